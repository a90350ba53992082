/** How a rule acts on another actor: an event its state refuses means the rule has nothing to do. */
import type { DecideEvent } from '../actors/decide.js';
import type { Applied, UnitOfWork } from '../actors/host.js';
import { IllegalTransition, NotFound } from '../errors.js';
import type { EntityType } from '../machines/index.js';

/**
 * Sends `event` to an actor read fresh from Postgres (or as this transaction left it, never
 * from the process cache: a cached row may be behind another process). A refusal (older
 * news, a state that no longer takes it) or a missing actor is answered with null.
 */
export async function sendIfAccepted(
  uow: UnitOfWork,
  entityType: EntityType,
  id: string,
  event: DecideEvent,
): Promise<Applied | null> {
  uow.host.forget(entityType, id);
  try {
    return await uow.send(entityType, id, event);
  } catch (error) {
    if (error instanceof IllegalTransition || error instanceof NotFound) return null;
    throw error;
  }
}
