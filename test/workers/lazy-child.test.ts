/**
 * The worker pool's logger per task is made at its first use: a task that never logs costs
 * no pino child; one that logs writes the same line a child would, bindings included.
 */
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { expect, it, vi } from 'vitest';
import { lazyChild } from '../../src/log.js';

function capture() {
  const lines: Record<string, unknown>[] = [];
  const out = new Writable({
    write(chunk, _enc, done) {
      for (const l of String(chunk).split('\n').filter(Boolean)) lines.push(JSON.parse(l));
      done();
    },
  });
  return { log: pino({ level: 'info', base: null }, out), lines };
}

it('makes no child until it is used', () => {
  const { log } = capture();
  const child = vi.spyOn(log, 'child');
  lazyChild(log, { taskId: 't1' });
  expect(child).not.toHaveBeenCalled();
});

it('logs with its bindings, through one child however often it logs', () => {
  const { log, lines } = capture();
  const child = vi.spyOn(log, 'child');
  const lazy = lazyChild(log, { taskId: 't1', attempt: 2 });
  lazy.warn({ event: 'COMPLETE' }, 'refused');
  lazy.info('again');
  lazy.debug('below the level: dropped');
  expect(child).toHaveBeenCalledTimes(1);
  expect(lines.map(({ time: _t, ...l }) => l)).toEqual([
    { level: 40, taskId: 't1', attempt: 2, event: 'COMPLETE', msg: 'refused' },
    { level: 30, taskId: 't1', attempt: 2, msg: 'again' },
  ]);
  expect(lazy.level).toBe('info');
  expect(lazy.isLevelEnabled('debug')).toBe(false);
});
