/**
 * The lists the API schemas enumerate, kept here so the schemas (and the client that shares
 * them) import nothing from the server. test/client/schemas.test.ts holds them equal to the
 * machines' own lists and to src/config.ts, so they cannot drift apart.
 */

/** The ticket phases of the default workflow, in order. */
export const PHASES = ['requirements', 'design', 'implementation', 'testing'] as const;

export const TASK_STATES = [
  'waiting',
  'pending',
  'claimed',
  'running',
  'retry_wait',
  'completed',
  'failed',
  'cancelled',
] as const;

export const TICKET_STATES = ['backlog', ...PHASES, 'done', 'blocked', 'cancelled'] as const;

/** The longest delay Node's timers hold: past 2^31-1 ms they overflow and fire at once. */
export const MAX_TIMER_MS = 2_147_483_647;
