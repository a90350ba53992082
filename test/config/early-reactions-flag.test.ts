/** EARLY_REACTIONS: on unless turned off, and a value that is no flag stops the start. */
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../../src/config.js';

describe('EARLY_REACTIONS', () => {
  it('is on by default and when empty', () => {
    expect(loadConfig({}).EARLY_REACTIONS).toBe(true);
    expect(loadConfig({ EARLY_REACTIONS: '' }).EARLY_REACTIONS).toBe(true);
    expect(loadConfig({ EARLY_REACTIONS: 'true' }).EARLY_REACTIONS).toBe(true);
  });

  it('is off with 0 or false', () => {
    expect(loadConfig({ EARLY_REACTIONS: '0' }).EARLY_REACTIONS).toBe(false);
    expect(loadConfig({ EARLY_REACTIONS: 'false' }).EARLY_REACTIONS).toBe(false);
  });

  it('refuses anything else, naming the variable', () => {
    expect(() => loadConfig({ EARLY_REACTIONS: 'yes' })).toThrow(ConfigError);
    expect(() => loadConfig({ EARLY_REACTIONS: 'yes' })).toThrow(/EARLY_REACTIONS="yes"/);
  });
});
