/**
 * Checks responses against the served `/openapi.json` itself (not the zod schemas it came
 * from): each component is turned back into a validator with `z.fromJSONSchema`.
 */
import { z } from 'zod';

interface Doc {
  components: { schemas: Record<string, unknown> };
  paths: Record<string, Record<string, { responses: Record<string, unknown> }>>;
}

export function openApiChecker(doc: Doc) {
  const defs = JSON.parse(
    JSON.stringify(doc.components.schemas).replaceAll('#/components/schemas/', '#/$defs/'),
  ) as Record<string, unknown>;
  const cache = new Map<string, z.ZodType>();
  const schema = (name: string) => {
    let s = cache.get(name);
    if (!s) {
      s = z.fromJSONSchema({ $defs: defs, $ref: `#/$defs/${name}` } as never);
      cache.set(name, s);
    }
    return s;
  };
  /** Throws when `body` is not what the document says `method path` answers with `status`. */
  return (method: string, path: string, status: number, body: unknown): void => {
    const op = doc.paths[path]?.[method.toLowerCase()];
    if (!op) throw new Error(`${method} ${path} is not in the OpenAPI document`);
    const response = op.responses[String(status)] as
      | { content?: Record<string, { schema?: { $ref?: string } }> }
      | undefined;
    if (!response) throw new Error(`${method} ${path} ${status} is not documented`);
    const ref = response.content?.['application/json']?.schema?.$ref;
    if (!ref) return;
    const name = ref.slice(ref.lastIndexOf('/') + 1);
    const result = schema(name).safeParse(body);
    if (!result.success) {
      throw new Error(
        `${method} ${path} ${status} does not match ${name}: ${JSON.stringify(result.error.issues).slice(0, 800)}\n${JSON.stringify(body).slice(0, 800)}`,
      );
    }
  };
}
