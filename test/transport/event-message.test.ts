/** What a message body must hold before the consumer looks its event up in Postgres. */
import { describe, expect, it } from 'vitest';
import { parseEventMessage } from '../../src/transport/consumer-runner.js';

const body = (over: Record<string, unknown> = {}) =>
  JSON.stringify({
    pos: 1,
    eventId: '0b5f4a8e-2c1d-4e6f-9a7b-3c2d1e0f9a8b',
    seq: 3,
    entityId: 'tsk_1',
    entityType: 'task',
    type: 'task.completed',
    data: {},
    at: '2026-01-01T00:00:00.000Z',
    ...over,
  });

describe('parseEventMessage', () => {
  it('takes a well-formed event message', () => {
    expect(parseEventMessage(body())?.seq).toBe(3);
  });

  it('refuses what Postgres could not look up, so it is forged rather than retried', () => {
    // The log's seq is an int; a NUL cannot be in a text parameter.
    expect(parseEventMessage(body({ seq: 2_147_483_648 }))).toBeNull();
    expect(parseEventMessage(body({ seq: 2_147_483_647 }))?.seq).toBe(2_147_483_647);
    expect(parseEventMessage(body({ entityId: 'tsk_\u0000' }))).toBeNull();
    expect(parseEventMessage(body({ seq: 0 }))).toBeNull();
    expect(parseEventMessage(body({ eventId: 'not-a-uuid' }))).toBeNull();
    expect(parseEventMessage('{')).toBeNull();
  });
});
