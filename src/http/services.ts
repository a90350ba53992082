/**
 * What the HTTP layer needs from the rest of the system, as interfaces: the composition root
 * passes concrete services in, tests pass real ones or small fakes. http never reaches for
 * Postgres or NATS itself.
 */

import type { Commands } from '../actors/commands.js';
import type { ActorHost } from '../actors/host.js';
import type { TaskOutput } from '../actors/output.js';
import type { WorkflowRegistry } from '../actors/workflow-registry.js';
import type { Config } from '../config.js';
import type { Logger } from '../log.js';
import type { Queries } from '../persistence/queries.js';
import type { ClaimService } from '../workers/claims.js';

/** One domain event as the ordered feed delivers it. */
export interface StreamMessage {
  /**
   * The event's position in the event log (its `pos`): the SSE `id:`, what `Last-Event-ID`
   * resumes after.
   */
  position: number;
  entry: {
    seq: number;
    entityId: string;
    entityType: string;
    type: string;
    data: Record<string, unknown>;
    at: string;
  };
}

/** A live subscription: `close` ends it; `done` settles when it ends on its own. */
export interface EventFeed {
  close(): Promise<void>;
  readonly done?: Promise<void>;
}

/**
 * The ordered event feed (the Transport's live feed): every event after a position ('new':
 * from now on), once, in order. `onMessage` is called one message at a time: the next waits
 * for the promise it returns. `bufferLimit` bounds what the source queues for this client.
 */
export interface EventSource {
  subscribeEvents(
    after: number | 'new',
    entityId: string | undefined,
    onMessage: (message: StreamMessage) => void | Promise<void>,
    options?: { bufferLimit?: number },
  ): Promise<EventFeed>;
}

/** Machine definitions for `/machines` and the dashboard's statecharts. */
export interface MachineCatalog {
  list(): {
    name: string;
    version: number;
    states: string[];
    events: string[];
    systemEvents: string[];
  }[];
  /** The JSON the Stately visualizer loads; undefined for an unknown name. */
  definition(name: string): unknown;
  /** Mermaid `stateDiagram-v2` text with `currentState` highlighted; undefined if unknown. */
  mermaid(name: string, currentState?: string): string | undefined;
}

export interface Readiness {
  postgres: boolean;
  nats: boolean;
  migrations: boolean;
}

export interface AppServices {
  host: ActorHost;
  commands: Commands;
  claims: ClaimService;
  queries: Queries;
  machines: MachineCatalog;
  /** The workflow registry behind `/workflows`; without it those routes are not found. */
  workflows?: WorkflowRegistry;
  log: Logger;
  config: Pick<
    Config,
    | 'API_TOKEN'
    | 'BODY_LIMIT_BYTES'
    | 'CLAIM_MAX_WAIT_MS'
    | 'PAYLOAD_MAX_BYTES'
    | 'SSE_MAX_CLIENTS'
    | 'OUTPUT_MAX_BYTES'
  >;
  /** Task output (`/tasks/:id/output`); without it those routes answer 503. */
  output?: TaskOutput;
  /** The live stream behind `GET /events/stream`; without it the route answers 503. */
  events?: EventSource;
  /** `/readyz`: each dependency reachable, migrations applied. */
  ready(): Promise<Readiness>;
  /** Extra Prometheus text from other components (transport, relay, workers). */
  metrics?: () => string | Promise<string>;
  sse?: {
    /** Keep-alive comment interval (default 15 s). */
    keepAliveMs?: number;
    /**
     * Events queued for one client (default 1000). Past it the live feed sends the client
     * back to read from Postgres; a source that does not wait for delivery disconnects it.
     */
    bufferLimit?: number;
  };
}

/**
 * What the probes and `/metrics` need: the part of the services every process has, a
 * worker's included (it serves them on OPS_PORT).
 */
export type OpsServices = Pick<
  AppServices,
  'host' | 'claims' | 'queries' | 'log' | 'ready' | 'metrics'
> & {
  config: Pick<Config, 'API_TOKEN'>;
};

export interface AppEnv {
  Variables: {
    requestId: string;
    /** The verified credential (`bearer:<sha256 of the token>`); unset when auth is off. */
    credential?: string;
  };
}
