/**
 * `actor-orchestrator/client`: the orchestrator's HTTP API from TypeScript, with no server
 * code behind it. `new OrchestratorClient({url, token})` for typed calls;
 * `client.agent({...}).work(handler)` to run tasks as an agent.
 * @module
 */
export {
  type AbortCause,
  Agent,
  type AgentOptions,
  type AgentTask,
  TaskAbortedError,
  type TaskContext,
  type TaskHandler,
} from './agent.js';
export { type CallOptions, type ClientOptions, OrchestratorClient } from './client.js';
export {
  ConflictError,
  IllegalTransitionError,
  InternalError,
  type Issue,
  NetworkError,
  NotFoundError,
  OrchestratorClientError,
  PayloadTooLargeError,
  StaleTokenError,
  UnauthorizedError,
  UnavailableError,
  UnsupportedMediaTypeError,
  ValidationError,
} from './errors.js';
export type * from './types.js';
