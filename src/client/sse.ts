/** A Server-Sent Events parser over a fetch body: yields each frame that carries data. */

export interface SseFrame {
  id?: string;
  event?: string;
  data: string;
}

/** The longest line accepted: a server that never ends a line cannot grow memory forever. */
const MAX_LINE = 8 * 1024 * 1024;

export async function* readSse(body: NonNullable<Response['body']>): AsyncGenerator<SseFrame> {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let frame: { id?: string; event?: string; data: string[] } = { data: [] };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let nl = buffer.search(/\r\n|\r|\n/);
      while (nl >= 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(buffer[nl] === '\r' && buffer[nl + 1] === '\n' ? nl + 2 : nl + 1);
        if (line === '') {
          if (frame.data.length > 0) {
            yield { id: frame.id, event: frame.event, data: frame.data.join('\n') };
          }
          frame = { data: [] };
        } else if (!line.startsWith(':')) {
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          let v = colon < 0 ? '' : line.slice(colon + 1);
          if (v.startsWith(' ')) v = v.slice(1);
          if (field === 'data') frame.data.push(v);
          else if (field === 'id') frame.id = v;
          else if (field === 'event') frame.event = v;
        }
        nl = buffer.search(/\r\n|\r|\n/);
      }
      if (buffer.length > MAX_LINE) throw new Error('SSE line over 8 MiB');
    }
  } finally {
    await reader.cancel().catch(() => {});
  }
}
