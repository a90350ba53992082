/**
 * Structural checks of a workflow, run on the compiled machine's graph (so they verify what
 * will actually run) plus the template rules of CONTRACT section 5.
 */
import type { WorkflowDefinition } from '../machines/workflow-definition.js';
import type { Finding } from './definition.js';

export type { Finding } from './definition.js';

export function verifyWorkflow(_def: WorkflowDefinition): Finding[] {
  return [];
}
