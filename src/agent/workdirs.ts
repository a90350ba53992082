/**
 * Where a claimed task's command runs: a git worktree of the agent's repository named
 * after the task's `worktree` (created on first use, reused after, so a rework loop finds
 * the work it left), or, for a task without one, a fresh temporary directory removed
 * afterwards. The server never lets two tasks with one `worktree` run at once; the agent
 * also locks each directory itself, so even a misbehaving server cannot make two commands
 * share one, and it runs one `git worktree` change at a time per repository.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export class WorkdirError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'WorkdirError';
  }
}

export interface Workdir {
  dir: string;
  /** The git worktree's name and branch, when it is one. */
  worktree: { name: string; branch: string } | null;
  release(): Promise<void>;
}

/** A branch and directory name: git-safe, and distinct for distinct `worktree` values. */
export function worktreeName(value: string): string {
  const safe = value
    .replace(/[^A-Za-z0-9_-]+/g, '-')
    .replace(/^-+/, '')
    .slice(0, 80);
  if (safe === value && safe !== '') return safe;
  const hash = createHash('sha256').update(value).digest('hex').slice(0, 10);
  return safe === '' ? hash : `${safe}-${hash}`;
}

/** Runs git; rejects with its stderr. Output is bounded by execFile's maxBuffer. */
export function git(args: string[], cwd: string): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      'git',
      args,
      { cwd, maxBuffer: 4 * 1024 * 1024, env: { ...process.env, GIT_TERMINAL_PROMPT: '0' } },
      (error, stdout, stderr) => {
        if (error) {
          const why = String(stderr).trim() || error.message;
          reject(new WorkdirError(`git ${args.join(' ')}: ${why}`));
        } else resolve(String(stdout).trim());
      },
    );
  });
}

/** One holder at a time per key; waiters queue in order. */
class Locks {
  private readonly tails = new Map<string, Promise<void>>();

  async acquire(key: string): Promise<() => void> {
    const before = this.tails.get(key) ?? Promise.resolve();
    let unlock!: () => void;
    const mine = new Promise<void>((r) => {
      unlock = r;
    });
    const tail = before.then(() => mine);
    this.tails.set(key, tail);
    await before;
    return () => {
      unlock();
      if (this.tails.get(key) === tail) this.tails.delete(key);
    };
  }
}

export class Workdirs {
  private readonly locks = new Locks();

  /**
   * @param repo the repository's top level (`--repo`), or null: every task gets a temporary directory
   * @param root where worktrees are made (default: `<repo>.worktrees`, beside the repository)
   */
  constructor(
    readonly repo: string | null,
    readonly root: string | null,
  ) {}

  /** Resolves `--repo` to its top level; throws a WorkdirError when it is not a git repository. */
  static async open(repo: string | null, root: string | null): Promise<Workdirs> {
    if (!repo) return new Workdirs(null, null);
    const top = await git(['rev-parse', '--show-toplevel'], repo).catch((error: unknown) => {
      throw new WorkdirError(`--repo ${repo} is not a git repository: ${(error as Error).message}`);
    });
    return new Workdirs(top, root ?? `${top}.worktrees`);
  }

  async acquire(worktree: string | null): Promise<Workdir> {
    if (!worktree || !this.repo || !this.root) return this.temporary();
    const name = worktreeName(worktree);
    const dir = join(this.root, name);
    const unlock = await this.locks.acquire(`dir:${dir}`);
    try {
      const branch = await this.ensure(name, dir);
      return { dir, worktree: { name, branch }, release: async () => unlock() };
    } catch (error) {
      unlock();
      throw error;
    }
  }

  private async temporary(): Promise<Workdir> {
    const dir = await mkdtemp(join(tmpdir(), 'orchestrator-task-'));
    return {
      dir,
      worktree: null,
      release: () => rm(dir, { recursive: true, force: true, maxRetries: 3 }),
    };
  }

  /** The worktree at `dir` on branch `orchestrator/<name>`, made if missing. */
  private async ensure(name: string, dir: string): Promise<string> {
    const repo = this.repo!;
    const branch = `orchestrator/${name}`;
    const existing = await stat(join(dir, '.git')).catch(() => null);
    if (existing) {
      const top = await git(['rev-parse', '--show-toplevel'], dir).catch(() => null);
      if (top !== null) return (await git(['branch', '--show-current'], dir)) || branch;
      throw new WorkdirError(`${dir} exists but is not a git worktree; remove it`);
    }
    // `git worktree` edits the repository's shared admin files: one change at a time.
    const unlock = await this.locks.acquire(`repo:${repo}`);
    try {
      await mkdir(this.root!, { recursive: true });
      // A worktree directory deleted by hand leaves a registration that blocks the name.
      await git(['worktree', 'prune'], repo);
      const hasBranch = await git(['show-ref', '--verify', '--quiet', `refs/heads/${branch}`], repo)
        .then(() => true)
        .catch(() => false);
      const args = hasBranch
        ? ['worktree', 'add', dir, branch]
        : ['worktree', 'add', '-b', branch, dir];
      await git(args, repo);
      return branch;
    } finally {
      unlock();
    }
  }
}
