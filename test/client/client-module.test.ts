/**
 * The client module itself: importable by its package name (`exports`), built from the
 * server's own schemas and lists, free of server imports, and one exception per error code.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import * as byName from 'actor-orchestrator/client';
import { describe, expect, it } from 'vitest';
import type { TaskView } from '../../src/actors/views.js';
import * as constants from '../../src/api/constants.js';
import { ErrorResponse } from '../../src/api/schemas.js';
import { errorFromResponse } from '../../src/client/errors.js';
import * as byPath from '../../src/client/index.js';
import type { Task as ClientTask, TaskState as ClientTaskState } from '../../src/client/types.js';
import { MAX_TIMER_MS } from '../../src/config.js';
import { STATUS } from '../../src/http/errors.js';
import { PHASES } from '../../src/machines/phases.js';
import { TASK_STATES, type TaskState } from '../../src/machines/task.js';
import { TICKET_STATES } from '../../src/machines/ticket.js';

// Compile-time: a state added to the machine but not to the API (or back) fails tsc.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
const statesAgree: Same<ClientTaskState, TaskState> = true;
// Every field the server's task view has, the client's Task type has too.
const viewFits: Same<keyof TaskView, Exclude<keyof ClientTask, 'allowedEvents'>> = true;

const ROOT = resolve(import.meta.dirname, '../..');

describe('actor-orchestrator/client', () => {
  it('resolves by package name to the same module as the source path', () => {
    expect(byName.OrchestratorClient).toBe(byPath.OrchestratorClient);
    expect(byName.StaleTokenError).toBe(byPath.StaleTokenError);
    expect(statesAgree && viewFits).toBe(true);
  });

  it("enumerates exactly the machines' states and phases, and config's timer limit", () => {
    expect([...constants.TASK_STATES]).toEqual([...TASK_STATES]);
    expect([...constants.TICKET_STATES]).toEqual([...TICKET_STATES]);
    expect([...constants.PHASES]).toEqual([...PHASES]);
    expect(constants.MAX_TIMER_MS).toBe(MAX_TIMER_MS);
  });

  it('imports nothing but zod and its own files, transitively (src/client and src/api)', () => {
    const seen = new Set<string>();
    const outside: string[] = [];
    const visit = (file: string) => {
      if (seen.has(file)) return;
      seen.add(file);
      const text = readFileSync(file, 'utf8');
      for (const m of text.matchAll(/^\s*(?:import|export)\b[^'"]*?from\s+['"]([^'"]+)['"]/gm)) {
        const spec = m[1]!;
        if (spec.startsWith('.')) {
          const target = resolve(dirname(file), spec.replace(/\.js$/, '.ts'));
          const rel = relative(ROOT, target);
          if (!rel.startsWith('src/client/') && !rel.startsWith('src/api/')) {
            outside.push(`${relative(ROOT, file)} → ${spec}`);
          } else visit(target);
        } else if (spec !== 'zod') outside.push(`${relative(ROOT, file)} → ${spec}`);
      }
    };
    for (const dir of ['src/client', 'src/api']) {
      for (const f of readdirSync(join(ROOT, dir))) visit(join(ROOT, dir, f));
    }
    expect(seen.size).toBeGreaterThan(5);
    expect(outside).toEqual([]);
  });

  it('maps every error code the server sends to its own exception, with code and status', () => {
    const classes: Record<string, unknown> = {
      validation_failed: byName.ValidationError,
      unauthorized: byName.UnauthorizedError,
      not_found: byName.NotFoundError,
      illegal_transition: byName.IllegalTransitionError,
      stale_token: byName.StaleTokenError,
      conflict: byName.ConflictError,
      version_conflict: byName.ConflictError,
      payload_too_large: byName.PayloadTooLargeError,
      unsupported_media_type: byName.UnsupportedMediaTypeError,
      unavailable: byName.UnavailableError,
      internal: byName.InternalError,
    };
    for (const code of ErrorResponse.shape.error.options) {
      const status = STATUS[code];
      const e = errorFromResponse(
        status,
        { error: code, message: `m ${code}` },
        new Headers({ 'x-request-id': 'r1', 'retry-after': '2' }),
      );
      expect(e).toBeInstanceOf(byName.OrchestratorClientError);
      expect(e).toBeInstanceOf(Error);
      expect({
        code: e.code,
        status: e.status,
        message: e.message,
        requestId: e.requestId,
      }).toEqual({
        code,
        status,
        message: `m ${code}`,
        requestId: 'r1',
      });
      if (classes[code]) expect(e).toBeInstanceOf(classes[code] as typeof Error);
    }
    const illegal = errorFromResponse(
      409,
      {
        error: 'illegal_transition',
        message: 'no',
        state: 'cancelled',
        event: 'HEARTBEAT',
        allowed: [],
      },
      new Headers(),
    ) as byPath.IllegalTransitionError;
    expect([illegal.state, illegal.event, illegal.allowed]).toEqual(['cancelled', 'HEARTBEAT', []]);
    const stale = errorFromResponse(
      409,
      { error: 'stale_token', message: 'x', attempt: 3 },
      new Headers(),
    );
    expect((stale as byPath.StaleTokenError).attempt).toBe(3);
    const busy = errorFromResponse(
      503,
      { error: 'unavailable', message: 'x' },
      new Headers({ 'retry-after': '2' }),
    );
    expect((busy as byPath.UnavailableError).retryAfterMs).toBe(2000);
    // A status with no known body (a proxy's 502 page) still gets a typed error.
    const proxy = errorFromResponse(502, '<html>', new Headers());
    expect(proxy).toBeInstanceOf(byName.InternalError);
    expect([proxy.code, proxy.status]).toEqual(['http_502', 502]);
  });
});
