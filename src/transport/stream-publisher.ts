/**
 * Publishes to one JetStream stream with a message id, answering each publish with its ack,
 * for a caller that keeps many publishes in flight (the relay).
 *
 * `js.publish` does the same one message at a time: each call builds a request with its own
 * timer, registers it in the connection's shared reply subscription and parses the ack with a
 * fresh decoder. Here the publishes share one reply subscription of their own (a reply
 * subject per publish: `<inbox>.<n>`), one sweep of expired publishes for all of them, and
 * a header block encoded once per publish without re-validating the two fixed keys. What
 * goes over the wire is what `js.publish(subject, data, {msgID, expect: {streamName}})`
 * sends, and the answers mean the same: the server's error becomes a `JetStreamApiError`
 * (a refusal), while a timeout, "no responders" (no stream took the subject) and a closed
 * connection are outages.
 */
import { JetStreamApiError } from '@nats-io/jetstream';
import {
  ClosedConnectionError,
  createInbox,
  type Msg,
  type MsgHdrs,
  type NatsConnection,
  NoRespondersError,
  type Subscription,
  TimeoutError,
} from '@nats-io/transport-node';

export interface StreamAck {
  seq: number;
  duplicate: boolean;
}

interface Pending {
  resolve: (ack: StreamAck) => void;
  reject: (error: Error) => void;
  subject: string;
  deadline: number;
}

const DECODER = new TextDecoder();

/**
 * The header block of one publish. The client only asks a message's headers to encode
 * themselves; these two values are a stream name and an event id, checked where they are
 * made, so the generic header map's per-key checks are not needed here.
 */
class PublishHeaders {
  constructor(private readonly bytes: Uint8Array) {}
  encode(): Uint8Array {
    return this.bytes;
  }
}

/** Ids and stream names never hold line breaks; one that did would forge a header. */
function headerSafe(value: string): string {
  if (/[\r\n]/.test(value)) throw new TypeError(`header value holds a line break: ${value}`);
  return value;
}

export class StreamPublisher {
  private readonly inbox: string;
  private readonly sub: Subscription;
  private readonly pending = new Map<number, Pending>();
  private readonly headerTail: string;
  private next = 0;
  private sweep: NodeJS.Timeout | null = null;
  private closed = false;

  constructor(
    private readonly nc: NatsConnection,
    stream: string,
    private readonly timeoutMs: number,
  ) {
    this.headerTail = `\r\nNats-Expected-Stream: ${headerSafe(stream)}\r\n\r\n`;
    this.inbox = createInbox();
    this.sub = nc.subscribe(`${this.inbox}.*`, { callback: (err, msg) => this.answer(err, msg) });
    // However the subscription ended (closed here, the connection closed, the server refused
    // it), nothing more will be answered: the owner makes a new publisher.
    void this.sub.closed.then(() => {
      this.closed = true;
      this.failAll(new ClosedConnectionError());
    });
  }

  /** True once it can answer nothing more (see the constructor). */
  get isClosed(): boolean {
    return this.closed;
  }

  /** Resolves with the stream's ack; rejects as described above. */
  publish(subject: string, payload: Uint8Array, msgId: string): Promise<StreamAck> {
    if (this.closed) return Promise.reject(new ClosedConnectionError());
    const n = this.next++;
    return new Promise<StreamAck>((resolve, reject) => {
      this.pending.set(n, { resolve, reject, subject, deadline: Date.now() + this.timeoutMs });
      try {
        const headers = new PublishHeaders(
          Buffer.from(`NATS/1.0\r\nNats-Msg-Id: ${headerSafe(msgId)}${this.headerTail}`),
        );
        this.nc.publish(subject, payload, {
          reply: `${this.inbox}.${n}`,
          headers: headers as unknown as MsgHdrs,
        });
      } catch (error) {
        this.pending.delete(n);
        reject(error as Error);
        return;
      }
      this.armSweep();
    });
  }

  /** Rejects every publish still waiting and stops listening for answers. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.failAll(new ClosedConnectionError());
    try {
      this.sub.unsubscribe();
    } catch {
      // The connection is already closed.
    }
  }

  private answer(err: Error | null, msg: Msg): void {
    if (err) {
      this.failAll(err);
      return;
    }
    const n = Number(msg.subject.slice(this.inbox.length + 1));
    const p = this.pending.get(n);
    if (!p) return; // answered after its timeout
    this.pending.delete(n);
    if (msg.headers?.code === 503) {
      p.reject(new NoRespondersError(p.subject));
      return;
    }
    let body: {
      seq?: number;
      duplicate?: boolean;
      stream?: string;
      error?: { code: number; err_code: number; description: string };
    };
    try {
      body = JSON.parse(DECODER.decode(msg.data));
    } catch {
      p.reject(new Error(`invalid ack from JetStream for ${p.subject}`));
      return;
    }
    if (body.error) p.reject(new JetStreamApiError(body.error));
    else if (typeof body.seq !== 'number' || !body.stream)
      p.reject(new Error(`invalid ack from JetStream for ${p.subject}`));
    else p.resolve({ seq: body.seq, duplicate: body.duplicate === true });
  }

  /** One timer for every publish in flight: they expire in the order they were sent. */
  private armSweep(): void {
    if (this.sweep) return;
    this.sweep = setTimeout(
      () => {
        this.sweep = null;
        const now = Date.now();
        for (const [n, p] of this.pending) {
          if (p.deadline > now) break;
          this.pending.delete(n);
          p.reject(new TimeoutError());
        }
        if (this.pending.size > 0) this.armSweep();
      },
      Math.max(10, Math.min(250, this.timeoutMs / 4)),
    );
    this.sweep.unref();
  }

  private failAll(error: Error): void {
    for (const p of this.pending.values()) p.reject(error);
    this.pending.clear();
    if (this.sweep) clearTimeout(this.sweep);
    this.sweep = null;
  }
}
