/**
 * The default workflow's phases, in order. A user workflow names its own (any string that
 * its definition allows), so machine-level code takes a phase as a `string`.
 */

export const PHASES = ['requirements', 'design', 'implementation', 'testing'] as const;
export type Phase = (typeof PHASES)[number];

export function isPhase(value: unknown): value is Phase {
  return typeof value === 'string' && (PHASES as readonly string[]).includes(value);
}

/** The state a ticket enters when it leaves `phase` forward: the next phase, or `done`. */
export function nextPhaseState(phase: Phase): Phase | 'done' {
  const i = PHASES.indexOf(phase);
  return PHASES[i + 1] ?? 'done';
}
