/**
 * The workflow registry (CONTRACT section 5): named, immutable versions of workflow
 * definitions in Postgres, and, per process, their compiled ticket machines, each compiled
 * once per `name@version` and kept in an @xstate/store. The store is filled lazily from
 * Postgres, since another process may have registered a version this one has not seen; the
 * latest version of a name is always read from Postgres for the same reason.
 *
 * Checking and compiling a definition is the compiler's job (a port: the composition root
 * hands in the schema, `verifyWorkflow` and `compileWorkflow`); the registry stores, finds
 * and caches.
 */
import { createHash } from 'node:crypto';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createStore } from '@xstate/store';
import { InvalidInput, UnknownWorkflow } from '../errors.js';
import type { CompiledWorkflow } from '../machines/workflow.js';
import type { WorkflowDefinition } from '../machines/workflow-definition.js';
import type { Sql } from '../persistence/db.js';
import {
  latestWorkflowRow,
  latestWorkflowRows,
  loadWorkflowRow,
  registerWorkflowRow,
  type WorkflowRow,
  workflowVersions,
} from '../persistence/workflow-rows.js';

export type { CompiledWorkflow };

export interface WorkflowIssue {
  path: string;
  message: string;
}

/** The checks and the compiler, from src/workflows and src/machines. */
export interface WorkflowCompiler {
  /**
   * Schema and verification (reachability, loops, templates...). Returns the normalized
   * definition or the issues, each naming its path (`phases[1].onReject.sendBackTo`).
   */
  check(raw: unknown): { definition: WorkflowDefinition } | { issues: WorkflowIssue[] };
  compile(definition: WorkflowDefinition, version: number): CompiledWorkflow;
  /** The built-in `default` workflow, version 1. */
  builtIn: WorkflowDefinition;
}

export interface WorkflowSummary {
  name: string;
  version: number;
  description: string | null;
  phases: unknown;
  createdAt: string;
}

export const DEFAULT_WORKFLOW_NAME = 'default';
/** A definition's JSON is at most this many bytes (CONTRACT section 5). */
export const WORKFLOW_MAX_BYTES = 64 * 1024;
/** Compiled machines kept per process; the least recently compiled go first. */
const MAX_COMPILED = 256;
const LIST_LIMIT = 1_000;
const NAME = /^[a-z][a-z0-9_-]{0,63}$/;
const REF = /^([a-z][a-z0-9_-]{0,63})(?:@([1-9][0-9]{0,8}))?$/;

/** Sorted keys at every level: equal definitions hash equal however their keys were ordered. */
export function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value !== null && typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>)
      .filter(([, v]) => v !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

function createCompiledStore() {
  return createStore({
    context: { compiled: {} as Record<string, CompiledWorkflow>, order: [] as string[] },
    on: {
      compiled: (ctx, ev: { workflow: CompiledWorkflow }) => {
        const { ref } = ev.workflow;
        if (ctx.compiled[ref]) return ctx;
        const order = [...ctx.order, ref];
        const compiled = { ...ctx.compiled, [ref]: ev.workflow };
        while (order.length > MAX_COMPILED) delete compiled[order.shift() as string];
        return { compiled, order };
      },
    },
  });
}

export class WorkflowRegistry {
  private readonly store = createCompiledStore();

  constructor(
    private readonly sql: Sql,
    private readonly compiler: WorkflowCompiler,
  ) {}

  /** Stores the built-in `default` as version 1 if it is not there yet (every start). */
  async ensureBuiltIn(): Promise<void> {
    const def = this.compiler.builtIn;
    if (await loadWorkflowRow(this.sql, def.name, 1)) return;
    await registerWorkflowRow(this.sql, def.name, def, hashOf(def));
  }

  /**
   * Registers a definition: a new version when it differs from every stored one of its name
   * (`created: true`), else the version that has it. InvalidInput naming the path when the
   * checks refuse it; the built-in name cannot be registered again.
   */
  async register(raw: unknown): Promise<{ created: boolean; workflow: WorkflowSummary }> {
    if (Buffer.byteLength(JSON.stringify(raw ?? null)) > WORKFLOW_MAX_BYTES) {
      throw new InvalidInput(`a workflow definition is at most ${WORKFLOW_MAX_BYTES} bytes`, [
        { path: '', message: `over ${WORKFLOW_MAX_BYTES} bytes` },
      ]);
    }
    const name = (raw as { name?: unknown } | null)?.name;
    if (name === DEFAULT_WORKFLOW_NAME) {
      throw new InvalidInput('the workflow name default is built in', [
        { path: 'name', message: 'default is the built-in workflow and cannot be replaced' },
      ]);
    }
    if (typeof name === 'string' && !NAME.test(name)) {
      throw new InvalidInput('invalid workflow name', [
        { path: 'name', message: `must match ${NAME.source}` },
      ]);
    }
    const checked = this.compiler.check(raw);
    if ('issues' in checked) {
      const first = checked.issues[0];
      throw new InvalidInput(
        `workflow refused: ${first ? `${first.path}: ${first.message}` : 'invalid'}`,
        checked.issues.slice(0, 50),
      );
    }
    const def = checked.definition;
    if (!NAME.test(def.name)) {
      throw new InvalidInput('invalid workflow name', [
        { path: 'name', message: `must match ${NAME.source}` },
      ]);
    }
    const { row, created } = await registerWorkflowRow(this.sql, def.name, def, hashOf(def));
    this.compiledOf(row);
    return { created, workflow: summaryOf(row) };
  }

  /**
   * The compiled workflow a ref names: `NAME@VERSION`, or `NAME` for the latest version.
   * UnknownWorkflow when there is no such name or version.
   */
  async resolve(ref: string): Promise<CompiledWorkflow> {
    const m = REF.exec(ref);
    if (!m?.[1]) throw new UnknownWorkflow(ref);
    const [, name, version] = m;
    if (version !== undefined) {
      const cached = this.store.getSnapshot().context.compiled[`${name}@${version}`];
      if (cached) return cached;
    }
    const row =
      version === undefined
        ? await latestWorkflowRow(this.sql, name)
        : await loadWorkflowRow(this.sql, name, Number(version));
    if (!row) throw new UnknownWorkflow(ref);
    return this.compiledOf(row);
  }

  /** A compiled workflow already in this process, if any (no I/O). */
  cached(ref: string): CompiledWorkflow | undefined {
    return this.store.getSnapshot().context.compiled[ref];
  }

  async list(): Promise<WorkflowSummary[]> {
    return (await latestWorkflowRows(this.sql, LIST_LIMIT)).map(summaryOf);
  }

  /** The latest version with the list of versions; null for an unknown name. */
  async get(
    name: string,
  ): Promise<(WorkflowSummary & { versions: { version: number; createdAt: string }[] }) | null> {
    const row = await latestWorkflowRow(this.sql, name);
    if (!row) return null;
    const versions = await workflowVersions(this.sql, name, LIST_LIMIT);
    return {
      ...summaryOf(row),
      versions: versions.map((v) => ({ version: v.version, createdAt: v.createdAt.toISOString() })),
    };
  }

  async getVersion(name: string, version: number): Promise<WorkflowSummary | null> {
    const row = await loadWorkflowRow(this.sql, name, version);
    return row ? summaryOf(row) : null;
  }

  /**
   * Registers every `*.json` in `dir` (WORKFLOWS_DIR), in name order. A file that is not
   * JSON or is refused stops the start with one line naming the file and the path.
   */
  async registerDir(dir: string): Promise<WorkflowSummary[]> {
    const files = (await readdir(dir)).filter((f) => f.endsWith('.json')).sort();
    const out: WorkflowSummary[] = [];
    for (const file of files) {
      const path = join(dir, file);
      let raw: unknown;
      try {
        raw = JSON.parse(await readFile(path, 'utf8'));
      } catch (error) {
        throw new Error(`WORKFLOWS_DIR: ${path}: not JSON (${(error as Error).message})`);
      }
      try {
        out.push((await this.register(raw)).workflow);
      } catch (error) {
        if (!(error instanceof InvalidInput)) throw error;
        const issue = error.issues[0];
        throw new Error(
          `WORKFLOWS_DIR: ${path}: ${issue ? `${issue.path || '(root)'}: ${issue.message}` : error.message}`,
        );
      }
    }
    return out;
  }

  private compiledOf(row: WorkflowRow): CompiledWorkflow {
    const ref = `${row.name}@${row.version}`;
    const cached = this.store.getSnapshot().context.compiled[ref];
    if (cached) return cached;
    const workflow = this.compiler.compile(row.definition as WorkflowDefinition, row.version);
    this.store.trigger.compiled({ workflow });
    return workflow;
  }
}

function hashOf(def: WorkflowDefinition): string {
  return createHash('sha256').update(canonicalJson(def)).digest('hex');
}

function summaryOf(row: WorkflowRow): WorkflowSummary {
  const def = row.definition as WorkflowDefinition;
  return {
    name: row.name,
    version: row.version,
    description: def.description ?? null,
    phases: def.phases,
    createdAt: row.createdAt.toISOString(),
  };
}
