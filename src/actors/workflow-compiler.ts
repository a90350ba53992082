/** The registry's compiler: the definition schema, `verifyWorkflow` and the machine factory. */
import { compileWorkflow } from '../machines/workflow.js';
import { DEFAULT_WORKFLOW, parseWorkflowDefinition } from '../workflows/definition.js';
import { verifyWorkflow } from '../workflows/verify.js';
import type { WorkflowCompiler } from './workflow-registry.js';

export function workflowCompiler(): WorkflowCompiler {
  return {
    check(raw) {
      const parsed = parseWorkflowDefinition(raw);
      if (!parsed.ok) return { issues: parsed.findings };
      const findings = verifyWorkflow(parsed.definition);
      return findings.length > 0 ? { issues: findings } : { definition: parsed.definition };
    },
    compile: compileWorkflow,
    builtIn: DEFAULT_WORKFLOW,
  };
}
