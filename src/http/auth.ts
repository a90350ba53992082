/**
 * Bearer-token auth when API_TOKEN is set: the API's and the ops listener's one check. The
 * token is compared as a SHA-256 digest in constant time, so neither its length nor a prefix
 * leaks through timing.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { MiddlewareHandler } from 'hono';
import { HttpProblem } from './errors.js';
import { requestHeader } from './node-io.js';
import type { AppEnv } from './services.js';

/** The probes an orchestrator of pods or units calls without credentials. */
export const PROBES = ['/healthz', '/readyz'] as const;

const digest = (s: string) => createHash('sha256').update(s).digest();

export function bearerAuth(
  token: string | undefined,
  isPublic: (path: string) => boolean,
): MiddlewareHandler<AppEnv> {
  const expected = token ? digest(token) : null;
  return async (c, next) => {
    if (!expected || isPublic(c.req.path)) return next();
    const header = requestHeader(c, 'authorization') ?? '';
    const m = /^Bearer\s+(.+)$/i.exec(header);
    const given = m?.[1] ? digest(m[1].trim()) : null;
    if (!given || !timingSafeEqual(given, expected)) {
      throw new HttpProblem('unauthorized', 'a valid bearer token is required');
    }
    // Idempotency keys are scoped by it; a digest, never the token, reaches storage.
    c.set('credential', `bearer:${given.toString('hex')}`);
    return next();
  };
}
