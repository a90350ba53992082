/**
 * The settings a process refuses to start with, because they would hand the machine to
 * whoever reaches it: pure, so `main.ts` decides and prints, and tests call it directly.
 *
 * - `api` and `all` serve HTTP. Without `API_TOKEN` anyone who reaches the port drives the
 *   orchestrator, so they need a token when HOST is not loopback; and an `all` process with
 *   the shell executor runs the commands its own API accepts, so it needs one even on
 *   loopback (every local user, and every local process, reaches 127.0.0.1).
 * - A `worker` serves nothing: the shell commands it runs come from an API elsewhere that it
 *   cannot inspect, so it only warns that this API must require a token.
 * - `all` and `worker` run shell tasks: never as root unless SHELL_ALLOW_ROOT says so.
 */
import type { Config } from './config.js';
import type { Role } from './runtime.js';

type SecurityConfig = Pick<
  Config,
  'HOST' | 'API_TOKEN' | 'ENABLE_SHELL_EXECUTOR' | 'SHELL_ALLOW_ROOT' | 'SHELL_ENV_PASSTHROUGH'
>;

/** Variables that hold this process's own secrets: a shell task must not see them. */
const SECRET_VARIABLES = ['API_TOKEN', 'DATABASE_URL', 'NATS_CREDS', 'NATS_TLS_KEY'];

/** `localhost`, 127.0.0.0/8 or ::1 (in any spelling, IPv4-mapped included). */
export function isLoopback(host: string): boolean {
  const h = host.trim().toLowerCase().replace(/\.$/, '');
  if (h === 'localhost') return true;
  let name: string;
  try {
    // The URL parser canonicalises both families: `0:0::1` → `[::1]`, `127.1` → `127.0.0.1`,
    // `::ffff:127.0.0.1` → `[::ffff:7f00:1]`.
    name = new URL(`http://${h.includes(':') ? `[${h.replace(/^\[|\]$/g, '')}]` : h}/`).hostname;
  } catch {
    return false;
  }
  if (name === '[::1]') return true;
  if (/^\[::ffff:7f[0-9a-f]{2}:[0-9a-f]{1,4}\]$/.test(name)) return true;
  return /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(name);
}

const servesHttp = (role: Role) => role === 'api' || role === 'all';
const runsShell = (config: SecurityConfig, role: Role) =>
  config.ENABLE_SHELL_EXECUTOR && (role === 'worker' || role === 'all');

/**
 * One line per reason this process must not start, each saying what to set; empty when it
 * may. `uid` is the process's (undefined where there are no uids, as on Windows).
 */
export function startupRefusals(
  config: SecurityConfig,
  role: Role,
  uid: number | undefined,
): string[] {
  const out: string[] = [];
  if (servesHttp(role) && !config.API_TOKEN) {
    if (!isLoopback(config.HOST)) {
      out.push(
        `HOST=${config.HOST} is not a loopback address and API_TOKEN is unset: anyone who reaches the port could drive the orchestrator; set API_TOKEN, or HOST=127.0.0.1`,
      );
    } else if (runsShell(config, role)) {
      out.push(
        'ENABLE_SHELL_EXECUTOR=1 and API_TOKEN is unset: any local user or process could run commands as this one through the API; set API_TOKEN, or run the shell executor in a separate worker process',
      );
    }
  }
  if (runsShell(config, role) && uid === 0 && !config.SHELL_ALLOW_ROOT) {
    out.push(
      'ENABLE_SHELL_EXECUTOR=1 as root (uid 0): shell tasks would run as root; run as an unprivileged user, or set SHELL_ALLOW_ROOT=1 to accept it',
    );
  }
  return out;
}

/** What this process may start with but should not be left like: one line each. */
export function startupWarnings(config: SecurityConfig, role: Role): string[] {
  const out: string[] = [];
  if (role === 'worker' && config.ENABLE_SHELL_EXECUTOR && !config.API_TOKEN) {
    out.push(
      'this worker runs shell tasks created through the API, and cannot check that API: it must require API_TOKEN',
    );
  }
  const leaked = config.ENABLE_SHELL_EXECUTOR
    ? config.SHELL_ENV_PASSTHROUGH.filter((n) => SECRET_VARIABLES.includes(n))
    : [];
  if (leaked.length > 0) {
    out.push(
      `SHELL_ENV_PASSTHROUGH gives shell tasks ${leaked.join(', ')}: a task that prints it puts it in its result, the event log and the event stream`,
    );
  }
  return out;
}
