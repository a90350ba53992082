/**
 * Tickets: create, read (with its tasks), list by state, send an event, read its log, and
 * add a task to it. Every POST honours `Idempotency-Key` (one effect, the first response
 * replayed; the same key with another body is `conflict`).
 */
import { Hono } from 'hono';
import { assertPublicEvent } from '../../actors/commands.js';
import {
  EventLogQuery,
  ID_PATTERN,
  NewTaskBody,
  NewTicketBody,
  TicketEventBody,
  TicketListQuery,
  TicketTasksQuery,
} from '../../api/schemas.js';
import { NotFound } from '../../errors.js';
import { capJsonBytes, idempotencyOf, readJson, validate } from '../request.js';
import type { AppEnv, AppServices } from '../services.js';
import { summaryOf } from '../views.js';

/** A path id that cannot be one the API issued is simply not found. */
export function pathId(raw: string, entityType: string): string {
  if (!ID_PATTERN.test(raw)) throw new NotFound(entityType, raw.slice(0, 200));
  return raw;
}

/** Refuses runtime-only events with their own message before the schema would. */
export function refuseSystemEvent(entityType: 'ticket' | 'task', raw: unknown): void {
  const type = (raw as { type?: unknown } | null)?.type;
  if (typeof type === 'string') assertPublicEvent(entityType, type);
}

export function ticketRoutes(s: AppServices): Hono<AppEnv> {
  const app = new Hono<AppEnv>();

  /** 201 with the new ticket (in `backlog`). */
  app.post('/tickets', async (c) => {
    const raw = await readJson(c);
    const body = validate(NewTicketBody, raw, 'body');
    const res = await s.host.idempotent(idempotencyOf(c, raw), async (uow) => ({
      status: 201,
      body: summaryOf(await s.commands.createTicket(uow, body)),
    }));
    return c.json(res.body as object, res.status as 201);
  });

  app.get('/tickets', async (c) => {
    const q = validate(TicketListQuery, c.req.query(), 'query');
    return c.json(await s.queries.listTickets(q));
  });

  /**
   * The ticket, the events its state accepts and its first tasks (summaries, oldest first);
   * `tasksNext` pages the rest through GET /tickets/:id/tasks. 404 if unknown.
   */
  app.get('/tickets/:id', async (c) => {
    const id = pathId(c.req.param('id'), 'ticket');
    const ticket = await s.queries.getTicket(id);
    if (!ticket) throw new NotFound('ticket', id);
    return c.json(ticket);
  });

  /** 200 with the ticket after the event; 409 illegal_transition; 400 for a system event. */
  app.post('/tickets/:id/events', async (c) => {
    const id = pathId(c.req.param('id'), 'ticket');
    const raw = await readJson(c);
    refuseSystemEvent('ticket', raw);
    const event = validate(TicketEventBody, raw, 'body');
    const idem = idempotencyOf(c, raw);
    const res = await s.host.idempotent(
      idem,
      async (uow) => ({
        status: 200,
        // Without a key, the send is the unit's last statement (no stored response follows).
        body: summaryOf(
          await s.commands.sendPublic(uow, 'ticket', id, event, { last: idem === undefined }),
        ),
      }),
      { entityType: 'ticket', id },
    );
    return c.json(res.body as object, res.status as 200);
  });

  /** A ticket's tasks oldest first, `cursor` from `tasksNext` or a previous page. */
  app.get('/tickets/:id/tasks', async (c) => {
    const id = pathId(c.req.param('id'), 'ticket');
    const q = validate(TicketTasksQuery, c.req.query(), 'query');
    const tasks = await s.queries.ticketTasks(id, q);
    if (!tasks) throw new NotFound('ticket', id);
    return c.json(tasks);
  });

  app.get('/tickets/:id/events', async (c) => {
    const id = pathId(c.req.param('id'), 'ticket');
    const q = validate(EventLogQuery, c.req.query(), 'query');
    const events = await s.queries.entityEvents('ticket', id, q.after, q.limit);
    if (!events) throw new NotFound('ticket', id);
    return c.json({ events });
  });

  /** 201 with the task; phase defaults to the ticket's; 409 on a final ticket. */
  app.post('/tickets/:id/tasks', async (c) => {
    const id = pathId(c.req.param('id'), 'ticket');
    const raw = await readJson(c);
    const body = validate(NewTaskBody, raw, 'body');
    capJsonBytes('payload', body.payload, s.config.PAYLOAD_MAX_BYTES);
    const res = await s.host.idempotent(idempotencyOf(c, raw), async (uow) => ({
      status: 201,
      body: summaryOf(await s.commands.addTask(uow, id, body)),
    }));
    return c.json(res.body as object, res.status as 201);
  });

  return app;
}
