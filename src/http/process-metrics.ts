/**
 * The process's own health in Prometheus text, under the names prom-client's default metrics
 * use (so existing dashboards and alerts apply): CPU, resident memory, V8 heap, open file
 * descriptors, active handles and event-loop delay. A process meant to run for months is
 * watched for a slope in these, not for a single value.
 */
import { readdir } from 'node:fs/promises';
import { type IntervalHistogram, monitorEventLoopDelay } from 'node:perf_hooks';
import { family } from './metrics.js';

const START_SECONDS = Math.round(Date.now() / 1000 - process.uptime());

/** Event-loop delay, sampled every 20 ms; one per process, from the first app on. */
let loopDelay: IntervalHistogram | null = null;

/** Starts sampling the event-loop delay (once per process; the sampler is unreferenced). */
export function watchEventLoop(): IntervalHistogram {
  if (loopDelay === null) {
    loopDelay = monitorEventLoopDelay({ resolution: 20 });
    loopDelay.enable();
  }
  return loopDelay;
}

/** Open descriptors from /proc (Linux); null where there is no /proc. */
async function openFds(): Promise<number | null> {
  try {
    return (await readdir('/proc/self/fd')).length;
  } catch {
    return null;
  }
}

export async function processMetrics(): Promise<string> {
  const delay = watchEventLoop();
  const cpu = process.cpuUsage();
  const mem = process.memoryUsage();
  const fds = await openFds();
  // Delay since the previous scrape (as prom-client resets it): a burst shows in the next.
  const ns = (v: number) => (Number.isFinite(v) ? v / 1e9 : 0);
  const lag = { p50: ns(delay.percentile(50)), p99: ns(delay.percentile(99)), max: ns(delay.max) };
  delay.reset();
  return [
    family('process_cpu_user_seconds_total', 'counter', 'User CPU time spent, seconds.', [
      { value: cpu.user / 1e6 },
    ]),
    family('process_cpu_system_seconds_total', 'counter', 'System CPU time spent, seconds.', [
      { value: cpu.system / 1e6 },
    ]),
    family('process_start_time_seconds', 'gauge', 'Start time since the epoch, seconds.', [
      { value: START_SECONDS },
    ]),
    family('process_resident_memory_bytes', 'gauge', 'Resident memory, bytes.', [
      { value: mem.rss },
    ]),
    ...(fds === null
      ? []
      : [family('process_open_fds', 'gauge', 'Open file descriptors.', [{ value: fds }])]),
    family('nodejs_heap_size_used_bytes', 'gauge', 'V8 heap in use, bytes.', [
      { value: mem.heapUsed },
    ]),
    family('nodejs_heap_size_total_bytes', 'gauge', 'V8 heap reserved, bytes.', [
      { value: mem.heapTotal },
    ]),
    family('nodejs_external_memory_bytes', 'gauge', 'Memory outside the heap (buffers), bytes.', [
      { value: mem.external },
    ]),
    family(
      'nodejs_active_resources',
      'gauge',
      'Handles and requests keeping the event loop alive (sockets, timers, ...).',
      [{ value: process.getActiveResourcesInfo().length }],
    ),
    family('nodejs_eventloop_lag_p50_seconds', 'gauge', 'Event-loop delay p50, seconds.', [
      { value: lag.p50 },
    ]),
    family('nodejs_eventloop_lag_p99_seconds', 'gauge', 'Event-loop delay p99, seconds.', [
      { value: lag.p99 },
    ]),
    family('nodejs_eventloop_lag_max_seconds', 'gauge', 'Event-loop delay max, seconds.', [
      { value: lag.max },
    ]),
  ].join('');
}
