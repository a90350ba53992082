/**
 * `orchestrator workflow check FILE.json`: the registration checks offline (schema, size,
 * `verifyWorkflow`) plus a model run of the compiled machine through `decide()`. Prints the
 * coverage and every finding with its path; exit 1 on any finding, 2 on a usage error.
 */
import { readFile } from 'node:fs/promises';
import { compileWorkflow } from '../machines/workflow.js';
import { type Finding, parseWorkflowJson } from './definition.js';
import { modelSummary, runWorkflowModel } from './model-run.js';
import { verifyWorkflow } from './verify.js';

export const WORKFLOW_USAGE = 'usage: orchestrator workflow check FILE.json';

interface Out {
  out: (text: string) => void;
  err: (text: string) => void;
}

const stdio: Out = {
  out: (t) => process.stdout.write(t),
  err: (t) => process.stderr.write(t),
};

export async function workflowCommand(argv: string[], io: Out = stdio): Promise<number> {
  if (argv[0] !== 'check' || argv.length !== 2) {
    io.err(`${WORKFLOW_USAGE}\n`);
    return 2;
  }
  const file = argv[1]!;
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (error) {
    io.err(`cannot read ${file}: ${(error as Error).message}\n`);
    return 2;
  }
  const findings: Finding[] = [];
  const parsed = parseWorkflowJson(text);
  if (!parsed.ok) findings.push(...parsed.findings);
  else {
    findings.push(...verifyWorkflow(parsed.definition));
    if (findings.length === 0) {
      const compiled = compileWorkflow(parsed.definition, 1);
      const report = runWorkflowModel(compiled);
      io.out(`${modelSummary(`workflow ${compiled.name}`, report)}\n`);
      findings.push(...report.findings);
    }
  }
  for (const f of findings) io.out(`${file}: ${f.path}: ${f.message}\n`);
  io.out(findings.length === 0 ? `${file}: ok\n` : `${file}: ${findings.length} finding(s)\n`);
  return findings.length === 0 ? 0 : 1;
}
