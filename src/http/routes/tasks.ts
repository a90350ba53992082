/**
 * Tasks: read, list by state, send an event (worker events carry the claim's `token`;
 * a wrong one is `stale_token`), read the log, and the agents' claim long poll.
 */
import { Hono } from 'hono';
import type { StoredResponse } from '../../actors/host.js';
import { ClaimBody, EventLogQuery, TaskEventBody, TaskListQuery } from '../../api/schemas.js';
import { InvalidInput, NotFound } from '../../errors.js';
import type { ClaimedTask } from '../../workers/claims.js';
import { capJsonBytes, idempotencyOf, readJson, validate } from '../request.js';
import type { AppEnv, AppServices } from '../services.js';
import { summaryOf } from '../views.js';
import { pathId, refuseSystemEvent } from './tickets.js';

/** Thrown inside a probe transaction: no stored response, and nothing is written. */
class NoStoredResponse extends Error {}

export function taskRoutes(s: AppServices): Hono<AppEnv> {
  const app = new Hono<AppEnv>();

  app.get('/tasks', async (c) => {
    const q = validate(TaskListQuery, c.req.query(), 'query');
    return c.json(await s.queries.listTasks(q));
  });

  /**
   * Claims the best claimable `external` task for `workerId`: 200 `{task, token}`, or 204
   * when none turned up within `waitMs` (capped by CLAIM_MAX_WAIT_MS). A client that hangs
   * up ends the wait; a task claimed for a client that has gone is released at once.
   */
  app.post('/tasks/claim', async (c) => {
    const raw = await readJson(c);
    const body = validate(ClaimBody, raw, 'body');
    const idem = idempotencyOf(c, raw);
    // The claim commits in its own transaction, so a keyed claim first looks for a stored
    // response (a probe that writes nothing), and stores its own afterwards.
    if (idem) {
      try {
        const prior = await s.host.idempotent(idem, async () => {
          throw new NoStoredResponse();
        });
        return respond(prior);
      } catch (error) {
        if (!(error instanceof NoStoredResponse)) throw error;
      }
    }
    const signal = c.req.raw.signal;
    const claimed = await s.claims.claim({
      workerId: body.workerId,
      types: body.types,
      waitMs: Math.min(body.waitMs ?? 0, s.config.CLAIM_MAX_WAIT_MS),
      signal,
    });
    const mine: StoredResponse = claimed
      ? { status: 200, body: claimed }
      : { status: 204, body: {} };
    if (claimed && signal.aborted) {
      await release(claimed, 'the claiming client disconnected');
      return respond({ status: 204, body: {} });
    }
    if (!idem) return respond(mine);
    const stored = await s.host.idempotent(idem, async () => mine);
    const winner = stored.body as Partial<ClaimedTask>;
    // A concurrent request with the same key stored first: ours is a second claim.
    if (claimed && winner.token !== claimed.token) {
      await release(claimed, 'duplicate claim under one Idempotency-Key');
    }
    return respond(stored);

    function respond(r: StoredResponse) {
      return r.status === 204 ? c.body(null, 204) : c.json(r.body as object, r.status as 200);
    }
  });

  async function release(claimed: ClaimedTask, reason: string): Promise<void> {
    try {
      await s.host.send('task', claimed.task.id, {
        type: 'RELEASE',
        token: claimed.token,
        reason,
      });
    } catch (error) {
      s.log.warn({ err: error, taskId: claimed.task.id }, 'could not release a claim');
    }
  }

  app.get('/tasks/:id', async (c) => {
    const id = pathId(c.req.param('id'), 'task');
    const task = await s.queries.getTask(id);
    if (!task) throw new NotFound('task', id);
    return c.json(task);
  });

  /** 200 with the task after the event; 409 illegal_transition or stale_token. */
  app.post('/tasks/:id/events', async (c) => {
    const id = pathId(c.req.param('id'), 'task');
    const raw = await readJson(c);
    refuseSystemEvent('task', raw);
    if ((raw as { type?: unknown } | null)?.type === 'CLAIM') {
      throw new InvalidInput('claim a task with POST /tasks/claim', [
        { path: 'type', message: 'CLAIM goes through POST /tasks/claim' },
      ]);
    }
    const event = validate(TaskEventBody, raw, 'body');
    if (event.type === 'COMPLETE') capJsonBytes('result', event.result, s.config.PAYLOAD_MAX_BYTES);
    const idem = idempotencyOf(c, raw);
    const res = await s.host.idempotent(
      idem,
      async (uow) => ({
        status: 200,
        // Without a key, the send is the unit's last statement (no stored response follows).
        body: summaryOf(
          await s.commands.sendPublic(uow, 'task', id, event, { last: idem === undefined }),
        ),
      }),
      { entityType: 'task', id },
    );
    return c.json(res.body as object, res.status as 200);
  });

  app.get('/tasks/:id/events', async (c) => {
    const id = pathId(c.req.param('id'), 'task');
    const q = validate(EventLogQuery, c.req.query(), 'query');
    const events = await s.queries.entityEvents('task', id, q.after, q.limit);
    if (!events) throw new NotFound('task', id);
    return c.json({ events });
  });

  return app;
}
