/** Builders for tests: inputs with the runtime's defaults filled in. */
import { randomUUID } from 'node:crypto';
import type { TaskDefaults } from '../../src/actors/host.js';
import type { Phase } from '../../src/machines/phases.js';
import type { TaskInput } from '../../src/machines/task.js';
import type { TicketInput } from '../../src/machines/ticket.js';

export const TASK_DEFAULTS: TaskDefaults = { maxAttempts: 3, leaseMs: 30_000, retryBaseMs: 1_000 };

export function ticketInput(over: Partial<TicketInput> = {}): TicketInput {
  return {
    id: `tk-${randomUUID()}`,
    title: 'A ticket',
    stuckAfterMs: 3_600_000,
    diagnosticCooldownMs: 3_600_000,
    ...over,
  };
}

export function taskInput(ticketId: string, over: Partial<TaskInput> = {}): TaskInput {
  return {
    id: `ts-${randomUUID()}`,
    ticketId,
    type: 'implement_feature',
    phase: 'requirements' as Phase,
    ...TASK_DEFAULTS,
    ...over,
  };
}
