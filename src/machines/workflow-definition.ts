/**
 * A workflow definition as plain types (CONTRACT section 5): what the ticket-machine factory
 * compiles. The zod schema that checks user input against these types is
 * `src/workflows/definition.ts`; machines stay free of it (they import only xstate).
 */
import type { Json } from './domain-events.js';
import { PHASES } from './phases.js';

/** Node's timers overflow past this and fire at once; copied from config (machines are pure). */
export const MAX_TIMER_MS = 2_147_483_647;

export interface TaskTemplate {
  /** Unique in its phase; `dependsOn` refers to it. */
  key: string;
  type: string;
  executor?: string;
  payload?: Json;
  maxAttempts?: number;
  priority?: number;
  /** `{{ticket.id}}` is replaced by the ticket's id when the task is created. */
  worktree?: string;
  dependsOn?: string[];
}

/** A rework loop: go back to `sendBackTo` (this or an earlier phase) at most `maxLoops` times. */
export interface LoopRule {
  sendBackTo: string;
  maxLoops: number;
}

export type OnTimeout = 'approve' | 'reject' | 'block';

export interface WorkPhase {
  name: string;
  tasks?: TaskTemplate[];
  onFail?: LoopRule;
}

export interface GatePhase {
  name: string;
  approval: { timeoutMs?: number; onTimeout?: OnTimeout };
  onReject?: LoopRule;
}

export type PhaseDefinition = WorkPhase | GatePhase;

export interface WorkflowDefinition {
  name: string;
  description?: string;
  phases: PhaseDefinition[];
}

export function isGate(phase: PhaseDefinition): phase is GatePhase {
  return 'approval' in phase && phase.approval !== undefined;
}

/** CONTRACT section 1: the built-in workflow, four work phases without templates. */
export const DEFAULT_WORKFLOW: WorkflowDefinition = {
  name: 'default',
  description: 'requirements, design, implementation, testing',
  phases: PHASES.map((name) => ({ name })),
};
