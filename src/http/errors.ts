/**
 * The one mapping from errors to HTTP responses (CONTRACT section 2): every error body is
 * `{error, message, ...details}`; an `OrchestratorError` keeps its code, anything else is a
 * logged `internal` 500 that names the request id and nothing more.
 */
import type { Context } from 'hono';
import type { ContentfulStatusCode } from 'hono/utils/http-status';
import { type ErrorCode, OrchestratorError, Unavailable } from '../errors.js';
import type { Logger } from '../log.js';

export const STATUS: Record<ErrorCode, ContentfulStatusCode> = {
  validation_failed: 400,
  unauthorized: 401,
  not_found: 404,
  illegal_transition: 409,
  stale_token: 409,
  conflict: 409,
  version_conflict: 409,
  unsupported_snapshot: 409,
  unknown_workflow: 409,
  payload_too_large: 413,
  unsupported_media_type: 415,
  unavailable: 503,
  internal: 500,
};

/** Errors only the HTTP edge raises (auth, media type, size, unknown route). */
export class HttpProblem extends OrchestratorError {
  readonly retryable = false;
  constructor(
    readonly code: 'unauthorized' | 'payload_too_large' | 'unsupported_media_type' | 'not_found',
    message: string,
    /** The fields at fault, as `validation_failed` names them. */
    readonly issues: { path: string; message: string }[] = [],
  ) {
    super(message);
    this.name = 'HttpProblem';
  }
  override details() {
    return this.issues.length > 0 ? { issues: this.issues } : {};
  }
}

export interface ErrorBody {
  error: ErrorCode;
  message: string;
  [detail: string]: unknown;
}

/**
 * The database going away under a request (a restart, a failover, a killed backend) is not
 * a bug in the request: it is answered 503 `unavailable`, and the client may retry (an
 * Idempotency-Key makes that safe).
 */
const TRANSIENT = new Set([
  'CONNECTION_CLOSED',
  'CONNECTION_DESTROYED',
  'CONNECTION_ENDED',
  'CONNECT_TIMEOUT',
  'ECONNREFUSED',
  'ECONNRESET',
  '57P01', // admin_shutdown (pg_terminate_backend)
  '57P02', // crash_shutdown
  '57P03', // cannot_connect_now
  '53300', // too_many_connections
  '40001', // serialization_failure
  '40P01', // deadlock_detected
]);

export function asAnswer(error: unknown): unknown {
  if (error instanceof OrchestratorError) return error;
  const code = (error as { code?: unknown } | null)?.code;
  if (typeof code === 'string' && (TRANSIENT.has(code) || code.startsWith('08'))) {
    return new Unavailable(`the database is unavailable (${code}); retry`, { cause: error });
  }
  return error;
}

export function errorBody(error: unknown, requestId: string): ErrorBody {
  if (error instanceof OrchestratorError) {
    return { ...error.details(), error: error.code, message: error.message };
  }
  return { error: 'internal', message: `internal error (request ${requestId})`, requestId };
}

export function statusOf(error: unknown): ContentfulStatusCode {
  return error instanceof OrchestratorError ? STATUS[error.code] : 500;
}

/**
 * The answer to a request Node refused before the app saw it (`clientError`, by Node's
 * error code) or that @hono/node-server could not turn into a URL: the status Node would
 * have sent, with the API's error body.
 */
export function refusedRequest(nodeCode: string | undefined): { status: number; body: ErrorBody } {
  switch (nodeCode) {
    case 'HPE_HEADER_OVERFLOW':
      return {
        status: 431,
        body: { error: 'payload_too_large', message: 'the request headers are over the limit' },
      };
    case 'HPE_CHUNK_EXTENSIONS_OVERFLOW':
      return {
        status: 413,
        body: { error: 'payload_too_large', message: 'the chunk extensions are over the limit' },
      };
    case 'ERR_HTTP_REQUEST_TIMEOUT':
      return {
        status: 408,
        body: { error: 'validation_failed', message: 'the request did not arrive in time' },
      };
    case 'REQUEST_TARGET':
      return {
        status: 400,
        body: { error: 'validation_failed', message: 'the request URL or Host header is invalid' },
      };
    default:
      return {
        status: 400,
        body: {
          error: 'validation_failed',
          message: `malformed HTTP request${nodeCode ? ` (${nodeCode})` : ''}`,
        },
      };
  }
}

/** `app.onError`: the response for anything a handler or middleware threw. */
export function errorHandler(log: Logger) {
  return (thrown: unknown, c: Context) => {
    const error = asAnswer(thrown);
    const requestId = (c.get('requestId') as string | undefined) ?? 'unknown';
    const status = statusOf(error);
    if (status >= 500) {
      log.error(
        { err: error, requestId, method: c.req.method, path: c.req.path },
        'request failed',
      );
    }
    if (error instanceof Unavailable) c.header('Retry-After', '1');
    if (error instanceof OrchestratorError && error.code === 'unauthorized') {
      c.header('WWW-Authenticate', 'Bearer');
    }
    return c.json(errorBody(error, requestId), status);
  };
}
