/**
 * The relay's publisher against the real NATS server: what each answer of the server becomes
 * (an ack, a duplicate, a refusal, an outage), many publishes in flight on one reply
 * subscription, and what is still waiting when it times out or closes.
 */
import { JetStreamApiError } from '@nats-io/jetstream';
import {
  ClosedConnectionError,
  connect,
  NoRespondersError,
  TimeoutError,
} from '@nats-io/transport-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { StreamPublisher } from '../../src/transport/stream-publisher.js';
import { ensureStreams } from '../../src/transport/streams.js';
import { eventSubject, type TransportNames } from '../../src/transport/subjects.js';
import { NATS_URL, type NatsAdmin, natsAdmin, testNames } from '../support/transport.js';

let admin: NatsAdmin;
let names: TransportNames;
const bytes = (s: string) => Buffer.from(s);

beforeAll(async () => {
  admin = await natsAdmin();
  names = testNames();
  await ensureStreams(admin.jsm, names);
});

afterAll(async () => {
  await admin.close([names]);
});

describe('StreamPublisher', () => {
  it('answers each of 2,000 publishes in flight with its own sequence, the message stored with its id and body', async () => {
    const p = new StreamPublisher(admin.nc, names.stream, 5_000);
    const acks = await Promise.all(
      Array.from({ length: 2_000 }, (_, i) =>
        p.publish(
          eventSubject(names, 'task', `tsk_${i % 50}`, 'task.claimed'),
          bytes(`{"i":${i}}`),
          `id-${i}`,
        ),
      ),
    );
    p.close();
    const seqs = acks.map((a) => a.seq);
    expect(new Set(seqs).size).toBe(2_000);
    expect(acks.every((a) => !a.duplicate)).toBe(true);
    // One connection: the stream stores them in the order they were sent.
    expect(seqs).toEqual([...seqs].sort((a, b) => a - b));
    const stored = await admin.jsm.streams.getMessage(names.stream, { seq: acks[1_234]!.seq });
    expect(stored?.header.get('Nats-Msg-Id')).toBe('id-1234');
    expect(stored?.header.get('Nats-Expected-Stream')).toBe(names.stream);
    expect(stored?.string()).toBe('{"i":1234}');
  });

  it('a repeated id is a duplicate with the first sequence', async () => {
    const p = new StreamPublisher(admin.nc, names.stream, 5_000);
    const subject = eventSubject(names, 'ticket', 'tkt_dup', 'ticket.created');
    const first = await p.publish(subject, bytes('{}'), 'dup-1');
    const again = await p.publish(subject, bytes('{"other":true}'), 'dup-1');
    p.close();
    expect(first.duplicate).toBe(false);
    expect(again).toEqual({ seq: first.seq, duplicate: true });
  });

  it('a refusal is a JetStreamApiError; no stream is NoResponders; no answer is a timeout', async () => {
    // Another stream's name expected: the server refuses the message.
    const wrong = new StreamPublisher(admin.nc, `${names.stream}_OTHER`, 2_000);
    await expect(
      wrong.publish(eventSubject(names, 'ticket', 'tkt_x', 'ticket.created'), bytes('{}'), 'w-1'),
    ).rejects.toBeInstanceOf(JetStreamApiError);
    wrong.close();

    const p = new StreamPublisher(admin.nc, names.stream, 300);
    // A subject no stream takes and nobody listens on.
    await expect(p.publish(`${names.prefix}_none.x`, bytes('{}'), 'n-1')).rejects.toBeInstanceOf(
      NoRespondersError,
    );
    // A subject a plain subscriber takes but never answers: the publish times out, alone.
    const silent = admin.nc.subscribe(`${names.prefix}_silent.x`);
    const started = Date.now();
    const [late, fine] = await Promise.allSettled([
      p.publish(`${names.prefix}_silent.x`, bytes('{}'), 's-1'),
      p.publish(eventSubject(names, 'ticket', 'tkt_y', 'ticket.created'), bytes('{}'), 's-2'),
    ]);
    silent.unsubscribe();
    p.close();
    expect(late.status === 'rejected' && late.reason).toBeInstanceOf(TimeoutError);
    expect(Date.now() - started).toBeGreaterThanOrEqual(300);
    expect(Date.now() - started).toBeLessThan(2_000);
    expect(fine.status).toBe('fulfilled');
  });

  it('closing (or losing the connection) rejects what is still waiting; later publishes fail at once', async () => {
    const nc = await connect({ servers: NATS_URL });
    const p = new StreamPublisher(nc, names.stream, 5_000);
    const silent = nc.subscribe(`${names.prefix}_silent2.x`);
    const waiting = p.publish(`${names.prefix}_silent2.x`, bytes('{}'), 'c-1');
    await nc.flush();
    expect(p.isClosed).toBe(false);
    await nc.close();
    await expect(waiting).rejects.toBeInstanceOf(ClosedConnectionError);
    // Its owner (the relay) makes a new one when this one can answer nothing more.
    expect(p.isClosed).toBe(true);
    await expect(
      p.publish(eventSubject(names, 'ticket', 'tkt_z', 'ticket.created'), bytes('{}'), 'c-2'),
    ).rejects.toBeInstanceOf(Error);
    silent.unsubscribe();

    const q = new StreamPublisher(admin.nc, names.stream, 5_000);
    const s2 = admin.nc.subscribe(`${names.prefix}_silent3.x`);
    const held = q.publish(`${names.prefix}_silent3.x`, bytes('{}'), 'c-3');
    q.close();
    expect(q.isClosed).toBe(true);
    await expect(held).rejects.toBeInstanceOf(ClosedConnectionError);
    await expect(
      q.publish(eventSubject(names, 'ticket', 'tkt_z', 'ticket.created'), bytes('{}'), 'c-4'),
    ).rejects.toBeInstanceOf(ClosedConnectionError);
    s2.unsubscribe();
  });

  it('an id or stream name with a line break is refused before anything is sent', async () => {
    expect(() => new StreamPublisher(admin.nc, 'A\r\nB', 1_000)).toThrow(/line break/);
    const p = new StreamPublisher(admin.nc, names.stream, 1_000);
    await expect(
      p.publish(
        eventSubject(names, 'ticket', 'tkt_h', 'ticket.created'),
        bytes('{}'),
        'x\r\nNats-Msg-Id: y',
      ),
    ).rejects.toThrow(/line break/);
    p.close();
  });
});
