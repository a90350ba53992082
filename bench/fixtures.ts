/** Setup shared by the HTTP sections: a listening app, and running tasks with their tokens. */
import type { AddressInfo } from 'node:net';
import { type ServerType, serve } from '@hono/node-server';
import type { Commands } from '../src/actors/commands.js';
import type { ActorHost } from '../src/actors/host.js';
import { pool } from './stats.js';

/** Serves `fetch` on a free loopback port. */
export async function listen(
  fetch: (req: Request) => Response | Promise<Response>,
): Promise<{ server: ServerType; url: string }> {
  const server = serve({ fetch, port: 0, hostname: '127.0.0.1' });
  await new Promise<void>((resolve, reject) => {
    server.once('listening', () => resolve());
    server.once('error', reject);
  });
  return { server, url: `http://127.0.0.1:${(server.address() as AddressInfo).port}` };
}

/** `n` tasks, each in a ticket of its own, claimed and started: one per client loop. */
export async function runningTasks(
  host: ActorHost,
  commands: Commands,
  n: number,
): Promise<{ id: string; token: string }[]> {
  const tasks: { id: string; token: string }[] = [];
  await pool(n, 4, async () => {
    const { value } = await host.transact(async (uow) => {
      const t = await commands.createTicket(uow, { title: 'bench' });
      return (await commands.addTask(uow, t.id, { type: 'bench' })).id;
    });
    const claimed = await host.send('task', value, { type: 'CLAIM', workerId: 'bench' });
    const token = (claimed.snapshot.context as { token: string }).token;
    await host.send('task', value, { type: 'START', token });
    tasks.push({ id: value, token });
  });
  return tasks;
}
