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
const outside: string[] = [];

beforeAll(async () => {
  t = await createTestApp('http_browser');
  names = testNames();
  transport = await startTransport(t.db.sql, t.host, names, { reactions: () => [] });
  t.services.events = transport;
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
});
