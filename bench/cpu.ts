/**
 * CPU time of the processes a figure depends on, read from /proc (Linux): the Postgres
 * server (every `postgres` process), nats-server, and one process by pid. On a 2-core machine
 * shared by the queue, its database and the load generator, CPU per job says where the time
 * goes better than jobs/s alone. Elsewhere (no /proc) every reading is null.
 */
import { readdirSync, readFileSync } from 'node:fs';

/** Clock ticks per second of /proc's utime and stime (USER_HZ, 100 on Linux). */
const TICKS = 100;

export interface CpuReading {
  /** CPU seconds (user + system) by process name, and by `pid:<n>` for the pid asked. */
  seconds: Record<string, number>;
}

function ticksOf(pid: string): { comm: string; ticks: number } | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const end = stat.lastIndexOf(')');
    const comm = stat.slice(stat.indexOf('(') + 1, end);
    const fields = stat.slice(end + 2).split(' ');
    // Fields 14 and 15 of stat(5), utime and stime, are the 12th and 13th after the name.
    return { comm, ticks: Number(fields[11]) + Number(fields[12]) };
  } catch {
    return null;
  }
}

/** CPU seconds used so far by Postgres, nats-server and `pid` (when given). */
export function readCpu(pid?: number): CpuReading | null {
  let dirs: string[];
  try {
    dirs = readdirSync('/proc');
  } catch {
    return null;
  }
  const seconds: Record<string, number> = { postgres: 0, 'nats-server': 0 };
  for (const d of dirs) {
    if (!/^\d+$/.test(d)) continue;
    const t = ticksOf(d);
    if (!t) continue;
    if (t.comm === 'postgres' || t.comm === 'nats-server') {
      seconds[t.comm] = (seconds[t.comm] ?? 0) + t.ticks / TICKS;
    }
    if (pid !== undefined && Number(d) === pid) seconds[`pid:${pid}`] = t.ticks / TICKS;
  }
  return { seconds };
}

/** CPU seconds used between two readings, by the same keys. */
export function cpuSince(
  before: CpuReading | null,
  after: CpuReading | null,
): Record<string, number> {
  if (!before || !after) return {};
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(after.seconds)) out[k] = v - (before.seconds[k] ?? 0);
  return out;
}
