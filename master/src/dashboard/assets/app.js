// Flotilla's dashboard. Plain JavaScript, no dependencies: one
// server-sent event stream (/ui/events) pushes the cluster's state, at most
// about ten updates a second; the task table and detail read the API with
// the session cookie. Everything from the cluster is shown as text.

const WINDOW_MS = 120_000;   // the task stream shows the last two minutes
const MAX_DRAWN = 4_000;     // bars kept in the stream at most
const LANE_H = 14;
const LABEL_W = 64;
const ROW_H = 26;
const ID_WINDOW = 1_000;     // the table shows the latest task IDs, this many more per "Load earlier"
const MAX_EVENTS = 300;

const $ = (sel) => document.querySelector(sel);
const SVG = 'http://www.w3.org/2000/svg';

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = v;
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function svg(tag, attrs = {}) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

// ----- talking to the master ------------------------------------------------

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { 'X-Flotilla-Dashboard': '1' };
  if (options.body !== undefined) headers['Content-Type'] = 'application/json';
  const resp = await fetch(path, { credentials: 'same-origin', cache: 'no-store', ...options, headers });
  let body = null;
  const text = await resp.text();
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!resp.ok) throw new HttpError(resp.status, (body && body.error) || `${resp.status} ${resp.statusText}`);
  return body;
}

function toast(message, bad = false) {
  const t = el('div', { class: bad ? 'toast bad' : 'toast', text: message });
  $('#toasts').append(t);
  setTimeout(() => t.remove(), bad ? 8000 : 4000);
}

function confirmAction(text) {
  const dialog = $('#confirm');
  $('#confirm-text').textContent = text;
  dialog.returnValue = '';
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'), { once: true });
  });
}

// ----- state ---------------------------------------------------------------

const state = {
  incarnation: null,
  clockOffset: 0,        // master clock minus ours
  receivedAt: 0,
  workers: [],
  lanes: new Map(),      // "worker/slot" -> lane index
  drawn: [],             // stream rects, oldest first
  origin: 0,             // stream x origin (master ms)
  events: [],
  series: [],
  nextTaskId: 1,
  table: { rows: [], from: null, stale: true, loading: false, lastLoad: 0, selected: null },
  detail: { id: null, final: true, lastLoad: 0 },
  source: null,
};

const masterNow = () => Date.now() + state.clockOffset;

// ----- session -------------------------------------------------------------

async function boot() {
  let session;
  try {
    session = await api('/ui/session');
  } catch {
    $('#offline').hidden = false;
    setTimeout(boot, 1000);
    return;
  }
  $('#offline').hidden = true;
  if (!session.authenticated) {
    showLogin();
    return;
  }
  $('#login').hidden = true;
  $('#app').hidden = false;
  $('#logout').hidden = !session.auth;
  connect();
}

function showLogin(message = '') {
  if (state.source) { state.source.close(); state.source = null; }
  $('#app').hidden = true;
  $('#login').hidden = false;
  $('#login-error').textContent = message;
  $('#token').focus();
}

$('#login-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const token = $('#token').value;
  try {
    await api('/ui/login', { method: 'POST', body: JSON.stringify({ token }) });
    $('#token').value = '';
    $('#login-error').textContent = '';
    boot();
  } catch (err) {
    $('#login-error').textContent = err.status === 401 ? 'Wrong token.' : `Sign-in failed: ${err.message}`;
  }
});

$('#logout').addEventListener('click', async () => {
  await api('/ui/logout', { method: 'POST' }).catch(() => {});
  showLogin();
});

// ----- the live stream -----------------------------------------------------

function connect() {
  if (state.source) state.source.close();
  const source = new EventSource('/ui/events');
  state.source = source;
  source.addEventListener('update', (e) => {
    setConnected(true);
    onUpdate(JSON.parse(e.data));
  });
  source.onerror = () => {
    // A restarted master, a network cut, or a session that is no longer
    // valid (a new token): look again in a second.
    setConnected(false);
    source.close();
    if (state.source === source) state.source = null;
    setTimeout(reconnect, 1000);
  };
}

async function reconnect() {
  try {
    const session = await api('/ui/session');
    $('#offline').hidden = true;
    if (!session.authenticated) { showLogin('Please sign in again.'); return; }
    connect();
  } catch {
    $('#offline').hidden = false;
    setTimeout(reconnect, 1000);
  }
}

function setConnected(on) {
  const c = $('#conn');
  c.dataset.connected = on;
  c.textContent = on ? 'live' : 'reconnecting';
}

let pending = null;
function onUpdate(u) {
  if (u.hello) resetFor(u);
  state.clockOffset = u.now - Date.now();
  state.receivedAt = Date.now();
  state.nextTaskId = u.next_task_id;
  state.series.push(...u.series);
  if (state.series.length > 600) state.series.splice(0, state.series.length - 600);
  for (const e of u.events) state.events.push(e);
  if (state.events.length > MAX_EVENTS) state.events.splice(0, state.events.length - MAX_EVENTS);
  // Updates are rendered once per frame, however many arrived meanwhile.
  if (pending) {
    pending.bars.push(...u.bars);
    pending.events = pending.events || u.events.length > 0;
    pending.u = u;
  } else {
    pending = { u, bars: [...u.bars], events: u.events.length > 0 };
    requestAnimationFrame(render);
  }
}

function resetFor(u) {
  const incarnation = u.cluster.master_incarnation;
  state.events = [];
  state.series = [];
  state.origin = u.now - WINDOW_MS;
  for (const r of state.drawn) r.remove();
  state.drawn = [];
  state.lanes = new Map();
  $('#events').textContent = '';
  if (state.incarnation !== null && state.incarnation !== incarnation) {
    toast(`Connected to a new master (incarnation ${incarnation})`);
  }
  state.incarnation = incarnation;
  state.table.stale = true;
  state.detail.lastLoad = 0;
}

function render() {
  const { u, bars, events } = pending;
  pending = null;
  renderHeader(u);
  renderWorkers(u.workers);
  renderStream(u, bars);
  renderCharts();
  renderResources(u.resources);
  if (events) renderEvents();
  state.table.stale = true;
  maybeRefreshTable();
  maybeRefreshDetail();
}

// ----- header ----------------------------------------------------------------

function fmtDuration(s) {
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.floor(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function fmtMs(ms) {
  if (ms == null) return '–';
  if (ms < 1000) return `${ms} ms`;
  return `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
}

const fmtNum = (n) => n.toLocaleString('en-US');

function renderHeader(u) {
  const c = u.cluster;
  $('#cluster-name').textContent = c.name;
  document.title = `${c.name} · Flotilla`;
  $('#cluster-runtime').textContent = `${c.runtime} runtime · master ${c.master_incarnation}`;
  $('#uptime').textContent = fmtDuration(c.uptime_s);
  $('#throughput').textContent = `${fmtNum(Math.round(u.throughput))}/s`;
  for (const [name, n] of u.counts) $(`#count-${name}`).textContent = fmtNum(n);
}

// ----- workers ---------------------------------------------------------------

function renderWorkers(workers) {
  state.workers = workers;
  const box = $('#workers');
  const seen = new Set();
  for (const w of workers) {
    seen.add(String(w.id));
    let card = box.querySelector(`.card[data-worker="${w.id}"]`);
    if (!card) {
      card = makeCard(w.id);
      box.append(card);
    }
    updateCard(card, w);
  }
  for (const card of box.querySelectorAll('.card')) {
    if (!seen.has(card.dataset.worker)) card.remove();
  }
  const select = $('#filter-worker');
  if (select.options.length - 1 !== workers.length) {
    const chosen = select.value;
    select.textContent = '';
    select.append(el('option', { value: '', text: 'any' }));
    for (const w of workers) select.append(el('option', { value: String(w.id), text: String(w.id) }));
    select.value = chosen;
  }
}

function makeCard(id) {
  const field = (name) => [el('dt', { text: name }), el('dd', { 'data-field': name })];
  const stop = el('button', { class: 'danger', text: 'Stop', title: 'Kill this worker; it is restarted under the same ID' });
  stop.dataset.action = 'stop';
  stop.addEventListener('click', () => stopWorker(id));
  return el('article', { class: 'card', 'data-worker': String(id), 'data-state': 'starting' },
    el('div', { class: 'head' },
      el('span', { class: 'name', text: `Worker ${id}` }),
      el('span', { class: 'badge' })),
    el('div', { class: 'slots' }),
    el('dl', {}, ...field('running'), ...field('queued'), ...field('free'), ...field('incarnation'),
      ...field('restarts'), ...field('heartbeat'), ...field('cpu'), ...field('executed'), ...field('where')),
    el('div', { class: 'actions' }, stop));
}

function updateCard(card, w) {
  card.dataset.state = w.state;
  const badge = card.querySelector('.badge');
  badge.className = `badge ${w.state}`;
  badge.textContent = w.state;
  const free = Math.max(0, w.capacity - w.running - w.queued);
  const set = (name, text) => { card.querySelector(`[data-field="${name}"]`).textContent = text; };
  set('running', `${w.running} of ${w.slots} slot${w.slots === 1 ? '' : 's'}`);
  set('queued', String(w.queued));
  set('free', `${free} of ${w.capacity}`);
  set('incarnation', String(w.incarnation));
  set('restarts', String(w.restarts));
  set('heartbeat', w.state === 'dead' ? '–' : `${(w.last_heartbeat_ms_ago / 1000).toFixed(1)} s ago`);
  set('cpu', w.cpu_quota == null ? 'no quota (process)' : `${w.cpu_quota} CPU`);
  set('executed', fmtNum(w.executed));
  set('where', w.locator || '–');
  const slots = card.querySelector('.slots');
  const key = `${w.capacity}/${w.running}/${w.queued}`;
  if (slots.dataset.key === key) return;
  slots.dataset.key = key;
  slots.textContent = '';
  if (w.capacity <= 64) {
    slots.className = 'slots';
    for (let i = 0; i < w.capacity; i++) {
      slots.append(el('i', { class: i < w.running ? 'r' : i < w.running + w.queued ? 'q' : '' }));
    }
  } else {
    slots.className = 'slotbar';
    const pct = (n) => `${(100 * n) / w.capacity}%`;
    const r = el('span', { class: 'r' }); r.style.width = pct(w.running);
    const q = el('span', { class: 'q' }); q.style.width = pct(w.queued);
    slots.append(r, q);
  }
  slots.title = `${w.running} running, ${w.queued} queued, ${free} free of ${w.capacity}`;
}

async function stopWorker(id) {
  if (!await confirmAction(`Stop worker ${id}? It is killed at once, its tasks go back to the queue, and it is restarted under the same ID.`)) return;
  try {
    const r = await api(`/stop/${id}`, { method: 'POST' });
    toast(r.message);
  } catch (err) {
    toast(`Stop worker ${id}: ${err.message}`, true);
  }
}

$('#add-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const capacity = Number($('#add-capacity').value);
  if (!Number.isInteger(capacity) || capacity < 1) { toast('Capacity must be a whole number of at least 1', true); return; }
  if (!await confirmAction(`Add a worker of capacity ${capacity}?`)) return;
  try {
    const r = await api('/add', { method: 'POST', body: JSON.stringify({ max_capacity: capacity }) });
    toast(r.message);
  } catch (err) {
    toast(`Add worker: ${err.message}`, true);
  }
});

// ----- task stream -------------------------------------------------------------

function laneLayout(workers) {
  const lanes = new Map();
  let i = 0;
  for (const w of workers) for (let s = 0; s < w.slots; s++) lanes.set(`${w.id}/${s}`, i++);
  return lanes;
}

function renderStream(u, bars) {
  const stream = $('#stream');
  const width = stream.clientWidth || 800;
  const plotW = Math.max(100, width - LABEL_W);
  const scale = plotW / WINDOW_MS;
  const lanes = laneLayout(u.workers);
  const relayout = lanes.size !== state.lanes.size || [...lanes].some(([k, v]) => state.lanes.get(k) !== v)
    || stream.dataset.width !== String(width);
  const height = lanes.size * LANE_H + 18;
  if (relayout) {
    state.lanes = lanes;
    stream.dataset.width = String(width);
    stream.setAttribute('height', height);
    stream.setAttribute('viewBox', `0 0 ${width} ${height}`);
    stream.textContent = '';
    const bg = svg('g');
    for (const [key, i] of lanes) {
      bg.append(svg('rect', { class: i % 2 ? 'lane odd' : 'lane', x: LABEL_W, y: i * LANE_H, width: plotW, height: LANE_H }));
      const label = svg('text', { class: 'label', x: 2, y: i * LANE_H + 11 });
      const [w, s] = key.split('/');
      label.textContent = `w${w} · slot ${s}`;
      bg.append(label);
    }
    const axis = svg('g', { id: 'stream-axis' });
    const clip = svg('clipPath', { id: 'stream-clip' });
    clip.append(svg('rect', { x: LABEL_W, y: 0, width: plotW, height }));
    const plot = svg('g', { 'clip-path': 'url(#stream-clip)' });
    const moving = svg('g', { id: 'stream-bars' });
    const running = svg('g', { id: 'stream-running' });
    moving.append(...state.drawn.map((r) => place(r, scale)).filter(Boolean));
    plot.append(moving, running);
    stream.append(clip, bg, axis, plot);
    for (let k = 0; k <= 4; k++) {
      const x = LABEL_W + (plotW * k) / 4;
      const t = svg('text', { class: 'axis', x: Math.min(x, width - 30), y: height - 4 });
      t.textContent = k === 4 ? 'now' : `-${(WINDOW_MS * (4 - k)) / 4000} s`;
      axis.append(t);
    }
  }
  const moving = $('#stream-bars');
  const now = u.now;
  for (const b of bars) {
    const r = svg('rect', { class: `bar o-${b.outcome}` });
    r.dataset.task = b.task;
    r.dataset.attempt = b.attempt;
    r.dataset.worker = b.worker;
    r.dataset.slot = b.slot;
    r.dataset.start = b.started_at;
    r.dataset.end = b.ended_at;
    r.dataset.outcome = b.outcome;
    if (place(r, scale)) { moving.append(r); state.drawn.push(r); }
  }
  // Bounded: drop what left the window, and the oldest beyond MAX_DRAWN.
  const cutoff = now - WINDOW_MS;
  let drop = 0;
  while (drop < state.drawn.length && (Number(state.drawn[drop].dataset.end) < cutoff || state.drawn.length - drop > MAX_DRAWN)) drop++;
  for (const r of state.drawn.splice(0, drop)) r.remove();
  moving.setAttribute('transform', `translate(${LABEL_W - (now - WINDOW_MS - state.origin) * scale} 0)`);
  const running = $('#stream-running');
  running.textContent = '';
  for (const a of u.running) {
    const lane = state.lanes.get(`${a.worker}/${a.slot}`);
    if (lane === undefined) continue;
    const x = LABEL_W + Math.max(0, (a.started_at - (now - WINDOW_MS)) * scale);
    const r = svg('rect', { class: 'bar o-running', x, y: lane * LANE_H + 2, height: LANE_H - 4,
      width: Math.max(2, LABEL_W + plotW - x) });
    Object.assign(r.dataset, { task: a.task, attempt: a.attempt, worker: a.worker, slot: a.slot, start: a.started_at, outcome: 'running' });
    running.append(r);
  }
}

function place(r, scale) {
  const lane = state.lanes.get(`${r.dataset.worker}/${r.dataset.slot}`);
  if (lane === undefined) return null;
  const start = Number(r.dataset.start);
  const end = Number(r.dataset.end);
  r.setAttribute('x', (start - state.origin) * scale);
  r.setAttribute('width', Math.max(1.5, (end - start) * scale));
  r.setAttribute('y', lane * LANE_H + 2);
  r.setAttribute('height', LANE_H - 4);
  return r;
}

$('#stream').addEventListener('mousemove', (e) => {
  const tip = $('#tooltip');
  const r = e.target.closest('rect.bar');
  if (!r) { tip.hidden = true; return; }
  const d = r.dataset;
  const end = d.end ? Number(d.end) : masterNow();
  tip.textContent = `task ${d.task} · attempt ${d.attempt} · ${fmtMs(end - Number(d.start))} · ${d.outcome} · worker ${d.worker} slot ${d.slot}`;
  const box = $('.stream-wrap').getBoundingClientRect();
  tip.style.left = `${Math.min(e.clientX - box.left + 12, box.width - 320)}px`;
  tip.style.top = `${e.clientY - box.top + 12}px`;
  tip.hidden = false;
});
$('#stream').addEventListener('mouseleave', () => { $('#tooltip').hidden = true; });
$('#stream').addEventListener('click', (e) => {
  const r = e.target.closest('rect.bar');
  if (r) showDetail(Number(r.dataset.task));
});

// ----- charts ----------------------------------------------------------------------

function renderCharts() {
  lineChart($('#chart-throughput'), state.series.map((s) => [s.t, s.throughput]), 't');
  lineChart($('#chart-queue'), state.series.map((s) => [s.t, s.queued]), 'q');
}

function lineChart(box, points, cls) {
  const width = box.clientWidth || 400;
  const height = 140;
  box.setAttribute('viewBox', `0 0 ${width} ${height}`);
  box.textContent = '';
  const left = 44, bottom = 16, top = 8;
  const max = Math.max(1, ...points.map((p) => p[1]));
  const t1 = points.length ? points[points.length - 1][0] : 0;
  const span = 600_000; // ten minutes
  const x = (t) => left + ((t - (t1 - span)) / span) * (width - left - 4);
  const y = (v) => top + (1 - v / max) * (height - top - bottom);
  for (const f of [0, 0.5, 1]) {
    box.append(svg('line', { class: 'grid', x1: left, x2: width - 4, y1: y(max * f), y2: y(max * f) }));
    const label = svg('text', { x: 2, y: y(max * f) + 3 });
    const v = max * f;
    label.textContent = v >= 10 || Number.isInteger(v) ? fmtNum(Math.round(v)) : v.toFixed(1);
    box.append(label);
  }
  const axis = svg('text', { x: left, y: height - 3 });
  axis.textContent = '-10 min';
  const now = svg('text', { x: width - 28, y: height - 3 });
  now.textContent = 'now';
  box.append(axis, now);
  if (points.length > 1) {
    box.append(svg('polyline', { class: `line ${cls}`, points: points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(' ') }));
  }
}

// ----- resources and events ------------------------------------------------------

function owner(h) { return `${h.mode} · w${h.worker} task ${h.task}`; }

function renderResources(resources) {
  const body = $('#resources tbody');
  body.textContent = '';
  if (!resources.length) {
    body.append(el('tr', {}, el('td', { colSpan: 6, class: 'muted', text: 'No shared resources.' })));
    return;
  }
  for (const r of resources) {
    const more = r.waiting_total > r.waiting.length ? ` (+${r.waiting_total - r.waiting.length})` : '';
    body.append(el('tr', { 'data-resource': r.name },
      el('td', { class: 'mono', text: r.name }),
      el('td', { text: r.type }),
      el('td', { class: 'value mono', text: r.value, title: r.value }),
      el('td', { text: String(r.version) }),
      el('td', { text: r.holders.map(owner).join(', ') || '–' }),
      el('td', { text: (r.waiting.map(owner).join(', ') || '–') + more })));
  }
}

function fmtTime(ms) {
  return new Date(ms).toLocaleTimeString('en-GB', { hour12: false });
}

function renderEvents() {
  const list = $('#events');
  list.textContent = '';
  for (let i = state.events.length - 1; i >= 0; i--) {
    const e = state.events[i];
    list.append(el('li', { 'data-kind': e.kind },
      el('span', { class: 'muted', text: fmtTime(e.at) }),
      el('span', { class: 'kind', text: e.kind.replace('_', ' ') }),
      el('span', { text: e.text })));
  }
}

// ----- tasks table ------------------------------------------------------------------

function tableQuery(after, limit) {
  const q = new URLSearchParams({ after: String(after), limit: String(limit) });
  const stateFilter = $('#filter-state').value;
  const worker = $('#filter-worker').value;
  if (stateFilter) q.set('state', stateFilter);
  if (worker) q.set('node', worker);
  return `/ui/tasks?${q}`;
}

async function loadTable() {
  const t = state.table;
  if (t.loading) return;
  t.loading = true;
  t.stale = false;
  t.lastLoad = Date.now();
  try {
    if (t.from === null) t.from = Math.max(0, state.nextTaskId - 1 - ID_WINDOW);
    const rows = [];
    let after = t.from;
    // Follow `next` to the newest task; each page is bounded by the master.
    for (let pages = 0; pages < 200; pages++) {
      const page = await api(tableQuery(after, 1000));
      rows.push(...page.tasks);
      if (page.next == null) break;
      after = page.next;
    }
    t.rows = rows.reverse(); // newest first
    const note = `${fmtNum(rows.length)} task${rows.length === 1 ? '' : 's'} with IDs above ${fmtNum(t.from)}, newest first`;
    $('#table-note').textContent = note;
    $('#load-earlier').hidden = t.from <= 0;
    drawTable();
  } catch (err) {
    if (err.status === 401) { showLogin('Please sign in again.'); return; }
    $('#table-note').textContent = `cannot load the tasks: ${err.message}`;
  } finally {
    t.loading = false;
  }
}

function maybeRefreshTable() {
  const t = state.table;
  if (t.stale && !t.loading && Date.now() - t.lastLoad > 1000) loadTable();
}

function drawTable() {
  const viewport = $('#table-viewport');
  const spacer = $('#table-spacer');
  const rows = state.table.rows;
  spacer.style.height = `${rows.length * ROW_H}px`;
  const first = Math.max(0, Math.floor(viewport.scrollTop / ROW_H) - 5);
  const last = Math.min(rows.length, first + Math.ceil(viewport.clientHeight / ROW_H) + 10);
  spacer.textContent = '';
  for (let i = first; i < last; i++) {
    const r = rows[i];
    const row = el('div', { class: r.id === state.table.selected ? 'row selected' : 'row', 'data-task': String(r.id) },
      el('span', { class: 'mono', text: String(r.id) }),
      el('span', { class: `state ${r.state}`, text: r.state }),
      el('span', { text: r.node == null ? '–' : String(r.node) }),
      el('span', { text: String(r.attempts) }),
      el('span', { text: r.started_at && r.finished_at ? fmtMs(r.finished_at - r.started_at) : '–' }),
      el('span', { class: 'mono', text: r.summary || '' }));
    row.style.top = `${i * ROW_H}px`;
    spacer.append(row);
  }
}

$('#table-viewport').addEventListener('scroll', () => requestAnimationFrame(drawTable));
$('#table-spacer').addEventListener('click', (e) => {
  const row = e.target.closest('.row');
  if (row) showDetail(Number(row.dataset.task));
});
for (const id of ['#filter-state', '#filter-worker']) {
  $(id).addEventListener('change', () => { state.table.lastLoad = 0; loadTable(); });
}
$('#load-earlier').addEventListener('click', () => {
  state.table.from = Math.max(0, state.table.from - ID_WINDOW);
  loadTable();
});

// ----- task detail ------------------------------------------------------------------

async function showDetail(id) {
  state.detail.id = id;
  state.table.selected = id;
  drawTable();
  await loadDetail();
}

function maybeRefreshDetail() {
  const d = state.detail;
  if (d.id !== null && !d.final && Date.now() - d.lastLoad > 1000) loadDetail();
}

function pre(text) { return el('pre', { text }); }

function fmtValue(v) {
  return typeof v === 'string' ? v : JSON.stringify(v, null, 2);
}

async function loadDetail() {
  const d = state.detail;
  const id = d.id;
  d.lastLoad = Date.now();
  const box = $('#detail');
  let t;
  try {
    t = await api(`/ui/tasks/${id}`);
  } catch (err) {
    if (id !== d.id) return;
    box.hidden = false;
    box.dataset.task = String(id);
    box.textContent = '';
    box.append(el('h3', { text: `Task ${id}` }), el('p', { class: 'error', text: err.message }));
    d.final = true;
    return;
  }
  if (id !== d.id) return;
  d.final = ['succeeded', 'failed', 'cancelled'].includes(t.state);
  box.hidden = false;
  box.dataset.task = String(t.id);
  box.dataset.state = t.state;
  box.textContent = '';
  const title = el('h3', {}, el('span', { text: `Task ${t.id}` }), el('span', { class: `state ${t.state}`, text: t.state }));
  if (!d.final) {
    const cancel = el('button', { class: 'danger', text: 'Cancel task' });
    cancel.dataset.action = 'cancel';
    cancel.addEventListener('click', () => cancelTask(t.id));
    title.append(cancel);
  }
  const close = el('button', { class: 'quiet', text: 'Close' });
  close.addEventListener('click', () => { box.hidden = true; d.id = null; state.table.selected = null; drawTable(); });
  title.append(close);
  box.append(title);
  box.append(el('h4', { text: `${t.type} code` }), pre(t.code));
  if (t.result) {
    box.append(el('h4', { text: 'result' }), el('pre', { class: 'result', text: fmtValue(t.result.response) }));
    if (t.result.stdout) box.append(el('h4', { text: 'stdout' }), pre(t.result.stdout));
    if (t.result.stderr) box.append(el('h4', { text: 'stderr' }), pre(t.result.stderr));
    if (t.result.exit_code != null) box.append(el('h4', { text: 'exit code' }), pre(String(t.result.exit_code)));
  }
  if (t.error) box.append(el('h4', { text: 'error' }), el('pre', { class: 'error', text: t.error }));
  const timing = (a, b) => (a && b ? fmtMs(b - a) : '–');
  box.append(el('h4', { text: 'timings' }), el('table', {},
    el('tr', {}, el('th', { text: 'submitted' }), el('td', { text: fmtTime(t.submitted_at) })),
    el('tr', {}, el('th', { text: 'queued for' }), el('td', { text: timing(t.submitted_at, t.started_at) })),
    el('tr', {}, el('th', { text: 'ran for' }), el('td', { text: timing(t.started_at, t.finished_at) })),
    el('tr', {}, el('th', { text: 'timeout' }), el('td', { text: t.timeout ? `${t.timeout} s` : 'none' }))));
  const attempts = el('table', { class: 'attempts' },
    el('tr', {}, ...['attempt', 'worker', 'incarnation', 'slot', 'started', 'ran', 'outcome'].map((h) => el('th', { text: h }))));
  for (const a of t.attempt_log) {
    attempts.append(el('tr', { 'data-attempt': String(a.attempt) },
      el('td', { text: String(a.attempt) }), el('td', { text: String(a.worker) }),
      el('td', { text: String(a.incarnation) }), el('td', { text: String(a.slot) }),
      el('td', { text: fmtTime(a.started_at) }),
      el('td', { text: a.ended_at ? fmtMs(a.ended_at - a.started_at) : (a.outcome ? '–' : 'running') }),
      el('td', { text: a.outcome || 'running' })));
  }
  box.append(el('h4', { text: `attempts (${t.attempts})` }),
    t.attempt_log.length ? attempts : el('p', { class: 'muted', text: 'No attempt on this master.' }));
  const trace = el('p', {}, el('span', { text: 'trace ID: ' }),
    el('code', { text: t.trace_id || 'none (trace export is off)' }));
  if (t.jaeger) {
    trace.append(' ', el('a', { href: t.jaeger, target: '_blank', rel: 'noopener noreferrer', text: 'open in Jaeger' }));
  }
  box.append(el('h4', { text: 'trace' }), trace);
}

async function cancelTask(id) {
  if (!await confirmAction(`Cancel task ${id}? A running task is stopped on its worker.`)) return;
  try {
    const r = await api(`/tasks/${id}`, { method: 'DELETE' });
    toast(`Task ${r.id} cancelled (it was ${r.was})`);
    state.detail.lastLoad = 0;
    loadDetail();
  } catch (err) {
    toast(`Cancel task ${id}: ${err.message}`, true);
  }
}

window.addEventListener('resize', () => { $('#stream').dataset.width = ''; });

boot();
