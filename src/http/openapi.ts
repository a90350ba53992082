/**
 * `GET /openapi.json`: an OpenAPI 3.1 document generated from the zod schemas the handlers
 * validate with (`z.toJSONSchema` over the `components` registry), so it cannot drift.
 */
import { z } from 'zod';
import {
  components,
  EventLogQuery,
  OutputQuery,
  OutputStreamQuery,
  StreamQuery,
  TaskListQuery,
  TicketListQuery,
  TicketTasksQuery,
} from '../api/schemas.js';

type Json = Record<string, unknown>;
const ref = (id: string) => ({ $ref: `#/components/schemas/${id}` });
const body = (id: string) => ({
  required: true,
  content: { 'application/json': { schema: ref(id) } },
});
const ok = (id: string, description = 'OK') => ({
  description,
  content: { 'application/json': { schema: ref(id) } },
});
const error = (description: string) => ({
  description,
  content: { 'application/json': { schema: ref('Error') } },
});
const ERRORS = {
  '400': error('validation_failed: malformed JSON, wrong types, unknown fields'),
  '401': error('unauthorized: API_TOKEN set and the bearer token missing or wrong'),
  '404': error('not_found'),
};
const POST_ERRORS = {
  ...ERRORS,
  '409': error('illegal_transition, stale_token or conflict (Idempotency-Key reused)'),
  '413': error('payload_too_large'),
  '415': error('unsupported_media_type'),
};
const idParam = (name = 'id') => ({ name, in: 'path', required: true, schema: { type: 'string' } });
const idempotencyKey = {
  name: 'Idempotency-Key',
  in: 'header',
  required: false,
  description: 'The same key with the same body returns the first response and has one effect.',
  schema: { type: 'string', maxLength: 200 },
};

function queryParams(schema: z.ZodObject): Json[] {
  const js = z.toJSONSchema(schema, { io: 'input' }) as { properties?: Record<string, Json> };
  return Object.entries(js.properties ?? {}).map(([name, s]) => ({
    name,
    in: 'query',
    required: false,
    schema: s,
  }));
}

function schemas(): Record<string, Json> {
  const out = z.toJSONSchema(components, {
    io: 'input',
    uri: (id) => `#/components/schemas/${id}`,
  }) as { schemas: Record<string, Json> };
  return Object.fromEntries(
    Object.entries(out.schemas).map(([id, { $schema: _s, $id: _i, ...rest }]) => [id, rest]),
  );
}

let cached: Json | undefined;

export function openApiDocument(): Json {
  cached ??= {
    openapi: '3.1.0',
    info: { title: 'actor-orchestrator', version: '0.1.0' },
    components: {
      schemas: schemas(),
      securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } },
    },
    security: [{ bearer: [] }],
    paths: {
      '/tickets': {
        post: {
          summary: 'Create a ticket',
          parameters: [idempotencyKey],
          requestBody: body('NewTicket'),
          responses: { '201': ok('TicketSummary', 'Created'), ...POST_ERRORS },
        },
        get: {
          summary: 'List tickets, newest first',
          parameters: queryParams(TicketListQuery),
          responses: { '200': ok('TicketPage'), ...ERRORS },
        },
      },
      '/tickets/{id}': {
        get: {
          summary: 'A ticket with its first tasks (tasksNext pages the rest)',
          parameters: [idParam()],
          responses: { '200': ok('TicketDetail'), ...ERRORS },
        },
      },
      '/tickets/{id}/events': {
        post: {
          summary: 'Send an event to a ticket',
          parameters: [idParam(), idempotencyKey],
          requestBody: body('TicketEvent'),
          responses: { '200': ok('TicketSummary'), ...POST_ERRORS },
        },
        get: {
          summary: "The ticket's event log",
          parameters: [idParam(), ...queryParams(EventLogQuery)],
          responses: { '200': ok('EventLog'), ...ERRORS },
        },
      },
      '/tickets/{id}/tasks': {
        get: {
          summary: "A ticket's tasks, oldest first, without payload and result",
          parameters: [idParam(), ...queryParams(TicketTasksQuery)],
          responses: { '200': ok('TicketTaskPage'), ...ERRORS },
        },
        post: {
          summary: 'Add a task to a ticket (its current phase by default)',
          parameters: [idParam(), idempotencyKey],
          requestBody: body('NewTask'),
          responses: { '201': ok('TaskDetail', 'Created'), ...POST_ERRORS },
        },
      },
      '/tasks': {
        get: {
          summary: 'List tasks, newest first, without payload and result',
          parameters: queryParams(TaskListQuery),
          responses: { '200': ok('TaskPage'), ...ERRORS },
        },
      },
      '/tasks/claim': {
        post: {
          summary: 'Claim a task (long poll)',
          parameters: [idempotencyKey],
          requestBody: body('ClaimRequest'),
          responses: {
            '200': ok('Claimed'),
            '204': { description: 'Nothing claimable within waitMs' },
            ...POST_ERRORS,
          },
        },
      },
      '/tasks/{id}': {
        get: {
          summary: 'A task',
          parameters: [idParam()],
          responses: { '200': ok('TaskDetail'), ...ERRORS },
        },
      },
      '/tasks/{id}/events': {
        post: {
          summary: 'Send an event to a task (worker events carry the token)',
          parameters: [idParam(), idempotencyKey],
          requestBody: body('TaskEvent'),
          responses: { '200': ok('TaskDetail'), ...POST_ERRORS },
        },
        get: {
          summary: "The task's event log",
          parameters: [idParam(), ...queryParams(EventLogQuery)],
          responses: { '200': ok('EventLog'), ...ERRORS },
        },
      },
      '/tasks/{id}/output': {
        post: {
          summary:
            'Append output chunks for the live claim (token); 409 illegal_transition once the task left claimed/running (e.g. cancelled)',
          parameters: [idParam()],
          requestBody: body('OutputRequest'),
          responses: { '202': ok('OutputAccepted', 'Accepted'), ...POST_ERRORS },
        },
        get: {
          summary: "A page of the task's output after a seq, oldest first",
          parameters: [idParam(), ...queryParams(OutputQuery)],
          responses: { '200': ok('OutputPage'), ...ERRORS },
        },
      },
      '/tasks/{id}/output/stream': {
        get: {
          summary:
            "Server-Sent Events of the task's output (id: seq, event: output); a final `end` event when the task settles; resume with Last-Event-ID",
          parameters: [
            idParam(),
            ...queryParams(OutputStreamQuery),
            { name: 'Last-Event-ID', in: 'header', required: false, schema: { type: 'string' } },
          ],
          responses: {
            '200': { description: 'text/event-stream', content: { 'text/event-stream': {} } },
            ...ERRORS,
            '503': error('unavailable: too many output streams open in this process'),
          },
        },
      },
      '/events/stream': {
        get: {
          summary: 'Server-Sent Events of every domain event; resume with Last-Event-ID',
          parameters: [
            ...queryParams(StreamQuery),
            { name: 'Last-Event-ID', in: 'header', required: false, schema: { type: 'string' } },
          ],
          responses: {
            '200': { description: 'text/event-stream', content: { 'text/event-stream': {} } },
            '503': error('unavailable: no event stream configured'),
          },
        },
      },
      '/machines': {
        get: { summary: 'Machine summaries', responses: { '200': ok('MachineList') } },
      },
      '/machines/{name}': {
        get: {
          summary: 'A machine definition the Stately visualizer loads',
          parameters: [idParam('name')],
          responses: { '200': { description: 'machine JSON' }, ...ERRORS },
        },
      },
      '/healthz': { get: { security: [], responses: { '200': ok('Health') } } },
      '/readyz': {
        get: {
          security: [],
          responses: { '200': ok('Readiness'), '503': ok('Readiness', 'Not ready') },
        },
      },
      '/dead-letters': {
        get: {
          parameters: [
            { name: 'limit', in: 'query', schema: { type: 'integer', minimum: 1, maximum: 1000 } },
          ],
          responses: { '200': ok('DeadLetterList'), ...ERRORS },
        },
      },
      '/metrics': {
        get: {
          responses: { '200': { description: 'Prometheus text', content: { 'text/plain': {} } } },
        },
      },
    },
  };
  return cached;
}
