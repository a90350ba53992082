/**
 * The faults of a chaos run, one at a time at random intervals: kill -9 of an orchestrator
 * and its restart; NATS killed and restarted on the same port and store; every Postgres
 * backend of the orchestrators terminated; a process frozen (SIGSTOP) past its lease and
 * then resumed. Each is recorded with when it began and when the system was whole again.
 */
import type { Nats, Orchestrator, Sql } from './cluster.js';
import { errorText, note, type Rng, sleep } from './util.js';

export type FaultKind = 'kill -9' | 'nats restart' | 'pg terminate' | 'freeze';
export const FAULT_KINDS: readonly FaultKind[] = [
  'kill -9',
  'nats restart',
  'pg terminate',
  'freeze',
];

export interface Fault {
  kind: FaultKind;
  target: string;
  /** Worker ids that lost their process or were frozen (their claims must be reclaimed). */
  workerIds: string[];
  at: number;
  /** When the fault was undone (restart done, process resumed); `at` for instantaneous ones. */
  healedAt: number;
  detail: string;
}

export interface FaultOptions {
  leaseMs: number;
  /** Mean pause between faults. */
  meanGapMs: number;
}

export class FaultInjector {
  readonly faults: Fault[] = [];
  readonly errors: string[] = [];
  private running = false;
  private loop: Promise<void> | null = null;

  constructor(
    private readonly procs: Orchestrator[],
    private readonly nats: Nats,
    private readonly sql: Sql,
    private readonly dbName: string,
    private readonly rng: Rng,
    private readonly o: FaultOptions,
  ) {}

  start(): void {
    this.running = true;
    this.loop = this.run();
  }

  /** Stops injecting and waits for the fault under way to be undone. */
  async stop(): Promise<void> {
    this.running = false;
    await this.loop;
  }

  private async run(): Promise<void> {
    // Every kind early, then at random: a short run still sees each kind at least once.
    let queue = this.rng.shuffle(FAULT_KINDS);
    while (this.running) {
      await this.pause(this.o.meanGapMs * (0.5 + this.rng.next()));
      if (!this.running) break;
      if (queue.length === 0) queue = this.rng.shuffle([...FAULT_KINDS, 'kill -9', 'pg terminate']);
      const kind = queue.shift() as FaultKind;
      try {
        await this.inject(kind);
      } catch (error) {
        this.errors.push(`${kind}: ${errorText(error)}`);
        note(`fault ${kind} went wrong: ${errorText(error)}`);
      }
    }
  }

  private async pause(ms: number): Promise<void> {
    const end = Date.now() + ms;
    while (this.running && Date.now() < end) await sleep(Math.min(100, end - Date.now()));
  }

  async inject(kind: FaultKind): Promise<Fault> {
    const at = Date.now();
    let fault: Fault;
    switch (kind) {
      case 'kill -9': {
        const ready = this.procs.filter((x) => x.ready);
        if (ready.length === 0) throw new Error('no process is up to kill');
        const p = this.rng.pick(ready);
        const workerId = p.workerId;
        await p.kill();
        await sleep(this.rng.between(300, 1_500));
        await p.start();
        fault = {
          kind,
          target: p.name,
          workerIds: [workerId],
          at,
          healedAt: Date.now(),
          detail: `${workerId} → ${p.workerId}`,
        };
        break;
      }
      case 'nats restart': {
        const signal = this.rng.chance(0.7) ? 'SIGKILL' : 'SIGTERM';
        await this.nats.stop(signal);
        const downMs = this.rng.between(1_000, 3_000);
        await sleep(downMs);
        await this.nats.start();
        fault = {
          kind,
          target: 'nats-server',
          workerIds: [],
          at,
          healedAt: Date.now(),
          detail: `${signal}, down ${downMs} ms`,
        };
        break;
      }
      case 'pg terminate': {
        const rows = await this.sql<{ n: number }[]>`
          select count(pg_terminate_backend(pid))::int as n from pg_stat_activity
          where datname = ${this.dbName} and pid <> pg_backend_pid()
            and application_name <> 'chaos-harness'`;
        fault = {
          kind,
          target: 'postgres',
          workerIds: [],
          at,
          healedAt: Date.now(),
          detail: `${rows[0]?.n ?? 0} backends`,
        };
        break;
      }
      case 'freeze': {
        const ready = this.procs.filter((x) => x.ready);
        if (ready.length === 0) throw new Error('no process is up to freeze');
        const p = this.rng.pick(ready);
        const workerId = p.workerId;
        const frozenMs = this.o.leaseMs + this.rng.between(500, 1_500);
        p.freeze();
        await sleep(frozenMs);
        p.thaw();
        fault = {
          kind,
          target: p.name,
          workerIds: [workerId],
          at,
          healedAt: Date.now(),
          detail: `${workerId} stopped ${frozenMs} ms`,
        };
        break;
      }
    }
    this.faults.push(fault);
    note(`fault: ${fault.kind} ${fault.target} (${fault.detail})`);
    return fault;
  }
}
