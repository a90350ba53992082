/**
 * What a built-in executor prints, on its way into the task's output store: chunks gather
 * for `flushMs` or until `flushBytes`, then go in one write under the claim's token. It is
 * bounded (past `maxBufferedBytes` the oldest text is dropped and a note says how much) and
 * best-effort: a write that fails is dropped, one refused (the claim is no longer live)
 * turns the batcher off; neither ever reaches the task's outcome.
 */
import { IllegalTransition, NotFound, StaleToken } from '../errors.js';
import type { Logger } from '../log.js';

export type OutputStream = 'stdout' | 'stderr' | 'log';

/** The output store as a worker sees it (`TaskOutput.write`). */
export interface OutputWriter {
  write(
    taskId: string,
    token: string,
    chunks: { stream: OutputStream; text: string }[],
  ): Promise<unknown>;
}

export interface OutputBatcherOptions {
  flushMs?: number;
  flushBytes?: number;
  maxBufferedBytes?: number;
}

/**
 * At most 3 UTF-8 bytes per UTF-16 unit: a piece stays under the store's 64 KiB a chunk.
 * The store keeps no more than OUTPUT_MAX_BYTES a task anyway and trims the oldest.
 */
const MAX_PIECE_CHARS = 16_384;
/** Chunks per write, well under the API's 1,000 a request. */
const MAX_WRITE_CHUNKS = 256;

interface Piece {
  stream: OutputStream;
  text: string;
}

export class OutputBatcher {
  private buffer: Piece[] = [];
  private bytes = 0;
  private dropped = 0;
  private timer: NodeJS.Timeout | undefined;
  private inFlight: Promise<void> | null = null;
  private off = false;
  private closed = false;
  private readonly flushMs: number;
  private readonly flushBytes: number;
  private readonly maxBufferedBytes: number;

  constructor(
    private readonly writer: OutputWriter,
    private readonly taskId: string,
    private readonly token: string,
    private readonly log: Logger,
    o: OutputBatcherOptions = {},
  ) {
    this.flushMs = o.flushMs ?? 200;
    this.flushBytes = o.flushBytes ?? 65_536;
    this.maxBufferedBytes = o.maxBufferedBytes ?? 1_048_576;
  }

  push(stream: OutputStream, text: string): void {
    if (this.off || this.closed || text === '') return;
    for (let i = 0; i < text.length; i += MAX_PIECE_CHARS) {
      const part = text.slice(i, i + MAX_PIECE_CHARS);
      const last = this.buffer.at(-1);
      if (last && last.stream === stream && last.text.length + part.length <= MAX_PIECE_CHARS) {
        last.text += part;
      } else {
        this.buffer.push({ stream, text: part });
      }
      // UTF-16 units: cheap, and within 3x of the bytes it stands for.
      this.bytes += part.length;
    }
    while (this.bytes > this.maxBufferedBytes && this.buffer.length > 1) {
      const gone = this.buffer.shift()!;
      this.bytes -= gone.text.length;
      this.dropped += gone.text.length;
    }
    if (this.bytes >= this.flushBytes) void this.flush();
    else this.timer ??= setTimeout(() => void this.flush(), this.flushMs);
  }

  /**
   * Sends what is buffered, and what arrives meanwhile, one write at a time, in order; while
   * a write is in flight new text waits in the (bounded) buffer. Never rejects.
   */
  flush(): Promise<void> {
    clearTimeout(this.timer);
    this.timer = undefined;
    this.inFlight ??= this.pump();
    return this.inFlight;
  }

  /** The last flush; nothing is accepted after it. */
  close(): Promise<void> {
    this.closed = true;
    return this.flush();
  }

  private async pump(): Promise<void> {
    try {
      while (this.buffer.length > 0 && !this.off) {
        const pieces = this.buffer;
        if (this.dropped > 0) {
          pieces.unshift({
            stream: 'log',
            text: `[${this.dropped} characters of output dropped]\n`,
          });
          this.dropped = 0;
        }
        this.buffer = [];
        this.bytes = 0;
        await this.send(pieces);
      }
    } finally {
      this.inFlight = null;
    }
  }

  private async send(pieces: Piece[]): Promise<void> {
    for (let i = 0; i < pieces.length && !this.off; i += MAX_WRITE_CHUNKS) {
      try {
        await this.writer.write(this.taskId, this.token, pieces.slice(i, i + MAX_WRITE_CHUNKS));
      } catch (error) {
        if (
          error instanceof StaleToken ||
          error instanceof IllegalTransition ||
          error instanceof NotFound
        ) {
          this.off = true;
          this.buffer = [];
          return;
        }
        this.log.debug({ err: error }, 'task output write failed; dropped');
      }
    }
  }
}
