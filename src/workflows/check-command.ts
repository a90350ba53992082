/**
 * `orchestrator workflow check FILE.json`: the registration checks offline (schema, size,
 * `verifyWorkflow`) plus a model run of the compiled machine through `decide()`. Prints the
 * coverage and every finding with its path; exit 1 on any finding, 2 on a usage error, 3 when
 * the model run could not finish (inconclusive: no verdict on the workflow either way).
 * `--max-vertices N` bounds the model run (default MODEL_MAX_VERTICES).
 */
import { readFile } from 'node:fs/promises';
import { compileWorkflow } from '../machines/workflow.js';
import { type Finding, parseWorkflowJson } from './definition.js';
import { MODEL_MAX_VERTICES, modelSummary, runWorkflowModel } from './model-run.js';
import { verifyWorkflow } from './verify.js';

export const WORKFLOW_USAGE = 'usage: orchestrator workflow check [--max-vertices N] FILE.json';

interface Out {
  out: (text: string) => void;
  err: (text: string) => void;
}

const stdio: Out = {
  out: (t) => process.stdout.write(t),
  err: (t) => process.stderr.write(t),
};

export async function workflowCommand(argv: string[], io: Out = stdio): Promise<number> {
  const args = argv.slice(1);
  let maxVertices = MODEL_MAX_VERTICES;
  if (args[0] === '--max-vertices') {
    const n = Number(args[1]);
    if (!Number.isInteger(n) || n < 1 || n > MODEL_MAX_VERTICES) {
      io.err(`--max-vertices: an integer from 1 to ${MODEL_MAX_VERTICES}\n${WORKFLOW_USAGE}\n`);
      return 2;
    }
    maxVertices = n;
    args.splice(0, 2);
  }
  if (argv[0] !== 'check' || args.length !== 1) {
    io.err(`${WORKFLOW_USAGE}\n`);
    return 2;
  }
  const file = args[0]!;
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (error) {
    io.err(`cannot read ${file}: ${(error as Error).message}\n`);
    return 2;
  }
  const findings: Finding[] = [];
  let inconclusive: string | undefined;
  const parsed = parseWorkflowJson(text);
  if (!parsed.ok) findings.push(...parsed.findings);
  else {
    findings.push(...verifyWorkflow(parsed.definition));
    if (findings.length === 0) {
      const compiled = compileWorkflow(parsed.definition, 1);
      const report = runWorkflowModel(compiled, { maxVertices });
      io.out(`${modelSummary(`workflow ${compiled.name}`, report)}\n`);
      findings.push(...report.findings);
      inconclusive = report.inconclusive;
    }
  }
  for (const f of findings) io.out(`${file}: ${f.path}: ${f.message}\n`);
  if (findings.length > 0) {
    io.out(`${file}: ${findings.length} finding(s)\n`);
    return 1;
  }
  if (inconclusive) {
    // Not a finding: the run proved nothing either way about what it did not reach.
    io.out(`${file}: inconclusive: ${inconclusive}; the coverage above is no verdict\n`);
    return 3;
  }
  io.out(`${file}: ok\n`);
  return 0;
}
