/**
 * The API's errors (CONTRACT section 2) as exceptions: one class per `error` code, all
 * under `OrchestratorClientError` with the `code` and HTTP `status` the server answered.
 * `NetworkError` (status 0) is the one the server never sent: it did not answer at all.
 */
import type { ErrorBody } from './types.js';

export interface Issue {
  path: string;
  message: string;
}

export class OrchestratorClientError extends Error {
  constructor(
    /** The body's `error` field (`not_found`, `stale_token`...), or `network`. */
    readonly code: string,
    /** The HTTP status; 0 when no response arrived. */
    readonly status: number,
    message: string,
    /** The whole error body as the server sent it. */
    readonly body: Record<string, unknown> = {},
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.name = new.target.name;
  }
  /** The server's `X-Request-Id`, to find the request in its logs. */
  requestId?: string;
}

/** 400: the request named fields the server refused; `issues` lists each. */
export class ValidationError extends OrchestratorClientError {
  get issues(): Issue[] {
    return (this.body.issues as Issue[] | undefined) ?? [];
  }
}
/** 401: `API_TOKEN` is set on the server and the token was missing or wrong. */
export class UnauthorizedError extends OrchestratorClientError {}
/** 404: no such ticket, task, workflow, machine or route. */
export class NotFoundError extends OrchestratorClientError {}
/** 409: the entity's current `state` does not accept `event`; `allowed` lists what it accepts. */
export class IllegalTransitionError extends OrchestratorClientError {
  get state(): string {
    return String(this.body.state ?? '');
  }
  get event(): string {
    return String(this.body.event ?? '');
  }
  get allowed(): string[] {
    return (this.body.allowed as string[] | undefined) ?? [];
  }
}
/** 409: the token is not the current claim's; the task is now at `attempt`. */
export class StaleTokenError extends OrchestratorClientError {
  get attempt(): number {
    return Number(this.body.attempt ?? 0);
  }
}
/** 409 (or 422): e.g. an Idempotency-Key reused with another body. */
export class ConflictError extends OrchestratorClientError {}
/** 413: the body (or a field of it) is over the server's limit. */
export class PayloadTooLargeError extends OrchestratorClientError {}
/** 415: the body was not JSON. */
export class UnsupportedMediaTypeError extends OrchestratorClientError {}
/** 503: a service the server needs is down, or a limit is reached; retry after `retryAfterMs`. */
export class UnavailableError extends OrchestratorClientError {
  /** From the `Retry-After` header, in milliseconds; undefined when the server gave none. */
  retryAfterMs?: number;
}
/** 500: a server bug; `requestId` finds it in the server's log. */
export class InternalError extends OrchestratorClientError {}
/** No answer: the connection failed or was cut (after the client's retries). */
export class NetworkError extends OrchestratorClientError {}

type ErrorClass = new (
  code: string,
  status: number,
  message: string,
  body?: Record<string, unknown>,
  options?: ErrorOptions,
) => OrchestratorClientError;

const BY_CODE: Record<string, ErrorClass> = {
  validation_failed: ValidationError,
  unauthorized: UnauthorizedError,
  not_found: NotFoundError,
  illegal_transition: IllegalTransitionError,
  stale_token: StaleTokenError,
  conflict: ConflictError,
  version_conflict: ConflictError,
  payload_too_large: PayloadTooLargeError,
  unsupported_media_type: UnsupportedMediaTypeError,
  unavailable: UnavailableError,
  internal: InternalError,
};

const BY_STATUS: Record<number, ErrorClass> = {
  400: ValidationError,
  401: UnauthorizedError,
  404: NotFoundError,
  409: ConflictError,
  413: PayloadTooLargeError,
  415: UnsupportedMediaTypeError,
  422: ConflictError,
  431: PayloadTooLargeError,
  503: UnavailableError,
};

/** The exception for an error response: by its `error` code, else by its status. */
export function errorFromResponse(
  status: number,
  body: unknown,
  headers: Headers,
): OrchestratorClientError {
  const b: Partial<ErrorBody> & Record<string, unknown> =
    body !== null && typeof body === 'object' ? (body as Record<string, unknown>) : {};
  const code = typeof b.error === 'string' ? b.error : `http_${status}`;
  const Class = BY_CODE[code] ?? BY_STATUS[status] ?? (status >= 500 ? InternalError : null);
  const message = typeof b.message === 'string' ? b.message : `HTTP ${status}`;
  const error = new (Class ?? OrchestratorClientError)(code, status, message, b);
  error.requestId = headers.get('x-request-id') ?? undefined;
  if (error instanceof UnavailableError) error.retryAfterMs = retryAfterMs(headers);
  return error;
}

/** `Retry-After` as seconds or an HTTP date, in milliseconds from now. */
export function retryAfterMs(headers: Headers): number | undefined {
  const raw = headers.get('retry-after');
  if (raw === null) return undefined;
  if (/^\d+$/.test(raw.trim())) return Number(raw.trim()) * 1000;
  const at = Date.parse(raw);
  return Number.isNaN(at) ? undefined : Math.max(0, at - Date.now());
}
