/**
 * The `sleep` executor: waits `payload.ms` (default 0; an integer up to MAX_TIMER_MS, else
 * the task fails), abortably. With `payload.fail` (a
 * string) it fails with that message after the wait, which demos and tests use for retries.
 */
import type { TaskView } from '../../actors/views.js';
import { type ExecutionContext, ExecutionFailed, type Executor, timerMs } from './executor.js';

export class SleepExecutor implements Executor {
  readonly name = 'sleep';

  async run(task: TaskView, ctx: ExecutionContext) {
    const payload = (task.payload ?? {}) as { ms?: unknown; fail?: unknown };
    const ms =
      payload.ms === undefined || payload.ms === null ? 0 : timerMs('payload.ms', payload.ms, 0);
    await abortableSleep(ms, ctx.signal);
    if (typeof payload.fail === 'string') throw new ExecutionFailed(payload.fail);
    return { result: { sleptMs: ms } };
  }
}

function abortableSleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const aborted = () =>
      new ExecutionFailed(`aborted: ${String(signal.reason ?? 'aborted')}`, { aborted: true });
    if (signal.aborted) return reject(aborted());
    // Nothing to wait for: a timer of 0 ms would still wait a millisecond (Node's minimum).
    if (ms === 0) return resolve();
    const onAbort = () => {
      clearTimeout(timer);
      reject(aborted());
    };
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal.addEventListener('abort', onAbort, { once: true });
  });
}
