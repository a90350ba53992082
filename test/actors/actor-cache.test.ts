/** The actor cache's bounds: least recently used rows go first, by count and by bytes. */
import { describe, expect, it } from 'vitest';
import { ActorCache, MAX_ENTRY_SHARE } from '../../src/actors/actor-cache.js';
import type { ActorRow } from '../../src/persistence/actor-rows.js';

const row = (id: string, version = 1): ActorRow => ({
  entityType: 'task',
  id,
  machineVersion: 1,
  snapshot: { value: 'pending', context: {}, status: 'active' } as never,
  version,
  seq: 1,
});

const keys = (cache: ActorCache, ids: string[]) => ids.filter((id) => cache.get(`task:${id}`));

describe('ActorCache', () => {
  it('evicts least recently used rows until the byte total is under the cap', () => {
    const cache = new ActorCache({ maxEntries: 1_000, maxBytes: 2_000 });
    for (const id of ['a', 'b', 'c', 'd']) cache.set(row(id), 100);
    expect(cache.bytes).toBe(400);
    cache.get('task:a'); // a is now the most recently used
    for (let i = 0; i < 19; i++) cache.set(row(`x${i}`), 100);
    expect(cache.bytes).toBeLessThanOrEqual(2_000);
    expect(cache.bytes).toBe(cache.size * 100);
    // b, c, d were the least recently used: they went first, a stayed.
    expect(keys(cache, ['a', 'b', 'c', 'd'])).toEqual(['a']);
    expect(cache.get('task:x18')?.id).toBe('x18');
  });

  it('keeps the byte total exact when a row is replaced, deleted or cleared', () => {
    const cache = new ActorCache({ maxEntries: 10, maxBytes: 10_000 });
    cache.set(row('a', 1), 300);
    cache.set(row('a', 2), 500);
    expect(cache.size).toBe(1);
    expect(cache.bytes).toBe(500);
    expect(cache.get('task:a')?.version).toBe(2);
    cache.set(row('b'), 200);
    cache.delete('task:a');
    cache.delete('task:a');
    expect(cache.bytes).toBe(200);
    cache.clear();
    expect([cache.size, cache.bytes]).toEqual([0, 0]);
  });

  it('never caches a row larger than its share of the cap, and drops the older version', () => {
    const cache = new ActorCache({ maxEntries: 10, maxBytes: 16_000 });
    const limit = 16_000 * MAX_ENTRY_SHARE;
    cache.set(row('big', 1), limit);
    expect(cache.get('task:big')?.version).toBe(1);
    cache.set(row('big', 2), limit + 1);
    expect(cache.get('task:big')).toBeUndefined();
    expect(cache.bytes).toBe(0);
  });

  it('still bounds the count, and a zero byte cap caches nothing', () => {
    const byCount = new ActorCache({ maxEntries: 2, maxBytes: 1_000_000 });
    for (const id of ['a', 'b', 'c']) byCount.set(row(id), 10);
    expect(keys(byCount, ['a', 'b', 'c'])).toEqual(['b', 'c']);
    expect(byCount.bytes).toBe(20);
    const off = new ActorCache({ maxEntries: 100, maxBytes: 0 });
    off.set(row('a'), 1);
    expect(off.size).toBe(0);
  });
});
