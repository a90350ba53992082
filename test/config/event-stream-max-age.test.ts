/** EVENT_STREAM_MAX_AGE_MS: 7 days by default, 0 keeps events forever, else at least an hour. */
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../../src/config.js';

describe('EVENT_STREAM_MAX_AGE_MS', () => {
  it('is 7 days unless set, and may be 0 or an hour or more', () => {
    expect(loadConfig({}).EVENT_STREAM_MAX_AGE_MS).toBe(604_800_000);
    expect(loadConfig({ EVENT_STREAM_MAX_AGE_MS: '0' }).EVENT_STREAM_MAX_AGE_MS).toBe(0);
    expect(loadConfig({ EVENT_STREAM_MAX_AGE_MS: '3600000' }).EVENT_STREAM_MAX_AGE_MS).toBe(
      3_600_000,
    );
  });

  it('refuses under an hour (shorter than consumers may lag), negative, fractional or over ten years', () => {
    for (const bad of ['1', '3599999', '-1', '1.5', '315360000001', 'week']) {
      expect(() => loadConfig({ EVENT_STREAM_MAX_AGE_MS: bad })).toThrow(ConfigError);
      expect(() => loadConfig({ EVENT_STREAM_MAX_AGE_MS: bad })).toThrow(/EVENT_STREAM_MAX_AGE_MS/);
    }
  });
});
