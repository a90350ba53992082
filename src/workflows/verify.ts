/**
 * Structural checks of a workflow (CONTRACT section 5, "verified before accepted"): the
 * template and loop rules read from the definition, then reachability read from the
 * compiled machine's own state graph, so what is verified is what will run.
 */
import type { AnyStateMachine, AnyStateNode } from 'xstate';
import { compileWorkflow } from '../machines/workflow.js';
import {
  isGate,
  type PhaseDefinition,
  type WorkflowDefinition,
} from '../machines/workflow-definition.js';
import {
  type Finding,
  MAX_PHASES,
  MAX_TEMPLATES_PER_PHASE,
  RESERVED_STATE_NAMES,
} from './definition.js';

export type { Finding } from './definition.js';

/**
 * Every finding of a (schema-valid) definition, each with the path it is about, e.g.
 * `phases[1].onReject.sendBackTo`. Empty: the workflow may be registered.
 */
export function verifyWorkflow(def: WorkflowDefinition): Finding[] {
  const findings = definitionFindings(def);
  // A definition whose names do not resolve cannot be compiled; its graph is not checked.
  if (findings.length > 0) return findings;
  const compiled = compileWorkflow(def, 1);
  return graphFindings(compiled.machine, compiled.phases);
}

function definitionFindings(def: WorkflowDefinition): Finding[] {
  const out: Finding[] = [];
  if (def.phases.length === 0 || def.phases.length > MAX_PHASES) {
    out.push({ path: 'phases', message: `a workflow has 1 to ${MAX_PHASES} phases` });
  }
  const seen = new Map<string, number>();
  def.phases.forEach((phase, i) => {
    const at = `phases[${i}]`;
    if ((RESERVED_STATE_NAMES as readonly string[]).includes(phase.name)) {
      out.push({ path: `${at}.name`, message: `${phase.name} is a reserved state name` });
    }
    const first = seen.get(phase.name);
    if (first !== undefined) {
      out.push({
        path: `${at}.name`,
        message: `phase ${phase.name} is already phases[${first}]`,
      });
    } else seen.set(phase.name, i);
  });
  def.phases.forEach((phase, i) => {
    const at = `phases[${i}]`;
    const rule = isGate(phase) ? phase.onReject : phase.onFail;
    const ruleKey = isGate(phase) ? 'onReject' : 'onFail';
    if (rule) {
      const target = def.phases.findIndex((p) => p.name === rule.sendBackTo);
      if (target === -1) {
        out.push({
          path: `${at}.${ruleKey}.sendBackTo`,
          message: `${rule.sendBackTo} is not a phase of this workflow`,
        });
      } else if (target > i) {
        out.push({
          path: `${at}.${ruleKey}.sendBackTo`,
          message: `${rule.sendBackTo} comes after ${phase.name}: send back to this or an earlier phase`,
        });
      }
    }
    out.push(...templateFindings(phase, at));
  });
  return out;
}

function templateFindings(phase: PhaseDefinition, at: string): Finding[] {
  if (isGate(phase)) return [];
  const tasks = phase.tasks ?? [];
  const out: Finding[] = [];
  if (tasks.length > MAX_TEMPLATES_PER_PHASE) {
    out.push({ path: `${at}.tasks`, message: `at most ${MAX_TEMPLATES_PER_PHASE} templates` });
  }
  const index = new Map<string, number>();
  tasks.forEach((t, j) => {
    if (index.has(t.key)) {
      out.push({
        path: `${at}.tasks[${j}].key`,
        message: `key ${t.key} is already tasks[${index.get(t.key)}] of ${phase.name}`,
      });
    } else index.set(t.key, j);
  });
  tasks.forEach((t, j) => {
    (t.dependsOn ?? []).forEach((dep, k) => {
      if (!index.has(dep)) {
        out.push({
          path: `${at}.tasks[${j}].dependsOn[${k}]`,
          message: `${dep} is not a template key of phase ${phase.name}`,
        });
      } else if (dep === t.key) {
        out.push({
          path: `${at}.tasks[${j}].dependsOn[${k}]`,
          message: `${dep} depends on itself`,
        });
      }
    });
  });
  // Cycles: a depth-first walk; each template on a cycle is named once, with the cycle.
  const state = new Map<string, 'open' | 'done'>();
  const deps = new Map(tasks.map((t) => [t.key, (t.dependsOn ?? []).filter((d) => index.has(d))]));
  const reported = new Set<string>();
  const visit = (key: string, stack: string[]) => {
    state.set(key, 'open');
    for (const dep of deps.get(key) ?? []) {
      if (dep === key) continue;
      if (state.get(dep) === 'open') {
        const cycle = [...stack.slice(stack.indexOf(dep)), key, dep];
        if (!reported.has(dep)) {
          reported.add(dep);
          out.push({
            path: `${at}.tasks[${index.get(dep)}].dependsOn`,
            message: `dependency cycle: ${cycle.join(' -> ')}`,
          });
        }
      } else if (state.get(dep) === undefined) visit(dep, [...stack, key]);
    }
    state.set(key, 'done');
  };
  for (const t of tasks) if (state.get(t.key) === undefined) visit(t.key, []);
  return out;
}

/** A machine's top-level states and, per state, the states its transitions can reach. */
export function stateGraph(machine: AnyStateMachine): Map<string, Set<string>> {
  const graph = new Map<string, Set<string>>();
  const root = machine.root;
  for (const node of Object.values(root.states) as AnyStateNode[]) {
    const targets = new Set<string>();
    const add = (defs: Iterable<{ target?: readonly AnyStateNode[] }>) => {
      for (const t of defs) for (const n of t.target ?? []) targets.add(topLevel(n, root));
    };
    if (node.type !== 'final') {
      for (const defs of node.transitions.values()) add(defs);
      for (const [eventType, defs] of root.transitions) {
        if (!node.transitions.has(eventType)) add(defs);
      }
      add(node.always ?? []);
    }
    graph.set(node.key, targets);
  }
  return graph;
}

function topLevel(node: AnyStateNode, root: AnyStateNode): string {
  let n = node;
  while (n.parent && n.parent !== root) n = n.parent;
  return n.key;
}

function reachableFrom(graph: Map<string, Set<string>>, start: string): Set<string> {
  const seen = new Set([start]);
  const queue = [start];
  while (queue.length > 0) {
    for (const next of graph.get(queue.shift()!) ?? []) {
      if (!seen.has(next)) {
        seen.add(next);
        queue.push(next);
      }
    }
  }
  return seen;
}

/**
 * Reachability on the machine's graph: every state reachable from the initial state, and
 * `done` reachable from every non-final state. `phases` names the phase states so findings
 * point into the definition (`phases[2]`); other states are named as they are.
 */
export function graphFindings(machine: AnyStateMachine, phases: readonly string[]): Finding[] {
  const graph = stateGraph(machine);
  const pathOf = (state: string) => {
    const i = phases.indexOf(state);
    return i === -1 ? `states.${state}` : `phases[${i}]`;
  };
  const out: Finding[] = [];
  const initial = String(machine.config.initial ?? 'backlog');
  const fromInitial = reachableFrom(graph, initial);
  for (const state of graph.keys()) {
    if (!fromInitial.has(state)) {
      out.push({ path: pathOf(state), message: `${state} is not reachable from ${initial}` });
    }
  }
  for (const state of graph.keys()) {
    const node = machine.root.states[state] as AnyStateNode;
    if (node.type === 'final' || !fromInitial.has(state)) continue;
    if (!reachableFrom(graph, state).has('done')) {
      out.push({ path: pathOf(state), message: `done is not reachable from ${state}` });
    }
  }
  return out;
}
