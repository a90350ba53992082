/**
 * A bounded least-recently-used cache of actor rows. It only saves reads: every write is
 * still a compare-and-set, and an entry is dropped whenever a write through it fails.
 */
import type { ActorRow } from '../persistence/actor-rows.js';

export class ActorCache {
  private readonly rows = new Map<string, ActorRow>();

  constructor(private readonly capacity: number) {}

  get size(): number {
    return this.rows.size;
  }

  get(key: string): ActorRow | undefined {
    const row = this.rows.get(key);
    if (row) {
      this.rows.delete(key);
      this.rows.set(key, row);
    }
    return row;
  }

  set(row: ActorRow): void {
    if (this.capacity <= 0) return;
    const key = `${row.entityType}:${row.id}`;
    this.rows.delete(key);
    this.rows.set(key, row);
    if (this.rows.size > this.capacity) {
      const oldest = this.rows.keys().next().value;
      if (oldest !== undefined) this.rows.delete(oldest);
    }
  }

  delete(key: string): void {
    this.rows.delete(key);
  }

  clear(): void {
    this.rows.clear();
  }
}
