/**
 * The dashboard in a real headless Chromium (Debian's, driven by playwright-core) against
 * the app on a real port with the real Transport behind its live stream: a ticket created
 * through the API appears and moves live, its statechart shows the current state lit, an
 * allowed-event button sends the event, a refused one shows its 409 plainly. Nothing is
 * fetched from outside. The screenshot is kept in test-results/.
 */
import { mkdirSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import { type Browser, chromium, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TaskOutput } from '../../src/actors/output.js';
import type { Transport } from '../../src/transport/index.js';
import type { TransportNames } from '../../src/transport/subjects.js';
import { createTestApp, type TestApp } from '../support/http-app.js';
import { natsAdmin, startTransport, testNames } from '../support/transport.js';

let t: TestApp;
let transport: Transport;
let names: TransportNames;
let server: ReturnType<typeof serve>;
let browser: Browser;
let page: Page;
let base: string;
let output: TaskOutput;
const outside: string[] = [];

beforeAll(async () => {
  t = await createTestApp('http_browser');
  names = testNames();
  transport = await startTransport(t.db.sql, t.host, names, { reactions: () => [] });
  t.services.events = transport;
  output = new TaskOutput(t.db.sql, { maxBytes: 1_048_576, host: t.host });
  await output.start();
  t.services.output = output;
  server = serve({ fetch: t.app.fetch, port: 0, hostname: '127.0.0.1' });
  await new Promise<void>((resolve) => server.once('listening', () => resolve()));
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  browser = await chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
    ],
  });
  page = await browser.newPage({ viewport: { width: 1366, height: 768 } });
  page.on('request', (r) => {
    if (!r.url().startsWith(base)) outside.push(r.url());
  });
});

afterAll(async () => {
  await browser?.close();
  if (server) {
    await new Promise<void>((resolve) => {
      server.close(() => resolve());
      if ('closeAllConnections' in server) server.closeAllConnections();
    });
  }
  await output?.stop();
  await transport?.stop();
  const admin = await natsAdmin();
  await admin.close([names]);
  await t?.close();
});

const ticketCard = (column: string, id: string) =>
  `.column[data-state="${column}"] .ticket[data-id="${id}"]`;

describe('dashboard', () => {
  it('shows a new ticket live, draws its statechart, sends events and shows a 409', async () => {
    await page.goto(`${base}/`);
    await page.waitForSelector('#live:not(.off)', { timeout: 10_000 });

    const created = await t.call('POST', '/tickets', { title: 'Browser ticket' });
    const id = created.body.id as string;
    // Live: the page was already open; the SSE event makes it appear.
    await page.waitForSelector(ticketCard('backlog', id), { timeout: 5_000 });

    await page.click(ticketCard('backlog', id));
    await page.waitForSelector('#chart svg', { timeout: 10_000 });
    expect(await page.getAttribute('#chart-panel', 'data-state')).toBe('backlog');
    // The detail panel shows what the ticket has, and no stray "null" for what it lacks.
    await page.waitForSelector('#detail h2', { timeout: 5_000 });
    expect(await page.textContent('#detail')).not.toContain('null');
    // Mermaid gives the node of the current state the `current` class from our classDef.
    const lit = await page.$$eval('#chart svg g.current', (nodes) =>
      nodes.map((n) => n.textContent?.trim()),
    );
    expect(lit).toEqual(['backlog']);
    const buttons = await page.$$eval('#allowed button', (bs) =>
      bs.map((b) => b.getAttribute('data-event')),
    );
    expect(buttons).toEqual(['CANCEL', 'START']);

    await page.click('#allowed button[data-event="START"]');
    await page.waitForSelector('#chart-panel[data-state="requirements"]', { timeout: 5_000 });
    await page.waitForSelector(ticketCard('requirements', id), { timeout: 5_000 });
    await page.waitForFunction(
      () => document.querySelector('#chart svg g.current')?.textContent?.trim() === 'requirements',
      undefined,
      { timeout: 5_000 },
    );

    // ADVANCE is offered in requirements but its guard refuses it with no completed task.
    await page.click('#allowed button[data-event="ADVANCE"]');
    await page.waitForFunction(
      () => document.querySelector('#message')?.textContent?.includes('409'),
      undefined,
      { timeout: 5_000 },
    );
    const message = await page.textContent('#message');
    expect(message).toContain('409 illegal_transition');
    expect(message).toContain('ADVANCE');
    expect(await page.getAttribute('#chart-panel', 'data-state')).toBe('requirements');

    // A task added and the ticket blocked through the API show up without a click.
    await t.call('POST', `/tickets/${id}/tasks`, { type: 'write_spec' });
    await page.waitForSelector('#tasks tr.task', { timeout: 5_000 });
    await t.call('POST', `/tickets/${id}/events`, { type: 'BLOCK', reason: 'waiting on legal' });
    await page.waitForSelector(ticketCard('blocked', id), { timeout: 5_000 });
    expect(await page.locator('#events li').count()).toBeGreaterThan(0);

    // A task's own statechart: selecting its row draws the task machine.
    await page.click('#tasks tr.task');
    await page.waitForFunction(
      () => document.querySelector('#chart svg g.current')?.textContent?.trim() === 'pending',
      undefined,
      { timeout: 5_000 },
    );

    mkdirSync('test-results', { recursive: true });
    await page.screenshot({ path: 'test-results/dashboard.png', fullPage: true });
    expect(outside).toEqual([]);
  });

  it("pages a ticket's tasks: the first hundred, then more on demand", async () => {
    const ticket = (await t.call('POST', '/tickets', { title: 'Many tasks' })).body.id as string;
    await t.call('POST', `/tickets/${ticket}/events`, { type: 'START' });
    await t.host.transact(async (uow) => {
      for (let i = 0; i < 130; i++) {
        await t.services.commands.addTask(uow, ticket, { type: 'bulk', payload: { i } });
      }
    });
    await page.goto(`${base}/`);
    await page.click(ticketCard('requirements', ticket));
    await page.waitForSelector('#more-tasks', { timeout: 10_000 });
    expect(await page.locator('#tasks tr.task').count()).toBe(100);
    await page.click('#more-tasks');
    await page.waitForFunction(
      () => document.querySelectorAll('#tasks tr.task').length === 130,
      undefined,
      { timeout: 10_000 },
    );
    expect(await page.locator('#more-tasks').count()).toBe(0);
    // A task of the second page is selectable like any other.
    await page.click('#tasks tr.task:last-child');
    await page.waitForFunction(
      () => document.querySelector('#chart svg g.current')?.textContent?.trim() === 'pending',
      undefined,
      { timeout: 5_000 },
    );
    expect(outside).toEqual([]);
  });

  it("follows a running task's output live, with its attempt and stream marked", async () => {
    const ticket = (await t.call('POST', '/tickets', { title: 'Output ticket' })).body.id as string;
    await t.call('POST', `/tickets/${ticket}/events`, { type: 'START' });
    const task = (await t.call('POST', `/tickets/${ticket}/tasks`, { type: 'agent_work' })).body
      .id as string;
    const claimed = await t.host.send('task', task, { type: 'CLAIM', workerId: 'agent-b' });
    const token = (claimed.snapshot.context as { token: string }).token;
    await t.call('POST', `/tasks/${task}/events`, { type: 'START', token });
    const write = async (chunks: { stream: string; text: string }[]) => {
      const r = await t.call('POST', `/tasks/${task}/output`, { token, chunks });
      expect(r.status).toBe(202);
    };
    await write([{ stream: 'stdout', text: 'before the page opened\n' }]);

    await page.goto(`${base}/`);
    await page.click(ticketCard('requirements', ticket));
    await page.click(`#tasks tr.task[data-id="${task}"]`);
    await page.waitForSelector('#output .chunk[data-seq="1"]', { timeout: 10_000 });
    expect(await page.getAttribute('#output-panel', 'data-task')).toBe(task);
    expect(await page.textContent('#output .attempt')).toContain('attempt 1');

    // Written after the page is following: each arrives without a reload or a click.
    for (let i = 2; i <= 4; i++) {
      await write([{ stream: i === 3 ? 'stderr' : 'log', text: `live line ${i}\n` }]);
      await page.waitForSelector(`#output .chunk[data-seq="${i}"]`, { timeout: 5_000 });
    }
    const shown = await page.$$eval('#output .chunk', (nodes) =>
      nodes.map((n) => [
        n.getAttribute('data-seq'),
        n.getAttribute('data-attempt'),
        n.getAttribute('data-stream'),
        n.className,
        n.textContent,
      ]),
    );
    expect(shown).toEqual([
      ['1', '1', 'stdout', 'chunk stdout', 'before the page opened\n'],
      ['2', '1', 'log', 'chunk log', 'live line 2\n'],
      ['3', '1', 'stderr', 'chunk stderr', 'live line 3\n'],
      ['4', '1', 'log', 'chunk log', 'live line 4\n'],
    ]);
    await t.call('POST', `/tasks/${task}/events`, { type: 'COMPLETE', token });
    await page.waitForFunction(
      () => document.querySelector('#output .end')?.textContent?.includes('completed'),
      undefined,
      { timeout: 5_000 },
    );
    await page.screenshot({ path: 'test-results/dashboard-output.png', fullPage: true });
    expect(outside).toEqual([]);
  });
});
