/** IDEMPOTENCY_KEY_TTL_MS: a day by default, 0 keeps keys forever, at most a year. */
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../../src/config.js';

describe('IDEMPOTENCY_KEY_TTL_MS', () => {
  it('is a day unless set, and may be 0', () => {
    expect(loadConfig({}).IDEMPOTENCY_KEY_TTL_MS).toBe(86_400_000);
    expect(loadConfig({ IDEMPOTENCY_KEY_TTL_MS: '0' }).IDEMPOTENCY_KEY_TTL_MS).toBe(0);
    expect(loadConfig({ IDEMPOTENCY_KEY_TTL_MS: '604800000' }).IDEMPOTENCY_KEY_TTL_MS).toBe(
      604_800_000,
    );
  });

  it('refuses a negative, fractional or over-a-year value, naming the variable', () => {
    for (const bad of ['-1', '1.5', '31536000001', 'day']) {
      expect(() => loadConfig({ IDEMPOTENCY_KEY_TTL_MS: bad })).toThrow(ConfigError);
      expect(() => loadConfig({ IDEMPOTENCY_KEY_TTL_MS: bad })).toThrow(/IDEMPOTENCY_KEY_TTL_MS/);
    }
  });
});
