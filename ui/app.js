// taskwarden console. Reads the page from location.pathname and draws it from the JSON API
// under /v1. The token lives in this tab's sessionStorage and goes out as a Bearer header,
// never in a URL. Live parts read server-sent events with fetch (EventSource cannot send
// the header): /v1/status/stream for the overview and the agents, a task's event stream on
// its page. Every value from the API is put in the page as text, never as HTML.
'use strict';

const TOKEN_KEY = 'taskwarden-token';
const main = document.getElementById('main');
const live = document.getElementById('live');
const logout = document.getElementById('logout');

function token() { return sessionStorage.getItem(TOKEN_KEY) || ''; }
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (token()) h.Authorization = 'Bearer ' + token();
  return h;
}

class Unauthorized extends Error {}

async function api(path, opts) {
  const o = Object.assign({}, opts || {});
  o.headers = headers(Object.assign(o.body ? { 'Content-Type': 'application/json' } : {}, o.headers || {}));
  const r = await fetch(path, o);
  if (r.status === 401) { showLogin('The daemon wants its API token.'); throw new Unauthorized(); }
  const text = await r.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = { error: text }; }
  if (!r.ok) { throw new Error((body && body.error) || ('HTTP ' + r.status)); }
  return body;
}

// h('tag', {attr: value, onclick: fn}, child...) with text children as text nodes.
function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function show(...nodes) { main.replaceChildren(...nodes); }
function secs(v) { return v === null || v === undefined ? '–' : Number(v).toFixed(1) + ' s'; }
function mib(v) { return (Number(v || 0) / 1048576).toFixed(1) + ' MiB'; }
function when(v) { return v ? new Date(v).toLocaleString() : '–'; }
function taskLink(id) { return id === null || id === undefined ? '–' : h('a', { href: '/ui/tasks/' + id }, '#' + id); }
function statusCell(s) { return h('span', { class: 'status-' + s, 'data-status-of': true }, s); }
function table(head, rows, opts) {
  const o = opts || {};
  return h('div', { class: 'scroll' }, h('table', { id: o.id },
    h('thead', {}, h('tr', {}, head.map((c) => h('th', { scope: 'col' }, c)))),
    h('tbody', {}, rows.length ? rows.map((r) => h('tr', {}, r.map((c) => h('td', {}, c))))
      : h('tr', {}, h('td', { colspan: head.length }, o.empty || 'none')))));
}
function note(text, cls) { live.textContent = text; live.className = cls || ''; }

function showLogin(message) {
  stopStreams();
  const input = h('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'current-password', required: true });
  const err = h('p', { class: 'error', role: 'alert' }, message || '');
  const form = h('form', { class: 'login', 'aria-label': 'Log in' },
    h('label', { for: 'token' }, 'API token (http.api_token)'), input,
    h('button', { type: 'submit' }, 'Log in'), err);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value);
    try { await api('/v1/status'); route(); } catch (e) { if (!(e instanceof Unauthorized)) err.textContent = e.message; }
  });
  show(h('h1', {}, 'Log in'), form);
  logout.hidden = true;
  input.focus();
}

// Server-sent events over fetch, until the stream ends or `signal` aborts.
async function follow(path, onEvent, signal) {
  const r = await fetch(path, { headers: headers({ Accept: 'text/event-stream' }), signal });
  if (r.status === 401) { showLogin('The daemon wants its API token.'); throw new Unauthorized(); }
  if (!r.ok || !r.body) throw new Error('HTTP ' + r.status);
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const chunk = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const ev = { event: 'message', data: '', id: null };
      for (const line of chunk.split('\n')) {
        if (line.startsWith('data:')) ev.data += (ev.data ? '\n' : '') + line.slice(5).replace(/^ /, '');
        else if (line.startsWith('event:')) ev.event = line.slice(6).trim();
        else if (line.startsWith('id:')) ev.id = line.slice(3).trim();
      }
      if (ev.data) onEvent(ev);
    }
  }
}

let streams = [];
function stopStreams() { streams.forEach((c) => c.abort()); streams = []; }

// Follows /v1/status/stream, reconnecting after a pause when it drops.
function followStatus(draw) {
  const ctl = new AbortController();
  streams.push(ctl);
  (async () => {
    while (!ctl.signal.aborted) {
      try {
        note('live');
        await follow('/v1/status/stream', (ev) => {
          if (ev.event === 'status') { draw(JSON.parse(ev.data)); note('live · updated ' + new Date().toLocaleTimeString()); }
        }, ctl.signal);
      } catch (e) {
        if (e instanceof Unauthorized || ctl.signal.aborted) return;
        note('reconnecting: ' + e.message, 'bad');
      }
      await new Promise((r) => setTimeout(r, 2000));
    }
  })();
}

// ---- Overview -------------------------------------------------------------------------
function overview() {
  const parts = {
    pool: h('section', { id: 'pool', 'aria-labelledby': 'h-pool' }),
    alerts: h('section', { id: 'alerts', 'aria-labelledby': 'h-alerts' }),
    tasks: h('section', { id: 'tasks', 'aria-labelledby': 'h-tasks' }),
    sessions: h('section', { id: 'sessions', 'aria-labelledby': 'h-sessions' }),
    watch: h('section', { id: 'watch', 'aria-labelledby': 'h-watch' }),
    running: h('section', { id: 'running', 'aria-labelledby': 'h-running' }),
    instances: h('section', { id: 'instances', 'aria-labelledby': 'h-instances' }),
  };
  show(h('h1', {}, 'Overview'), h('div', { class: 'grid' }, parts.pool, parts.alerts), parts.tasks,
    parts.sessions, parts.watch, parts.running, parts.instances);
  followStatus((s) => drawOverview(s, parts));
}

function drawOverview(s, parts) {
  const p = s.pool;
  const pct = Math.round(p.utilization * 100);
  const hot = p.utilization >= p.alert_ratio;
  parts.pool.replaceChildren(h('h2', { id: 'h-pool' }, 'Database pool'),
    h('div', { class: 'gauge' + (hot ? ' hot' : ''), role: 'meter', 'aria-valuemin': 0, 'aria-valuemax': p.max, 'aria-valuenow': p.in_use, 'aria-label': 'pool in use' },
      h('div', { class: 'fill', style: null, 'data-width': pct }),
      h('div', { class: 'line', title: 'alert at ' + Math.round(p.alert_ratio * 100) + '%', 'data-left': Math.round(p.alert_ratio * 100) })),
    h('p', { id: 'pool-figures' }, `in use ${p.in_use} of ${p.max} (${pct}%, alert at ${Math.round(p.alert_ratio * 100)}%) · idle ${p.idle} · waiting ${p.waiting}` + (p.lent ? ` · lent ${p.lent}` : '')));
  // Widths are set through the CSSOM (the policy allows no inline style attributes).
  parts.pool.querySelector('.fill').style.width = Math.min(pct, 100) + '%';
  parts.pool.querySelector('.line').style.left = Math.round(p.alert_ratio * 100) + '%';

  parts.alerts.replaceChildren(h('h2', { id: 'h-alerts' }, 'Alerts firing'),
    s.alerts_firing.length ? h('ul', {}, s.alerts_firing.map((a) => h('li', { class: a.severity === 'critical' ? 'bad' : 'warn' },
      `${a.alert}${a.subject ? '[' + a.subject + ']' : ''} (${a.severity}) since ${when(a.since)}: ${a.summary}`))) : h('p', { class: 'ok' }, 'none'),
    s.ready ? h('p', { class: 'ok' }, 'ready') : h('p', { class: 'bad' }, 'not ready: ' + (s.not_ready_reason || '')));

  const by = (s.tasks && s.tasks.by_status) || {};
  parts.tasks.replaceChildren(h('h2', { id: 'h-tasks' }, 'Tasks'),
    h('ul', { class: 'counts', id: 'task-counts' }, ['queued', 'running', 'succeeded', 'failed', 'cancelled', 'timed_out'].map((k) =>
      h('li', {}, h('a', { href: '/ui/tasks?status=' + k }, k), ' ', h('strong', { 'data-count': k }, by[k] === undefined ? '–' : by[k])))),
    s.database_view_as_of ? h('p', { class: 'muted' }, 'as of ' + when(s.database_view_as_of)) : null);

  const max = s.sessions.max_age_seconds;
  parts.sessions.replaceChildren(h('h2', { id: 'h-sessions' }, `Open DB sessions (${s.sessions.open}), oldest first`),
    table(['caller', 'label', 'age / max', 'backend pid', 'task'], s.sessions.live.map((x) => [
      x.caller, x.label, h('span', { class: 'age ' + (x.age_seconds >= s.sessions.warn_age_seconds ? 'warn' : '') }, `${secs(x.age_seconds)} / ${secs(max)}`),
      String(x.backend_pid), taskLink(x.task_id)]), { id: 'sessions-table', empty: 'no session open' }));

  // The applications beside taskwarden: the server's connections and each [watch.NAME]
  // rule's sessions, oldest first, with who opened them (application_name).
  const w = s.watch;
  if (!w) {
    parts.watch.replaceChildren(h('h2', { id: 'h-watch' }, 'Applications\' DB sessions'), h('p', { class: 'muted' }, 'not read yet'));
  } else {
    const srv = w.server;
    const rules = Object.entries(w.rules || {});
    // replaceChildren takes nodes only: the optional ones are filtered out.
    parts.watch.replaceChildren(...[h('h2', { id: 'h-watch' }, 'Applications\' DB sessions'),
      h('p', { id: 'server-connections', class: srv.utilization >= p.alert_ratio ? 'warn' : '' },
        `server: ${srv.in_use} of ${srv.max} client connections in use (${Math.round(srv.utilization * 100)}%)`),
      rules.length ? null : h('p', { class: 'muted' }, 'no [watch.NAME] rule configured'),
      ...rules.map(([name, r]) => h('div', { class: 'watch-rule', 'data-watch': name },
        h('h3', {}, `${name}: ${r.sessions_total}${r.max_sessions ? ' of ' + r.max_sessions : ''} sessions (${r.application_name}, ${r.action})`),
        table(['application (caller)', 'state', 'in state', 'age', 'role@db', 'pid', 'past limit'], r.sessions.map((x) => [
          x.application_name, x.state || 'unknown', x.state_seconds === null ? '' : secs(x.state_seconds),
          h('span', { class: 'age ' + (x.over_limit.length ? 'warn' : '') }, secs(x.age_seconds)),
          `${x.user}@${x.database}`, String(x.pid), x.over_limit.join(', ')]), { empty: 'no session' })))].filter(Boolean));
  }

  parts.running.replaceChildren(h('h2', { id: 'h-running' }, 'Running here, with their agents\' processes and sessions'),
    table(['task', 'agent', 'running', 'processes', 'memory', 'CPU', 'agent DB sessions'], s.tasks.running_here.map((t) => [
      taskLink(t.task_id), t.agent, secs(t.running_seconds), String(t.usage.processes), mib(t.usage.resident_memory_bytes),
      secs(t.usage.cpu_seconds), `${t.usage.db_sessions}` + (t.usage.oldest_db_session_seconds !== null && t.usage.oldest_db_session_seconds !== undefined
        ? ` (oldest ${secs(t.usage.oldest_db_session_seconds)}, ${t.usage.db_sessions_idle_in_transaction} idle in tx)` : '')]),
    { empty: 'nothing running here' }));

  const sup = s.supervisor;
  parts.instances.replaceChildren(h('h2', { id: 'h-instances' }, 'Instances'),
    table(['instance', 'version', 'heartbeat', 'role'], (s.instances || []).map((i) => [
      i.id || i.instance_id || '', i.version || '', when(i.heartbeat_at || i.last_heartbeat), i.leader ? 'leader' : '']), { empty: 'unknown' }),
    h('p', {}, `supervisor: ${sup.ticks} ticks, last ${secs(sup.seconds_since_last_tick)} ago (every ${secs(sup.interval_seconds)})`));
}

// ---- Tasks ----------------------------------------------------------------------------
async function tasks() {
  const q = new URLSearchParams(location.search);
  const field = (name, label, input) => h('label', {}, label, input);
  const status = h('select', { name: 'status' }, ['', 'queued', 'running', 'succeeded', 'failed', 'cancelled', 'timed_out']
    .map((s) => h('option', { value: s, selected: q.get('status') === s }, s || 'any')));
  const form = h('form', { class: 'filters', method: 'get', action: '/ui/tasks', 'aria-label': 'Filter tasks' },
    field('status', 'status', status),
    field('agent', 'agent', h('input', { name: 'agent', value: q.get('agent') || '', size: 12 })),
    field('slot', 'run slot', h('input', { name: 'slot', value: q.get('slot') || '', size: 12 })),
    field('objective', 'objective', h('input', { name: 'objective', value: q.get('objective') || '', size: 6, inputmode: 'numeric' })),
    h('button', { type: 'submit' }, 'Filter'));
  const params = new URLSearchParams();
  for (const k of ['status', 'agent', 'slot', 'objective', 'after']) if (q.get(k)) params.set(k, q.get(k));
  params.set('limit', '100');
  const msg = h('p', { role: 'status' });
  show(h('h1', {}, 'Tasks'), form, msg);
  let page;
  try { page = await api('/v1/tasks?' + params); } catch (e) { if (!(e instanceof Unauthorized)) msg.textContent = e.message; return; }
  const rows = page.tasks.map((t) => [taskLink(t.id), statusCell(t.status), t.agent, `${t.attempts}/${t.max_attempts}`,
    String(t.priority), when(t.created_at), t.objective_id ? h('a', { href: '/ui/objectives/' + t.objective_id }, '#' + t.objective_id) : '', t.error || '']);
  const next = page.next_after ? (() => { const n = new URLSearchParams(q); n.set('after', page.next_after); return h('a', { href: '/ui/tasks?' + n }, 'Next page'); })() : null;
  const bulk = h('div', { class: 'actions' },
    h('button', { type: 'button', onclick: () => bulkRetry(q, msg) }, 'Retry all matching'),
    h('button', { type: 'button', class: 'danger', onclick: () => bulkCancel(page.tasks, msg) }, 'Cancel the listed'));
  main.append(bulk, table(['task', 'status', 'agent', 'attempts', 'priority', 'created', 'objective', 'error'], rows, { id: 'tasks-table', empty: 'no task matches' }),
    page.truncated ? h('p', {}, 'page cut at http.max_response_bytes') : null, next);
}

async function bulkRetry(q, msg) {
  const status = q.get('status');
  const agent = q.get('agent');
  if (status && !['failed', 'cancelled', 'timed_out'].includes(status)) { msg.textContent = 'Only failed, cancelled or timed-out tasks can be retried.'; return; }
  if (!confirm(`Retry up to 1000 ${status || 'failed, cancelled and timed-out'} tasks${agent ? ' of agent ' + agent : ''}?`)) return;
  try {
    const r = await api('/v1/tasks/retry', { method: 'POST', body: JSON.stringify({ status: status || null, agent: agent || null, limit: 1000 }) });
    msg.textContent = `${r.count} task(s) queued again.`;
  } catch (e) { if (!(e instanceof Unauthorized)) msg.textContent = e.message; }
}

async function bulkCancel(list, msg) {
  const open = list.filter((t) => t.status === 'queued' || t.status === 'running');
  if (!open.length) { msg.textContent = 'No queued or running task on this page.'; return; }
  if (!confirm(`Cancel ${open.length} queued or running task(s) listed here?`)) return;
  let done = 0;
  for (const t of open) {
    try { await api(`/v1/tasks/${t.id}/cancel`, { method: 'POST', body: JSON.stringify({ reason: 'cancelled from the console' }) }); done += 1; } catch (e) { if (e instanceof Unauthorized) return; }
  }
  msg.textContent = `${done} of ${open.length} cancelled.`;
}

// ---- One task -------------------------------------------------------------------------
async function taskPage(id) {
  const facts = h('dl', { class: 'facts', id: 'task-facts' });
  const msg = h('p', { role: 'status', id: 'task-message' });
  const cancel = h('button', { type: 'button', class: 'danger', disabled: true }, 'Cancel');
  const retry = h('button', { type: 'button', disabled: true }, 'Retry');
  const events = h('tbody', {});
  const payload = h('pre', { id: 'payload' });
  const result = h('pre', { id: 'result' });
  show(h('h1', {}, 'Task #' + id), h('div', { class: 'actions' }, cancel, retry), msg, facts,
    h('h2', {}, 'Payload'), payload, h('h2', {}, 'Result'), result,
    h('h2', {}, 'Events (live)'), h('div', { class: 'scroll' }, h('table', { id: 'events-table' },
      h('thead', {}, h('tr', {}, ['id', 'at', 'kind', 'data'].map((c) => h('th', { scope: 'col' }, c)))), events)));
  const draw = (t) => {
    const fact = (k, v) => [h('dt', {}, k), h('dd', {}, v)];
    facts.replaceChildren(...fact('status', h('span', { class: 'status-' + t.status, id: 'task-status' }, t.status)),
      ...fact('agent', t.agent), ...fact('attempts', `${t.attempts} of ${t.max_attempts}`), ...fact('priority', String(t.priority)),
      ...fact('created', when(t.created_at)), ...fact('started', when(t.started_at)), ...fact('finished', when(t.finished_at)),
      ...fact('error', t.error || '–'), ...fact('usage', `${t.prompt_tokens} prompt + ${t.completion_tokens} completion tokens, $${Number(t.cost_usd).toFixed(4)}`),
      ...fact('run slot', t.session_id || '–'), ...fact('objective', t.objective_id ? h('a', { href: '/ui/objectives/' + t.objective_id }, '#' + t.objective_id) : '–'),
      ...fact('unique key', t.unique_key || '–'));
    payload.textContent = JSON.stringify(t.payload, null, 2);
    result.textContent = t.result === null ? '–' : JSON.stringify(t.result, null, 2);
    cancel.disabled = !(t.status === 'queued' || t.status === 'running');
    retry.disabled = !['failed', 'cancelled', 'timed_out'].includes(t.status);
  };
  const refresh = async () => { try { draw(await api('/v1/tasks/' + id)); } catch (e) { if (!(e instanceof Unauthorized)) msg.textContent = e.message; } };
  const act = (what) => async () => {
    if (what === 'cancel' && !confirm('Cancel task #' + id + '?')) return;
    try {
      const t = await api(`/v1/tasks/${id}/${what}`, { method: 'POST', body: '{}' });
      draw(t);
      msg.textContent = what === 'cancel' ? 'Cancelled.' : 'Queued again.';
      if (what === 'retry') followEvents();
    } catch (e) { if (!(e instanceof Unauthorized)) msg.textContent = e.message; }
  };
  cancel.addEventListener('click', act('cancel'));
  retry.addEventListener('click', act('retry'));
  let last = 0;
  const followEvents = () => {
    const ctl = new AbortController();
    streams.push(ctl);
    follow(`/v1/tasks/${id}/events?after=${last}`, (ev) => {
      const e = JSON.parse(ev.data);
      last = Number(ev.id) || last;
      events.append(h('tr', {}, h('td', {}, ev.id), h('td', {}, when(e.at)), h('td', {}, e.kind), h('td', {}, h('code', {}, JSON.stringify(e.data)))));
    }, ctl.signal).then(refresh, (e) => { if (!(e instanceof Unauthorized) && !ctl.signal.aborted) msg.textContent = 'events: ' + e.message; });
  };
  await refresh();
  followEvents();
}

// ---- One objective --------------------------------------------------------------------
async function objectivePage(id) {
  let o;
  try { o = await api('/v1/objectives/' + id); } catch (e) { if (!(e instanceof Unauthorized)) show(h('h1', {}, 'Objective #' + id), h('p', { class: 'error' }, e.message)); return; }
  // Steps by depth: a step is one column right of the deepest step it depends on.
  const byKey = new Map(o.tasks.map((t) => [t.step_key, t]));
  const depth = new Map();
  const depthOf = (t, seen) => {
    if (depth.has(t.step_key)) return depth.get(t.step_key);
    if (seen.has(t.step_key)) return 0;
    seen.add(t.step_key);
    const d = Math.max(-1, ...t.depends_on.map((k) => (byKey.get(k) ? depthOf(byKey.get(k), seen) : -1))) + 1;
    depth.set(t.step_key, d);
    return d;
  };
  o.tasks.forEach((t) => depthOf(t, new Set()));
  const columns = [];
  for (const t of o.tasks) (columns[depth.get(t.step_key)] = columns[depth.get(t.step_key)] || []).push(t);
  show(h('h1', {}, `Objective #${o.id}: ${o.title}`),
    h('p', {}, 'status ', h('span', { class: 'status-' + o.status }, o.status), ' · created ' + when(o.created_at)),
    h('div', { class: 'steps', role: 'list', 'aria-label': 'Steps by dependency depth' }, columns.map((col, i) => h('ol', { 'aria-label': 'depth ' + i },
      col.map((t) => h('li', {}, h('strong', {}, t.step_key), ' ', taskLink(t.id), h('br'), statusCell(t.status), ' · ', t.agent,
        t.depends_on.length ? h('div', { class: 'muted' }, 'after ' + t.depends_on.join(', ')) : null))))));
}

// ---- Agents ---------------------------------------------------------------------------
function agents() {
  const list = h('section', { id: 'agents' });
  const sched = h('section', { id: 'schedules' });
  const msg = h('p', { role: 'status' });
  show(h('h1', {}, 'Agents'), msg, list, sched);
  const act = (name, what) => async () => {
    if (what === 'pause' && !confirm(`Pause agent ${name} on every instance?`)) return;
    try { await api(`/v1/agents/${encodeURIComponent(name)}/${what}`, { method: 'POST', body: '{}' }); msg.textContent = `${name}: ${what}d.`; } catch (e) { if (!(e instanceof Unauthorized)) msg.textContent = e.message; }
  };
  followStatus((s) => {
    const queues = s.queues || {};
    list.replaceChildren(h('h2', {}, 'Agents of this instance'), table(
      ['agent', 'queued', 'oldest due', 'running here', 'concurrency', 'rate', 'limits', 'queue', ''],
      Object.entries(s.agents).map(([name, a]) => {
        const q = queues[name] || { queued: 0, oldest_queued_seconds: 0, paused: false };
        const limits = [a.memory_max_bytes ? 'memory ' + mib(a.memory_max_bytes) : null, a.processes_max ? a.processes_max + ' processes' : null,
          a.cpu_time_max_seconds ? 'CPU ' + secs(a.cpu_time_max_seconds) : null, a.db_sessions_max ? a.db_sessions_max + ' DB sessions' : null,
          'timeout ' + secs(a.timeout_seconds)].filter(Boolean).join(', ');
        return [h('a', { href: '/ui/tasks?agent=' + encodeURIComponent(name) }, name), String(q.queued), secs(q.oldest_queued_seconds),
          String(a.running_here), String(a.concurrency), a.rate || '–', limits, q.paused ? h('span', { class: 'warn' }, 'paused') : 'running',
          q.paused ? h('button', { type: 'button', onclick: act(name, 'resume') }, 'Resume') : h('button', { type: 'button', onclick: act(name, 'pause') }, 'Pause')];
      }), { id: 'agents-table' }));
    sched.replaceChildren(h('h2', {}, 'Schedules'), table(['schedule', 'cron (UTC)', 'agent', 'last due', 'next due', 'last task'],
      Object.entries(s.schedules).map(([n, x]) => [n, x.cron, x.agent, when(x.last_due), when(x.next_due), taskLink(x.last_task_id)]), { empty: 'no schedule' }));
  });
}

// ---- Routing --------------------------------------------------------------------------
function route() {
  stopStreams();
  logout.hidden = !token();
  const path = location.pathname.replace(/\/+$/, '');
  let m;
  if (path === '/ui') return overview();
  if (path === '/ui/tasks') return tasks();
  if ((m = path.match(/^\/ui\/tasks\/(\d+)$/))) return taskPage(m[1]);
  if ((m = path.match(/^\/ui\/objectives\/(\d+)$/))) return objectivePage(m[1]);
  if (path === '/ui/agents') return agents();
  show(h('h1', {}, 'Not found'), h('p', {}, h('a', { href: '/ui' }, 'Overview')));
}

logout.addEventListener('click', () => { sessionStorage.removeItem(TOKEN_KEY); showLogin('Logged out.'); });
route();
