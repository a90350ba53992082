/**
 * `OrchestratorClient`: typed calls for every route of the orchestrator's HTTP API over
 * `fetch`, its errors as exceptions (`errors.ts`), safe retries, and `agent()` to run
 * claimed tasks. No server code: it runs wherever `fetch` does.
 *
 * @example
 * const client = new OrchestratorClient(); // ORCHESTRATOR_URL, API_TOKEN
 * const ticket = await client.createTicket({ title: 'Add dark mode' });
 * await client.sendTicketEvent(ticket.id, { type: 'START' });
 * await client.addTask(ticket.id, { type: 'write_spec' });
 */
import { Agent, type AgentOptions } from './agent.js';
import {
  errorFromResponse,
  NetworkError,
  OrchestratorClientError,
  UnavailableError,
} from './errors.js';
import { readSse } from './sse.js';
import type {
  ClaimedTask,
  ClaimRequest,
  DeadLetters,
  EventLogBody,
  EventLogQuery,
  MachineListBody,
  NewTask,
  NewTicket,
  OutputAccepted,
  OutputChunk,
  OutputChunkIn,
  OutputPage,
  OutputQuery,
  PageQuery,
  ReadinessBody,
  StreamEvent,
  Task,
  TaskEvent,
  TaskListQuery,
  TaskPageBody,
  Ticket,
  TicketEvent,
  TicketListQuery,
  TicketPageBody,
  TicketTaskPageBody,
  TicketWithTasks,
  Workflow,
  WorkflowDefinition,
} from './types.js';

export interface ClientOptions {
  /** Default: `ORCHESTRATOR_URL`, else `http://127.0.0.1:3000`. */
  url?: string;
  /** Sent as `Authorization: Bearer`. Default: `API_TOKEN` when set. */
  token?: string;
  /** Retries of a request that is safe to repeat (network error, 502/503/504). Default 4. */
  retries?: number;
  /** First retry delay; it doubles up to `retryMaxMs`. Default 100. */
  retryBaseMs?: number;
  /** Default 2000. */
  retryMaxMs?: number;
  /** Another fetch (a proxy, a test spy). Default: the global one. */
  fetch?: typeof fetch;
}

export interface CallOptions {
  signal?: AbortSignal;
  /** For a POST: the key that makes repeating it safe. Default: a fresh one per call. */
  idempotencyKey?: string;
}

interface Request {
  method: 'GET' | 'POST' | 'HEAD';
  path: string;
  query?: Record<string, string | number | undefined>;
  body?: unknown;
  signal?: AbortSignal;
  /** `key`: send an Idempotency-Key (and retry); `safe`: retry without one; `never`. */
  retry: 'key' | 'safe' | 'never';
  idempotencyKey?: string;
  accept?: string;
}

function env(name: string): string | undefined {
  const p = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process;
  const v = p?.env?.[name];
  return v === undefined || v === '' ? undefined : v;
}

const RETRY_STATUS = new Set([502, 503, 504]);

export class OrchestratorClient {
  readonly url: string;
  readonly #token: string | undefined;
  readonly #fetch: typeof fetch;
  readonly #retries: number;
  readonly #retryBaseMs: number;
  readonly #retryMaxMs: number;

  constructor(options: ClientOptions = {}) {
    this.url = (options.url ?? env('ORCHESTRATOR_URL') ?? 'http://127.0.0.1:3000').replace(
      /\/+$/,
      '',
    );
    this.#token = options.token ?? env('API_TOKEN');
    this.#fetch = options.fetch ?? ((input, init) => fetch(input, init));
    this.#retries = Math.min(Math.max(options.retries ?? 4, 0), 20);
    this.#retryBaseMs = Math.max(options.retryBaseMs ?? 100, 1);
    this.#retryMaxMs = Math.max(options.retryMaxMs ?? 2_000, this.#retryBaseMs);
  }

  // ---- tickets ------------------------------------------------------------------------

  /** `POST /tickets` → the new ticket, in `backlog`. */
  createTicket(body: NewTicket, o: CallOptions = {}): Promise<Ticket> {
    return this.#post('/tickets', body, o);
  }
  /** `GET /tickets/:id`: the ticket, its allowed events and its first tasks. */
  getTicket(id: string, o: CallOptions = {}): Promise<TicketWithTasks> {
    return this.#get(`/tickets/${enc(id)}`, undefined, o);
  }
  /** `GET /tickets`: a page, newest first; pass `nextCursor` as `cursor` for the next. */
  listTickets(q: TicketListQuery = {}, o: CallOptions = {}): Promise<TicketPageBody> {
    return this.#get('/tickets', { ...q }, o);
  }
  /** `POST /tickets/:id/events` (START, ADVANCE, BLOCK, UNBLOCK, CANCEL, workflow events). */
  sendTicketEvent(id: string, event: TicketEvent, o: CallOptions = {}): Promise<Ticket> {
    return this.#post(`/tickets/${enc(id)}/events`, event, o);
  }
  /** `GET /tickets/:id/events`: the ticket's event log, `seq` after `after`. */
  ticketEvents(id: string, q: EventLogQuery = {}, o: CallOptions = {}): Promise<EventLogBody> {
    return this.#get(`/tickets/${enc(id)}/events`, { ...q }, o);
  }
  /** `GET /tickets/:id/tasks`: the ticket's tasks, oldest first, paged. */
  ticketTasks(id: string, q: PageQuery = {}, o: CallOptions = {}): Promise<TicketTaskPageBody> {
    return this.#get(`/tickets/${enc(id)}/tasks`, { ...q }, o);
  }
  /** `POST /tickets/:id/tasks` → the new task (phase defaults to the ticket's). */
  addTask(ticketId: string, body: NewTask, o: CallOptions = {}): Promise<Task> {
    return this.#post(`/tickets/${enc(ticketId)}/tasks`, body, o);
  }

  // ---- tasks --------------------------------------------------------------------------

  /** `GET /tasks/:id`, with payload and result. */
  getTask(id: string, o: CallOptions = {}): Promise<Task> {
    return this.#get(`/tasks/${enc(id)}`, undefined, o);
  }
  /** `GET /tasks`: a page of task summaries (no payload/result). */
  listTasks(q: TaskListQuery = {}, o: CallOptions = {}): Promise<TaskPageBody> {
    return this.#get('/tasks', { ...q }, o);
  }
  /** `POST /tasks/:id/events`: any public task event; the helpers below name the usual ones. */
  sendTaskEvent(id: string, event: TaskEvent, o: CallOptions = {}): Promise<Task> {
    // A repeated HEARTBEAT extends the same lease: safe to retry without storing a key.
    const retry = event.type === 'HEARTBEAT' && !o.idempotencyKey ? 'safe' : 'key';
    return this.#call({
      method: 'POST',
      path: `/tasks/${enc(id)}/events`,
      body: event,
      retry,
      signal: o.signal,
      idempotencyKey: o.idempotencyKey,
    });
  }
  /** `GET /tasks/:id/events`: the task's event log. */
  taskEvents(id: string, q: EventLogQuery = {}, o: CallOptions = {}): Promise<EventLogBody> {
    return this.#get(`/tasks/${enc(id)}/events`, { ...q }, o);
  }
  /**
   * `POST /tasks/claim`: the best claimable `external` task of `types` for `workerId`, with
   * its `token`, or null when none turned up within `waitMs` (a long poll the server caps).
   */
  async claim(req: ClaimRequest, o: CallOptions = {}): Promise<ClaimedTask | null> {
    return this.#post<ClaimedTask | null>('/tasks/claim', req, o);
  }
  start(id: string, token: string, o: CallOptions = {}): Promise<Task> {
    return this.sendTaskEvent(id, { type: 'START', token }, o);
  }
  heartbeat(id: string, token: string, o: CallOptions = {}): Promise<Task> {
    return this.sendTaskEvent(id, { type: 'HEARTBEAT', token }, o);
  }
  complete(id: string, token: string, result?: unknown, o: CallOptions = {}): Promise<Task> {
    const event = { type: 'COMPLETE', token } as TaskEvent & { result?: unknown };
    if (result !== undefined) event.result = result;
    return this.sendTaskEvent(id, event as TaskEvent, o);
  }
  fail(id: string, token: string, error: string, o: CallOptions = {}): Promise<Task> {
    return this.sendTaskEvent(id, { type: 'FAIL', token, error }, o);
  }
  release(id: string, token: string, reason?: string, o: CallOptions = {}): Promise<Task> {
    return this.sendTaskEvent(id, { type: 'RELEASE', token, ...(reason ? { reason } : {}) }, o);
  }
  cancelTask(id: string, reason?: string, o: CallOptions = {}): Promise<Task> {
    return this.sendTaskEvent(id, { type: 'CANCEL', ...(reason ? { reason } : {}) }, o);
  }
  requeue(id: string, maxAttempts?: number, o: CallOptions = {}): Promise<Task> {
    return this.sendTaskEvent(id, { type: 'REQUEUE', ...(maxAttempts ? { maxAttempts } : {}) }, o);
  }

  // ---- output -------------------------------------------------------------------------

  /** `POST /tasks/:id/output`: append chunks under the claim's token; the `seq`s they got. */
  appendOutput(
    id: string,
    token: string,
    chunks: OutputChunkIn[],
    o: CallOptions = {},
  ): Promise<OutputAccepted> {
    return this.#post(`/tasks/${enc(id)}/output`, { token, chunks }, o);
  }
  /** `GET /tasks/:id/output`: chunks with `seq` after `after`; `truncated` when old ones went. */
  readOutput(id: string, q: OutputQuery = {}, o: CallOptions = {}): Promise<OutputPage> {
    return this.#get(`/tasks/${enc(id)}/output`, { ...q }, o);
  }
  /** `GET /tasks/:id/output/stream`: chunks as they arrive, resuming after a lost connection. */
  async *streamOutput(
    id: string,
    o: { after?: number; signal?: AbortSignal } = {},
  ): AsyncGenerator<OutputChunk> {
    const frames = this.#stream(`/tasks/${enc(id)}/output/stream`, {}, o.after, o.signal);
    for await (const f of frames) yield JSON.parse(f.data) as OutputChunk;
  }

  // ---- the live event stream ----------------------------------------------------------

  /**
   * `GET /events/stream`: every domain event (or one entity's) as it happens, in order,
   * from `after` (an event-log position, or `'new'`: from now on). A dropped connection is
   * resumed from the last position seen, so no event is missed or repeated; end it with
   * `signal` or by leaving the `for await`.
   */
  async *streamEvents(
    o: { entityId?: string; after?: number | 'new'; signal?: AbortSignal } = {},
  ): AsyncGenerator<StreamEvent> {
    const query = { entityId: o.entityId, after: o.after === undefined ? undefined : o.after };
    for await (const f of this.#stream('/events/stream', query, undefined, o.signal)) {
      const entry = JSON.parse(f.data) as StreamEvent['entry'];
      yield { id: f.id ?? '', type: f.event ?? entry.type, entry };
    }
  }

  // ---- workflows ----------------------------------------------------------------------

  /** `POST /workflows`: registers a definition (a new version only when it changed). */
  createWorkflow(def: WorkflowDefinition, o: CallOptions = {}): Promise<Workflow> {
    return this.#post('/workflows', def, o);
  }
  /** `GET /workflows`: the latest version of each. */
  async listWorkflows(o: CallOptions = {}): Promise<Workflow[]> {
    const body = await this.#get<Workflow[] | { workflows?: Workflow[]; items?: Workflow[] }>(
      '/workflows',
      undefined,
      o,
    );
    return Array.isArray(body) ? body : (body.workflows ?? body.items ?? []);
  }
  getWorkflow(name: string, o: CallOptions = {}): Promise<Workflow> {
    return this.#get(`/workflows/${enc(name)}`, undefined, o);
  }
  getWorkflowVersion(name: string, version: number, o: CallOptions = {}): Promise<Workflow> {
    return this.#get(`/workflows/${enc(name)}/versions/${version}`, undefined, o);
  }

  // ---- inspection and operations ------------------------------------------------------

  /** `GET /machines`: each machine's name, version, states and events. */
  machines(o: CallOptions = {}): Promise<MachineListBody> {
    return this.#get('/machines', undefined, o);
  }
  /** `GET /machines/:name` (`task`, `ticket`, `workflow:NAME@VERSION`): Stately-loadable JSON. */
  machine(name: string, o: CallOptions = {}): Promise<Record<string, unknown>> {
    return this.#get(`/machines/${enc(name)}`, undefined, o);
  }
  /** `GET /machines/:name/mermaid`: a `stateDiagram-v2`, `state` highlighted. */
  mermaid(name: string, state?: string, o: CallOptions = {}): Promise<string> {
    return this.#call({
      method: 'GET',
      path: `/machines/${enc(name)}/mermaid`,
      query: { state },
      retry: 'safe',
      signal: o.signal,
      accept: 'text/plain',
    });
  }
  /** `GET /healthz`: resolves when the process answers. */
  health(o: CallOptions = {}): Promise<{ status: 'ok' }> {
    return this.#get('/healthz', undefined, o);
  }
  /**
   * `GET /readyz`: whether Postgres, NATS and the migrations are there. Not ready is an
   * answer here, not an error (the server says 503 with the same body).
   */
  async ready(o: CallOptions = {}): Promise<ReadinessBody> {
    try {
      return await this.#call({ method: 'GET', path: '/readyz', retry: 'never', signal: o.signal });
    } catch (error) {
      if (error instanceof UnavailableError && typeof error.body.ready === 'boolean') {
        return error.body as unknown as ReadinessBody;
      }
      throw error;
    }
  }
  /** `GET /metrics`: Prometheus text. */
  metrics(o: CallOptions = {}): Promise<string> {
    return this.#call({
      method: 'GET',
      path: '/metrics',
      retry: 'safe',
      signal: o.signal,
      accept: 'text/plain',
    });
  }
  /** `GET /dead-letters`: messages the reactions gave up on, newest first. */
  deadLetters(q: { limit?: number } = {}, o: CallOptions = {}): Promise<DeadLetters> {
    return this.#get('/dead-letters', { ...q }, o);
  }
  /** `GET /openapi.json`. */
  openapi(o: CallOptions = {}): Promise<Record<string, unknown>> {
    return this.#get('/openapi.json', undefined, o);
  }

  // ---- agents -------------------------------------------------------------------------

  /**
   * An agent that claims tasks and runs a handler on each: see `Agent.work`.
   * @example
   * await client.agent({ types: ['summarize'], concurrency: 2 }).work(async (task, ctx) => {
   *   ctx.log(`summarizing ${task.id}`);
   *   return { summary: await summarize(task.payload, { signal: ctx.signal }) };
   * });
   */
  agent(options: AgentOptions = {}): Agent {
    return new Agent(this, options);
  }

  // ---- the transport ------------------------------------------------------------------

  #get<T>(path: string, query: Request['query'], o: CallOptions): Promise<T> {
    return this.#call({ method: 'GET', path, query, retry: 'safe', signal: o.signal });
  }

  #post<T>(path: string, body: unknown, o: CallOptions): Promise<T> {
    return this.#call({
      method: 'POST',
      path,
      body,
      retry: 'key',
      signal: o.signal,
      idempotencyKey: o.idempotencyKey,
    });
  }

  #headers(r: Pick<Request, 'body' | 'accept'>, key?: string): Record<string, string> {
    const h: Record<string, string> = { accept: r.accept ?? 'application/json' };
    if (r.body !== undefined) h['content-type'] = 'application/json';
    if (this.#token) h.authorization = `Bearer ${this.#token}`;
    if (key) h['idempotency-key'] = key;
    return h;
  }

  #urlOf(path: string, query: Request['query']): string {
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(query ?? {})) if (v !== undefined) params.set(k, String(v));
    const qs = params.toString();
    return `${this.url}${path}${qs ? `?${qs}` : ''}`;
  }

  /** One request, retried when repeating it is safe; an error answer becomes its exception. */
  async #call<T>(r: Request): Promise<T> {
    const key =
      r.retry === 'key' ? (r.idempotencyKey ?? globalThis.crypto.randomUUID()) : undefined;
    const init: RequestInit = {
      method: r.method,
      headers: this.#headers(r, key),
      body: r.body === undefined ? undefined : JSON.stringify(r.body),
      signal: r.signal,
    };
    const url = this.#urlOf(r.path, r.query);
    const tries = r.retry === 'never' ? 1 : this.#retries + 1;
    for (let attempt = 1; ; attempt++) {
      let error: OrchestratorClientError;
      try {
        const res = await this.#fetch(url, init);
        if (res.ok) return (await bodyOf(res)) as T;
        error = errorFromResponse(res.status, await bodyOf(res).catch(() => null), res.headers);
        if (!RETRY_STATUS.has(res.status)) throw error;
      } catch (thrown) {
        if (thrown instanceof OrchestratorClientError) throw thrown;
        if (r.signal?.aborted) throw r.signal.reason;
        error = new NetworkError(
          'network',
          0,
          `${r.method} ${r.path}: ${describe(thrown)}`,
          {},
          {
            cause: thrown,
          },
        );
      }
      if (attempt >= tries) throw error;
      const backoff = Math.min(this.#retryBaseMs * 2 ** (attempt - 1), this.#retryMaxMs);
      const hinted = error instanceof UnavailableError ? error.retryAfterMs : undefined;
      await sleep(Math.min(hinted ?? backoff * (0.5 + Math.random() / 2), 10_000), r.signal);
    }
  }

  /**
   * An SSE route as frames, reconnecting with `Last-Event-ID` after a dropped connection
   * or a 503, until `signal` aborts or the caller stops iterating.
   */
  async *#stream(
    path: string,
    query: Request['query'],
    lastEventId: number | undefined,
    signal: AbortSignal | undefined,
  ) {
    let last = lastEventId === undefined ? undefined : String(lastEventId);
    let failures = 0;
    // Leaving the loop (break, return, throw) must close the connection too.
    const local = new AbortController();
    const stop = () => local.abort(signal?.reason);
    signal?.addEventListener('abort', stop, { once: true });
    try {
      while (!local.signal.aborted) {
        let res: Response;
        try {
          const headers = this.#headers({ accept: 'text/event-stream' });
          if (last !== undefined) headers['last-event-id'] = last;
          res = await this.#fetch(this.#urlOf(path, query), { headers, signal: local.signal });
        } catch (error) {
          if (local.signal.aborted) return;
          if (++failures > this.#retries) throw error;
          await sleep(this.#retryBaseMs * 2 ** Math.min(failures, 5), local.signal).catch(() => {});
          continue;
        }
        if (!res.ok || !res.body) {
          const error = errorFromResponse(
            res.status,
            await bodyOf(res).catch(() => null),
            res.headers,
          );
          if (!RETRY_STATUS.has(res.status) || ++failures > this.#retries) throw error;
          const wait = error instanceof UnavailableError ? error.retryAfterMs : undefined;
          await sleep(wait ?? this.#retryBaseMs * 2 ** failures, local.signal).catch(() => {});
          continue;
        }
        failures = 0;
        try {
          for await (const frame of readSse(res.body)) {
            if (frame.id !== undefined && frame.id !== '') last = frame.id;
            yield frame;
          }
        } catch (error) {
          if (local.signal.aborted) return;
          if (++failures > this.#retries) throw error;
        }
        // The server ended the stream (a restart, a slow-client cut): the loop resumes
        // after `last`, or, with nothing seen yet, from the position first asked for.
      }
    } finally {
      signal?.removeEventListener('abort', stop);
      local.abort();
    }
  }
}

const enc = encodeURIComponent;

async function bodyOf(res: Response): Promise<unknown> {
  if (res.status === 204 || res.status === 205) return null;
  const text = await res.text();
  if (text === '') return null;
  const type = res.headers.get('content-type') ?? '';
  if (!type.includes('json')) return text;
  return JSON.parse(text) as unknown;
}

function describe(error: unknown): string {
  const e = error as { message?: string; cause?: { code?: string; message?: string } };
  const cause = e?.cause?.code ?? e?.cause?.message;
  return `${e?.message ?? String(error)}${cause ? ` (${cause})` : ''}`;
}

/** Resolves after `ms`, or rejects with the signal's reason when it aborts first. */
export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = () => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}
