/** A small Server-Sent Events reader over a fetch `Response`, for tests. */

export interface SseFrame {
  id?: string;
  event?: string;
  data?: string;
  /** Comment lines (`: keep-alive`). */
  comments: string[];
}

export interface SseReader {
  /** The next frame, or null when the stream ended. Rejects after `timeoutMs`. */
  next(timeoutMs?: number): Promise<SseFrame | null>;
  /** Hangs up (the server sees the client go away). */
  cancel(): Promise<void>;
}

export function sseReader(res: Response): SseReader {
  if (!res.body) throw new Error('no body');
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  // A read that lost a race to the timeout is kept for the next call, not dropped.
  let pending: Promise<ReadableStreamReadResult<string>> | null = null;
  const parse = (block: string): SseFrame => {
    const frame: SseFrame = { comments: [] };
    const data: string[] = [];
    for (const line of block.split('\n')) {
      if (line.startsWith(':')) frame.comments.push(line.slice(1).trim());
      else if (line.startsWith('id: ')) frame.id = line.slice(4);
      else if (line.startsWith('event: ')) frame.event = line.slice(7);
      else if (line.startsWith('data: ')) data.push(line.slice(6));
    }
    if (data.length > 0) frame.data = data.join('\n');
    return frame;
  };
  return {
    async next(timeoutMs = 10_000) {
      const deadline = Date.now() + timeoutMs;
      for (;;) {
        const end = buffer.indexOf('\n\n');
        if (end >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          return parse(block);
        }
        const left = deadline - Date.now();
        if (left <= 0) throw new Error('SSE read timed out');
        let timer: NodeJS.Timeout | undefined;
        pending ??= reader.read();
        const chunk = await Promise.race([
          pending,
          new Promise<never>((_, reject) => {
            timer = setTimeout(() => reject(new Error('SSE read timed out')), left);
          }),
        ]).finally(() => clearTimeout(timer));
        pending = null;
        if (chunk.done) return null;
        buffer += chunk.value;
      }
    },
    async cancel() {
      await reader.cancel().catch(() => {});
    },
  };
}
