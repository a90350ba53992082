// The dashboard's script: a board of one workflow's tickets by state, the selected ticket's
// tasks, its gate's Approve/Reject, the selected entity's statechart (a ticket's drawn here
// from its workflow's machine, a task's by Mermaid, served locally) with its allowed events
// as buttons, and a live feed from GET /events/stream. Plain DOM; text is never parsed as HTML.

const DEFAULT_COLUMNS = [
  'backlog',
  'requirements',
  'design',
  'implementation',
  'testing',
  'blocked',
  'done',
  'cancelled',
];
// Sent from the gate panel (they need `by` and a reason), not as bare buttons.
const GATE_EVENTS = ['APPROVE', 'REJECT'];
// The most workflows offered in the selects (GET /workflows returns the latest of each).
const WORKFLOWS_MAX = 200;
const TOKEN_EVENTS = ['START', 'HEARTBEAT', 'COMPLETE', 'FAIL', 'RELEASE'];
const FEED_MAX = 100;
// Output chunks kept on the page (the server keeps OUTPUT_MAX_BYTES per task).
const OUTPUT_MAX = 5000;
// Each column shows its newest tickets, so done and cancelled ones never crowd out the open.
const COLUMN_MAX = 100;

const $ = (id) => document.getElementById(id);
const state = {
  // Latest version of each registered workflow: {name, version, phases}.
  workflows: [],
  board: localStorage.getItem('orch.board') || 'default',
  tickets: [],
  more: {},
  ticket: null,
  // Pages of the ticket's tasks to show (GET /tickets/:id carries the first).
  taskPages: 1,
  selected: null,
  live: false,
  chartSeq: 0,
  // The selected task's output stream: {taskId, abort, ended}.
  output: null,
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') node.className = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function authHeaders() {
  const token = localStorage.getItem('orch.token');
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(method, path, body) {
  const headers = { ...authHeaders() };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    headers['Idempotency-Key'] = crypto.randomUUID();
  }
  const res = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401) {
    const token = prompt('This orchestrator needs an API token:');
    if (token) {
      localStorage.setItem('orch.token', token);
      return api(method, path, body);
    }
  }
  const data = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) {
    const err = new Error(describeError(res.status, data));
    err.status = res.status;
    throw err;
  }
  return data;
}

function describeError(status, data) {
  if (!data || typeof data !== 'object') return `${status}`;
  let text = `${status} ${data.error}: ${data.message}`;
  if (Array.isArray(data.allowed)) text += `\nallowed now: ${data.allowed.join(', ') || 'none'}`;
  return text;
}

function showMessage(text, ok = false) {
  const box = $('message');
  box.textContent = text;
  box.className = ok ? 'ok' : '';
  box.hidden = !text;
}

function stateBadge(value) {
  return el('span', { class: 'state', 'data-state': value }, value);
}

// ---- board --------------------------------------------------------------------------

async function loadWorkflows() {
  try {
    const { workflows } = await api('GET', '/workflows');
    state.workflows = workflows.slice(0, WORKFLOWS_MAX);
  } catch (error) {
    // Without the registry (or before it answers) only the built-in workflow is offered.
    if (error.status !== 404) showMessage(error.message);
    state.workflows = [];
  }
  if (!state.workflows.some((w) => w.name === state.board)) state.board = 'default';
  const listed = JSON.stringify([state.board, state.workflows.map((w) => [w.name, w.version])]);
  if (listed === state.listed) return;
  state.listed = listed;
  for (const id of ['new-ticket-workflow', 'board-workflow']) {
    const select = $(id);
    const chosen = id === 'board-workflow' ? state.board : select.value || 'default';
    const names = ['default', ...state.workflows.map((w) => w.name).filter((n) => n !== 'default')];
    select.replaceChildren(
      ...names.map((name) => {
        const wf = state.workflows.find((w) => w.name === name);
        const label = wf ? `${name} (v${wf.version}, ${wf.phases.length} phases)` : name;
        return el('option', { value: name }, label);
      }),
    );
    select.value = names.includes(chosen) ? chosen : 'default';
  }
}

/** backlog, the workflow's phases, then done, blocked and cancelled. */
function boardColumns() {
  if (state.board === 'default') return DEFAULT_COLUMNS;
  const wf = state.workflows.find((w) => w.name === state.board);
  if (!wf) return DEFAULT_COLUMNS;
  return ['backlog', ...wf.phases.map((p) => p.name), 'done', 'blocked', 'cancelled'];
}

async function loadBoard() {
  const columns = boardColumns();
  const workflow = encodeURIComponent(state.board);
  const pages = await Promise.all(
    columns.map((name) =>
      api('GET', `/tickets?state=${name}&workflow=${workflow}&limit=${COLUMN_MAX}`),
    ),
  );
  state.columns = columns;
  state.tickets = pages.flatMap((p) => p.items);
  state.more = Object.fromEntries(columns.map((name, i) => [name, !!pages[i].nextCursor]));
  renderBoard();
}

function renderBoard() {
  const board = $('board');
  board.dataset.workflow = state.board;
  const columns = (state.columns ?? DEFAULT_COLUMNS).map((name) => {
    const tickets = state.tickets.filter((t) => t.state === name);
    return el(
      'div',
      { class: 'column', 'data-state': name },
      el(
        'h3',
        {},
        name,
        el('span', { class: 'count' }, `${tickets.length}${state.more[name] ? '+' : ''}`),
      ),
      ...tickets.map((t) =>
        el(
          'button',
          {
            type: 'button',
            class: `ticket${state.ticket?.id === t.id ? ' selected' : ''}`,
            'data-id': t.id,
            onclick: () => selectTicket(t.id),
          },
          el('strong', {}, t.title),
          el('div', { class: 'id' }, t.id.slice(0, 12)),
        ),
      ),
    );
  });
  board.replaceChildren(...columns);
}

// ---- ticket detail and statechart ---------------------------------------------------

async function selectTicket(id) {
  showMessage('');
  if (state.ticket?.id !== id) state.taskPages = 1;
  state.selected = { type: 'ticket', id };
  await loadTicket(id);
  renderBoard();
}

async function loadTicket(id) {
  const path = `/tickets/${encodeURIComponent(id)}`;
  try {
    // Tasks come as summaries (no payload or result), a page at a time.
    const ticket = await api('GET', path);
    for (let n = 1; ticket.tasksNext && n < state.taskPages; n++) {
      const next = await api('GET', `${path}/tasks?cursor=${encodeURIComponent(ticket.tasksNext)}`);
      ticket.tasks.push(...next.items);
      ticket.tasksNext = next.nextCursor;
    }
    state.ticket = ticket;
  } catch (error) {
    showMessage(error.message);
    return;
  }
  renderDetail();
  renderGate();
  await renderChart();
}

function renderDetail() {
  const t = state.ticket;
  if (!t) return;
  const rows = t.tasks.map((task) =>
    el(
      'tr',
      {
        class: `task${state.selected?.id === task.id ? ' selected' : ''}`,
        'data-id': task.id,
        'data-type': task.type,
        'data-state': task.state,
        onclick: () => {
          state.selected = { type: 'task', id: task.id };
          renderDetail();
          renderChart();
        },
      },
      el('td', {}, task.type),
      el('td', {}, task.phase),
      el('td', {}, stateBadge(task.state)),
      el(
        'td',
        { title: 'attempt number · attempts charged / maxAttempts' },
        `${task.attempt} · ${task.attemptsUsed}/${task.maxAttempts}`,
      ),
      el('td', {}, task.workerId ?? '—'),
      el('td', {}, task.leaseExpiresAt ? new Date(task.leaseExpiresAt).toLocaleTimeString() : '—'),
      el('td', { class: 'notes' }, ...taskNotes(task, t.tasks)),
    ),
  );
  // replaceChildren() would print a null child as the text "null": drop the absent ones.
  const parts = [
    el('h2', {}, t.title, ' ', stateBadge(t.state)),
    el(
      'p',
      { class: 'muted' },
      `${t.id} · workflow ${t.workflow} · phase ${t.phase ?? '—'} · version ${t.version}`,
    ),
    t.blockedReason ? el('p', {}, `Blocked: ${t.blockedReason}`) : null,
    el(
      'button',
      {
        type: 'button',
        onclick: () => {
          state.selected = { type: 'ticket', id: t.id };
          renderDetail();
          renderChart();
        },
      },
      'Ticket statechart',
    ),
    rows.length === 0
      ? el('p', { class: 'muted' }, 'No tasks yet.')
      : el(
          'table',
          { id: 'tasks' },
          el(
            'thead',
            {},
            el(
              'tr',
              {},
              ...['type', 'phase', 'state', 'attempt', 'worker', 'lease until', 'notes'].map((h) =>
                el('th', {}, h),
              ),
            ),
          ),
          el('tbody', {}, ...rows),
        ),
    t.tasksNext
      ? el(
          'button',
          {
            type: 'button',
            id: 'more-tasks',
            onclick: () => {
              state.taskPages++;
              loadTicket(t.id);
            },
          },
          'More tasks',
        )
      : null,
  ];
  $('detail').replaceChildren(...parts.filter((p) => p !== null));
}

/**
 * What a task waits for (its dependencies, each with its state, found among the ticket's
 * loaded tasks) and why it came back (the feedback of the rework that created it).
 */
function taskNotes(task, tasks) {
  const notes = [];
  if (task.state === 'waiting' && task.dependsOn?.length) {
    notes.push(
      el(
        'div',
        { class: 'waits' },
        'waits for ',
        ...task.dependsOn.map((depId) => {
          const dep = tasks.find((x) => x.id === depId);
          return el(
            'span',
            { class: 'dep', 'data-dep': depId, 'data-dep-state': dep?.state ?? 'unknown' },
            dep ? `${dep.type} ` : `${depId.slice(0, 12)} `,
            stateBadge(dep?.state ?? '?'),
          );
        }),
      ),
    );
  }
  if (task.feedback) {
    const f = task.feedback;
    notes.push(
      el(
        'div',
        { class: 'feedback', title: 'this task was created by a rework' },
        `↩ from ${f.fromPhase}, loop ${f.loop}: `,
        el('q', {}, f.reason),
      ),
    );
  }
  return notes;
}

// ---- gate ---------------------------------------------------------------------------

/**
 * Approve and Reject for a ticket in a gate phase. Rebuilt only when the ticket or its state
 * changes, so a live refresh never wipes a reason being typed.
 */
function renderGate() {
  const panel = $('gate-panel');
  const t = state.ticket;
  const open = t && GATE_EVENTS.some((e) => t.allowedEvents.includes(e));
  const key = open ? `${t.id}:${t.state}` : '';
  if (panel.dataset.key === key) return;
  panel.dataset.key = key;
  panel.hidden = !open;
  if (!open) {
    panel.replaceChildren();
    return;
  }
  const by = el('input', {
    id: 'gate-by',
    value: localStorage.getItem('orch.by') || 'dashboard',
    maxlength: 200,
    title: 'sent as `by`',
  });
  const comment = el('input', { id: 'gate-comment', placeholder: 'comment (optional)' });
  const reason = el('textarea', {
    id: 'gate-reason',
    placeholder: 'Why is it rejected? (required)',
    rows: 2,
  });
  const rejectBox = el(
    'div',
    { id: 'gate-reject-box', hidden: true },
    reason,
    el(
      'button',
      { type: 'button', id: 'gate-reject-confirm', onclick: () => reject() },
      'Send reject',
    ),
  );
  const who = () => {
    const name = by.value.trim() || 'dashboard';
    localStorage.setItem('orch.by', name);
    return name;
  };
  const send = async (body) => {
    try {
      await api('POST', `/tickets/${encodeURIComponent(t.id)}/events`, body);
      showMessage(`${body.type} accepted`, true);
    } catch (error) {
      showMessage(error.message);
    }
    await refresh();
  };
  const reject = () => {
    const text = reason.value.trim();
    if (!text) {
      showMessage('A reject needs a reason.');
      reason.focus();
      return;
    }
    send({ type: 'REJECT', by: who(), reason: text });
  };
  panel.replaceChildren(
    el('h2', {}, `Gate: ${t.state}`),
    el('p', { class: 'muted' }, 'This phase waits for an approval.'),
    el('label', {}, 'by ', by),
    comment,
    el(
      'div',
      { class: 'gate-buttons' },
      el(
        'button',
        {
          type: 'button',
          id: 'gate-approve',
          disabled: !t.allowedEvents.includes('APPROVE'),
          onclick: () => {
            const body = { type: 'APPROVE', by: who() };
            if (comment.value.trim()) body.comment = comment.value.trim();
            send(body);
          },
        },
        'Approve',
      ),
      el(
        'button',
        {
          type: 'button',
          id: 'gate-reject',
          disabled: !t.allowedEvents.includes('REJECT'),
          onclick: () => {
            rejectBox.hidden = false;
            reason.focus();
          },
        },
        'Reject…',
      ),
    ),
    rejectBox,
  );
}

function selectedEntity() {
  const t = state.ticket;
  if (!t || !state.selected) return null;
  if (state.selected.type === 'ticket') return { type: 'ticket', entity: t };
  const task = t.tasks.find((x) => x.id === state.selected.id);
  return task ? { type: 'task', entity: task } : { type: 'ticket', entity: t };
}

async function renderChart() {
  const sel = selectedEntity();
  const panel = $('chart-panel');
  if (!sel) {
    panel.hidden = true;
    return;
  }
  panel.hidden = false;
  const { type, entity } = sel;
  followOutput(type === 'task' ? entity : null);
  $('chart-title').textContent = `${type} ${entity.id.slice(0, 12)} · ${entity.state}`;
  panel.dataset.entity = entity.id;
  panel.dataset.state = entity.state;
  $('allowed').replaceChildren(
    ...entity.allowedEvents
      .filter((event) => type !== 'ticket' || !GATE_EVENTS.includes(event))
      .map((event) => eventButton(type, entity, event)),
  );
  const chart = $('chart');
  const width = Math.max(200, chart.clientWidth);
  const key = type === 'ticket' ? `ticket:${entity.workflow}:${entity.id}` : `task:${entity.id}`;
  // A refresh that changes nothing drawn keeps the chart, and the user's zoom and pan.
  const drawn = `${key}:${entity.state}:${type === 'ticket' ? Math.round(width / 40) : ''}`;
  if (chart.dataset.drawn === drawn) return;
  const seq = ++state.chartSeq;
  try {
    if (type === 'ticket') {
      const def = await ticketMachine(entity.workflow);
      if (seq !== state.chartSeq) return;
      const { svg, legend } = drawTicketChart(def, entity.state, width);
      chart.replaceChildren(svg);
      $('chart-legend').textContent = legend;
    } else {
      const text = await fetch(
        `/machines/${type}/mermaid?state=${encodeURIComponent(entity.state)}`,
        { headers: authHeaders() },
      ).then((r) => r.text());
      if (seq !== state.chartSeq) return;
      $('chart-legend').textContent = '';
      if (!window.mermaid) {
        chart.textContent = text;
        return;
      }
      const { svg } = await window.mermaid.render(`chart-svg-${seq}`, text);
      if (seq !== state.chartSeq) return;
      chart.innerHTML = svg;
    }
  } catch (error) {
    showMessage(`statechart: ${error.message}`);
    return;
  }
  chart.dataset.state = entity.state;
  chart.dataset.drawn = drawn;
  const svg = chart.querySelector('svg');
  if (svg) viewport.load(svg, key);
}

// ---- a ticket's statechart, drawn from its workflow's machine ---------------------------

const MACHINE_CACHE_MAX = 50;
const machineCache = new Map();

/** The Stately JSON of a ticket's machine: the built-in one or its workflow version's. */
async function ticketMachine(ref) {
  const path = ref === 'default@1' ? '/machines/ticket' : `/machines/workflow:${ref}`;
  if (!machineCache.has(path)) {
    // Versions never change, so a definition once read is good for the page's life.
    machineCache.set(path, await api('GET', path));
    if (machineCache.size > MACHINE_CACHE_MAX)
      machineCache.delete(machineCache.keys().next().value);
  }
  return machineCache.get(path);
}

const SVG_NS = 'http://www.w3.org/2000/svg';
function svgEl(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const SIDE_STATES = ['blocked', 'cancelled'];
// The events that move a ticket along its main line, in the order they are looked for.
const FORWARD_EVENTS = ['START', 'ADVANCE', 'APPROVE'];
// Drawn as a legend, not as arrows: they go from (or to) every phase, and as arrows they
// would bury the workflow's own shape (SEND_BACK alone is n² arrows).
const LEGEND_EVENTS = new Set(['SEND_BACK', 'BLOCK', 'UNBLOCK', 'CANCEL', 'TASK_ADDED']);
const leafOf = (target) => target.slice(target.lastIndexOf('.') + 1);

function edgeLabel(event, back) {
  if (event === 'TASK_STATE') return back ? 'task failed' : 'tasks done';
  const delayed = /^xstate\.after\.([^.]+)\./.exec(event);
  return delayed ? `after ${delayed[1]}` : event;
}

/** States on the main line (initial, then along forward events), side states, and arrows. */
function ticketGraph(def) {
  const states = def.states ?? {};
  const names = Object.keys(states);
  const chain = [];
  let at = leafOf(def.initial?.target?.[0] ?? names[0]);
  while (at && states[at] && !chain.includes(at)) {
    chain.push(at);
    const on = states[at].on ?? {};
    let next = null;
    for (const e of FORWARD_EVENTS) {
      const target = on[e]?.find((b) => b.target?.length)?.target[0];
      if (target) {
        next = leafOf(target);
        break;
      }
    }
    at = next;
  }
  for (const n of names) if (!chain.includes(n) && !SIDE_STATES.includes(n)) chain.push(n);
  const side = names.filter((n) => SIDE_STATES.includes(n));
  const index = new Map(chain.map((n, i) => [n, i]));
  const edges = new Map();
  for (const from of chain) {
    for (const [event, branches] of Object.entries(states[from].on ?? {})) {
      if (LEGEND_EVENTS.has(event)) continue;
      for (const b of branches) {
        for (const target of b.target ?? []) {
          const to = leafOf(target);
          if (to === from || !index.has(to)) continue;
          const key = `${from}>${to}`;
          const edge = edges.get(key) ?? { from, to, labels: [] };
          const back = index.get(to) < index.get(from);
          // ADVANCE says it; the legend says that done tasks send it too.
          if (event === 'TASK_STATE' && !back && states[from].on?.ADVANCE) continue;
          const label = edgeLabel(event, back);
          if (!edge.labels.includes(label)) edge.labels.push(label);
          edges.set(key, edge);
        }
      }
    }
  }
  const has = (event) => chain.some((n) => states[n].on?.[event]);
  const legend = [];
  if (has('ADVANCE')) legend.push('ADVANCE: also taken when the phase’s tasks are done');
  if (side.includes('blocked')) {
    legend.push('blocked: from a phase on BLOCK, or when it cannot go on (a failure, a timeout)');
  }
  if (states.blocked?.on?.UNBLOCK) legend.push('UNBLOCK: back to its phase');
  if (has('SEND_BACK')) legend.push('SEND_BACK: to any earlier phase');
  if (def.on?.CANCEL) legend.push('CANCEL: from any open state to cancelled');
  return {
    chain,
    side,
    index,
    edges: [...edges.values()],
    gates: new Set(chain.filter((n) => states[n].on?.APPROVE)),
    finals: new Set(names.filter((n) => states[n].type === 'final')),
    legend: legend.join(' · '),
  };
}

const NODE_H = 44;
const GAP_X = 64;
const GAP_Y = 92;
const PAD = 28;
const FONT = 15;

/**
 * The main line in rows that turn back at each end (so every arrow between rows is a short
 * vertical one), as many per row as the panel holds at full size, the side states below.
 */
function drawTicketChart(def, current, width) {
  const g = ticketGraph(def);
  const all = [...g.chain, ...g.side];
  const longest = Math.max(...all.map((n) => n.length));
  const nodeW = Math.round(Math.min(380, Math.max(110, longest * FONT * 0.6 + 36)));
  const perRow = Math.max(
    2,
    Math.min(g.chain.length, Math.floor((width - 2 * PAD + GAP_X) / (nodeW + GAP_X))),
  );
  const rows = Math.ceil(g.chain.length / perRow);
  const pos = new Map();
  g.chain.forEach((n, i) => {
    const row = Math.floor(i / perRow);
    const col = row % 2 ? perRow - 1 - (i % perRow) : i % perRow;
    pos.set(n, { x: PAD + col * (nodeW + GAP_X), y: PAD + row * (NODE_H + GAP_Y), row });
  });
  g.side.forEach((n, i) => {
    pos.set(n, { x: PAD + i * (nodeW + GAP_X), y: PAD + rows * (NODE_H + GAP_Y), row: rows });
  });
  const W = 2 * PAD + perRow * nodeW + (perRow - 1) * GAP_X;
  const H = 2 * PAD + (rows + 1) * NODE_H + rows * GAP_Y;

  const svg = svgEl('svg', {
    xmlns: SVG_NS,
    viewBox: `0 0 ${W} ${H}`,
    class: 'ticket-chart',
    role: 'img',
    'aria-label': `statechart, current state ${current}`,
  });
  svg.append(
    svgEl(
      'defs',
      {},
      svgEl(
        'marker',
        {
          id: 'arrow',
          viewBox: '0 0 10 10',
          refX: 9,
          refY: 5,
          markerWidth: 8,
          markerHeight: 8,
          orient: 'auto-start-reverse',
        },
        svgEl('path', { d: 'M0,0 L10,5 L0,10 z', class: 'arrowhead' }),
      ),
    ),
  );
  const edgesG = svgEl('g', { class: 'edges' });
  const labelsG = svgEl('g', { class: 'labels' });
  const label = (x, y, text, anchor = 'middle') =>
    labelsG.append(svgEl('text', { x, y, 'text-anchor': anchor, class: 'edge-label' }, text));
  g.edges.forEach((e, n) => {
    const a = pos.get(e.from);
    const b = pos.get(e.to);
    const text = e.labels.join(', ');
    const step = g.index.get(e.to) - g.index.get(e.from);
    if (step === 1 && a.row === b.row) {
      const right = b.x > a.x;
      const x1 = right ? a.x + nodeW : a.x;
      const x2 = right ? b.x : b.x + nodeW;
      const y = a.y + NODE_H / 2;
      edgesG.append(svgEl('path', { d: `M${x1},${y} L${x2},${y}`, class: 'edge forward' }));
      label((x1 + x2) / 2, y - 8, text);
    } else if (step === 1) {
      const x = a.x + nodeW / 2;
      edgesG.append(
        svgEl('path', { d: `M${x},${a.y + NODE_H} L${x},${b.y}`, class: 'edge forward' }),
      );
      // On the line itself (its halo hides the line): clear of the arcs that bend outwards.
      label(x, (a.y + NODE_H + b.y) / 2 + 4, text);
    } else if (a.row === b.row) {
      // Above the row for a step back, below it for a jump forward.
      const up = step < 0;
      const y = up ? a.y : a.y + NODE_H;
      const lift = (up ? -1 : 1) * (30 + 8 * Math.min(Math.abs(step), 5) + (n % 3) * 6);
      const x1 = a.x + nodeW / 2 + (up ? -12 : 12);
      const x2 = b.x + nodeW / 2 + (up ? 12 : -12);
      edgesG.append(
        svgEl('path', {
          d: `M${x1},${y} C${x1},${y + lift} ${x2},${y + lift} ${x2},${y}`,
          class: `edge ${up ? 'back' : 'skip'}`,
        }),
      );
      label((x1 + x2) / 2, y + lift * 0.75 + (up ? -4 : 12), text);
    } else {
      // Between rows: leave from the side of the source, arrive on the near edge of the target.
      const down = b.row > a.row;
      const x1 = a.x + nodeW - 14;
      const y1 = down ? a.y + NODE_H : a.y;
      const x2 = b.x + nodeW - 14;
      const y2 = down ? b.y : b.y + NODE_H;
      const bend = nodeW / 2 + 20;
      edgesG.append(
        svgEl('path', {
          d: `M${x1},${y1} C${x1 + bend},${y1} ${x2 + bend},${y2} ${x2},${y2}`,
          class: `edge ${down ? 'skip' : 'back'}`,
        }),
      );
      label((x1 + x2) / 2 + bend * 0.75, (y1 + y2) / 2, text, 'start');
    }
  });
  svg.append(edgesG);
  const nodesG = svgEl('g', { class: 'nodes' });
  for (const n of all) {
    const p = pos.get(n);
    const classes = ['node'];
    if (n === current) classes.push('current');
    if (g.gates.has(n)) classes.push('gate');
    if (g.finals.has(n)) classes.push('final');
    if (g.side.includes(n)) classes.push('side');
    const node = svgEl(
      'g',
      { class: classes.join(' '), 'data-state': n },
      svgEl('rect', {
        x: p.x,
        y: p.y,
        width: nodeW,
        height: NODE_H,
        rx: g.gates.has(n) ? NODE_H / 2 : 8,
      }),
      svgEl('text', { x: p.x + nodeW / 2, y: p.y + NODE_H / 2 + FONT / 3 + 1 }, n),
    );
    nodesG.append(node);
    // The marker sits outside the node's group: its text is the state's name alone.
    if (g.gates.has(n)) {
      nodesG.append(
        svgEl('text', { x: p.x + nodeW / 2, y: p.y - 6, class: 'gate-mark' }, 'approval gate'),
      );
    }
  }
  svg.append(nodesG, labelsG);
  return { svg, legend: g.legend };
}

// ---- zoom and pan -------------------------------------------------------------------

// Below this scale a chart's text is too small to read: show part of it at full size instead.
const READABLE_SCALE = 0.75;
const ZOOM_MIN = 0.05;
const ZOOM_MAX = 4;

/** The chart's viewBox as a camera: fit, zoom at a point, pan by dragging, show the current state. */
const viewport = {
  svg: null,
  box: null,
  view: null,
  key: null,
  touched: false,

  attach(container) {
    container.addEventListener(
      'wheel',
      (e) => {
        if (!this.svg) return;
        e.preventDefault();
        const p = this.toUser(e.clientX, e.clientY);
        this.zoom(e.deltaY < 0 ? 1.15 : 1 / 1.15, p.x, p.y);
      },
      { passive: false },
    );
    let drag = null;
    container.addEventListener('pointerdown', (e) => {
      if (!this.svg || e.button !== 0) return;
      drag = { x: e.clientX, y: e.clientY, view: { ...this.view } };
      container.setPointerCapture(e.pointerId);
      container.classList.add('dragging');
    });
    container.addEventListener('pointermove', (e) => {
      if (!drag) return;
      const k = this.scale();
      this.view = {
        ...drag.view,
        x: drag.view.x - (e.clientX - drag.x) / k,
        y: drag.view.y - (e.clientY - drag.y) / k,
      };
      this.touched = true;
      this.apply();
    });
    const end = () => {
      drag = null;
      container.classList.remove('dragging');
    };
    container.addEventListener('pointerup', end);
    container.addEventListener('pointercancel', end);
  },

  load(svg, key) {
    const [x, y, w, h] = (svg.getAttribute('viewBox') ?? '0 0 100 100').split(/[\s,]+/).map(Number);
    this.svg = svg;
    this.box = { x, y, w: w || 1, h: h || 1 };
    // Mermaid sizes its SVG itself; here it fills the panel and the viewBox does the rest.
    svg.removeAttribute('style');
    svg.removeAttribute('height');
    svg.setAttribute('width', '100%');
    svg.setAttribute('height', '100%');
    svg.setAttribute('preserveAspectRatio', 'xMidYMid meet');
    if (key === this.key && this.touched && this.view) {
      this.apply();
      this.showCurrent(false);
    } else {
      this.key = key;
      this.touched = false;
      this.initial();
    }
  },

  size() {
    const r = this.svg.getBoundingClientRect();
    return { w: r.width || 1, h: r.height || 1 };
  },

  scale() {
    const { w, h } = this.size();
    return Math.min(w / this.view.w, h / this.view.h);
  },

  apply() {
    const v = this.view;
    this.svg.setAttribute('viewBox', `${v.x} ${v.y} ${v.w} ${v.h}`);
    $('chart').dataset.scale = this.scale().toFixed(2);
  },

  /** Whole when that is readable; otherwise full size around the current state. */
  initial() {
    const { w, h } = this.size();
    if (Math.min(w / this.box.w, h / this.box.h) >= READABLE_SCALE) {
      this.fit();
      return;
    }
    this.view = { x: this.box.x, y: this.box.y, w: w / 1, h: h / 1 };
    this.apply();
    this.showCurrent(true);
  },

  fit() {
    if (!this.svg) return;
    this.view = { ...this.box };
    this.touched = true;
    this.apply();
  },

  zoom(factor, cx, cy) {
    if (!this.svg) return;
    const v = this.view;
    const { w } = this.size();
    const next = Math.min(ZOOM_MAX, Math.max(ZOOM_MIN, this.scale() * factor));
    const f = next / this.scale();
    const x = cx ?? v.x + v.w / 2;
    const y = cy ?? v.y + v.h / 2;
    this.view = { x: x - (x - v.x) / f, y: y - (y - v.y) / f, w: v.w / f, h: v.h / f };
    this.touched = w > 0;
    this.apply();
  },

  /** Screen coordinates to the chart's own (the viewBox is centred by `meet`). */
  toUser(clientX, clientY) {
    const r = this.svg.getBoundingClientRect();
    const k = this.scale();
    const v = this.view;
    return {
      x: v.x + (clientX - r.left - (r.width - v.w * k) / 2) / k,
      y: v.y + (clientY - r.top - (r.height - v.h * k) / 2) / k,
    };
  },

  /** Centres the current state when it is out of view (always when `force`). */
  showCurrent(force) {
    const node = this.svg?.querySelector('g.current');
    if (!node) return;
    const r = node.getBoundingClientRect();
    const a = this.toUser(r.left, r.top);
    const b = this.toUser(r.right, r.bottom);
    const v = this.view;
    const inside = a.x >= v.x && a.y >= v.y && b.x <= v.x + v.w && b.y <= v.y + v.h;
    if (inside && !force) return;
    this.view = this.clamp({ ...v, x: (a.x + b.x) / 2 - v.w / 2, y: (a.y + b.y) / 2 - v.h / 2 });
    this.apply();
  },

  /** Keeps a view that is smaller than the chart on it, and centres one that is larger. */
  clamp(v) {
    const axis = (at, size, start, length) =>
      size >= length
        ? start - (size - length) / 2
        : Math.min(Math.max(at, start), start + length - size);
    return {
      ...v,
      x: axis(v.x, v.w, this.box.x, this.box.w),
      y: axis(v.y, v.h, this.box.y, this.box.h),
    };
  },
};

function eventButton(type, entity, event) {
  let disabled = false;
  let title = `send ${event}`;
  if (type === 'task' && TOKEN_EVENTS.includes(event)) {
    disabled = true;
    title = `${event} needs the claiming worker's token`;
  } else if (type === 'task' && event === 'CLAIM') {
    disabled = true;
    title = 'agents claim through POST /tasks/claim';
  }
  return el(
    'button',
    {
      type: 'button',
      'data-event': event,
      title,
      disabled,
      onclick: () => sendEvent(type, entity.id, event),
    },
    event,
  );
}

async function sendEvent(type, id, event) {
  const body = { type: event };
  if (event === 'BLOCK') {
    const reason = prompt('Why is it blocked?');
    if (!reason) return;
    body.reason = reason;
  } else if (event === 'SEND_BACK') {
    const toPhase = prompt('Send back to which earlier phase?');
    if (!toPhase) return;
    const reason = prompt('Why is it sent back?');
    if (!reason) return;
    body.toPhase = toPhase.trim();
    body.reason = reason;
  }
  try {
    await api(
      'POST',
      `/${type === 'ticket' ? 'tickets' : 'tasks'}/${encodeURIComponent(id)}/events`,
      body,
    );
    showMessage(`${event} accepted`, true);
  } catch (error) {
    showMessage(error.message);
  }
  await refresh();
}

// ---- live ---------------------------------------------------------------------------

let refreshTimer = null;
function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, 150);
}

async function refresh() {
  try {
    await loadBoard();
    if (state.ticket) await loadTicket(state.ticket.id);
  } catch (error) {
    showMessage(error.message);
  }
}

function setLive(on, text) {
  state.live = on;
  const badge = $('live');
  badge.textContent = text;
  badge.className = on ? 'live' : 'live off';
}

function onStreamEvent(id, type, data) {
  let entry = null;
  try {
    entry = JSON.parse(data);
  } catch {
    return;
  }
  const item = el(
    'li',
    { 'data-id': id, 'data-entity': entry.entityId },
    `${new Date(entry.at).toLocaleTimeString()} ${type} ${entry.entityId.slice(0, 12)}`,
  );
  const feed = $('events');
  feed.prepend(item);
  while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
  scheduleRefresh();
}

async function stream() {
  let lastId = null;
  for (;;) {
    try {
      const headers = { ...authHeaders() };
      if (lastId) headers['Last-Event-ID'] = lastId;
      // First connection: only what happens from now on (the board is loaded separately).
      const res = await fetch(lastId ? '/events/stream' : '/events/stream?after=new', { headers });
      if (!res.ok || !res.body) {
        setLive(false, res.status === 503 ? 'no live stream: polling' : `offline (${res.status})`);
        await new Promise((r) => setTimeout(r, 5000));
        continue;
      }
      setLive(true, 'live');
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end = buffer.indexOf('\n\n');
        while (end >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let id = null;
          let type = 'message';
          const data = [];
          for (const line of block.split('\n')) {
            if (line.startsWith('id: ')) id = line.slice(4);
            else if (line.startsWith('event: ')) type = line.slice(7);
            else if (line.startsWith('data: ')) data.push(line.slice(6));
          }
          if (id) lastId = id;
          if (data.length > 0) onStreamEvent(id, type, data.join('\n'));
          end = buffer.indexOf('\n\n');
        }
      }
    } catch {
      // The stream broke: fall through and resume from the last id.
    }
    setLive(false, 'reconnecting');
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// ---- a task's output --------------------------------------------------------------

/** Splits an SSE body into frames and calls `onFrame({id, event, data})` for each. */
async function readFrames(res, onFrame) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end = buffer.indexOf('\n\n');
    while (end >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const frame = { id: null, event: 'message', data: [] };
      for (const line of block.split('\n')) {
        if (line.startsWith('id: ')) frame.id = line.slice(4);
        else if (line.startsWith('event: ')) frame.event = line.slice(7);
        else if (line.startsWith('data: ')) frame.data.push(line.slice(6));
      }
      if (frame.data.length > 0) onFrame({ ...frame, data: frame.data.join('\n') });
      end = buffer.indexOf('\n\n');
    }
  }
}

/**
 * Follows the selected task's output (or stops when none is selected): everything kept,
 * then live, resuming after the last seq when the stream breaks. The view sticks to the
 * bottom while it is scrolled there, and stays put while the user reads further up.
 */
function followOutput(task) {
  const current = state.output;
  const live = task && ['claimed', 'running'].includes(task.state);
  if (current && task && current.taskId === task.id && (!current.ended || !live)) return;
  current?.abort.abort();
  state.output = null;
  const panel = $('output-panel');
  if (!task) {
    panel.hidden = true;
    return;
  }
  panel.hidden = false;
  panel.dataset.task = task.id;
  const pre = $('output');
  if (!current || current.taskId !== task.id) pre.replaceChildren();
  const mine = { taskId: task.id, abort: new AbortController(), ended: false, lastSeq: null };
  if (current && current.taskId === task.id) mine.lastSeq = current.lastSeq;
  state.output = mine;
  $('output-title').textContent = `Output · ${task.id.slice(0, 12)}`;
  void (async () => {
    while (!mine.abort.signal.aborted && !mine.ended) {
      try {
        const headers = { ...authHeaders() };
        if (mine.lastSeq) headers['Last-Event-ID'] = mine.lastSeq;
        const res = await fetch(`/tasks/${encodeURIComponent(task.id)}/output/stream`, {
          headers,
          signal: mine.abort.signal,
        });
        if (!res.ok || !res.body) throw new Error(`output stream: ${res.status}`);
        await readFrames(res, (f) => onOutputFrame(mine, pre, f));
      } catch {
        // Broken or refused: try again shortly, after the last seq shown.
      }
      if (!mine.ended) await new Promise((r) => setTimeout(r, 1000));
    }
  })();
}

function onOutputFrame(mine, pre, frame) {
  if (state.output !== mine) return;
  let data = null;
  try {
    data = JSON.parse(frame.data);
  } catch {
    return;
  }
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  if (frame.event === 'output') {
    mine.lastSeq = frame.id;
    const last = pre.lastElementChild;
    if (!last || last.dataset.attempt !== String(data.attempt)) {
      pre.append(
        el(
          'span',
          { class: 'attempt', 'data-attempt': data.attempt },
          `— attempt ${data.attempt} —\n`,
        ),
      );
    }
    pre.append(
      el(
        'span',
        {
          class: `chunk ${data.stream}`,
          'data-seq': data.seq,
          'data-attempt': data.attempt,
          'data-stream': data.stream,
          title: `#${data.seq} · attempt ${data.attempt} · ${data.stream} · ${data.at}`,
        },
        data.text,
      ),
    );
    while (pre.children.length > OUTPUT_MAX) pre.firstElementChild.remove();
  } else if (frame.event === 'truncated') {
    pre.append(
      el('span', { class: 'gap' }, `… chunks ${data.from}–${data.to} were dropped (cap) …\n`),
    );
  } else if (frame.event === 'end') {
    mine.ended = true;
    pre.append(
      el(
        'span',
        { class: 'end' },
        `— ${data.state}${data.truncated ? ', oldest output dropped' : ''} —\n`,
      ),
    );
  }
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

// ---- start --------------------------------------------------------------------------

$('new-ticket').addEventListener('submit', async (e) => {
  e.preventDefault();
  const input = $('new-ticket-title');
  const workflow = $('new-ticket-workflow').value || 'default';
  try {
    const body = { title: input.value };
    if (workflow !== 'default') body.workflow = workflow;
    const ticket = await api('POST', '/tickets', body);
    input.value = '';
    // Show the board of the workflow the new ticket runs.
    setBoard(ticket.workflow.slice(0, ticket.workflow.indexOf('@')));
    await loadBoard();
    await selectTicket(ticket.id);
  } catch (error) {
    showMessage(error.message);
  }
});

function setBoard(name) {
  state.board = name;
  localStorage.setItem('orch.board', name);
  $('board-workflow').value = name;
}

$('board-workflow').addEventListener('change', async (e) => {
  setBoard(e.target.value);
  try {
    await loadBoard();
  } catch (error) {
    showMessage(error.message);
  }
});
$('new-ticket-workflow').addEventListener('focus', () => loadWorkflows());
$('chart-fit').addEventListener('click', () => viewport.fit());
$('chart-zoom-in').addEventListener('click', () => viewport.zoom(1.25));
$('chart-zoom-out').addEventListener('click', () => viewport.zoom(0.8));
$('chart-current').addEventListener('click', () => viewport.showCurrent(true));
viewport.attach($('chart'));

if (window.mermaid) window.mermaid.initialize({ startOnLoad: false, securityLevel: 'strict' });
setInterval(() => {
  if (!state.live) refresh();
}, 5000);
loadWorkflows().then(refresh);
stream();
