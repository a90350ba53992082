/**
 * Plans of the statements the code under test really sends: a postgres.js connection wrapped
 * so that every tagged statement beginning with SELECT or WITH is first EXPLAINed (FORMAT
 * JSON) with the same parameters and fragments, its plan handed to `onPlan`, then run as
 * usual. EXPLAIN without ANALYZE runs nothing, so a WITH that writes is planned, not applied.
 */
import postgres from 'postgres';
import type { Tx } from '../../src/persistence/db.js';

export interface PlanNode {
  'Node Type': string;
  'Relation Name'?: string;
  'Index Name'?: string;
  'Parent Relationship'?: string;
  Plans?: PlanNode[];
}

/** The node and every node below it. */
export function planNodes(plan: PlanNode): PlanNode[] {
  return [plan, ...(plan.Plans ?? []).flatMap(planNodes)];
}

/** The tables a plan reads by a sequential scan. */
export function seqScanned(plan: PlanNode): string[] {
  return planNodes(plan)
    .filter((n) => n['Node Type'] === 'Seq Scan')
    .map((n) => n['Relation Name'] ?? '?');
}

export function explaining(target: Tx, onPlan: (plan: PlanNode) => void): Tx {
  return new Proxy(target, {
    apply(fn, thisArg, args: unknown[]) {
      const [strings, ...values] = args;
      const isTemplate =
        Array.isArray(strings) && Array.isArray((strings as { raw?: unknown }).raw);
      if (!isTemplate || !/^\s*(select|with)\b/i.test(String((strings as string[])[0]))) {
        return Reflect.apply(fn, thisArg, args);
      }
      const parts = strings as string[];
      const explained = Object.assign([`explain (format json) ${parts[0]}`, ...parts.slice(1)], {
        raw: [`explain (format json) ${parts[0]}`, ...parts.slice(1)],
      });
      const run = (async () => {
        const rows = (await Reflect.apply(fn, thisArg, [explained, ...values])) as {
          'QUERY PLAN': { Plan: PlanNode }[];
        }[];
        const plan = rows[0]?.['QUERY PLAN'][0]?.Plan;
        if (!plan) throw new Error('EXPLAIN returned no plan');
        onPlan(plan);
        return Reflect.apply(fn, thisArg, args);
      })();
      // Code that sends a statement with `.execute()` gets the same promise.
      return Object.assign(run, { execute: () => run });
    },
  });
}

/**
 * The generic plans of the SELECT and WITH statements `send` issues on a connection of its
 * own: what a prepared statement runs after its fifth execution when Postgres finds that plan
 * no costlier, planned without the parameters' values (an array counts as 10 elements). Each
 * statement is captured as the driver sends it, then PREPAREd and EXPLAINed with
 * `plan_cache_mode = force_generic_plan`.
 */
export async function genericPlans(
  url: string,
  send: (sql: Tx) => Promise<unknown>,
): Promise<PlanNode[]> {
  // By text: the driver may report a statement more than once, its parameters not yet bound
  // in one of the reports.
  const sent = new Map<string, unknown[]>();
  const sql = postgres(url, {
    max: 1,
    onnotice: () => {},
    types: { bigint: { to: 20, from: [20], serialize: String, parse: Number } },
    debug: (_connection, text, params) => {
      if (!/^\s*(select|with)\b/i.test(text)) return;
      if (params.length > 0 || !sent.has(text)) sent.set(text, [...params]);
    },
  });
  try {
    await send(sql as unknown as Tx);
    const plans: PlanNode[] = [];
    await sql.begin(async (tx) => {
      await tx`set local plan_cache_mode = force_generic_plan`;
      for (const [i, s] of [...sent].map(([text, params]) => ({ text, params })).entries()) {
        // The parameters' types as the server infers them for the statement as sent.
        const { types } = await tx.unsafe(s.text).describe();
        const [named] = await tx<{ names: string[] }[]>`
          select array(select format_type(t, null) from unnest(${types}::oid[]) t) as names`;
        const typed = named?.names.length ? `(${named.names.join(', ')})` : '';
        await tx.unsafe(`prepare generic_${i}${typed} as ${s.text}`);
        // EXECUTE's arguments as literals: an EXPLAIN's own parameters get no types.
        const args: string[] = [];
        for (const [k, t] of (named?.names ?? []).entries()) {
          const [lit] = await tx.unsafe(`select quote_literal($1::${t}::text) as v`, [
            s.params[k] as never,
          ]);
          args.push(`${(lit as unknown as { v: string }).v}::${t}`);
        }
        const rows = await tx.unsafe(
          `explain (format json) execute generic_${i}${args.length ? `(${args.join(', ')})` : ''}`,
        );
        const plan = (rows[0] as { 'QUERY PLAN': { Plan: PlanNode }[] } | undefined)?.[
          'QUERY PLAN'
        ][0]?.Plan;
        if (!plan) throw new Error('EXPLAIN returned no plan');
        plans.push(plan);
        await tx.unsafe(`deallocate generic_${i}`);
      }
    });
    return plans;
  } finally {
    await sql.end({ timeout: 5 });
  }
}
