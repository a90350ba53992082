/**
 * The workflow definition users post (CONTRACT section 5), as a strict zod schema: every
 * string, list and number is bounded, unknown fields are refused. Structural rules that need
 * the whole definition (reachability, `sendBackTo` order, `dependsOn` cycles) are checked by
 * `verifyWorkflow` on the compiled machine, not here.
 */
import { z } from 'zod';
import type { Json } from '../machines/domain-events.js';
import { MAX_TIMER_MS, type WorkflowDefinition } from '../machines/workflow-definition.js';

export type {
  GatePhase,
  LoopRule,
  OnTimeout,
  PhaseDefinition,
  TaskTemplate,
  WorkflowDefinition,
  WorkPhase,
} from '../machines/workflow-definition.js';
export { DEFAULT_WORKFLOW, isGate, MAX_TIMER_MS } from '../machines/workflow-definition.js';

/** The largest definition body accepted, in bytes (CONTRACT section 5). */
export const WORKFLOW_BODY_LIMIT_BYTES = 64 * 1024;
export const MAX_PHASES = 32;
export const MAX_TEMPLATES_PER_PHASE = 32;
export const MAX_LOOPS = 100;
export const MAX_DEPENDS_ON = 32;

export const WORKFLOW_NAME_PATTERN = /^[a-z][a-z0-9_-]{0,63}$/;
export const PHASE_NAME_PATTERN = /^[a-z][a-z0-9_]{0,39}$/;
/** States every ticket machine has; a phase may not take their names. */
export const RESERVED_STATE_NAMES = ['backlog', 'blocked', 'done', 'cancelled'] as const;

/** Task types and executors: the same alphabet as the tasks route's names. */
const name = z.string().regex(/^[A-Za-z0-9_.:#-]{1,100}$/, 'letters, digits and _ . : # - only');
const templateKey = z.string().regex(/^[A-Za-z0-9_-]{1,64}$/, 'letters, digits, _ and - only');
const phaseName = z
  .string()
  .regex(PHASE_NAME_PATTERN, 'a phase name is ^[a-z][a-z0-9_]{0,39}$')
  .refine((n) => !(RESERVED_STATE_NAMES as readonly string[]).includes(n), {
    message: `a phase may not be named ${RESERVED_STATE_NAMES.join(', ')}`,
  });

const loopRule = z.strictObject({
  sendBackTo: phaseName,
  maxLoops: z.int().min(1).max(MAX_LOOPS),
});

export const TaskTemplateSchema = z.strictObject({
  key: templateKey,
  type: name,
  executor: name.optional(),
  payload: z.json().optional() as z.ZodOptional<z.ZodType<Json>>,
  maxAttempts: z.int().min(1).max(100).optional(),
  priority: z.int().min(-1000).max(1000).optional(),
  worktree: z.string().min(1).max(500).optional(),
  dependsOn: z.array(templateKey).max(MAX_DEPENDS_ON).optional(),
});

export const WorkPhaseSchema = z.strictObject({
  name: phaseName,
  tasks: z.array(TaskTemplateSchema).max(MAX_TEMPLATES_PER_PHASE).optional(),
  onFail: loopRule.optional(),
});

export const GatePhaseSchema = z.strictObject({
  name: phaseName,
  approval: z.strictObject({
    timeoutMs: z.int().min(1).max(MAX_TIMER_MS).optional(),
    onTimeout: z.enum(['approve', 'reject', 'block']).optional(),
  }),
  onReject: loopRule.optional(),
});

/** A phase with `approval` is a gate, else a work phase; a gate takes no `tasks`/`onFail`. */
const PhaseSchema = z.union([GatePhaseSchema, WorkPhaseSchema]);

export const WorkflowDefinitionSchema = z.strictObject({
  name: z.string().regex(WORKFLOW_NAME_PATTERN, 'a workflow name is ^[a-z][a-z0-9_-]{0,63}$'),
  description: z.string().max(2_000).optional(),
  phases: z.array(PhaseSchema).min(1).max(MAX_PHASES),
});

// The schema's output must be a definition the factory accepts.
const _fits: (d: z.output<typeof WorkflowDefinitionSchema>) => WorkflowDefinition = (d) => d;
void _fits;

/** A finding: what is wrong and where (`phases[1].onReject.sendBackTo`). */
export interface Finding {
  path: string;
  message: string;
}

/** zod's path as the contract writes it: `phases[1].tasks[0].key`. */
export function formatPath(path: readonly PropertyKey[]): string {
  let out = '';
  for (const p of path) {
    if (typeof p === 'number') out += `[${p}]`;
    else out += out === '' ? String(p) : `.${String(p)}`;
  }
  return out;
}

export type ParseResult =
  | { ok: true; definition: WorkflowDefinition }
  | { ok: false; findings: Finding[] };

/**
 * Checks a parsed JSON value against the schema. A phase with `approval` is judged as a
 * gate (so `tasks` beside `approval` is named as an unknown field), anything else as a work
 * phase, which gives one precise finding instead of the union's two.
 */
export function parseWorkflowDefinition(value: unknown): ParseResult {
  const top = z
    .strictObject({
      name: WorkflowDefinitionSchema.shape.name,
      description: WorkflowDefinitionSchema.shape.description,
      phases: z.array(z.unknown()).min(1).max(MAX_PHASES),
    })
    .safeParse(value);
  const findings: Finding[] = [];
  for (const issue of top.error?.issues ?? []) {
    findings.push({ path: formatPath(issue.path) || '(root)', message: issue.message });
  }
  const raws = (value as { phases?: unknown } | null)?.phases;
  if (!Array.isArray(raws) || raws.length > MAX_PHASES) return { ok: false, findings };
  const phases: WorkflowDefinition['phases'] = [];
  raws.forEach((raw: unknown, i) => {
    const gate = raw !== null && typeof raw === 'object' && 'approval' in raw;
    const parsed = (gate ? GatePhaseSchema : WorkPhaseSchema).safeParse(raw);
    if (parsed.success) phases.push(parsed.data);
    else {
      for (const issue of parsed.error.issues) {
        findings.push({ path: formatPath(['phases', i, ...issue.path]), message: issue.message });
      }
    }
  });
  if (findings.length > 0 || !top.success) return { ok: false, findings };
  const definition: WorkflowDefinition = { name: top.data.name, phases };
  if (top.data.description !== undefined) definition.description = top.data.description;
  return { ok: true, definition };
}

/** Parses a definition from its JSON text, the size limit included. */
export function parseWorkflowJson(text: string): ParseResult {
  if (Buffer.byteLength(text, 'utf8') > WORKFLOW_BODY_LIMIT_BYTES) {
    return {
      ok: false,
      findings: [
        { path: '(root)', message: `a definition is at most ${WORKFLOW_BODY_LIMIT_BYTES} bytes` },
      ],
    };
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    return {
      ok: false,
      findings: [{ path: '(root)', message: `not JSON: ${(error as Error).message}` }],
    };
  }
  return parseWorkflowDefinition(value);
}
