import { defaultServerConditions } from 'vite';
import { defineConfig } from 'vitest/config';

// `actor-orchestrator/client` resolves to its TypeScript source under test (the package's
// `source` condition), not to the build in dist/ that plain Node gets: the tests then check
// the code as it is, built or not.
const sourceFirst = { conditions: ['source', ...defaultServerConditions] };

export default defineConfig({
  test: {
    // Two test files at a time, whatever the machine: the files spend most of their time
    // waiting on Postgres, NATS and timers, so two halve the suite's time on a 2-core machine
    // (where Vitest's default is one), and more would crowd Postgres's 100 connections (the
    // heaviest files open over 30 each). The chaos run goes last, on its own (groupOrder), as
    // it ran when files ran one at a time: beside another file, one run left a task in
    // retry_wait past its 60 s settle (docs/BENCHMARKS.md section 39; the cause is not found).
    maxWorkers: 2,
    projects: [
      {
        resolve: sourceFirst,
        ssr: { resolve: sourceFirst },
        test: {
          name: 'unit',
          include: [
            'test/machines/**/*.test.ts',
            'test/actors/**/*.test.ts',
            'test/client/**/*.test.ts',
            'test/workers/**/*.test.ts',
            'test/persistence/**/*.test.ts',
            'test/transport/**/*.test.ts',
            'test/config/**/*.test.ts',
          ],
        },
      },
      {
        test: {
          name: 'integration',
          include: ['test/integration/**/*.test.ts'],
          exclude: ['test/integration/chaos.test.ts'],
          testTimeout: 60_000,
          hookTimeout: 60_000,
        },
      },
      {
        test: {
          name: 'chaos',
          include: ['test/integration/chaos.test.ts'],
          testTimeout: 60_000,
          hookTimeout: 60_000,
          sequence: { groupOrder: 1 },
        },
      },
      {
        test: {
          name: 'browser',
          include: ['test/browser/**/*.test.ts'],
          testTimeout: 60_000,
          hookTimeout: 60_000,
        },
      },
    ],
  },
});
