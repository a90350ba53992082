// The dashboard's script: a board of tickets by state, the selected ticket's tasks, the
// selected entity's statechart (Mermaid, served locally) with its allowed events as buttons,
// and a live feed from GET /events/stream. Plain DOM; text is never parsed as HTML.

const TICKET_COLUMNS = [
  'backlog',
  'requirements',
  'design',
  'implementation',
  'testing',
  'blocked',
  'done',
  'cancelled',
];
const TOKEN_EVENTS = ['START', 'HEARTBEAT', 'COMPLETE', 'FAIL', 'RELEASE'];
const FEED_MAX = 100;
// Output chunks kept on the page (the server keeps OUTPUT_MAX_BYTES per task).
const OUTPUT_MAX = 5000;
// Each column shows its newest tickets, so done and cancelled ones never crowd out the open.
const COLUMN_MAX = 100;

const $ = (id) => document.getElementById(id);
const state = {
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

async function loadBoard() {
  const pages = await Promise.all(
    TICKET_COLUMNS.map((name) => api('GET', `/tickets?state=${name}&limit=${COLUMN_MAX}`)),
  );
  state.tickets = pages.flatMap((p) => p.items);
  state.more = Object.fromEntries(TICKET_COLUMNS.map((name, i) => [name, !!pages[i].nextCursor]));
  renderBoard();
}

function renderBoard() {
  const board = $('board');
  const columns = TICKET_COLUMNS.map((name) => {
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
    ),
  );
  // replaceChildren() would print a null child as the text "null": drop the absent ones.
  const parts = [
    el('h2', {}, t.title, ' ', stateBadge(t.state)),
    el('p', { class: 'muted' }, `${t.id} · phase ${t.phase ?? '—'} · version ${t.version}`),
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
              ...['type', 'phase', 'state', 'attempt', 'worker', 'lease until'].map((h) =>
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
    ...entity.allowedEvents.map((event) => eventButton(type, entity, event)),
  );
  const seq = ++state.chartSeq;
  const text = await fetch(`/machines/${type}/mermaid?state=${encodeURIComponent(entity.state)}`, {
    headers: authHeaders(),
  }).then((r) => r.text());
  if (!window.mermaid) {
    $('chart').textContent = text;
    return;
  }
  const { svg } = await window.mermaid.render(`chart-svg-${seq}`, text);
  if (seq !== state.chartSeq) return;
  $('chart').innerHTML = svg;
  $('chart').dataset.state = entity.state;
}

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
  try {
    const ticket = await api('POST', '/tickets', { title: input.value });
    input.value = '';
    await loadBoard();
    await selectTicket(ticket.id);
  } catch (error) {
    showMessage(error.message);
  }
});

if (window.mermaid) window.mermaid.initialize({ startOnLoad: false, securityLevel: 'strict' });
setInterval(() => {
  if (!state.live) refresh();
}, 5000);
refresh();
stream();
