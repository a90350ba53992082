/**
 * Logging: pino. JSON lines by default (for collectors); readable lines when stdout is a
 * terminal. Every module takes a `Logger` (a child carrying its component, request id or
 * entity id), so nothing in the server writes to the console.
 */
import { type Logger as PinoLogger, pino } from 'pino';
import pretty from 'pino-pretty';

export type Logger = PinoLogger;

export function createLogger(level = 'info', readable = process.stdout.isTTY === true): Logger {
  if (readable) {
    // Synchronous, in-process formatting: no worker thread to outlive a shutdown.
    return pino(
      { level, base: { pid: process.pid } },
      pretty({ colorize: true, translateTime: 'HH:MM:ss.l', ignore: 'pid,hostname', sync: true }),
    );
  }
  return pino({ level, base: { pid: process.pid } });
}

/** A logger that drops everything (tests that do not assert on logs). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}

/**
 * `parent.child(bindings)`, made at the first use: a child of pino copies and serializes its
 * bindings when made, which for a logger per task (most of which never log) cost the worker
 * pool more than the rest of its own bookkeeping of the task.
 */
export function lazyChild(parent: Logger, bindings: Record<string, unknown>): Logger {
  let child: Logger | null = null;
  return new Proxy({} as Logger, {
    get(_, key) {
      child ??= parent.child(bindings);
      const value = Reflect.get(child, key, child) as unknown;
      return typeof value === 'function' ? value.bind(child) : value;
    },
  });
}
