/**
 * Relay positions compare as (transaction id, pos), the ids as 64-bit numbers given in
 * decimal text: compared without parsing, they must order as the numbers do, where the text
 * alone would not ('99' after '100').
 */
import { describe, expect, it } from 'vitest';
import { comparePositions, inRelayOrder } from '../../src/persistence/outbox-rows.js';

const at = (tx: string, pos: number) => ({ tx, pos });

describe('relay positions', () => {
  it('order transaction ids as numbers, then pos', () => {
    expect(comparePositions(at('99', 5), at('100', 1))).toBeLessThan(0);
    expect(comparePositions(at('100', 1), at('99', 5))).toBeGreaterThan(0);
    expect(comparePositions(at('4294967296', 1), at('4294967295', 9))).toBeGreaterThan(0);
    expect(comparePositions(at('18446744073709551615', 1), at('9', 1))).toBeGreaterThan(0);
    expect(comparePositions(at('120', 3), at('120', 7))).toBeLessThan(0);
    expect(comparePositions(at('120', 7), at('120', 7))).toBe(0);
  });

  it('leave items already in order as they are, and sort any that are not', () => {
    const ordered = [at('99', 4), at('99', 8), at('100', 2), at('1000', 1)];
    expect(inRelayOrder(ordered)).toBe(ordered);
    const shuffled = [at('1000', 1), at('99', 8), at('100', 2), at('99', 4)];
    expect(inRelayOrder(shuffled)).toEqual([at('99', 4), at('99', 8), at('100', 2), at('1000', 1)]);
    expect(inRelayOrder([])).toEqual([]);
  });
});
