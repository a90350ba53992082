/**
 * The error model. Every failure that crosses a boundary is an `OrchestratorError` with a
 * machine-readable `code`; HTTP maps codes to statuses in one place (`src/http/errors.ts`) and
 * the JetStream consumers decide between `term()` and `nak()` from `retryable`.
 */

export type ErrorCode =
  | 'validation_failed'
  | 'unauthorized'
  | 'not_found'
  | 'illegal_transition'
  | 'stale_token'
  | 'conflict'
  | 'version_conflict'
  | 'payload_too_large'
  | 'unsupported_media_type'
  | 'unsupported_snapshot'
  | 'unknown_workflow'
  | 'unavailable'
  | 'internal';

export abstract class OrchestratorError extends Error {
  abstract readonly code: ErrorCode;
  /** True when the same operation may succeed if tried again (a lost race, a service down). */
  abstract readonly retryable: boolean;
  /** Extra fields that belong in the error body, beside `error` and `message`. */
  details(): Record<string, unknown> {
    return {};
  }
}

/** The current state does not accept the event, or its guard refused it. Nothing was written. */
export class IllegalTransition extends OrchestratorError {
  readonly code = 'illegal_transition';
  readonly retryable = false;
  constructor(
    readonly entityId: string,
    readonly state: string,
    readonly event: string,
    readonly allowed: string[],
    /** True when the state handles the event but its guard refused it now. */
    readonly guarded = false,
    /** `ticket` or `task`, for metrics by entity. */
    readonly entityType?: string,
  ) {
    super(
      guarded
        ? `event ${event} is not allowed now in state ${state}: its guard refused it`
        : `event ${event} is not accepted in state ${state} (allowed: ${allowed.join(', ') || 'none'})`,
    );
    this.name = 'IllegalTransition';
  }
  override details() {
    return { state: this.state, event: this.event, allowed: this.allowed };
  }
}

/** A worker event carried a fencing token that is not the live claim's. Nothing was written. */
export class StaleToken extends OrchestratorError {
  readonly code = 'stale_token';
  readonly retryable = false;
  constructor(
    readonly entityId: string,
    readonly attempt: number,
  ) {
    super(`token is not the current claim's token (task ${entityId} is at attempt ${attempt})`);
    this.name = 'StaleToken';
  }
  override details() {
    return { attempt: this.attempt };
  }
}

export class NotFound extends OrchestratorError {
  readonly code = 'not_found';
  readonly retryable = false;
  constructor(
    readonly entityType: string,
    readonly entityId: string,
  ) {
    super(`no ${entityType} ${entityId}`);
    this.name = 'NotFound';
  }
}

/** Bad input from outside; `issues` name each offending field. */
export class InvalidInput extends OrchestratorError {
  readonly code = 'validation_failed';
  readonly retryable = false;
  constructor(
    message: string,
    readonly issues: { path: string; message: string }[] = [],
  ) {
    super(message);
    this.name = 'InvalidInput';
  }
  override details() {
    return this.issues.length > 0 ? { issues: this.issues } : {};
  }
}

/** A compare-and-set lost to another writer; the caller reloads and tries again. */
export class VersionConflict extends OrchestratorError {
  readonly code = 'version_conflict';
  readonly retryable = true;
  constructor(
    readonly entityId: string,
    readonly expected: number,
  ) {
    super(`${entityId} changed since version ${expected}`);
    this.name = 'VersionConflict';
  }
}

/** A request that contradicts an earlier one, e.g. an idempotency key reused with another body. */
export class Conflict extends OrchestratorError {
  readonly code = 'conflict';
  readonly retryable = false;
  constructor(message: string) {
    super(message);
    this.name = 'Conflict';
  }
}

/** A stored snapshot written by a machine version this build cannot read. */
export class UnsupportedSnapshot extends OrchestratorError {
  readonly code = 'unsupported_snapshot';
  readonly retryable = false;
  constructor(
    readonly entityId: string,
    readonly storedVersion: number,
    readonly supported: number,
  ) {
    super(
      `${entityId} was stored by machine version ${storedVersion}; this build reads version ${supported}`,
    );
    this.name = 'UnsupportedSnapshot';
  }
}

/** A service the operation needs (Postgres, NATS) did not answer. */
export class Unavailable extends OrchestratorError {
  readonly code = 'unavailable';
  readonly retryable = true;
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'Unavailable';
  }
}

/**
 * A workflow ref (`NAME` or `NAME@VERSION`) that names no registered version. From input it
 * is a 400 naming the field; on a stored ticket it means its machine cannot be loaded, and
 * the ticket is refused rather than run on another machine.
 */
export class UnknownWorkflow extends OrchestratorError {
  readonly code = 'unknown_workflow';
  readonly retryable = false;
  constructor(readonly ref: string) {
    super(`no workflow ${ref.slice(0, 200)} is registered`);
    this.name = 'UnknownWorkflow';
  }
  override details() {
    return { workflow: this.ref.slice(0, 200) };
  }
}
