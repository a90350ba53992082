/** Ids of new entities: UUIDv7, ordered by creation time, unique. */
import { describe, expect, it } from 'vitest';
import { uuidv7 } from '../../src/actors/ids.js';

const FORMAT = /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

describe('uuidv7', () => {
  it('is a version 7, variant 10 UUID carrying its millisecond', () => {
    const at = Date.UTC(2026, 11, 7, 5, 40, 1, 234);
    const id = uuidv7(at);
    expect(id).toMatch(FORMAT);
    expect(Number.parseInt(id.replace(/-/g, '').slice(0, 12), 16)).toBe(at);
    expect(uuidv7(0).startsWith('00000000-0000-7')).toBe(true);
    expect(
      Number.parseInt(
        uuidv7(2 ** 48 - 1)
          .replace(/-/g, '')
          .slice(0, 12),
        16,
      ),
    ).toBe(2 ** 48 - 1);
  });

  it('sorts by creation time, as text too', () => {
    const ids = [5, 1_000, 1_001, 70_000, 2 ** 33, Date.now()].map((t) => uuidv7(t));
    expect([...ids].sort()).toEqual(ids);
  });

  it('never repeats, within one millisecond or across the pool refills', () => {
    const at = Date.now();
    const ids = Array.from({ length: 100_000 }, () => uuidv7(at));
    expect(new Set(ids).size).toBe(ids.length);
    for (const id of ids.slice(0, 2_000)) expect(id).toMatch(FORMAT);
  });
});
