/**
 * Workflows (CONTRACT section 5): register a definition (a new immutable version, or the
 * existing one for the same definition), list the latest of each, read one with its
 * versions, read one version, and the compiled machine in the Stately-loadable form at
 * `/machines/workflow:NAME@VERSION`.
 */
import { Hono } from 'hono';
import { bodyLimit } from 'hono/body-limit';
import { WORKFLOW_MAX_BYTES } from '../../actors/workflow-registry.js';
import { NotFound, UnknownWorkflow } from '../../errors.js';
import { HttpProblem } from '../errors.js';
import { idempotencyOf, readJson } from '../request.js';
import type { AppEnv, AppServices } from '../services.js';

const NAME = /^[a-z][a-z0-9_-]{0,63}$/;
const VERSION = /^[1-9][0-9]{0,8}$/;

export function workflowRoutes(s: AppServices): Hono<AppEnv> {
  const app = new Hono<AppEnv>();
  const registry = s.workflows;
  if (!registry) return app;

  /**
   * 201 `{name, version, description, phases, createdAt}` for a new version; 200 with the
   * stored version when the same definition was registered before; 400 validation_failed
   * naming the path of what the checks refused; 413 over 64 KiB.
   */
  app.post(
    '/workflows',
    bodyLimit({
      maxSize: WORKFLOW_MAX_BYTES,
      onError: () => {
        throw new HttpProblem(
          'payload_too_large',
          `a workflow definition is at most ${WORKFLOW_MAX_BYTES} bytes`,
        );
      },
    }),
    async (c) => {
      const raw = await readJson(c);
      const res = await s.host.idempotent(idempotencyOf(c, raw), async () => {
        const { created, workflow } = await registry.register(raw);
        return { status: created ? 201 : 200, body: workflow };
      });
      return c.json(res.body as object, res.status as 200 | 201);
    },
  );

  app.get('/workflows', async (c) => c.json({ workflows: await registry.list() }));

  /** The latest version and `versions` (number and creation time of each). */
  app.get('/workflows/:name', async (c) => {
    const name = c.req.param('name');
    const found = NAME.test(name) ? await registry.get(name) : null;
    if (!found) throw new NotFound('workflow', name.slice(0, 100));
    return c.json(found);
  });

  app.get('/workflows/:name/versions/:version', async (c) => {
    const { name, version } = c.req.param();
    const found =
      NAME.test(name) && VERSION.test(version)
        ? await registry.getVersion(name, Number(version))
        : null;
    if (!found) throw new NotFound('workflow', `${name.slice(0, 100)}@${version.slice(0, 12)}`);
    return c.json(found);
  });

  /** The compiled ticket machine of one version, as the Stately visualizer loads it. */
  app.get('/machines/:name{workflow:[^/]+}', async (c) => {
    const ref = c.req.param('name').slice('workflow:'.length);
    if (!ref.includes('@')) throw new NotFound('machine', `workflow:${ref.slice(0, 100)}`);
    try {
      const wf = await registry.resolve(ref);
      return c.json(JSON.parse(JSON.stringify(wf.machine)) as object);
    } catch (error) {
      if (error instanceof UnknownWorkflow) {
        throw new NotFound('machine', `workflow:${ref.slice(0, 100)}`);
      }
      throw error;
    }
  });

  return app;
}
