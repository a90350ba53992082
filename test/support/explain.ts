/**
 * Plans of the statements the code under test really sends: a postgres.js connection wrapped
 * so that every tagged statement beginning with SELECT or WITH is first EXPLAINed (FORMAT
 * JSON) with the same parameters and fragments, its plan handed to `onPlan`, then run as
 * usual. EXPLAIN without ANALYZE runs nothing, so a WITH that writes is planned, not applied.
 */
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
