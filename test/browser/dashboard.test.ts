/**
 * The dashboard in a real headless Chromium (Debian's, driven by playwright-core) against
 * the app on a real port with the real Transport behind its live stream: a ticket created
 * through the API appears and moves live, its statechart shows the current state lit, an
 * allowed-event button sends the event, a refused one shows its 409 plainly. Nothing is
 * fetched from outside. The screenshot is kept in test-results/.
 */
import { mkdirSync, readFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { serve } from '@hono/node-server';
import { type Browser, chromium, type Page } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Commands } from '../../src/actors/commands.js';
import { ActorHost } from '../../src/actors/host.js';
import { TaskOutput } from '../../src/actors/output.js';
import { workflowCompiler } from '../../src/actors/workflow-compiler.js';
import { WorkflowRegistry } from '../../src/actors/workflow-registry.js';
import type { Transport } from '../../src/transport/index.js';
import type { TransportNames } from '../../src/transport/subjects.js';
import { createTestDatabase } from '../support/database.js';
import { TASK_DEFAULTS } from '../support/fixtures.js';
import { createTestApp, type TestApp } from '../support/http-app.js';
import { natsAdmin, startTransport, testNames } from '../support/transport.js';

let t: TestApp;
// The host that knows the registered workflows (the app's); every test acts through it.
let host: ActorHost;
let transport: Transport;
let names: TransportNames;
let server: ReturnType<typeof serve>;
let browser: Browser;
let page: Page;
let base: string;
let output: TaskOutput;
const outside: string[] = [];

beforeAll(async () => {
  const db = await createTestDatabase('http_browser');
  const registry = new WorkflowRegistry(db.sql, workflowCompiler());
  await registry.ensureBuiltIn();
  host = new ActorHost(db.sql, { taskDefaults: TASK_DEFAULTS, workflows: registry });
  const commands = new Commands(host, { stuckAfterMs: 3_600_000, diagnosticCooldownMs: 3_600_000 });
  t = await createTestApp('unused', { db, services: { host, commands, workflows: registry } });
  names = testNames();
  // With the reactions: a completed task moves its workflow's ticket on.
  transport = await startTransport(t.db.sql, host, names);
  t.services.events = transport;
  output = new TaskOutput(t.db.sql, { maxBytes: 1_048_576, host });
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
  await t?.db.drop();
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
    await host.transact(async (uow) => {
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
    const claimed = await host.send('task', task, { type: 'CLAIM', workerId: 'agent-b' });
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

  it('runs a workflow ticket from the UI: gate Reject with a reason, rework feedback, Approve, waiting tasks', async () => {
    const feature = JSON.parse(readFileSync('examples/workflows/feature.json', 'utf8'));
    expect((await t.call('POST', '/workflows', feature)).status).toBe(201);
    await page.goto(`${base}/`);
    await page.selectOption('#new-ticket-workflow', 'feature');
    await page.fill('#new-ticket-title', 'Feature ticket');
    await page.click('#new-ticket button[type="submit"]');
    await page.waitForSelector(
      '#board[data-workflow="feature"] .column[data-state="plan_review"]',
      {
        timeout: 10_000,
      },
    );
    const columns = await page.$$eval('#board .column', (cs) =>
      cs.map((c) => c.getAttribute('data-state')),
    );
    expect(columns).toEqual([
      'backlog',
      'plan',
      'plan_review',
      'build',
      'review',
      'done',
      'blocked',
      'cancelled',
    ]);
    await page.waitForSelector('#chart-panel[data-state="backlog"]', { timeout: 10_000 });
    const id = (await page.getAttribute('#chart-panel', 'data-entity')) as string;
    expect((await t.call('GET', `/tickets/${id}`)).body.workflow).toBe('feature@1');
    // The default board does not show it.
    expect(await page.locator(ticketCard('backlog', id)).count()).toBe(1);

    await page.click('#allowed button[data-event="START"]');
    await page.waitForSelector('#tasks tr.task[data-type="write_spec"]', { timeout: 10_000 });
    // The plan task is completed through the API: the ticket reaches its gate.
    const completeOpen = async (type: string) => {
      const tasks = (await t.call('GET', `/tickets/${id}/tasks?limit=200`)).body.items as {
        id: string;
        type: string;
        state: string;
      }[];
      const task = tasks.find((x) => x.type === type && x.state === 'pending');
      expect(task, type).toBeDefined();
      const claimed = await host.send('task', task?.id as string, { type: 'CLAIM', workerId: 'w' });
      const token = (claimed.snapshot.context as { token: string }).token;
      await host.send('task', task?.id as string, { type: 'START', token });
      await host.send('task', task?.id as string, { type: 'COMPLETE', token });
    };
    await completeOpen('write_spec');
    await page.waitForSelector('#gate-panel:not([hidden]) #gate-approve', { timeout: 15_000 });
    await page.waitForSelector(ticketCard('plan_review', id), { timeout: 5_000 });
    await page.waitForSelector('#chart svg g.current[data-state="plan_review"]', {
      timeout: 5_000,
    });
    const inView = async () =>
      page.evaluate(() => {
        const node = document.querySelector('#chart svg g.current')?.getBoundingClientRect();
        const box = document.querySelector('#chart')?.getBoundingClientRect();
        if (!node || !box) return false;
        return (
          node.left >= box.left &&
          node.right <= box.right &&
          node.top >= box.top &&
          node.bottom <= box.bottom
        );
      });
    expect(await page.$$eval('#chart svg g.current', (ns) => ns.map((n) => n.textContent))).toEqual(
      ['plan_review'],
    );
    expect(await inView()).toBe(true);
    mkdirSync('test-results', { recursive: true });
    await page.screenshot({ path: 'test-results/dashboard-gate.png', fullPage: true });

    // Reject needs a reason: without one it is refused on the page, with one it is sent.
    await page.click('#gate-reject');
    await page.click('#gate-reject-confirm');
    expect(await page.textContent('#message')).toContain('needs a reason');
    await page.fill('#gate-by', 'ann');
    await page.fill('#gate-reason', 'the spec misses the error cases');
    await page.click('#gate-reject-confirm');
    await page.waitForSelector('#chart-panel[data-state="plan"]', { timeout: 10_000 });
    await page.waitForSelector(
      '#tasks tr.task[data-type="write_spec"][data-state="pending"] .feedback',
      {
        timeout: 10_000,
      },
    );
    const feedback = await page.textContent('#tasks tr.task[data-state="pending"] .feedback');
    expect(feedback).toContain('plan_review');
    expect(feedback).toContain('loop 1');
    expect(feedback).toContain('the spec misses the error cases');
    const log = (await t.call('GET', `/tickets/${id}/events`)).body.events as {
      type: string;
      payload?: unknown;
    }[];
    expect(JSON.stringify(log)).toContain('ann');

    await completeOpen('write_spec');
    await page.waitForSelector('#gate-panel:not([hidden]) #gate-approve', { timeout: 15_000 });
    await page.click('#gate-approve');
    await page.waitForSelector('#chart-panel[data-state="build"]', { timeout: 10_000 });
    await page.waitForSelector(
      '#tasks tr.task[data-type="run_tests"][data-state="waiting"] .waits .dep',
      {
        timeout: 10_000,
      },
    );
    const waits = await page.textContent('#tasks tr.task[data-type="run_tests"] .waits');
    expect(waits).toContain('implement');
    expect(
      await page.getAttribute('#tasks tr.task[data-type="run_tests"] .dep', 'data-dep-state'),
    ).toBe('pending');
    expect(await page.locator('#gate-panel').isHidden()).toBe(true);
    await page.waitForSelector('#chart svg g.current[data-state="build"]', { timeout: 5_000 });
    expect(await inView()).toBe(true);
    await page.screenshot({ path: 'test-results/dashboard-rework.png', fullPage: true });
    expect(outside).toEqual([]);
  });

  it('keeps a 32-phase workflow readable: the current state at full size and in view, zoom and fit', async () => {
    // Gates all through, so the ticket can be driven deep into it without tasks.
    const phases = Array.from({ length: 32 }, (_, i) => ({
      name: `review_step_${String(i + 1).padStart(2, '0')}`,
      approval: {},
    }));
    const reg = await t.call('POST', '/workflows', { name: 'long', phases });
    expect(reg.status).toBe(201);
    const id = (await t.call('POST', '/tickets', { title: 'Long ride', workflow: 'long' })).body
      .id as string;
    await t.call('POST', `/tickets/${id}/events`, { type: 'START' });
    for (let i = 0; i < 20; i++) {
      const r = await t.call('POST', `/tickets/${id}/events`, { type: 'APPROVE', by: 'x' });
      expect(r.status).toBe(200);
    }
    const at = (await t.call('GET', `/tickets/${id}`)).body.state as string;
    expect(at).toBe('review_step_21');
    await page.goto(`${base}/`);
    await page.selectOption('#board-workflow', 'long');
    await page.waitForSelector(ticketCard(at, id), { timeout: 10_000 });
    expect(await page.locator('#board .column').count()).toBe(36);
    await page.click(ticketCard(at, id));
    await page.waitForSelector(`#chart svg g.current[data-state="${at}"]`, { timeout: 10_000 });
    expect(await page.locator('#chart svg g.node').count()).toBe(36);
    // Too big to fit legibly: shown at full size around the current state.
    const inView = () =>
      page.evaluate(() => {
        const node = document.querySelector('#chart svg g.current')?.getBoundingClientRect();
        const box = document.querySelector('#chart')?.getBoundingClientRect();
        if (!node || !box) return false;
        return (
          node.left >= box.left &&
          node.right <= box.right &&
          node.top >= box.top &&
          node.bottom <= box.bottom
        );
      });
    expect(Number(await page.getAttribute('#chart', 'data-scale'))).toBeGreaterThanOrEqual(0.75);
    expect(await inView()).toBe(true);
    const fontPx = await page.$eval(
      '#chart svg g.current text',
      (n) => n.getBoundingClientRect().height,
    );
    expect(fontPx).toBeGreaterThanOrEqual(12);
    await page.locator('#chart-panel').scrollIntoViewIfNeeded();
    await page.screenshot({ path: 'test-results/dashboard-32-phases.png', fullPage: true });
    await page.click('#chart-fit');
    const fitted = Number(await page.getAttribute('#chart', 'data-scale'));
    expect(fitted).toBeLessThan(0.75);
    await page.click('#chart-zoom-in');
    expect(Number(await page.getAttribute('#chart', 'data-scale'))).toBeCloseTo(fitted * 1.25, 1);
    await page.click('#chart-current');
    expect(await inView()).toBe(true);
    await page.screenshot({ path: 'test-results/dashboard-32-phases-fit.png', fullPage: true });
    expect(outside).toEqual([]);
  });
});
