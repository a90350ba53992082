/**
 * The `sleep` executor: waits `payload.ms` on a timer, except that 0 ms (the default) waits
 * for nothing (a timer of 0 ms would still wait Node's minimum of a millisecond); an aborted
 * signal fails it at once, and `payload.fail` fails it after the wait.
 */
import { afterEach, describe, expect, it, vi } from 'vitest';
import type { TaskView } from '../../src/actors/views.js';
import { silentLogger } from '../../src/log.js';
import type { ExecutionContext } from '../../src/workers/executors/executor.js';
import { SleepExecutor } from '../../src/workers/executors/sleep.js';

const sleep = new SleepExecutor();

function task(payload: unknown): TaskView {
  return { id: 'task-1', payload } as TaskView;
}

function context(signal = new AbortController().signal): ExecutionContext {
  return { signal, attempt: 1, token: 'tok', log: silentLogger() };
}

/** Whether `p` settles before the pending microtasks and this turn's immediates have run. */
async function settlesNow(p: Promise<unknown>): Promise<boolean> {
  let settled = false;
  p.then(
    () => {
      settled = true;
    },
    () => {
      settled = true;
    },
  );
  await new Promise<void>((resolve) => setImmediate(resolve));
  return settled;
}

afterEach(() => {
  vi.useRealTimers();
});

describe('sleep executor', () => {
  it('with 0 ms (or no ms) it sets no timer and completes at once', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout'] });
    for (const payload of [{ ms: 0 }, {}, null]) {
      const run = sleep.run(task(payload), context());
      expect(await settlesNow(run)).toBe(true);
      expect(await run).toEqual({ result: { sleptMs: 0 } });
    }
    expect(vi.getTimerCount()).toBe(0);
  });

  it('waits its milliseconds on a timer', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout'] });
    const run = sleep.run(task({ ms: 50 }), context());
    expect(await settlesNow(run)).toBe(false);
    vi.advanceTimersByTime(50);
    expect(await run).toEqual({ result: { sleptMs: 50 } });
  });

  it('an aborted signal fails it, with 0 ms too; `fail` fails it after the wait', async () => {
    const aborted = new AbortController();
    aborted.abort('lease lost');
    await expect(sleep.run(task({ ms: 0 }), context(aborted.signal))).rejects.toThrow(
      'aborted: lease lost',
    );
    await expect(sleep.run(task({ ms: 0, fail: 'boom' }), context())).rejects.toThrow('boom');
    await expect(sleep.run(task({ ms: -1 }), context())).rejects.toThrow('payload.ms');
  });
});
