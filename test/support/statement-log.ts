/**
 * A pool that records every statement it hands to a connection, in order, with the turn of
 * the event loop it was handed over in: a statement sent only after another was answered is
 * sent in a later turn (answers arrive as I/O, after this turn's setImmediate callbacks), so
 * tests can tell statements sent together in one round trip from ones sent in sequence.
 */
import postgres from 'postgres';
import type { Sql } from '../../src/persistence/db.js';

export interface Sent {
  query: string;
  turn: number;
  /** The driver's number for the connection it went out on. */
  connection: number;
}

export function recordingSql(url: string, max: number): { sql: Sql; sent: Sent[] } {
  const sent: Sent[] = [];
  let turn = 0;
  let ticking = false;
  const sql = postgres(url, {
    max,
    onnotice: () => {},
    // As createSql parses them: the code under test reads bigint columns as numbers.
    types: { bigint: { to: 20, from: [20], serialize: String, parse: Number } },
    debug: (connection, query) => {
      sent.push({ query, turn, connection });
      if (ticking) return;
      ticking = true;
      setImmediate(() => {
        turn++;
        ticking = false;
      });
    },
  }) as unknown as Sql;
  return { sql, sent };
}
