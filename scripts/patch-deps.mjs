// Patches two dependencies in node_modules. Idempotent; run by `postinstall`, so `npm ci`
// always yields patched copies. A patch whose expected code is missing fails the install at
// the version it was written for, and is skipped (with a message) at any other.
//
// postgres.js 3.4.9:
//
// 1. closed-socket (porsager/postgres#1154, #1208; the fix proposed in #1209): when the server
//    kills a backend inside a transaction, the driver writes the ROLLBACK to a socket that is
//    already gone and throws an uncatchable TypeError from a setImmediate, crashing the
//    process. With the patch the write settles its queries with CONNECTION_CLOSED instead,
//    and a closed connection forgets its pending write timer.
// 2. pipelined-savepoint: `sql.savepoint(fn)` awaited its SAVEPOINT before running `fn`, one
//    round trip per savepoint that carries nothing back. Queries on one connection run in
//    the order they are sent, so the SAVEPOINT now goes out ahead of `fn`'s first statements,
//    in the same write, and the scope awaits its answer before it returns: if it failed, the
//    scope rolls back and throws as before. The relay records a round's acks in a
//    savepoint, so this saves a round trip per relay round.
// 3. pipelined-begin: `sql.begin(fn)` awaited its BEGIN before running `fn`, the same round
//    trip for nothing, once per transaction. For a plain `begin` (no options) the scope now
//    starts as soon as a connection has taken the BEGIN, so `fn`'s first statements go out
//    behind it in the same write, and the scope awaits the BEGIN's answer before it commits.
//    A plain BEGIN on a live, idle connection cannot fail (a dead connection fails every
//    statement behind it too), so no statement runs outside the transaction. With options
//    (an isolation level, which the server may refuse), BEGIN is still awaited first.
// 4. pipelined-commit: `sql.begin(fn)` sent its COMMIT only once `fn` had settled, one round
//    trip after `fn`'s last statements were answered. Inside the scope, `sql.commitAhead()`
//    now sends the COMMIT at once, behind what was already sent, and returns its answer; the
//    scope then sends no COMMIT or ROLLBACK of its own. The server commits if every statement
//    before it succeeded and rolls back otherwise (a COMMIT in a failed transaction answers
//    ROLLBACK): the caller reads which from that answer. A scope whose callback settles
//    successfully after a rolled-back COMMIT throws. A statement handed to the connection
//    after the COMMIT would run outside the transaction: it is refused instead
//    (SENT_AFTER_COMMIT). A query is handed one microtask after `execute()` (or two after an
//    `await`), so the statements that must precede the COMMIT are `execute()`d before it.
// 5. coalesced-writes: the driver wrote a query's messages to the socket at once when its
//    buffer reached 1 KiB, else at the end of the turn; a snapshot's statement is above
//    1 KiB, so the statements a transaction sends together went out in separate writes (a
//    system call and a wake-up of the server each). Now only a buffer of 64 KiB is written
//    early; below that, one write per connection per turn.
// 6. closed-forgets-queries: a connection that closed kept its in-flight query as the
//    current one (and, when the socket closed with an error, the queries pipelined behind it
//    unsettled). A statement sent on the connection after it closed (a transaction's
//    ROLLBACK) or after it reconnected then queued behind that stale query, whose answer
//    never comes: `sql.end()` waited out its timeout (seen at shutdown after backends were
//    terminated), and after a reconnect an answer could go to the stale query instead of its
//    own, leaving the last query of the connection waiting forever. Now a closing
//    connection settles every query it still holds with CONNECTION_CLOSED and forgets them,
//    and a write that finds the socket gone does the same; either way a pending `end()` of
//    that connection is answered at once instead of when its timeout destroys it.
// 7. write-now: with coalesced writes a query goes out at the end of the turn, after whatever
//    the thread does next in it. A query marked `writeNow` (db.ts `writeNow`) is written at
//    once, with what the connection had buffered before it. The relay asks for its next batch
//    before it builds the current batch's publishes: unmarked, the read went out behind those
//    (a few milliseconds of this thread's work) and the round waited on it.
//
// 9. reserve-survives-close (porsager/postgres#1195): a `reserve()` waiting for a pooled
//    connection was lost when a connection of the pool closed meanwhile (a backend killed,
//    Postgres restarted): the pool took the next waiter as the reconnecting connection's first
//    query, and a reconnect drops a reserve it is given that way, so the promise never
//    settled. The queue vacuum's run waited on it forever, and so did its process's shutdown.
//    Now the pool leaves a waiting reserve in the queue and reconnects with no first query;
//    the reopened connection then serves the queue as any freed connection does. While
//    Postgres is down, queries queued behind such a reserve wait for it to return rather than
//    failing one per reconnect attempt (those given a connection of their own still fail).
//
// @nats-io/nats-core 3.3.1:
//
// 8. answered-request: a request (every JetStream publish is one) that got its answer
//    called `cancel()` to unregister itself, and `cancel()` built a
//    `RequestError("cancelled")` to reject the promise that had just been resolved: an Error
//    and its stack trace per publish, for nothing (1.6% of a draining worker's CPU). An
//    answered request now unregisters without building one; `cancel()` itself is unchanged.
import { readFileSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';

const require = createRequire(import.meta.url);

const postgresPatches = [
  {
    mark: '/* orchestrator-patch: closed-socket */',
    files: ['src/connection.js', 'cjs/src/connection.js'],
    edits: (mark) => [
      [
        '  function nextWrite(fn) {\n    const x = socket.write(chunk, fn)',
        `  function nextWrite(fn) {\n    ${mark}\n    if (socket === null) {\n      chunk = nextWriteTimer = null\n      error(Errors.connection('CONNECTION_CLOSED', options))\n      return false\n    }\n    const x = socket.write(chunk, fn)`,
      ],
      [
        '    remaining = 0\n    incomings = null\n    clearImmediate(nextWriteTimer)\n',
        '    remaining = 0\n    incomings = null\n    clearImmediate(nextWriteTimer)\n    nextWriteTimer = null\n    chunk = null\n',
      ],
    ],
  },
  {
    mark: '/* orchestrator-patch: closed-forgets-queries */',
    files: ['src/connection.js', 'cjs/src/connection.js'],
    edits: (mark) => [
      [
        "    !hadError && (query || sent.length) && error(Errors.connection('CONNECTION_CLOSED', options, socket))\n",
        `    ${mark}\n    ;(query || sent.length) && error(Errors.connection('CONNECTION_CLOSED', options, socket))\n    query = results = errorResponse = null\n    result = new Result()\n    ended && terminate()\n`,
      ],
      [
        "      chunk = nextWriteTimer = null\n      error(Errors.connection('CONNECTION_CLOSED', options))\n      return false\n",
        "      chunk = nextWriteTimer = null\n      error(Errors.connection('CONNECTION_CLOSED', options))\n      query = results = errorResponse = null\n      result = new Result()\n      ended && terminate()\n      return false\n",
      ],
    ],
  },
  {
    mark: '/* orchestrator-patch: pipelined-savepoint */',
    files: ['src/index.js', 'cjs/src/index.js'],
    edits: (mark) => [
      [
        // biome-ignore lint/suspicious/noTemplateCurlyInString: the driver's source, matched as text
        '      name && await sql`savepoint ${ sql(name) }`\n',
        `      ${mark}\n      const saved = name && sql\`savepoint \${ sql(name) }\`.execute()\n`,
      ],
      [
        '        })\n\n        if (uncaughtError)\n          throw uncaughtError\n',
        '        })\n\n        saved && await saved\n        if (uncaughtError)\n          throw uncaughtError\n',
      ],
    ],
  },
  {
    mark: '/* orchestrator-patch: pipelined-begin */',
    files: ['src/index.js', 'cjs/src/index.js'],
    edits: (mark) => [
      [
        "      await sql.unsafe('begin ' + options.replace(/[^a-z ]/ig, ''), [], { onexecute }).execute()\n",
        `      ${mark}\n      const mode = options.replace(/[^a-z ]/ig, '')\n      let taken\n      const took = new Promise(r => taken = r)\n      began = sql.unsafe('begin ' + mode, [], { onexecute: c => (onexecute(c), taken()) }).execute()\n      began.catch(() => {})\n      mode.trim() ? await began : await Promise.race([took, began])\n      // The pool marks a connection full once it took the BEGIN; reserved, the scope's\n      // statements are written behind it rather than queued until it is answered.\n      connection.queue === queues.full && move(connection, reserved)\n`,
      ],
      [
        '    let savepoints = 0\n      , connection\n',
        '    let savepoints = 0\n      , connection\n      , began = null\n',
      ],
      [
        '        saved && await saved\n',
        '        saved && await saved\n        !name && began && await began\n',
      ],
    ],
  },
  {
    mark: '/* orchestrator-patch: pipelined-commit */',
    files: ['src/index.js', 'cjs/src/index.js'],
    edits: (mark) => [
      [
        '      sql.prepare = x => prepare = x.replace(/[^a-z0-9$-_. ]/gi)\n',
        `      sql.prepare = x => prepare = x.replace(/[^a-z0-9$-_. ]/gi)\n      ${mark}\n      let committing = null\n        , commitHanded = false\n      sql.commitAhead = () => {\n        if (!name && !prepare && !committing) {\n          const commit = sql\`commit\`\n          commit.pipelinedCommit = true\n          committing = commit.execute()\n          committing.catch(() => {})\n        }\n        return committing\n      }\n`,
      ],
      [
        '      function handler(q) {\n        q.catch(e => uncaughtError || (uncaughtError = e))\n',
        "      function handler(q) {\n        if (q.pipelinedCommit) {\n          commitHanded = true\n        } else if (commitHanded) {\n          const error = new Error('a statement was sent after the pipelined COMMIT of its transaction')\n          error.code = 'SENT_AFTER_COMMIT'\n          return q.reject(error)\n        }\n        q.catch(e => uncaughtError || (uncaughtError = e))\n",
      ],
      [
        '      } catch (e) {\n        await (name\n',
        "      } catch (e) {\n        if (committing) {\n          // The COMMIT is out: the transaction ended with it, whichever way it went.\n          await committing.catch(() => {})\n          throw e instanceof PostgresError && e.code === '25P02' && uncaughtError || e\n        }\n        await (name\n",
      ],
      [
        '      if (!name) {\n        prepare\n',
        "      if (!name && committing) {\n        const done = await committing\n        if (done.command !== 'COMMIT')\n          throw uncaughtError || new Error('the transaction was rolled back at its pipelined COMMIT')\n      } else if (!name) {\n        prepare\n",
      ],
    ],
  },
  {
    mark: '/* orchestrator-patch: coalesced-writes */',
    files: ['src/connection.js', 'cjs/src/connection.js'],
    edits: (mark) => [
      [
        '    if (fn || chunk.length >= 1024)\n',
        `    ${mark}\n    if (fn || chunk.length >= 65536)\n`,
      ],
    ],
  },
  {
    mark: '/* orchestrator-patch: write-now */',
    files: ['src/connection.js', 'cjs/src/connection.js'],
    edits: (mark) => [
      [
        '      build(q)\n      return write(toBuffer(q))\n',
        `      build(q)\n      ${mark}\n      return write(toBuffer(q), q.writeNow ? wroteNow : undefined)\n`,
      ],
      ['  function nextWrite(fn) {\n', '  function wroteNow() {}\n\n  function nextWrite(fn) {\n'],
    ],
  },
  {
    mark: '/* orchestrator-patch: reserve-survives-close */',
    files: ['src/index.js', 'cjs/src/index.js'],
    edits: (mark) => [
      [
        '    queries.length && connect(c, queries.shift())\n',
        `    ${mark}\n    queries.length && connect(c, queries.peek().reserve ? null : queries.shift())\n`,
      ],
    ],
  },
  {
    mark: '/* orchestrator-patch: queue-peek */',
    files: ['src/queue.js', 'cjs/src/queue.js'],
    edits: (mark) => [
      [
        '    push: (x) => (xs.push(x), x),\n',
        `    ${mark}\n    peek: () => xs[index],\n    push: (x) => (xs.push(x), x),\n`,
      ],
    ],
  },
];

const natsPatches = [
  {
    mark: '/* orchestrator-patch: answered-request */',
    files: ['lib/request.js'],
    edits: (mark) => [
      [
        '            this.deferred.resolve(msg);\n        }\n        this.cancel();\n    }\n    cancel(err) {',
        `            this.deferred.resolve(msg);\n        }\n        ${mark}\n        this.mux.cancel(this);\n    }\n    cancel(err) {`,
      ],
    ],
  },
];

// Both packages' exports hide package.json: resolve the entry and walk up to the root.
const packages = [
  {
    name: 'postgres',
    expected: '3.4.9',
    root: join(dirname(require.resolve('postgres')), '..', '..'),
    patches: postgresPatches,
  },
  {
    name: '@nats-io/nats-core',
    expected: '3.3.1',
    root: join(dirname(require.resolve('@nats-io/nats-core')), '..'),
    patches: natsPatches,
  },
];

for (const pkg of packages) {
  const { version } = JSON.parse(readFileSync(join(pkg.root, 'package.json'), 'utf8'));
  let patched = 0;
  for (const patch of pkg.patches) {
    for (const file of patch.files) {
      const path = join(pkg.root, file);
      let text = readFileSync(path, 'utf8');
      if (text.includes(patch.mark)) continue;
      for (const [from, to] of patch.edits(patch.mark)) {
        if (!text.includes(from)) {
          process.stderr.write(
            `patch-deps: ${pkg.name} ${version} ${file} does not contain the expected code; not patched\n`,
          );
          process.exit(version === pkg.expected ? 1 : 0);
        }
        text = text.replace(from, to);
      }
      writeFileSync(path, text);
      patched++;
    }
  }
  process.stdout.write(`patch-deps: ${pkg.name} ${version}: ${patched} file(s) patched\n`);
}
