export interface LatencyStats {
  count: number;
  perSecond: number;
  p50: number;
  p99: number;
}

export function percentile(sorted: number[], q: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? 0;
}

export const fmt = (n: number, digits = 1) => n.toFixed(digits).padStart(9);

/** Count, rate over `seconds`, p50 and p99 of latency samples (ms). Sorts `samples`. */
export function summarize(samples: number[], seconds: number): LatencyStats {
  samples.sort((a, b) => a - b);
  return {
    count: samples.length,
    perSecond: seconds > 0 ? samples.length / seconds : 0,
    p50: percentile(samples, 0.5),
    p99: percentile(samples, 0.99),
  };
}

/**
 * Of runs of one path that took turns with the runs of the path it is compared to, the run
 * with the median rate: its figures are reported together. Run once each, one after the
 * other, two paths' ratio moved with the machine's speed between them (BENCHMARKS section 31).
 */
export function medianRun<T extends { perSecond: number }>(runs: T[]): T {
  const sorted = [...runs].sort((a, b) => a.perSecond - b.perSecond);
  const run = sorted[Math.floor(sorted.length / 2)];
  if (!run) throw new Error('bench: no runs');
  return run;
}

/** Timed runs of each path of a comparison, taking turns (see `medianRun`). */
export const TURNS = 3;

/**
 * Runs every path TURNS times, the paths taking turns in the order given, and returns each
 * one's runs and its median run (`medianRun`).
 */
export async function inTurns<P extends Record<string, () => Promise<{ perSecond: number }>>>(
  paths: P,
): Promise<{
  median: { [K in keyof P]: Awaited<ReturnType<P[K]>> };
  runs: { [K in keyof P]: Awaited<ReturnType<P[K]>>[] };
}> {
  const keys = Object.keys(paths);
  const runs: Record<string, { perSecond: number }[]> = {};
  for (const k of keys) runs[k] = [];
  for (let turn = 0; turn < TURNS; turn++) {
    for (const k of keys) runs[k]?.push(await (paths[k] as P[keyof P])());
  }
  const median: Record<string, { perSecond: number }> = {};
  for (const k of keys) median[k] = medianRun(runs[k] ?? []);
  return { median, runs } as {
    median: { [K in keyof P]: Awaited<ReturnType<P[K]>> };
    runs: { [K in keyof P]: Awaited<ReturnType<P[K]>>[] };
  };
}

/**
 * Closed-loop load: `concurrency` loops call `step` back to back for `durationMs`; each
 * call's latency is a sample.
 */
export async function loop(
  concurrency: number,
  durationMs: number,
  step: (worker: number, i: number) => Promise<void>,
): Promise<LatencyStats & { samples: number[] }> {
  const latencies: number[] = [];
  const end = Date.now() + durationMs;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async (_, w) => {
      for (let i = 0; Date.now() < end; i++) {
        const t0 = performance.now();
        await step(w, i);
        latencies.push(performance.now() - t0);
      }
    }),
  );
  return { ...summarize(latencies, (performance.now() - started) / 1000), samples: latencies };
}

/** Runs `n` jobs with at most `concurrency` in flight; returns elapsed seconds. */
export async function pool(
  n: number,
  concurrency: number,
  job: (i: number) => Promise<void>,
): Promise<number> {
  const started = performance.now();
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.min(concurrency, n) }, async () => {
      while (next < n) await job(next++);
    }),
  );
  return (performance.now() - started) / 1000;
}

/** A fixed-width text table: the header row, a rule, then the rows. */
export function table(header: string[], rows: (string | number)[][]): string {
  const cells = [header, ...rows.map((r) => r.map(String))];
  const widths = header.map((_, i) => Math.max(...cells.map((r) => (r[i] ?? '').length)));
  const line = (r: string[]) =>
    r.map((c, i) => (i === 0 ? c.padEnd(widths[i] ?? 0) : c.padStart(widths[i] ?? 0))).join(' | ');
  return [
    line(header),
    widths.map((w) => '-'.repeat(w)).join('-|-'),
    ...cells.slice(1).map(line),
  ].join('\n');
}

export const n0 = (x: number) => Math.round(x).toLocaleString('en-US');
export const ms = (x: number) => (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));
export const ratio = (a: number, b: number) => (b > 0 ? (a / b).toFixed(2) : 'n/a');

export function sleep(msec: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, msec));
}

/** Polls `check` every `everyMs` until it is true; throws after `timeoutMs`. */
export async function until(
  check: () => boolean | Promise<boolean>,
  timeoutMs: number,
  what: string,
  everyMs = 5,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`bench: timed out waiting for ${what}`);
    await sleep(everyMs);
  }
}

export function print(text = ''): void {
  process.stdout.write(`${text}\n`);
}
