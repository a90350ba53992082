/** The built-in executors a worker process registers, from its configuration. */
import type { Config } from '../../config.js';
import { ExecutorRegistry } from './executor.js';
import { ShellExecutor } from './shell.js';
import { SleepExecutor } from './sleep.js';

export * from './executor.js';
export { ShellExecutor, type ShellExecutorOptions } from './shell.js';
export { SleepExecutor } from './sleep.js';

/** `sleep` always; `shell` only with `ENABLE_SHELL_EXECUTOR`; never `external`. */
export function createExecutors(
  config: Pick<
    Config,
    | 'ENABLE_SHELL_EXECUTOR'
    | 'SHELL_TIMEOUT_MS'
    | 'SHELL_ALLOW_ROOT'
    | 'SHELL_ENV_PASSTHROUGH'
    | 'SHELL_CWD_ROOT'
  >,
): ExecutorRegistry {
  const registry = new ExecutorRegistry().register(new SleepExecutor());
  if (config.ENABLE_SHELL_EXECUTOR) {
    registry.register(
      new ShellExecutor({
        timeoutMs: config.SHELL_TIMEOUT_MS,
        allowRoot: config.SHELL_ALLOW_ROOT,
        envPassthrough: config.SHELL_ENV_PASSTHROUGH,
        cwdRoot: config.SHELL_CWD_ROOT,
      }),
    );
  }
  return registry;
}
