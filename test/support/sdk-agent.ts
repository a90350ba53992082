/**
 * An agent process built on the client by its package name, for sdk-agents.test.ts:
 * `node --import tsx test/support/sdk-agent.ts` with ORCHESTRATOR_URL, WORKER_ID and
 * MARKER_DIR. Each attempt appends start/end (or abort) lines with times to
 * MARKER_DIR/<task>.<attempt>; once work() resolves it writes the handles still open and
 * lets the process end by itself, which it only can if nothing of the agent is left running.
 */
import { appendFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { OrchestratorClient, type TaskAbortedError } from 'actor-orchestrator/client';

const dir = process.env.MARKER_DIR!;
const workerId = process.env.WORKER_ID!;
const mark = (file: string, what: Record<string, unknown>) =>
  appendFileSync(
    file,
    `${JSON.stringify({ ...what, at: Date.now(), workerId, pid: process.pid })}\n`,
  );

const agent = new OrchestratorClient().agent({
  workerId,
  types: ['sdk'],
  concurrency: 2,
  waitMs: 1_000,
  shutdownGraceMs: 1_000,
  onError: () => {},
});
await agent.work(async (task, ctx) => {
  const file = join(dir, `${task.id}.${ctx.attempt}`);
  mark(file, { event: 'start' });
  ctx.log(`${workerId} runs attempt ${ctx.attempt}\n`);
  const ms = (task.payload as { ms: number }).ms;
  try {
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(resolve, ms);
      ctx.signal.addEventListener(
        'abort',
        () => {
          clearTimeout(timer);
          reject(ctx.signal.reason);
        },
        { once: true },
      );
    });
  } catch (error) {
    mark(file, { event: 'abort', reason: (error as TaskAbortedError).reason });
    throw error;
  }
  mark(file, { event: 'end' });
  return { workerId, attempt: ctx.attempt };
});
writeFileSync(
  join(dir, `exit-${workerId}.json`),
  JSON.stringify({ resources: process.getActiveResourcesInfo() }),
);
