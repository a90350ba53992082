/**
 * A least-recently-used cache of actor rows, bounded by count AND by bytes. It only saves
 * reads: every write is still a compare-and-set, and an entry is dropped whenever a write
 * through it fails.
 *
 * A row's size is the byte length of its snapshot JSON as last written, which the caller
 * already has (it serialized the snapshot for Postgres): the cache never serializes. Actors
 * with large payloads or results would otherwise pin hundreds of megabytes per process.
 */
import type { ActorRow } from '../persistence/actor-rows.js';

export interface ActorCacheLimits {
  /** Rows held at most. */
  maxEntries: number;
  /** Sum of the rows' sizes held at most; 0 disables the cache. */
  maxBytes: number;
}

/**
 * A row larger than this share of `maxBytes` is not cached: one such row would evict many
 * small hot ones, and re-reading it costs little next to its own size.
 */
export const MAX_ENTRY_SHARE = 1 / 16;

interface Entry {
  row: ActorRow;
  bytes: number;
}

export class ActorCache {
  private readonly rows = new Map<string, Entry>();
  private total = 0;
  private readonly maxEntryBytes: number;

  constructor(private readonly limits: ActorCacheLimits) {
    this.maxEntryBytes = Math.floor(limits.maxBytes * MAX_ENTRY_SHARE);
  }

  get size(): number {
    return this.rows.size;
  }

  /** The sum of the cached rows' sizes. */
  get bytes(): number {
    return this.total;
  }

  get(key: string): ActorRow | undefined {
    const entry = this.rows.get(key);
    if (entry) {
      this.rows.delete(key);
      this.rows.set(key, entry);
    }
    return entry?.row;
  }

  /** Caches `row`, whose snapshot JSON is `bytes` long, then evicts down to the limits. */
  set(row: ActorRow, bytes: number): void {
    const key = `${row.entityType}:${row.id}`;
    // The old entry goes in every case: keeping it would serve a stale version.
    this.delete(key);
    if (this.limits.maxEntries <= 0 || bytes > this.maxEntryBytes) return;
    this.rows.set(key, { row, bytes });
    this.total += bytes;
    while (this.rows.size > this.limits.maxEntries || this.total > this.limits.maxBytes) {
      const oldest = this.rows.keys().next().value;
      if (oldest === undefined) break;
      this.delete(oldest);
    }
  }

  delete(key: string): void {
    const entry = this.rows.get(key);
    if (!entry) return;
    this.rows.delete(key);
    this.total -= entry.bytes;
  }

  clear(): void {
    this.rows.clear();
    this.total = 0;
  }
}
