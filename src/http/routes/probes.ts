/**
 * What an operator's probes and scraper read: liveness, readiness (503 until Postgres, NATS
 * and migrations are all there) and Prometheus metrics. Served by the API and, on OPS_PORT,
 * by any process (`ops-app.ts`), a worker's included.
 */
import { Hono } from 'hono';
import { family, type Histogram } from '../metrics.js';
import { processMetrics, watchEventLoop } from '../process-metrics.js';
import type { AppEnv, OpsServices } from '../services.js';

export function probeRoutes(s: OpsServices, httpLatency: Histogram): Hono<AppEnv> {
  const app = new Hono<AppEnv>();
  watchEventLoop();

  app.get('/healthz', (c) => c.json({ status: 'ok' as const }));

  app.get('/readyz', async (c) => {
    const r = await s.ready().catch(() => ({ postgres: false, nats: false, migrations: false }));
    const ready = r.postgres && r.nats && r.migrations;
    return c.json({ ready, ...r }, ready ? 200 : 503);
  });

  app.get('/metrics', async (c) => {
    const extra = s.metrics ? await s.metrics() : '';
    // A family another component already reports (e.g. the transport's dead letters) is
    // left out here: Prometheus refuses a family declared twice.
    const taken = new Set([...extra.matchAll(/^# TYPE (\S+)/gm)].map((m) => m[1]));
    const parts = [httpLatency.render(), hostMetrics(s), await dbMetrics(s), await processMetrics()]
      .flatMap(splitFamilies)
      .filter((f) => !taken.has(/^# TYPE (\S+)/m.exec(f)?.[1]));
    parts.push(extra);
    c.header('Content-Type', 'text/plain; version=0.0.4; charset=utf-8');
    return c.body(parts.join(''));
  });

  return app;
}

/** Splits exposition text into its families (each starts at a `# HELP` line). */
function splitFamilies(text: string): string[] {
  return text
    .split(/^(?=# HELP )/m)
    .filter((f) => f.trim() !== '')
    .map((f) => (f.endsWith('\n') ? f : `${f}\n`));
}

function hostMetrics(s: OpsServices): string {
  const split = (key: string) => key.split(':');
  const transitions = [...s.host.stats.transitions].map(([key, value]) => {
    const [entity = '', event = '', change = ''] = split(key);
    const [from = '', to = ''] = change.split('->');
    return { labels: { entity, event, from, to }, value };
  });
  const illegal = [...s.host.stats.illegal].map(([key, value]) => {
    const [entity = '', state = '', event = ''] = split(key);
    return { labels: { entity, state, event }, value };
  });
  return [
    family(
      'orch_transitions_total',
      'counter',
      'Applied transitions by entity, event and change of state.',
      transitions,
    ),
    family(
      'orch_illegal_transitions_total',
      'counter',
      'Refused events by entity, state and event.',
      illegal,
    ),
    family('orch_version_conflicts_total', 'counter', 'Lost compare-and-sets (retried).', [
      { value: s.host.stats.conflicts },
    ]),
    // Group commit: units per commit is the batching; reruns are units whose batch another
    // unit's failure rolled back.
    family('orch_commits_total', 'counter', 'Write transactions the host committed.', [
      { value: s.host.commits.stats.commits },
    ]),
    family('orch_commit_units_total', 'counter', 'Units of work those transactions held.', [
      { value: s.host.commits.stats.units },
    ]),
    family(
      'orch_commit_reruns_total',
      'counter',
      'Units run again after another unit of their batch failed.',
      [{ value: s.host.commits.stats.reruns }],
    ),
    family('orch_commit_failures_total', 'counter', 'Write transactions whose commit failed.', [
      { value: s.host.commits.stats.failedCommits },
    ]),
    family('orch_commit_waiting', 'gauge', 'Units of work waiting for a free commit lane.', [
      { value: s.host.commits.waiting },
    ]),
    family('orch_claims_total', 'counter', 'Tasks claimed through this process.', [
      { value: s.claims.claims },
    ]),
    family('orch_claim_attempts_total', 'counter', 'Claim transactions run, won or not.', [
      { value: s.claims.attempts },
    ]),
    family('orch_claim_waiters', 'gauge', 'Claims in a long poll in this process.', [
      { value: s.claims.waiters },
    ]),
    family('orch_cached_actors', 'gauge', 'Actors held in the host cache.', [
      { value: s.host.cachedActors },
    ]),
    family('orch_cached_actor_bytes', 'gauge', 'Snapshot bytes held in the host cache.', [
      { value: s.host.cachedBytes },
    ]),
  ].join('');
}

async function dbMetrics(s: OpsServices): Promise<string> {
  try {
    const [lag, dead, counts] = await Promise.all([
      s.queries.outboxLag(),
      s.queries.deadLetterCount(),
      s.queries.stateCounts(),
    ]);
    return [
      family(
        'orch_outbox_pending',
        'gauge',
        'Events committed, not yet acknowledged by JetStream.',
        [{ value: lag.pending }],
      ),
      family('orch_outbox_lag_seconds', 'gauge', 'Age of the oldest unpublished event.', [
        { value: lag.oldestSeconds },
      ]),
      family('orch_dead_letters', 'gauge', 'Messages reactions gave up on.', [{ value: dead }]),
      family(
        'orch_entities',
        'gauge',
        'Tickets and tasks by state.',
        counts.map((r) => ({ labels: { entity: r.entityType, state: r.state }, value: r.n })),
      ),
    ].join('');
  } catch {
    return family('orch_metrics_db_up', 'gauge', 'Whether the database figures could be read.', [
      { value: 0 },
    ]);
  }
}
