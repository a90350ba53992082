/**
 * Event subjects read back: the type a subject names is the one `eventSubject` put in it,
 * for any entity id (an unsafe one travels hashed), and anything that is not an event
 * subject of the same names says nothing.
 */
import { describe, expect, it } from 'vitest';
import { eventSubject, eventTypeOfSubject, transportNames } from '../../src/transport/subjects.js';

const names = transportNames('orch.tenant_a', 'ORCH_EVENTS');

describe('eventTypeOfSubject', () => {
  it('names the type eventSubject put in the subject, whatever the entity id', () => {
    for (const [entityType, id, type] of [
      ['task', 'tsk_01J', 'task.completed'],
      ['task', 'has.dots and spaces*', 'task.claimed'],
      ['ticket', 'tkt_9', 'ticket.phase_changed'],
    ] as const) {
      expect(eventTypeOfSubject(names, eventSubject(names, entityType, id, type))).toBe(type);
    }
  });

  it('says nothing of a subject that is not an event subject of these names', () => {
    const other = transportNames('orch.tenant_b', 'ORCH_EVENTS');
    for (const subject of [
      eventSubject(other, 'task', 'tsk_1', 'task.completed'),
      'orch.tenant_a.events.task.tsk_1',
      'orch.tenant_a.events.task.tsk_1.completed.extra',
      'orch.tenant_a.dispatch',
      '',
    ]) {
      expect(eventTypeOfSubject(names, subject)).toBeNull();
    }
  });
});
