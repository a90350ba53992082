/** A bounded tail of a process's output, for results and error messages. */

/** The last `max` bytes written to it. */
export class Tail {
  private chunks: Buffer[] = [];
  private size = 0;

  constructor(private readonly max: number) {}

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.size += chunk.length;
    while (this.chunks.length > 1 && this.size - (this.chunks[0]?.length ?? 0) >= this.max) {
      this.size -= this.chunks.shift()?.length ?? 0;
    }
  }

  text(): string {
    const all = Buffer.concat(this.chunks);
    // Cut on a character boundary: a tail that starts mid-character would show U+FFFD.
    let start = Math.max(0, all.length - this.max);
    while (start < all.length && start > 0 && ((all[start] ?? 0) & 0xc0) === 0x80) start++;
    return all.subarray(start).toString('utf8');
  }
}
