import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    // Two test files at a time, whatever the machine: the files spend most of their time
    // waiting on Postgres, NATS and timers, so two halve the suite's time on a 2-core machine
    // (where Vitest's default is one), and more would crowd Postgres's 100 connections (the
    // heaviest files open over 30 each).
    maxWorkers: 2,
    projects: [
      {
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
          testTimeout: 60_000,
          hookTimeout: 60_000,
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
