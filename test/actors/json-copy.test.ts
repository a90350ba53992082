/**
 * `jsonCopy` replaces a JSON round trip in every decide: what it returns is what the row
 * stores and what the actor cache serves, so it must equal the round trip for any value.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { decide, decideInitial, jsonCopy } from '../../src/actors/decide.js';

const roundTrip = (v: unknown) => {
  const text = JSON.stringify(v);
  return text === undefined ? undefined : JSON.parse(text);
};

describe('jsonCopy', () => {
  it('equals JSON.parse(JSON.stringify(v)) for any value JSON can write', () => {
    fc.assert(
      fc.property(
        fc.anything({
          withDate: true,
          withNullPrototype: true,
          withBoxedValues: true,
          withSparseArray: true,
          withObjectString: true,
          withMap: true,
          withSet: true,
        }),
        (v) => {
          expect(jsonCopy(v)).toStrictEqual(roundTrip(v));
        },
      ),
      { numRuns: 2_000 },
    );
  });

  it('keeps what a round trip keeps of the awkward cases', () => {
    const hostile = JSON.parse('{"__proto__": {"polluted": true}, "a": 1}');
    const cases: unknown[] = [
      hostile,
      { nested: hostile },
      { a: undefined, b: () => 1, c: Symbol('s'), d: Number.NaN, e: -0, f: Infinity },
      [undefined, () => 1, Number.NEGATIVE_INFINITY],
      { at: new Date(0), big: { toJSON: () => 'custom' } },
    ];
    for (const v of cases) expect(jsonCopy(v)).toStrictEqual(roundTrip(v));
    const copy = jsonCopy(hostile) as Record<string, unknown>;
    expect(Object.getPrototypeOf(copy)).toBe(Object.prototype);
    expect(Object.hasOwn(copy, '__proto__')).toBe(true);
  });

  it('throws where JSON throws', () => {
    expect(() => jsonCopy({ n: 1n })).toThrow(TypeError);
  });

  it('gives the snapshot that XState and a round trip give', async () => {
    const { taskMachine } = await import('../../src/machines/task.js');
    const created = decideInitial('task', {
      id: 't-1',
      ticketId: 'tk-1',
      type: 'x',
      phase: 'design',
      maxAttempts: 3,
      leaseMs: 30_000,
      retryBaseMs: 1_000,
      at: 0,
    });
    const claimed = decide('task', 't-1', created.snapshot, {
      type: 'CLAIM',
      workerId: 'w',
      token: 'tok',
      at: 1,
    });
    const started = decide('task', 't-1', claimed.snapshot, { type: 'START', token: 'tok', at: 2 });
    const completed = decide('task', 't-1', started.snapshot, {
      type: 'COMPLETE',
      token: 'tok',
      result: { ok: true, nothing: undefined },
      at: 2,
    });
    for (const d of [created, claimed, started, completed]) {
      const live = taskMachine.resolveState({
        value: d.snapshot.value,
        context: d.snapshot.context,
      } as never);
      expect(d.snapshot).toStrictEqual(roundTrip(taskMachine.getPersistedSnapshot(live)));
    }
    expect((completed.snapshot.context as { result: unknown }).result).toStrictEqual({ ok: true });
  });
});
