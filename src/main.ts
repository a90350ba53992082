/**
 * `bin/orchestrator [all|api|worker]`: validates the configuration, starts one runtime in
 * this process, prints where it listens, and shuts down cleanly on SIGTERM or SIGINT
 * (a second signal exits at once).
 */
import { ConfigError, loadConfig, roleConfigProblems } from './config.js';
import { OrchestratorError } from './errors.js';
import { createLogger } from './log.js';
import { ROLES, type Role, redact, startRuntime } from './runtime.js';
import { startupRefusals, startupWarnings } from './security.js';
import { redactNatsUrl } from './transport/nats.js';
import { codeOrigin, packageVersion } from './version.js';

const USAGE = `usage: orchestrator [all|api|worker]   (configuration: environment, see README)
       orchestrator --version
       orchestrator workflow check FILE.json
       orchestrator agent [options] -- COMMAND [ARGS...]   (orchestrator agent --help)
       orchestrator mcp   (a Model Context Protocol server on stdio)`;

async function main(argv: string[]): Promise<number> {
  const arg = argv[0] ?? 'all';
  if (arg === '-h' || arg === '--help') {
    process.stdout.write(`${USAGE}\n`);
    return 0;
  }
  if (arg === '-v' || arg === '--version') {
    process.stdout.write(`actor-orchestrator ${packageVersion()} (${codeOrigin()})\n`);
    return 0;
  }
  // Tools and clients of a running orchestrator, not roles of one: loaded on demand.
  if (arg === 'workflow') {
    return (await import('./workflows/check-command.js')).workflowCommand(argv.slice(1));
  }
  if (arg === 'agent') return (await import('./agent/cli.js')).runAgentCli(argv.slice(1));
  if (arg === 'mcp') return (await import('./agent/mcp.js')).runMcpServer(argv.slice(1));
  if (!ROLES.includes(arg as Role)) {
    process.stderr.write(`unknown role "${arg}"\n${USAGE}\n`);
    return 2;
  }
  const role = arg as Role;
  let config: ReturnType<typeof loadConfig>;
  try {
    config = loadConfig();
    const problems = roleConfigProblems(config, role);
    if (problems.length > 0) throw new ConfigError(problems);
  } catch (error) {
    if (error instanceof ConfigError) {
      process.stderr.write(`${error.message}\n`);
      return 2;
    }
    throw error;
  }
  const refusals = startupRefusals(config, role, process.getuid?.());
  if (refusals.length > 0) {
    process.stderr.write(refusals.map((r) => `refusing to start: ${r}\n`).join(''));
    return 2;
  }
  const log = createLogger(config.LOG_LEVEL);
  for (const warning of startupWarnings(config, role)) log.warn(warning);
  // Signals are handled from the first moment: one that arrives while starting (initdb can
  // take seconds) stops the runtime as soon as it is up, instead of killing the process and
  // orphaning an embedded database.
  let stopRequested: NodeJS.Signals | null = null;
  let onStopRequest: ((signal: NodeJS.Signals) => void) | null = null;
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopRequested) {
      log.warn({ signal }, 'second signal: exiting now');
      process.exit(1);
    }
    stopRequested = signal;
    onStopRequest?.(signal);
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);

  let runtime: Awaited<ReturnType<typeof startRuntime>>;
  try {
    runtime = await startRuntime(config, role, log);
  } catch (error) {
    // An explained failure (a server missing, out of reach) needs its message, not a stack.
    if (error instanceof OrchestratorError) log.fatal({ code: error.code }, error.message);
    else log.fatal({ err: error }, 'could not start');
    process.stderr.write(
      `orchestrator: ${error instanceof Error ? error.message : String(error)}\n`,
    );
    return 1;
  }
  const summary = [
    `role=${role}`,
    `db=${runtime.embeddedDataDir ? `embedded (${runtime.embeddedDataDir})` : redact(runtime.databaseUrl)}`,
    `nats=${redactNatsUrl(runtime.natsUrl)}`,
    role === 'api' ? null : `worker=${config.WORKER_ID} x${config.WORKER_CONCURRENCY}`,
    `lease=${config.LEASE_MS}ms`,
    `shell=${config.ENABLE_SHELL_EXECUTOR ? 'on' : 'off'}`,
    `auth=${config.API_TOKEN ? 'bearer' : 'none'}`,
    `code=${codeOrigin()}`,
  ]
    .filter(Boolean)
    .join(' ');
  log.info({ role, url: runtime.url, opsUrl: runtime.opsUrl }, 'orchestrator started');
  const ops = runtime.opsUrl ? `, ops on ${runtime.opsUrl}` : '';
  process.stdout.write(
    `${runtime.url ? `orchestrator listening on ${runtime.url}` : 'orchestrator worker running'}${ops} (${summary})\n`,
  );

  return new Promise<number>((resolve) => {
    const stop = (signal: NodeJS.Signals) => {
      log.info({ signal }, 'shutting down');
      runtime.stop().then(
        () => {
          log.info('stopped cleanly');
          resolve(0);
        },
        (error: unknown) => {
          log.error({ err: error }, 'shutdown failed');
          resolve(1);
        },
      );
    };
    if (stopRequested) stop(stopRequested);
    else onStopRequest = stop;
  });
}

const code = await main(process.argv.slice(2));
// Flush pino (sync destination by default) and leave, even if a stray handle lingers.
process.exit(code);
