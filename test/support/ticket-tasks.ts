/**
 * A started ticket with tasks of one phase, and the task steps tests take it through (claim
 * and start, complete), with a host and commands of the test's choosing.
 */
import type { Commands } from '../../src/actors/commands.js';
import type { ActorHost } from '../../src/actors/host.js';

/** A ticket with `n` tasks of type `build` (and `spec`), created in one transaction, then started. */
export async function ticketWithTasks(
  p: { host: ActorHost; commands: Commands },
  n: number,
  spec: { maxAttempts?: number } = {},
): Promise<{ ticketId: string; taskIds: string[] }> {
  const { value } = await p.host.transact(async (uow) => {
    const t = await p.commands.createTicket(uow, { title: `${n} tasks` });
    const taskIds: string[] = [];
    for (let i = 0; i < n; i++) {
      taskIds.push((await p.commands.addTask(uow, t.id, { type: 'build', ...spec })).id);
    }
    return { ticketId: t.id, taskIds };
  });
  await p.host.send('ticket', value.ticketId, { type: 'START' });
  return value;
}

/** CLAIM (as `w1`) and START; returns the fencing token. */
export async function claimAndStart(host: ActorHost, taskId: string): Promise<string> {
  const claimed = await host.send('task', taskId, { type: 'CLAIM', workerId: 'w1' });
  const token = (claimed.snapshot.context as { token: string }).token;
  await host.send('task', taskId, { type: 'START', token });
  return token;
}

/** CLAIM, START and COMPLETE. */
export async function completeTask(host: ActorHost, taskId: string): Promise<void> {
  const token = await claimAndStart(host, taskId);
  await host.send('task', taskId, { type: 'COMPLETE', token });
}
