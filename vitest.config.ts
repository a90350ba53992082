import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
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
