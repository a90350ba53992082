/**
 * Reading a request: the JSON body (415 for another media type, 400 for malformed JSON),
 * validation against a zod schema into `validation_failed` with every bad field named, and
 * the `Idempotency-Key` that makes a POST safe to repeat.
 */
import type { Context } from 'hono';
import type { z } from 'zod';
import type { IdempotencyOptions } from '../actors/host.js';
import { InvalidInput } from '../errors.js';
import { HttpProblem } from './errors.js';
import { requestHeader } from './node-io.js';
import type { AppEnv } from './services.js';

export interface Issue {
  path: string;
  message: string;
}

/** Turns zod issues into `{path, message}` pairs; each unknown key gets its own. */
export function toIssues(issues: readonly z.core.$ZodIssue[], prefix = ''): Issue[] {
  const out: Issue[] = [];
  const at = (p: readonly PropertyKey[]) => [prefix, ...p.map(String)].filter(Boolean).join('.');
  for (const i of issues) {
    if (i.code === 'unrecognized_keys') {
      for (const k of i.keys) out.push({ path: at([...i.path, k]), message: 'unknown field' });
    } else {
      out.push({ path: at(i.path) || prefix || '(body)', message: i.message });
    }
  }
  return out;
}

/** Validates `value`, or throws `validation_failed` naming every offending field. */
export function validate<S extends z.ZodType>(
  schema: S,
  value: unknown,
  where: string,
): z.output<S> {
  const parsed = schema.safeParse(value);
  if (parsed.success) return parsed.data;
  const issues = toIssues(parsed.error.issues, where === 'body' ? '' : where);
  const fields = [...new Set(issues.map((i) => i.path))].join(', ');
  throw new InvalidInput(`invalid ${where}: ${fields}`, issues);
}

export function isJsonMediaType(contentType: string | undefined): boolean {
  if (!contentType) return false;
  const type = contentType.split(';')[0]?.trim().toLowerCase() ?? '';
  return type === 'application/json' || /^application\/[a-z0-9.+-]+\+json$/.test(type);
}

const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: false });

/** The parsed JSON body. The body-limit middleware has already bounded its size. */
export async function readJson(c: Context): Promise<unknown> {
  if (!isJsonMediaType(requestHeader(c, 'content-type'))) {
    throw new HttpProblem('unsupported_media_type', 'the body must be application/json');
  }
  let text: string;
  try {
    // Strict: a lenient decode would store U+FFFD in place of every invalid byte, silently.
    text = STRICT_UTF8.decode(await c.req.arrayBuffer());
  } catch {
    throw new InvalidInput('the body is not valid UTF-8', [
      { path: '(body)', message: 'invalid UTF-8' },
    ]);
  }
  if (text.trim() === '') {
    throw new InvalidInput('the body is empty; send a JSON object', [
      { path: '(body)', message: 'required' },
    ]);
  }
  let value: unknown;
  try {
    value = JSON.parse(text) as unknown;
  } catch (error) {
    throw new InvalidInput(`malformed JSON: ${(error as Error).message}`, [
      { path: '(body)', message: 'malformed JSON' },
    ]);
  }
  const bad = storableProblems(value);
  if (bad.length > 0) throw new InvalidInput(`invalid body: ${bad[0]?.path}`, bad);
  return value;
}

const MAX_DEPTH = 64;
const LONE_SURROGATE = /[\ud800-\udbff](?![\udc00-\udfff])|(?<![\ud800-\udbff])[\udc00-\udfff]/;

/**
 * What Postgres jsonb cannot store: NUL characters and unpaired surrogates, in any string
 * or key, and nesting deeper than MAX_DEPTH. Checked iteratively, so depth cannot overflow.
 */
export function storableProblems(value: unknown): Issue[] {
  const issues: Issue[] = [];
  const stack: { v: unknown; path: string; depth: number }[] = [{ v: value, path: '', depth: 0 }];
  const badString = (s: string) => s.includes('\0') || LONE_SURROGATE.test(s);
  while (stack.length > 0 && issues.length < 20) {
    const { v, path, depth } = stack.pop()!;
    if (typeof v === 'string') {
      if (badString(v))
        issues.push({ path: path || '(body)', message: 'NUL or unpaired surrogate' });
    } else if (v !== null && typeof v === 'object') {
      if (depth >= MAX_DEPTH) {
        issues.push({ path: path || '(body)', message: `nested deeper than ${MAX_DEPTH}` });
        continue;
      }
      for (const [k, child] of Object.entries(v)) {
        const p = path ? `${path}.${k}` : k;
        if (badString(k)) issues.push({ path: p, message: 'NUL or unpaired surrogate in key' });
        else stack.push({ v: child, path: p, depth: depth + 1 });
      }
    }
  }
  return issues;
}

/**
 * Refuses a value whose JSON encoding is over `max` bytes of UTF-8 (`PAYLOAD_MAX_BYTES`):
 * 413 `payload_too_large` naming `field`. Bytes, not characters, are what Postgres stores.
 */
export function capJsonBytes(field: string, value: unknown, max: number): void {
  if (value === undefined) return;
  const bytes = Buffer.byteLength(JSON.stringify(value), 'utf8');
  if (bytes <= max) return;
  const message = `${bytes} bytes of JSON, over the ${max}-byte cap`;
  throw new HttpProblem('payload_too_large', `${field} is ${message}`, [{ path: field, message }]);
}

export async function readBody<S extends z.ZodType>(c: Context, schema: S): Promise<z.output<S>> {
  return validate(schema, await readJson(c), 'body');
}

/** JSON with sorted keys: the same body always hashes the same way. */
export function canonicalJson(value: unknown): string {
  return JSON.stringify(value, (_k, v: unknown) =>
    v && typeof v === 'object' && !Array.isArray(v)
      ? Object.fromEntries(Object.entries(v as object).sort(([a], [b]) => (a < b ? -1 : 1)))
      : v,
  );
}

const KEY = /^[\x21-\x7e]{1,200}$/;

/**
 * Whose idempotency keys a request uses: the verified credential, or `anonymous` when auth
 * is off. Another credential presenting the same key makes a fresh request, so it can never
 * read the first one's response. A later namespace (tenant) scope is one more `kind:value`
 * part of this string; storage keys on (scope, key) and needs no change.
 */
export function idempotencyScope(c: Context<AppEnv>): string {
  return c.get('credential') ?? 'anonymous';
}

/** The request's idempotency key with what identifies the request; undefined without one. */
export function idempotencyOf(c: Context<AppEnv>, body: unknown): IdempotencyOptions | undefined {
  const key = requestHeader(c, 'idempotency-key');
  if (key === undefined) return undefined;
  if (!KEY.test(key)) {
    throw new InvalidInput('Idempotency-Key must be 1-200 visible ASCII characters', [
      { path: 'Idempotency-Key', message: 'invalid header' },
    ]);
  }
  return {
    scope: idempotencyScope(c),
    key,
    request: `${c.req.method} ${c.req.path}\n${canonicalJson(body)}`,
  };
}
