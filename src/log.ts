/**
 * Logging: pino, JSON lines by default. Every module takes a `Logger` (a child carrying its
 * component, request id or entity id), so nothing in the server writes to the console.
 */
import { type Logger as PinoLogger, pino } from 'pino';

export type Logger = PinoLogger;

export function createLogger(level = 'info'): Logger {
  return pino({ level, base: { pid: process.pid } });
}

/** A logger that drops everything (tests that do not assert on logs). */
export function silentLogger(): Logger {
  return pino({ level: 'silent' });
}
