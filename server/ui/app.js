// agent-server console: a small single-page app over the REST API.
//
// It signs in with the admin password (the server sets an HttpOnly session cookie) and
// then uses the same /api/v1 endpoints as any client. /api/v1/events (Server-Sent Events)
// says what changed; pages refetch what they show. Text from the server is always put in
// the page as text nodes, never as HTML.
'use strict';

(function () {
  // ---- DOM helpers --------------------------------------------------------------------

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === 'class') el.className = v;
      else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'dataset') Object.assign(el.dataset, v);
      else if (v === true) el.setAttribute(k, '');
      else el.setAttribute(k, String(v));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    const list = Array.isArray(children) ? children.flat(Infinity) : [children];
    for (const c of list) {
      if (c === null || c === undefined || c === false) continue;
      el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  function clear(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
    return el;
  }

  function toast(message, bad) {
    const t = h('div', { class: 'toast' + (bad ? ' bad' : '') }, message);
    document.getElementById('toasts').appendChild(t);
    setTimeout(() => t.remove(), bad ? 7000 : 3500);
  }

  // ---- Formatting ---------------------------------------------------------------------

  function ago(iso) {
    if (!iso) return '—';
    const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
    if (s < 5) return 'just now';
    if (s < 60) return s + ' s ago';
    if (s < 3600) return Math.floor(s / 60) + ' min ago';
    if (s < 86400) return Math.floor(s / 3600) + ' h ago';
    return Math.floor(s / 86400) + ' d ago';
  }

  function when(iso) {
    return h('span', { title: iso ? new Date(iso).toLocaleString() : '' }, ago(iso));
  }

  function bytes(n) {
    if (n === null || n === undefined) return '—';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(n < 10 ? 2 : 1)) + ' ' + units[i];
  }

  function platform(os, arch) {
    if (!os && !arch) return '—';
    return (os || '?') + '/' + (arch || '?');
  }

  const COMMAND_PILL = { pending: '', delivered: 'info', succeeded: 'ok', failed: 'bad', expired: 'warn' };

  function pill(text, kind) {
    return h('span', { class: 'pill ' + (kind || '') }, text);
  }

  function onlineStatus(online) {
    return h('span', { class: 'status ' + (online ? 'online' : 'offline') }, online ? 'Online' : 'Offline');
  }

  // ---- API ----------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const opts = { method, headers: {} };
    if (body !== undefined) {
      opts.headers['content-type'] = 'application/json';
      opts.body = JSON.stringify(body);
    }
    let resp;
    try {
      resp = await fetch(path, opts);
    } catch (e) {
      throw new ApiError(0, 'network', 'The server cannot be reached: ' + e.message);
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!resp.ok) {
      const err = (data && data.error) || {};
      if (resp.status === 401 && path !== '/api/v1/session') signedOut();
      throw new ApiError(resp.status, err.code || 'http_' + resp.status, err.message || resp.statusText);
    }
    return data;
  }

  const get = (path) => api('GET', path);
  const post = (path, body) => api('POST', path, body);
  const del = (path) => api('DELETE', path);

  // ---- Live events ----------------------------------------------------------------------

  const live = {
    source: null,
    state: 'off',
    listeners: new Set(),
    start() {
      if (this.source) return;
      this.setState('connecting');
      const source = new EventSource('/api/v1/events');
      this.source = source;
      source.addEventListener('open', () => this.setState('live'));
      source.addEventListener('error', () => {
        this.setState(source.readyState === EventSource.CLOSED ? 'off' : 'connecting');
        if (source.readyState === EventSource.CLOSED) {
          // Signed out, or this replica is gone: check, then try again.
          this.source = null;
          setTimeout(() => { if (session.signedIn) this.start(); }, 3000);
        }
      });
      for (const name of ['ready', 'agent', 'agents', 'command', 'commands', 'binaries', 'rollouts', 'summary', 'resync', 'job', 'jobs']) {
        source.addEventListener(name, (e) => {
          let data = {};
          try { data = JSON.parse(e.data || '{}'); } catch (_) { /* keep {} */ }
          for (const fn of this.listeners) fn(name, data);
        });
      }
    },
    stop() {
      if (this.source) this.source.close();
      this.source = null;
      this.setState('off');
    },
    setState(state) {
      this.state = state;
      const el = document.getElementById('live');
      if (el) {
        el.dataset.state = state;
        el.textContent = state === 'live' ? 'Live' : state === 'connecting' ? 'Connecting…' : 'Offline';
      }
    },
  };

  // Runs `fn` at most once per `ms`, after the last call.
  function debounce(fn, ms) {
    let timer = null;
    return (...args) => {
      clearTimeout(timer);
      timer = setTimeout(() => fn(...args), ms);
    };
  }

  // ---- Session and shell ------------------------------------------------------------------

  const session = { signedIn: false, info: null };

  function signedOut() {
    if (!session.signedIn) return;
    session.signedIn = false;
    live.stop();
    location.hash = '#/login';
  }

  async function signOut() {
    try { await del('/api/v1/session'); } catch (_) { /* signed out either way */ }
    session.signedIn = false;
    live.stop();
    location.hash = '#/login';
  }

  const NAV = [
    ['#/agents', 'Agents'],
    ['#/jobs', 'Jobs'],
    ['#/binaries', 'Binaries & updates'],
    ['#/cluster', 'Cluster'],
    ['#/credentials', 'Credentials'],
    ['#/audit', 'Audit'],
  ];

  function shell(active) {
    const nav = h('nav', { class: 'nav' },
      NAV.map(([href, label]) => h('a', { href, class: href === active ? 'active' : '' }, label)));
    const bar = h('header', { class: 'topbar' },
      h('a', { class: 'brand', href: '#/agents' }, h('img', { src: '/ui/favicon.svg', alt: '' }), 'agent-server'),
      nav,
      h('div', { class: 'spacer' }),
      h('div', { class: 'meta' },
        h('span', { id: 'live', class: 'live', 'data-state': live.state }, live.state === 'live' ? 'Live' : 'Connecting…'),
        session.info ? h('span', { class: 'pod', title: 'The replica serving this page' }, session.info.pod) : null,
        h('button', { class: 'btn small', id: 'sign-out', onclick: signOut }, 'Sign out')));
    const main = h('main');
    const root = clear(document.getElementById('app'));
    append(root, [bar, main]);
    return main;
  }

  // ---- Sign-in page ------------------------------------------------------------------------

  function loginPage() {
    live.stop();
    const root = clear(document.getElementById('app'));
    const error = h('div', { class: 'error-text', id: 'sign-in-error' });
    const password = h('input', { type: 'password', id: 'password', autocomplete: 'current-password', required: true, autofocus: true });
    const button = h('button', { class: 'btn primary', id: 'sign-in', type: 'submit' }, 'Sign in');
    const enabled = !session.info || session.info.sign_in_enabled;
    const form = h('form', {
      id: 'login',
      onsubmit: async (e) => {
        e.preventDefault();
        button.disabled = true;
        error.textContent = '';
        try {
          await post('/api/v1/session', { password: password.value });
          session.signedIn = true;
          location.hash = '#/agents';
        } catch (err) {
          error.textContent = err.code === 'wrong_password' ? 'That password is not right.' : err.message;
          password.select();
        } finally {
          button.disabled = false;
        }
      },
    },
    // Password managers and screen readers expect a user name beside a password.
    h('input', { type: 'text', name: 'username', autocomplete: 'username', value: 'admin', hidden: true, 'aria-hidden': 'true' }),
    h('label', { class: 'field' }, h('span', {}, 'Admin password'), password),
    error,
    button);
    append(root, h('div', { class: 'signin' },
      h('div', { class: 'card' }, h('div', { class: 'card-body' },
        h('div', { class: 'logo' }, h('img', { src: '/ui/favicon.svg', alt: '' }), 'agent-server'),
        h('h1', {}, 'Sign in'),
        h('p', { class: 'lead' }, 'Manage agents, binaries and fleet updates.'),
        enabled ? form : h('p', { class: 'error-text' },
          'Sign-in is disabled on this server: set ADMIN_PASSWORD (the same on every replica) to enable it.'),
        h('div', { class: 'foot' },
          'The password is the server\'s ADMIN_PASSWORD. A server running with no configuration keeps a generated one in data/admin_password.')))));
    if (enabled) password.focus();
  }

  // ---- Agents page -------------------------------------------------------------------------

  function agentsPage(main) {
    const params = new URLSearchParams(location.hash.split('?')[1] || '');
    const view = { q: params.get('q') || '', online: params.get('online') || '', label: params.get('label') || '', shown: 100, total: 0, rows: [] };
    // Fleet jobs: the agents ticked for "Run a command"; empty means the current filter.
    const selected = new Set();
    const runButton = h('button', { class: 'btn primary', id: 'run-command', onclick: () => openJobDialog(jobTarget()) });
    const labelFilter = h('input', {
      type: 'search', class: 'search', id: 'agent-label', placeholder: 'Label', value: view.label,
      oninput: debounce(() => { view.label = labelFilter.value.trim(); view.shown = 100; selected.clear(); load(); }, 250),
    });
    const selectAll = h('input', {
      type: 'checkbox', id: 'select-all', title: 'Select the agents shown',
      onchange: () => {
        for (const a of view.rows) { if (selectAll.checked) selected.add(a.id); else selected.delete(a.id); }
        for (const box of tbody.querySelectorAll('input[type=checkbox]')) box.checked = selectAll.checked;
        updateRun();
      },
    });
    function updateRun() {
      const n = selected.size || view.total;
      runButton.textContent = 'Run a command on ' + n + ' agent' + (n === 1 ? '' : 's');
      runButton.disabled = n === 0;
    }
    // What a job from this page targets: the ticked agents, else the filter (a search is
    // no target field, so with one the agents shown are named).
    function jobTarget() {
      if (selected.size) return { target: { ids: [...selected] }, count: selected.size, what: selected.size + ' selected' };
      if (view.q) return { target: { ids: view.rows.map((a) => a.id) }, count: view.rows.length, what: view.rows.length + ' shown' };
      const target = {};
      if (view.label) target.labels = [view.label];
      if (view.online) target.online = view.online === 'true';
      if (!Object.keys(target).length) target.percentage = 100;
      return { target, count: view.total, what: 'every agent matching the filter' };
    }
    const stats = h('div', { class: 'stats' });
    const tbody = h('tbody');
    const more = h('div', { class: 'more' });
    const search = h('input', {
      type: 'search', class: 'search', id: 'agent-search', placeholder: 'Search by id or hostname', value: view.q,
      oninput: debounce(() => { view.q = search.value.trim(); view.shown = 100; load(); }, 250),
    });
    const filter = h('div', { class: 'segmented', id: 'agent-filter' });

    function filterButtons() {
      clear(filter);
      for (const [value, label] of [['', 'All'], ['true', 'Online'], ['false', 'Offline']]) {
        append(filter, h('button', {
          class: view.online === value ? 'on' : '',
          onclick: () => { view.online = value; view.shown = 100; filterButtons(); load(); },
        }, label));
      }
    }

    function stat(label, value, cls, onlineValue) {
      return h('button', {
        class: 'stat' + (view.online === onlineValue ? ' selected' : ''),
        onclick: () => { view.online = onlineValue; filterButtons(); load(); },
      }, h('div', { class: 'label' }, label), h('div', { class: 'value ' + (cls || '') }, value));
    }

    async function load() {
      const q = new URLSearchParams({ limit: String(view.shown) });
      if (view.q) q.set('q', view.q);
      if (view.online) q.set('online', view.online);
      if (view.label) q.set('label', view.label);
      let data;
      try { data = await get('/api/v1/agents?' + q); } catch (e) { toast(e.message, true); return; }
      clear(stats);
      append(stats, [
        stat('Agents', data.total, '', ''),
        stat('Online', data.online, 'ok', 'true'),
        stat('Offline', data.offline, 'muted', 'false'),
      ]);
      clear(tbody);
      if (!data.agents.length) {
        append(tbody, h('tr', {}, h('td', { colspan: 9, class: 'empty' },
          view.q || view.online || view.label ? 'No agent matches.' : 'No agent has connected yet. Mint a token with POST /api/v1/tokens and start one.')));
      }
      for (const a of data.agents) {
        const box = h('input', {
          type: 'checkbox', class: 'pick', 'aria-label': 'Select ' + a.id, checked: selected.has(a.id),
          onchange: () => { if (box.checked) selected.add(a.id); else selected.delete(a.id); updateRun(); },
        });
        append(tbody, h('tr', { dataset: { agent: a.id } },
          h('td', {}, box),
          h('td', {}, onlineStatus(a.online)),
          h('td', {}, h('a', { href: '#/agents/' + encodeURIComponent(a.id), class: 'mono' }, a.id)),
          h('td', {}, a.hostname || h('span', { class: 'muted' }, '—')),
          h('td', { class: 'mono' }, a.version || h('span', { class: 'muted' }, '—')),
          h('td', {}, platform(a.os, a.arch)),
          h('td', { class: 'labels' }, (a.labels || []).map((l) => h('button', {
            class: 'pill label', title: 'Show agents with this label',
            onclick: () => { view.label = l; labelFilter.value = l; selected.clear(); load(); },
          }, l))),
          h('td', { class: 'mono' }, a.pod || h('span', { class: 'muted' }, '—')),
          h('td', { class: 'nowrap' }, a.online ? when(a.connected_at) : when(a.last_seen))));
      }
      view.total = data.total;
      view.rows = data.agents;
      selectAll.checked = data.agents.length > 0 && data.agents.every((a) => selected.has(a.id));
      updateRun();
      clear(more);
      if (data.next) {
        append(more, h('button', { class: 'btn', onclick: () => { view.shown += 100; load(); } }, 'Show more'));
      } else {
        append(more, h('span', { class: 'muted' }, data.agents.length + ' of ' + data.total + ' shown'));
      }
    }

    filterButtons();
    append(main, [
      h('div', { class: 'page-head' }, h('div', {}, h('h1', {}, 'Agents'),
        h('div', { class: 'sub' }, 'Every host that has connected or was enrolled. Updates arrive live.'))),
      stats,
      h('div', { class: 'card' },
        h('div', { class: 'toolbar' }, search, labelFilter, filter, h('div', { class: 'grow' }), runButton),
        h('div', { class: 'table-wrap' }, h('table', { id: 'agents-table' },
          h('thead', {}, h('tr', {}, h('th', {}, selectAll), ['Status', 'Agent', 'Hostname', 'Version', 'Platform', 'Labels', 'Pod', 'Seen'].map((t) => h('th', {}, t)))),
          tbody)),
        more),
    ]);
    load();
    const refresh = debounce(load, 300);
    return {
      onEvent(name) {
        if (['agent', 'agents', 'summary', 'resync', 'ready'].includes(name)) refresh();
      },
      every: 15000,
      tick: load,
    };
  }

  // ---- Agent detail page -----------------------------------------------------------------

  function jsonTree(value) {
    function node(key, v, depth) {
      const label = key === null ? [] : [h('span', { class: 'k' }, key), ': '];
      if (v !== null && typeof v === 'object') {
        const entries = Array.isArray(v) ? v.map((x, i) => [String(i), x]) : Object.entries(v);
        const shown = entries.slice(0, 500);
        const details = h('details', { open: depth < 2 },
          h('summary', {}, label, Array.isArray(v) ? '[ ]' : '{ }', h('span', { class: 'count' },
            entries.length + (Array.isArray(v) ? ' items' : ' keys'))),
          h('ul', {}, shown.map(([k, x]) => h('li', {}, node(k, x, depth + 1))),
            entries.length > shown.length ? h('li', { class: 'leaf z' }, '… ' + (entries.length - shown.length) + ' more') : null));
        return details;
      }
      let cls = 's';
      let text = JSON.stringify(v);
      if (typeof v === 'number') cls = 'n';
      else if (typeof v === 'boolean') cls = 'b';
      else if (v === null) { cls = 'z'; text = 'null'; }
      return h('div', { class: 'leaf' }, label, h('span', { class: cls }, text));
    }
    return h('div', { class: 'tree' }, h('ul', {}, h('li', {}, node(null, value, 0))));
  }

  function outputText(output) {
    if (output === null || output === undefined) return '';
    if (typeof output === 'string') return output;
    if (output && typeof output === 'object' && typeof output.stdout === 'string' && Object.keys(output).length === 1) return output.stdout;
    return JSON.stringify(output, null, 2);
  }

  function agentPage(main, id) {
    const head = h('div');
    const facts = h('div', { class: 'card-body' });
    const history = h('tbody');
    const inventory = h('div', { class: 'card-body tree-scroll' });
    const inventoryHint = h('span', { class: 'hint' });
    const expanded = new Set();
    let fresh = null;
    let open = false;

    const name = h('input', { type: 'text', id: 'command-name', placeholder: 'e.g. uptime', required: true, maxlength: 128 });
    const args = h('textarea', { id: 'command-args', rows: 2, spellcheck: 'false' }, '{}');
    const ttl = h('input', { type: 'number', id: 'command-ttl', min: 1, placeholder: 'none' });
    const send = h('button', { class: 'btn primary', id: 'send-command', type: 'submit' }, 'Send command');
    const form = h('form', {
      onsubmit: async (e) => {
        e.preventDefault();
        let parsed;
        try { parsed = JSON.parse(args.value || '{}'); } catch (err) { toast('Arguments are not valid JSON: ' + err.message, true); return; }
        const body = { name: name.value.trim(), args: parsed };
        if (ttl.value) body.ttl_seconds = Number(ttl.value);
        send.disabled = true;
        try {
          const created = await post('/api/v1/agents/' + encodeURIComponent(id) + '/commands', body);
          fresh = created.id;
          expanded.add(created.id);
          toast('Command queued: ' + body.name);
          loadHistory();
        } catch (err) {
          toast(err.message, true);
        } finally {
          send.disabled = false;
        }
      },
    },
    h('div', { class: 'fields' },
      h('div', { class: 'fields cols-2' },
        h('label', { class: 'field' }, h('span', {}, 'Command'), name),
        h('label', { class: 'field' }, h('span', {}, 'Expires after (seconds)'), ttl)),
      h('label', { class: 'field' }, h('span', {}, 'Arguments (JSON object)'), args),
      h('div', { class: 'actions' }, send)));

    async function loadAgent() {
      let a;
      try { a = await get('/api/v1/agents/' + encodeURIComponent(id)); } catch (e) {
        clear(head);
        append(head, h('div', { class: 'page-head' }, h('div', {},
          h('div', { class: 'crumbs' }, h('a', { href: '#/agents' }, 'Agents'), ' / ', id),
          h('h1', {}, id), h('div', { class: 'sub' }, e.message))));
        return;
      }
      clear(head);
      append(head, h('div', { class: 'page-head' }, h('div', {},
        h('div', { class: 'crumbs' }, h('a', { href: '#/agents' }, 'Agents'), ' / ', a.id),
        h('h1', { class: 'mono' }, a.id),
        h('div', { class: 'sub' }, onlineStatus(a.online), a.online && a.pod ? ' on ' + a.pod : ''))));
      clear(facts);
      const fact = (k, v) => h('div', {}, h('dt', {}, k), h('dd', {}, v === null || v === undefined || v === '' ? '—' : v));
      append(facts, h('dl', { class: 'facts' },
        fact('Hostname', a.hostname),
        fact('Version', a.version ? h('span', { class: 'mono' }, a.version) : null),
        fact('Platform', platform(a.os, a.arch)),
        fact('Pod', a.pod),
        fact(a.online ? 'Connected' : 'Last seen', a.online ? when(a.connected_at) : when(a.last_seen)),
        fact('Known since', when(a.created_at))));
    }

    async function loadHistory() {
      let data;
      try { data = await get('/api/v1/agents/' + encodeURIComponent(id) + '/commands?limit=50'); } catch (e) { return; }
      open = data.commands.some((c) => c.status === 'pending' || c.status === 'delivered');
      clear(history);
      if (!data.commands.length) {
        append(history, h('tr', {}, h('td', { colspan: 4, class: 'empty' }, 'No command sent yet.')));
      }
      for (const c of data.commands) {
        const out = outputText(c.output);
        const row = h('tr', { dataset: { command: c.id }, class: c.id === fresh ? 'flash' : '' },
          h('td', { class: 'nowrap' }, when(c.created_at)),
          h('td', {}, h('span', { class: 'mono' }, c.name),
            Object.keys(c.args || {}).length ? h('div', { class: 'sub mono' }, JSON.stringify(c.args)) : null),
          h('td', {}, pill(c.status, COMMAND_PILL[c.status]), c.attempts > 1 ? h('div', { class: 'sub' }, c.attempts + ' attempts') : null),
          h('td', { class: 'output-cell' },
            out ? (expanded.has(c.id)
              ? h('pre', { class: 'output' }, out)
              : h('a', { href: '#', class: 'output-preview', onclick: (e) => { e.preventDefault(); expanded.add(c.id); loadHistory(); } }, out.split('\n')[0]))
              : h('span', { class: 'muted' }, c.status === 'pending' || c.status === 'delivered' ? 'waiting for the agent…' : '—')));
        append(history, row);
      }
      fresh = null;
    }

    async function loadInventory() {
      let inv;
      try { inv = await get('/api/v1/agents/' + encodeURIComponent(id) + '/inventory'); } catch (e) {
        clear(inventory);
        append(inventory, h('div', { class: 'empty' }, e.status === 404 ? 'No inventory reported yet.' : e.message));
        inventoryHint.textContent = '';
        return;
      }
      inventoryHint.textContent = bytes(inv.size_bytes) + ' · ' + ago(inv.received_at);
      clear(inventory);
      append(inventory, jsonTree(inv.data));
    }

    append(main, [
      head,
      h('div', { class: 'stack' },
      h('div', { class: 'card' }, facts),
      h('div', { class: 'grid detail' },
        h('div', { class: 'stack' },
          h('div', { class: 'card' }, h('div', { class: 'card-head' }, h('h2', {}, 'Send a command'),
            h('span', { class: 'hint' }, 'Stored first, delivered at least once')), h('div', { class: 'card-body' }, form)),
          h('div', { class: 'card' }, h('div', { class: 'card-head' }, h('h2', {}, 'Command history'), h('span', { class: 'hint' }, 'Newest first')),
            h('div', { class: 'table-wrap' }, h('table', { id: 'command-history' },
              h('thead', {}, h('tr', {}, ['Sent', 'Command', 'Status', 'Output'].map((t) => h('th', {}, t)))), history)))),
        h('div', { class: 'card' }, h('div', { class: 'card-head' }, h('h2', {}, 'Inventory'), inventoryHint), inventory))),
    ]);
    loadAgent();
    loadHistory();
    loadInventory();
    const refreshAgent = debounce(loadAgent, 200);
    const refreshHistory = debounce(loadHistory, 150);
    return {
      onEvent(name, data) {
        if ((name === 'agent' && data.id === id) || name === 'agents' || name === 'resync') refreshAgent();
        if ((name === 'command' && data.agent_id === id) || name === 'commands' || name === 'resync') refreshHistory();
        if (name === 'resync') loadInventory();
      },
      // A result stored by another replica shows up here within a few seconds too.
      every: 3000,
      tick() { if (open || live.state !== 'live') { loadHistory(); loadAgent(); } },
    };
  }

  // ---- Binaries & updates page -------------------------------------------------------------

  function binariesPage(main) {
    const rolloutsBox = h('div');
    const binariesBody = h('tbody');
    const history = h('tbody');
    let targets = new Map();
    let activeIncomplete = false;

    // Upload form
    const file = h('input', { type: 'file', id: 'upload-file' });
    const fileWhat = h('div', { class: 'what' }, 'Choose a build');
    const fileDetail = h('div', { class: 'detail' }, 'Streamed to the shared volume, checked by SHA-256.');
    const name = h('input', { type: 'text', id: 'upload-name', placeholder: 'agent', required: true });
    const version = h('input', { type: 'text', id: 'upload-version', placeholder: '2.5.0', required: true });
    const os = h('input', { type: 'text', id: 'upload-os', placeholder: 'linux', list: 'os-list', required: true });
    const arch = h('input', { type: 'text', id: 'upload-arch', placeholder: 'x86_64', list: 'arch-list', required: true });
    const notes = h('input', { type: 'text', id: 'upload-notes', placeholder: 'What changed (optional)' });
    const submit = h('button', { class: 'btn primary', id: 'upload-submit', type: 'submit' }, 'Upload');
    const progress = h('div', { class: 'upload-progress', id: 'upload-progress', hidden: true });

    file.addEventListener('change', () => {
      const f = file.files[0];
      if (!f) return;
      fileWhat.textContent = f.name;
      fileDetail.textContent = bytes(f.size);
      if (!name.value) name.value = f.name.replace(/[^A-Za-z0-9._-].*$/, '').replace(/[-_.]?v?\d.*$/, '') || f.name;
      const v = f.name.match(/(\d+\.\d+(?:\.\d+)?(?:[-+][A-Za-z0-9.]+)?)/);
      if (v && !version.value) version.value = v[1];
    });

    async function sha256Hex(f) {
      // Web Crypto exists in secure contexts only (https, localhost); large files would
      // need the whole file in memory, so they are checked by the server's hash alone.
      if (!window.crypto || !crypto.subtle || f.size > 256 * 1024 * 1024) return null;
      const digest = await crypto.subtle.digest('SHA-256', await f.arrayBuffer());
      return Array.from(new Uint8Array(digest)).map((b) => b.toString(16).padStart(2, '0')).join('');
    }

    function showProgress(loaded, total, started, label) {
      progress.hidden = false;
      clear(progress);
      const pct = total ? Math.min(100, (loaded / total) * 100) : 0;
      const secs = (performance.now() - started) / 1000;
      const rate = secs > 0.2 ? bytes(loaded / secs) + '/s' : '';
      const bar = h('span', { class: 'seg-accent' });
      bar.style.width = pct.toFixed(1) + '%';
      append(progress, [
        h('div', { class: 'line' }, h('span', {}, label), h('span', {}, bytes(loaded) + ' of ' + bytes(total) + (rate ? ' · ' + rate : ''))),
        h('div', { class: 'bar' }, bar),
      ]);
    }

    const uploadForm = h('form', {
      id: 'upload-form',
      onsubmit: async (e) => {
        e.preventDefault();
        const f = file.files[0];
        if (!f) { toast('Choose the build to upload first.', true); return; }
        submit.disabled = true;
        const started = performance.now();
        try {
          showProgress(0, f.size, started, 'Computing checksum…');
          const sum = await sha256Hex(f);
          const q = new URLSearchParams({ name: name.value.trim(), version: version.value.trim(), os: os.value.trim(), arch: arch.value.trim() });
          if (notes.value.trim()) q.set('notes', notes.value.trim());
          const created = await new Promise((resolve, reject) => {
            const xhr = new XMLHttpRequest();
            xhr.open('POST', '/api/v1/binaries?' + q);
            xhr.setRequestHeader('content-type', 'application/octet-stream');
            if (sum) xhr.setRequestHeader('x-checksum-sha256', sum);
            xhr.upload.onprogress = (ev) => showProgress(ev.loaded, ev.total || f.size, started, 'Uploading ' + f.name);
            xhr.onload = () => {
              let data = null;
              try { data = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
              if (xhr.status === 201) resolve(data);
              else reject(new ApiError(xhr.status, data && data.error && data.error.code, (data && data.error && data.error.message) || xhr.statusText));
            };
            xhr.onerror = () => reject(new ApiError(0, 'network', 'The upload was interrupted; nothing was stored. Try again.'));
            xhr.send(f);
          });
          showProgress(f.size, f.size, started, 'Stored ' + created.name + ' ' + created.version);
          toast('Uploaded ' + created.name + ' ' + created.version + ' for ' + created.os + '/' + created.arch);
          uploadForm.reset();
          fileWhat.textContent = 'Choose a build';
          fileDetail.textContent = 'Streamed to the shared volume, checked by SHA-256.';
          load();
        } catch (err) {
          progress.hidden = true;
          if (err.status === 401) signedOut();
          toast('Upload failed: ' + err.message, true);
        } finally {
          submit.disabled = false;
        }
      },
    },
    h('label', { class: 'filepick', for: 'upload-file' }, file, h('div', { class: 'icon' }, '↑'), h('div', {}, fileWhat, fileDetail)),
    h('div', { class: 'fields cols-4' },
      h('label', { class: 'field' }, h('span', {}, 'Name'), name),
      h('label', { class: 'field' }, h('span', {}, 'Version'), version),
      h('label', { class: 'field' }, h('span', {}, 'OS'), os),
      h('label', { class: 'field' }, h('span', {}, 'Architecture'), arch)),
    h('label', { class: 'field' }, h('span', {}, 'Notes'), notes),
    h('div', { class: 'actions' }, submit),
    progress,
    h('datalist', { id: 'os-list' }, ['linux', 'windows', 'darwin', 'freebsd'].map((v) => h('option', { value: v }))),
    h('datalist', { id: 'arch-list' }, ['x86_64', 'aarch64', 'armv7', 'i686'].map((v) => h('option', { value: v }))));
    uploadForm.classList.add('fields');

    // Rollout dialog
    const dialog = h('dialog', { id: 'rollout-dialog' });
    function openRollout(b) {
      clear(dialog);
      const pct = h('input', { type: 'number', id: 'rollout-percentage', min: 1, max: 100, value: 100 });
      const maxc = h('input', { type: 'number', id: 'rollout-max', min: 1, placeholder: 'server default' });
      const label = h('input', { type: 'text', id: 'rollout-label', placeholder: 'any agent' });
      const brake = h('input', { type: 'number', id: 'rollout-brake', min: 0, max: 100, step: 'any', placeholder: 'no brake' });
      const sample = h('input', { type: 'number', id: 'rollout-sample', min: 1, placeholder: '10' });
      const downgrade = h('input', { type: 'checkbox', id: 'rollout-downgrade' });
      const go = h('button', { class: 'btn primary', id: 'rollout-start', type: 'submit' }, 'Start rollout');
      append(dialog, h('form', {
        onsubmit: async (e) => {
          e.preventDefault();
          const body = { binary_id: b.id, percentage: Number(pct.value || 100) };
          if (maxc.value) body.max_concurrent = Number(maxc.value);
          if (label.value.trim()) body.label = label.value.trim();
          if (brake.value !== '') body.max_failure_ratio = Number(brake.value) / 100;
          if (sample.value) body.min_sample = Number(sample.value);
          if (downgrade.checked) body.allow_downgrade = true;
          go.disabled = true;
          try {
            await post('/api/v1/rollouts', body);
            dialog.close();
            toast((downgrade.checked ? 'Rolling back to ' : 'Rolling out ') + b.version + ' to ' + b.os + '/' + b.arch);
            load();
          } catch (err) {
            toast(err.message, true);
          } finally {
            go.disabled = false;
          }
        },
      },
      h('div', { class: 'card-head' }, h('h2', {}, 'Roll out ' + b.name + ' ' + b.version), h('span', { class: 'hint' }, b.os + '/' + b.arch)),
      h('div', { class: 'card-body' },
        h('p', { class: 'muted' }, 'Agents on ' + b.os + '/' + b.arch + ' reporting an older version are told to update, a few at a time. It replaces the current target for this platform.'),
        h('div', { class: 'fields cols-2' },
          h('label', { class: 'field' }, h('span', {}, 'Share of agents (%)'), pct),
          h('label', { class: 'field' }, h('span', {}, 'Updating at once'), maxc)),
        h('label', { class: 'field' }, h('span', {}, 'Only agents with label'), label, h('small', {}, 'Labels come from the agents\' hello message.')),
        h('div', { class: 'fields cols-2' },
          h('label', { class: 'field' }, h('span', {}, 'Pause above failures (%)'), brake),
          h('label', { class: 'field' }, h('span', {}, 'After finished updates'), sample)),
        h('label', { class: 'field check' }, downgrade, h('span', {}, 'Rollback: agents on a newer version install this older one too')),
        h('div', { class: 'actions' }, h('button', { class: 'btn', type: 'button', onclick: () => dialog.close() }, 'Cancel'), go))));
      dialog.showModal();
    }

    function progressBar(p) {
      const total = Math.max(1, p.targeted);
      const seg = (cls, n) => { const s = h('span', { class: cls, title: String(n) }); s.style.width = (100 * n / total) + '%'; return s; };
      const alreadyThere = Math.max(0, p.up_to_date - p.updated);
      return [
        h('div', { class: 'bar' }, seg('seg-ok', p.updated), seg('seg-current', alreadyThere), seg('seg-info', p.updating), seg('seg-bad', p.failed), seg('seg-warn', p.timed_out)),
        h('div', { class: 'legend' },
          h('span', {}, h('i', { class: 'seg-ok' }), 'Updated ', h('b', {}, p.updated)),
          h('span', {}, h('i', { class: 'seg-current' }), 'Already current ', h('b', {}, alreadyThere)),
          h('span', {}, h('i', { class: 'seg-info' }), 'Updating ', h('b', {}, p.updating)),
          h('span', {}, h('i', { class: 'seg-bad' }), 'Failed ', h('b', {}, p.failed)),
          h('span', {}, h('i', { class: 'seg-warn' }), 'Timed out ', h('b', {}, p.timed_out)),
          h('span', {}, h('i', { class: 'seg-wait' }), 'Waiting ', h('b', {}, p.waiting)),
          p.unknown_version ? h('span', {}, 'No version reported ', h('b', {}, p.unknown_version)) : null),
      ];
    }

    async function load() {
      let binaries;
      let rollouts;
      try {
        [binaries, rollouts] = await Promise.all([get('/api/v1/binaries?limit=200'), get('/api/v1/rollouts?limit=30')]);
      } catch (e) { toast(e.message, true); return; }
      // The current rollout of each platform: active, or paused by its brake or an operator.
      const active = rollouts.rollouts.filter((r) => r.status === 'active' || r.status === 'paused');
      targets = new Map(active.map((r) => [r.binary_id, r]));
      activeIncomplete = active.some((r) => r.status === 'active' && !r.progress.complete);

      clear(rolloutsBox);
      if (!active.length) {
        append(rolloutsBox, h('div', { class: 'empty' }, 'No rollout is active or paused. Upload a build, then choose “Roll out”.'));
      }
      for (const r of active) {
        const p = r.progress;
        const paused = r.status === 'paused';
        const act = (action, done) => async () => {
          try { await post('/api/v1/rollouts/' + r.id + '/' + action, {}); toast(done); load(); } catch (e) { toast(e.message, true); }
        };
        append(rolloutsBox, h('div', { class: 'rollout' + (paused ? ' paused' : ''), dataset: { rollout: r.id, status: r.status } },
          h('div', { class: 'title' },
            h('h2', {}, platform(r.os, r.arch), ' → ', h('span', { class: 'mono' }, r.version)),
            paused ? pill('paused', 'warn') : p.complete ? pill('complete', 'ok') : pill('in progress', 'info'),
            r.allow_downgrade ? pill('rollback', 'warn') : null,
            r.max_failure_ratio != null ? pill('brake above ' + Math.round(r.max_failure_ratio * 1000) / 10 + '% failed', '') : null,
            r.label ? pill('label ' + r.label, 'accent') : null,
            r.percentage < 100 ? pill(r.percentage + '% of agents', 'accent') : null,
            pill('up to ' + r.max_concurrent + ' at once'),
            h('span', { class: 'grow' }),
            h('span', { class: 'muted' }, p.up_to_date + ' of ' + p.targeted + ' current'),
            paused
              ? h('button', { class: 'btn small', 'data-action': 'resume', onclick: act('resume', 'Rollout resumed') }, 'Resume')
              : h('button', { class: 'btn small', 'data-action': 'pause', onclick: act('pause', 'Rollout paused') }, 'Pause'),
            h('button', {
              class: 'btn small danger',
              onclick: async () => {
                if (!confirm('Cancel the rollout of ' + r.version + ' to ' + r.os + '/' + r.arch + '? Agents already updated stay updated.')) return;
                try { await del('/api/v1/rollouts/' + r.id); toast('Rollout cancelled'); load(); } catch (e) { toast(e.message, true); }
              },
            }, 'Cancel')),
          paused ? h('div', { class: 'paused-reason' }, h('b', {}, 'Paused: '), r.reason || 'no reason recorded',
            h('span', { class: 'muted' }, ' · Nobody else is offered this build until it is resumed.')) : null,
          progressBar(p),
          p.updating_agents.length ? h('div', { class: 'updating-now' }, 'Updating now:', p.updating_agents.map((a) => h('a', { href: '#/agents/' + encodeURIComponent(a), class: 'mono' }, a))) : null,
          p.recent_failures.length ? h('div', { class: 'failures' }, h('div', { class: 'muted' }, 'Latest failures'),
            h('ul', {}, p.recent_failures.map((f) => h('li', {},
              h('a', { href: '#/agents/' + encodeURIComponent(f.agent_id), class: 'mono' }, f.agent_id),
              f.from_version ? h('span', { class: 'muted mono' }, ' (on ' + f.from_version + ')') : null,
              ' ', h('span', { class: 'error-text' }, f.error || 'no reason given'),
              f.at ? h('span', { class: 'muted' }, ' · ', when(f.at)) : null)))) : null));
      }

      clear(history);
      const ended = rollouts.rollouts.filter((r) => r.status !== 'active' && r.status !== 'paused').slice(0, 10);
      for (const r of ended) {
        append(history, h('tr', {},
          h('td', {}, platform(r.os, r.arch)),
          h('td', { class: 'mono' }, r.version, r.allow_downgrade ? ' ' : null, r.allow_downgrade ? pill('rollback', 'warn') : null),
          h('td', {}, pill(r.status, r.status === 'cancelled' ? 'warn' : '')),
          h('td', { class: 'num' }, r.progress.updated),
          h('td', { class: 'num' }, r.progress.failed),
          h('td', { class: 'num' }, r.progress.timed_out),
          h('td', { class: 'nowrap' }, when(r.ended_at))));
      }
      if (!ended.length) append(history, h('tr', {}, h('td', { colspan: 7, class: 'empty' }, 'No earlier rollouts.')));

      clear(binariesBody);
      if (!binaries.binaries.length) {
        append(binariesBody, h('tr', {}, h('td', { colspan: 7, class: 'empty' }, 'No binary uploaded yet.')));
      }
      for (const b of binaries.binaries) {
        const target = targets.get(b.id);
        append(binariesBody, h('tr', { dataset: { binary: b.id } },
          h('td', {}, h('div', { class: 'mono' }, b.name), b.notes ? h('div', { class: 'sub' }, b.notes) : null),
          h('td', { class: 'mono' }, b.version, ' ', target ? pill('target', 'ok') : null),
          h('td', {}, platform(b.os, b.arch)),
          h('td', { class: 'num' }, bytes(b.size_bytes)),
          h('td', { class: 'mono', title: b.sha256 }, b.sha256.slice(0, 12) + '…'),
          h('td', { class: 'nowrap' }, when(b.created_at)),
          h('td', { class: 'right nowrap' },
            h('a', { class: 'btn small', href: b.download_url, download: '' }, 'Download'), ' ',
            h('button', { class: 'btn small', onclick: () => openRollout(b) }, target ? 'Change rollout' : 'Roll out'), ' ',
            h('button', {
              class: 'btn small danger',
              disabled: !!target,
              title: target ? 'The target of an active or paused rollout cannot be deleted' : 'Delete',
              onclick: async () => {
                if (!confirm('Delete ' + b.name + ' ' + b.version + ' (' + b.os + '/' + b.arch + ')?')) return;
                try { await del('/api/v1/binaries/' + b.id); toast('Deleted ' + b.name + ' ' + b.version); load(); } catch (e) { toast(e.message, true); }
              },
            }, 'Delete'))));
      }
    }

    append(main, [
      h('div', { class: 'page-head' }, h('div', {}, h('h1', {}, 'Binaries & updates'),
        h('div', { class: 'sub' }, 'Agent builds on the shared volume, and the version each platform should run.'))),
      h('div', { class: 'stack' },
      h('div', { class: 'card' }, h('div', { class: 'card-head' }, h('h2', {}, 'Current rollouts'), h('span', { class: 'hint' }, 'One target version per platform')), rolloutsBox),
      h('div', { class: 'grid two' },
        h('div', { class: 'card' }, h('div', { class: 'card-head' }, h('h2', {}, 'Upload a build')), h('div', { class: 'card-body' }, uploadForm)),
        h('div', { class: 'card' }, h('div', { class: 'card-head' }, h('h2', {}, 'Earlier rollouts')),
          h('div', { class: 'table-wrap' }, h('table', {}, h('thead', {}, h('tr', {},
            ['Platform', 'Version', 'Status', 'Updated', 'Failed', 'Timed out', 'Ended'].map((t) => h('th', { class: ['Updated', 'Failed', 'Timed out'].includes(t) ? 'num' : '' }, t)))), history)))),
      h('div', { class: 'card' }, h('div', { class: 'card-head' }, h('h2', {}, 'Binaries'), h('span', { class: 'hint' }, 'Newest first')),
        h('div', { class: 'table-wrap' }, h('table', { id: 'binaries-table' }, h('thead', {}, h('tr', {},
          ['Name', 'Version', 'Platform', 'Size', 'SHA-256', 'Uploaded', ''].map((t) => h('th', { class: t === 'Size' ? 'num' : '' }, t)))), binariesBody)))),
      dialog,
    ]);
    load();
    const refresh = debounce(load, 500);
    return {
      onEvent(name) {
        if (['binaries', 'rollouts', 'resync', 'ready'].includes(name)) refresh();
        if ((name === 'agent' || name === 'agents') && targets.size) refresh();
      },
      every: 5000,
      tick() { if (activeIncomplete || live.state !== 'live') load(); },
    };
  }

  // ---- Jobs: the run-a-command dialog and the Jobs pages ------------------------------------

  const JOB_STATUS_PILL = { running: 'info', paused: 'warn', cancelled: 'bad', completed: 'ok' };

  // The dialog that starts a fleet job on `pick.target` (about `pick.count` agents).
  function openJobDialog(pick) {
    let dialog = document.getElementById('job-dialog');
    if (!dialog) { dialog = h('dialog', { id: 'job-dialog' }); document.body.appendChild(dialog); }
    clear(dialog);
    const field = (label, input, help) => h('label', { class: 'field' }, h('span', {}, label), input, help ? h('small', {}, help) : null);
    const num = (id, placeholder) => h('input', { type: 'number', id, min: '0', step: 'any', placeholder });
    const name = h('input', { type: 'text', id: 'job-name', required: true, maxlength: '128', placeholder: 'uptime' });
    const args = h('textarea', { id: 'job-args', rows: '3', placeholder: '{}' });
    const maxInFlight = num('job-max-in-flight', 'unbounded');
    const rate = num('job-rate', 'unbounded');
    const canary = num('job-canary', 'none');
    const ratio = num('job-max-failure-ratio', 'no brake');
    const ttl = num('job-ttl', 'none');
    const error = h('div', { class: 'error-text', id: 'job-error' });
    const go = h('button', { class: 'btn primary', id: 'job-start', type: 'submit' }, 'Run on ' + pick.count + ' agent' + (pick.count === 1 ? '' : 's'));
    const int = (input) => (input.value === '' ? undefined : Math.round(Number(input.value)));
    append(dialog, h('form', {
      onsubmit: async (e) => {
        e.preventDefault();
        error.textContent = '';
        const body = { name: name.value.trim(), target: pick.target };
        try {
          if (args.value.trim()) body.args = JSON.parse(args.value);
        } catch (err) { error.textContent = 'Args must be a JSON object: ' + err.message; return; }
        if (int(maxInFlight) !== undefined) body.max_in_flight = int(maxInFlight);
        if (int(rate) !== undefined) body.rate_per_second = int(rate);
        if (int(canary) !== undefined) body.canary = { count: int(canary) };
        if (ratio.value !== '') body.max_failure_ratio = Number(ratio.value);
        if (int(ttl) !== undefined) body.ttl_seconds = int(ttl);
        go.disabled = true;
        try {
          const job = await post('/api/v1/jobs', body);
          dialog.close();
          toast('Job started on ' + job.targeted + ' agents');
          location.hash = '#/jobs/' + encodeURIComponent(job.id);
        } catch (err) {
          error.textContent = err.message;
        } finally {
          go.disabled = false;
        }
      },
    }, h('div', { class: 'card-head' }, h('h2', {}, 'Run a command'), h('span', { class: 'muted' }, pick.what)),
    h('div', { class: 'card-body' },
      field('Command', name),
      field('Args (JSON object)', args),
      h('div', { class: 'fields cols-2' },
        field('Max in flight', maxInFlight, 'Delivered and unanswered at once'),
        field('Rate (per second)', rate, 'New deliveries per second')),
      h('div', { class: 'fields cols-2' },
        field('Canary (agents)', canary, 'These finish before the rest start'),
        field('Max failure ratio', ratio, '0 to 1: pause when more fail')),
      field('TTL (seconds)', ttl, 'Offline agents get it when they connect, until then'),
      error,
      h('div', { class: 'actions' }, h('button', { class: 'btn', type: 'button', onclick: () => dialog.close() }, 'Cancel'), go))));
    dialog.showModal();
    name.focus();
  }

  function jobProgress(j) {
    const c = j.counts;
    const total = Math.max(1, j.targeted);
    const seg = (cls, n) => { const s = h('span', { class: cls, title: String(n) }); s.style.width = (100 * n / total) + '%'; return s; };
    const ended = c.expired;
    return [
      h('div', { class: 'bar' }, seg('seg-ok', c.succeeded), seg('seg-bad', c.failed), seg('seg-info', c.delivered), seg('seg-wait', ended)),
      h('div', { class: 'legend job-counts' },
        h('span', {}, h('i', { class: 'seg-ok' }), 'Succeeded ', h('b', { dataset: { count: 'succeeded' } }, c.succeeded)),
        h('span', {}, h('i', { class: 'seg-bad' }), 'Failed ', h('b', { dataset: { count: 'failed' } }, c.failed)),
        h('span', {}, h('i', { class: 'seg-info' }), 'Delivered ', h('b', { dataset: { count: 'delivered' } }, c.delivered)),
        h('span', {}, 'Pending ', h('b', { dataset: { count: 'pending' } }, c.pending)),
        h('span', {}, h('i', { class: 'seg-wait' }), 'Expired ', h('b', { dataset: { count: 'expired' } }, c.expired),
          c.cancelled ? ' (' + c.cancelled + ' by cancel)' : ''),
        h('span', {}, 'of ', h('b', { dataset: { count: 'targeted' } }, j.targeted))),
    ];
  }

  function jobActions(j, reload) {
    const act = (action, label, cls) => h('button', {
      class: 'btn small ' + (cls || ''), dataset: { action },
      onclick: async () => {
        try { await post('/api/v1/jobs/' + encodeURIComponent(j.id) + '/' + action); reload(); } catch (e) { toast(e.message, true); }
      },
    }, label);
    return h('div', { class: 'job-actions' },
      j.status === 'running' ? act('pause', 'Pause') : null,
      j.status === 'paused' ? act('resume', 'Resume') : null,
      j.status === 'running' || j.status === 'paused' ? act('cancel', 'Cancel', 'danger') : null);
  }

  function jobsPage(main) {
    const list = h('div', { id: 'jobs-list' });
    async function load() {
      let data;
      try { data = await get('/api/v1/jobs?limit=50'); } catch (e) { toast(e.message, true); return; }
      clear(list);
      if (!data.jobs.length) {
        append(list, h('div', { class: 'card' }, h('div', { class: 'card-body empty' }, 'No job yet. Select agents on the Agents page and run a command on them.')));
      }
      for (const j of data.jobs) {
        append(list, h('div', { class: 'card job', dataset: { job: j.id } },
          h('div', { class: 'card-head' },
            h('a', { href: '#/jobs/' + encodeURIComponent(j.id), class: 'mono' }, j.name),
            ' ', pill(j.status, JOB_STATUS_PILL[j.status]),
            j.reason ? h('span', { class: 'muted' }, ' ' + j.reason) : null,
            h('div', { class: 'grow' }),
            h('span', { class: 'muted nowrap' }, when(j.created_at)),
            jobActions(j, load)),
          h('div', { class: 'card-body' }, jobProgress(j))));
      }
    }
    append(main, [
      h('div', { class: 'page-head' }, h('div', {}, h('h1', {}, 'Jobs'),
        h('div', { class: 'sub' }, 'Commands run on many agents, paced; progress arrives live.'))),
      list,
    ]);
    load();
    const refresh = debounce(load, 300);
    return {
      onEvent(name) { if (['job', 'jobs', 'command', 'commands', 'resync', 'ready'].includes(name)) refresh(); },
      every: 5000,
      tick: load,
    };
  }

  function jobPage(main, id) {
    const head = h('div');
    const progress = h('div', { class: 'card-body', id: 'job-progress' });
    const tbody = h('tbody');
    const more = h('div', { class: 'more' });
    const view = { status: '', shown: 100 };
    const filter = h('div', { class: 'segmented', id: 'result-filter' });
    function filterButtons() {
      clear(filter);
      for (const [value, label] of [['', 'All'], ['succeeded', 'Succeeded'], ['failed', 'Failed'], ['delivered', 'Delivered'], ['pending', 'Pending'], ['expired', 'Expired']]) {
        append(filter, h('button', {
          class: view.status === value ? 'on' : '', dataset: { status: value },
          onclick: () => { view.status = value; view.shown = 100; filterButtons(); loadResults(); },
        }, label));
      }
    }
    async function loadJob() {
      let j;
      try { j = await get('/api/v1/jobs/' + encodeURIComponent(id)); } catch (e) { toast(e.message, true); return; }
      clear(head);
      append(head, [
        h('div', { class: 'crumbs' }, h('a', { href: '#/jobs' }, 'Jobs'), ' / ', j.id),
        h('div', { class: 'page-head' }, h('div', {},
          h('h1', {}, h('span', { class: 'mono' }, j.name), ' ', h('span', { id: 'job-status' }, pill(j.status, JOB_STATUS_PILL[j.status]))),
          h('div', { class: 'sub' }, 'Started ', when(j.created_at),
            j.reason ? ' · ' + j.reason : '',
            j.durations.p50_ms !== null ? ' · p50 ' + j.durations.p50_ms + ' ms, p95 ' + j.durations.p95_ms + ' ms' : '',
            ' · in flight at most ', j.max_in_flight === null ? 'unbounded' : j.max_in_flight)),
          jobActions(j, () => { loadJob(); loadResults(); })),
      ]);
      clear(progress);
      append(progress, jobProgress(j));
    }
    async function loadResults() {
      const q = new URLSearchParams({ limit: String(view.shown) });
      if (view.status) q.set('status', view.status);
      let data;
      try { data = await get('/api/v1/jobs/' + encodeURIComponent(id) + '/results?' + q); } catch (e) { toast(e.message, true); return; }
      clear(tbody);
      if (!data.results.length) append(tbody, h('tr', {}, h('td', { colspan: 4, class: 'empty' }, 'No result matches.')));
      for (const r of data.results) {
        const kind = { succeeded: 'ok', failed: 'bad', delivered: 'info', expired: 'warn' }[r.status];
        append(tbody, h('tr', { dataset: { agent: r.agent_id } },
          h('td', {}, h('a', { href: '#/agents/' + encodeURIComponent(r.agent_id), class: 'mono' }, r.agent_id)),
          h('td', {}, pill(r.held ? 'held' : r.status, kind)),
          h('td', { class: 'num nowrap' }, r.duration_ms === null ? '—' : r.duration_ms + ' ms'),
          h('td', {}, h('pre', { class: 'output' }, outputText(r.output)))));
      }
      clear(more);
      if (data.next) append(more, h('button', { class: 'btn', onclick: () => { view.shown += 100; loadResults(); } }, 'Show more'));
    }
    filterButtons();
    append(main, [
      head,
      h('div', { class: 'card' }, progress),
      h('div', { class: 'card' },
        h('div', { class: 'toolbar' }, h('h2', {}, 'Results'), h('div', { class: 'grow' }), filter),
        h('div', { class: 'table-wrap' }, h('table', { id: 'results-table' },
          h('thead', {}, h('tr', {}, ['Agent', 'Status', 'Duration', 'Output'].map((t) => h('th', {}, t)))), tbody)),
        more),
    ]);
    loadJob();
    loadResults();
    const refresh = debounce(() => { loadJob(); loadResults(); }, 300);
    return {
      onEvent(name, data) {
        if ((name === 'job' && data.id === id) || ['jobs', 'command', 'commands', 'resync', 'ready'].includes(name)) refresh();
      },
      every: 5000,
      tick: () => { loadJob(); loadResults(); },
    };
  }

  // ---- Cluster page --------------------------------------------------------------------------

  function clusterPage(main) {
    const stats = h('div', { class: 'stats' });
    const tbody = h('tbody');
    async function load() {
      let data;
      try { data = await get('/api/v1/pods'); } catch (e) { toast(e.message, true); return; }
      clear(stats);
      const serving = data.pods.filter((p) => p.online_agents > 0).length;
      append(stats, [
        h('div', { class: 'stat' }, h('div', { class: 'label' }, 'Replicas with agents'), h('div', { class: 'value' }, serving)),
        h('div', { class: 'stat' }, h('div', { class: 'label' }, 'Agents online'), h('div', { class: 'value ok' }, data.online)),
        h('div', { class: 'stat' }, h('div', { class: 'label' }, 'Agents offline'), h('div', { class: 'value muted' }, data.offline)),
      ]);
      clear(tbody);
      const max = Math.max(1, data.online);
      for (const p of data.pods) {
        const fill = h('span', { class: 'seg-accent' });
        fill.style.width = (100 * p.online_agents / max) + '%';
        append(tbody, h('tr', { dataset: { pod: p.pod } },
          h('td', {}, h('span', { class: 'mono' }, p.pod), ' ', p.this_replica ? pill('serving this page', 'accent') : null),
          h('td', { class: 'num' }, p.online_agents),
          h('td', {}, h('div', { class: 'share' }, h('div', { class: 'bar' }, fill),
            h('span', { class: 'muted nowrap' }, Math.round(100 * p.online_agents / max) + '%')))));
      }
    }
    append(main, [
      h('div', { class: 'page-head' }, h('div', {}, h('h1', {}, 'Cluster'),
        h('div', { class: 'sub' }, 'Replicas and the agents connected to each. A replica with no agents shows once it holds one, except this one.'))),
      stats,
      h('div', { class: 'card' }, h('div', { class: 'table-wrap' }, h('table', { id: 'pods-table' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Replica (pod)'), h('th', { class: 'num' }, 'Agents online'), h('th', {}, 'Share'))), tbody))),
    ]);
    load();
    const refresh = debounce(load, 300);
    return {
      onEvent(name) { if (['summary', 'agent', 'agents', 'resync'].includes(name)) refresh(); },
      every: 10000,
      tick: load,
    };
  }

  // ---- Credentials and audit pages -------------------------------------------------------
  // Their own section: tokens and enroll secrets (#/credentials), the audit log (#/audit).

  const AUDIT_ACTIONS = [
    'command_created', 'agent_deleted', 'agent_revoked', 'token_minted', 'token_revoked',
    'enroll_secret_created', 'enroll_secret_used', 'enroll_secret_revoked',
    'binary_uploaded', 'binary_deleted', 'rollout_created', 'rollout_cancelled', 'rollout_paused', 'rollout_resumed',
    'sign_in_succeeded', 'sign_in_failed', 'job_created', 'job_paused', 'job_resumed',
    'job_cancelled',
  ];

  // A moment in the future (an expiry), as a date and time.
  function until(iso) {
    return h('span', { title: iso }, iso ? new Date(iso).toLocaleString() : '—');
  }

  function auditActor(e) {
    if (e.actor_kind === 'ui_session') return 'UI session ' + e.actor;
    if (e.actor_kind === 'enroll_secret') return 'enroll secret ' + e.actor;
    if (e.actor_kind === 'anonymous') return 'anonymous';
    return e.actor + (e.actor_jti ? ' (' + e.actor_jti.slice(-8) + ')' : '');
  }

  function auditPage(main) {
    const params = new URLSearchParams(location.hash.split('?')[1] || '');
    const actor = h('input', { type: 'search', id: 'audit-actor', placeholder: 'Actor (token subject, session, secret id)', value: params.get('actor') || '' });
    const action = h('select', { id: 'audit-action' },
      h('option', { value: '' }, 'All actions'),
      AUDIT_ACTIONS.map((a) => h('option', { value: a }, a.replace(/_/g, ' '))));
    action.value = params.get('action') || '';
    const tbody = h('tbody');
    const pager = h('div', { class: 'toolbar' });
    // The cursors of the pages before this one, so that "Newer" can go back.
    const view = { cursors: [], after: null, next: null };
    async function load() {
      const q = new URLSearchParams({ limit: '50' });
      if (actor.value.trim()) q.set('actor', actor.value.trim());
      if (action.value) q.set('action', action.value);
      if (view.after) q.set('after', view.after);
      let data;
      try { data = await get('/api/v1/audit?' + q); } catch (e) { toast(e.message, true); return; }
      view.next = data.next;
      clear(tbody);
      if (!data.entries.length) {
        append(tbody, h('tr', {}, h('td', { colspan: 5, class: 'muted' }, 'No entries.')));
      }
      for (const e of data.entries) {
        append(tbody, h('tr', { dataset: { action: e.action } },
          h('td', { class: 'nowrap', title: e.at }, when(e.at)),
          h('td', { class: 'mono' }, auditActor(e)),
          h('td', {}, pill(e.action.replace(/_/g, ' '), e.action.endsWith('failed') ? 'bad' : 'accent')),
          h('td', { class: 'mono' }, e.target || ''),
          h('td', { class: 'mono muted' }, e.source || '')));
      }
      clear(pager);
      append(pager, [
        h('button', { class: 'btn small', id: 'audit-newer', disabled: !view.cursors.length,
          onclick: () => { view.after = view.cursors.pop() || null; load(); } }, 'Newer'),
        h('button', { class: 'btn small', id: 'audit-older', disabled: !view.next,
          onclick: () => { view.cursors.push(view.after); view.after = view.next; load(); } }, 'Older'),
      ]);
    }
    function refilter() { view.cursors = []; view.after = null; load(); }
    actor.addEventListener('input', debounce(refilter, 250));
    action.addEventListener('change', refilter);
    append(main, [
      h('div', { class: 'page-head' }, h('div', {}, h('h1', {}, 'Audit log'),
        h('div', { class: 'sub' }, 'Every change made through the API or this console: who, what, from where and when. Newest first.'))),
      h('div', { class: 'card' },
        h('div', { class: 'toolbar' }, actor, action),
        h('div', { class: 'table-wrap' }, h('table', { id: 'audit-table' },
          h('thead', {}, h('tr', {}, h('th', {}, 'Time'), h('th', {}, 'Actor'), h('th', {}, 'Action'), h('th', {}, 'Target'), h('th', {}, 'Source'))),
          tbody)),
        pager),
    ]);
    load();
    return { every: 15000, tick: () => { if (!view.after) load(); } };
  }

  function credentialsPage(main) {
    const tokens = h('tbody');
    const secrets = h('tbody');
    const shown = h('div', { id: 'enroll-secret-shown' });
    async function loadTokens() {
      let data;
      try { data = await get('/api/v1/tokens?limit=1000'); } catch (e) { toast(e.message, true); return; }
      clear(tokens);
      if (!data.tokens.length) append(tokens, h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'No live tokens minted through the API.')));
      for (const t of data.tokens) {
        append(tokens, h('tr', { dataset: { token: t.id } },
          h('td', {}, t.name || h('span', { class: 'muted' }, '—')),
          h('td', { class: 'mono' }, t.client_id),
          h('td', {}, pill(t.role, t.role === 'admin' ? 'accent' : '')),
          h('td', { class: 'nowrap' }, until(t.expires_at)),
          h('td', { class: 'nowrap' }, t.last_used_at ? ago(t.last_used_at) : h('span', { class: 'muted' }, 'never')),
          h('td', {}, h('button', { class: 'btn small danger', onclick: async () => {
            if (!confirm('Revoke this token? Anything using it is refused from now on.')) return;
            try { await del('/api/v1/tokens/' + encodeURIComponent(t.id)); toast('Token revoked'); loadTokens(); } catch (e) { toast(e.message, true); }
          } }, 'Revoke'))));
      }
    }
    async function loadSecrets() {
      let data;
      try { data = await get('/api/v1/enroll-secrets?limit=1000'); } catch (e) { toast(e.message, true); return; }
      clear(secrets);
      if (!data.enroll_secrets.length) append(secrets, h('tr', {}, h('td', { colspan: 5, class: 'muted' }, 'No enroll secrets yet.')));
      for (const s of data.enroll_secrets) {
        const state = s.revoked_at ? pill('revoked', 'bad') : pill('active', 'ok');
        append(secrets, h('tr', { dataset: { secret: s.id } },
          h('td', {}, s.name, ' ', state),
          h('td', {}, s.labels.join(', ')),
          h('td', { class: 'num' }, s.use_count + (s.max_uses ? ' / ' + s.max_uses : '')),
          h('td', { class: 'nowrap' }, s.expires_at ? until(s.expires_at) : h('span', { class: 'muted' }, 'never')),
          h('td', {}, s.revoked_at ? null : h('button', { class: 'btn small danger', onclick: async () => {
            if (!confirm('Revoke this enroll secret? Enrolled agents keep their tokens.')) return;
            try { await del('/api/v1/enroll-secrets/' + encodeURIComponent(s.id)); toast('Enroll secret revoked'); loadSecrets(); } catch (e) { toast(e.message, true); }
          } }, 'Revoke'))));
      }
    }
    const name = h('input', { type: 'text', id: 'enroll-name', placeholder: 'e.g. rack 12', required: true, maxlength: 100 });
    const labels = h('input', { type: 'text', id: 'enroll-labels', placeholder: 'labels, comma-separated (optional)' });
    const maxUses = h('input', { type: 'number', id: 'enroll-max-uses', min: 1, placeholder: 'uses: unlimited' });
    const form = h('form', { class: 'toolbar', id: 'enroll-form', onsubmit: async (ev) => {
      ev.preventDefault();
      const body = { name: name.value.trim() };
      const ls = labels.value.split(',').map((l) => l.trim()).filter(Boolean);
      if (ls.length) body.labels = ls;
      if (maxUses.value) body.max_uses = Number(maxUses.value);
      try {
        const created = await post('/api/v1/enroll-secrets', body);
        clear(shown);
        append(shown, h('div', { class: 'card' }, h('div', { class: 'toolbar' },
          h('strong', {}, 'Copy the secret now; it is not shown again: '),
          h('code', { class: 'mono', id: 'enroll-secret-value' }, created.secret))));
        name.value = ''; labels.value = ''; maxUses.value = '';
        loadSecrets();
      } catch (e) { toast(e.message, true); }
    } }, name, labels, maxUses, h('button', { class: 'btn primary', type: 'submit' }, 'Create enroll secret'));
    append(main, [
      h('div', { class: 'page-head' }, h('div', {}, h('h1', {}, 'Credentials'),
        h('div', { class: 'sub' }, 'Enroll secrets let agents get their own token (POST /api/v1/enroll); tokens minted through the API can be revoked one by one.'))),
      h('h2', {}, 'Enroll secrets'),
      h('div', { class: 'card' }, form, shown,
        h('div', { class: 'table-wrap' }, h('table', { id: 'enroll-secrets-table' },
          h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'Labels'), h('th', { class: 'num' }, 'Used'), h('th', {}, 'Expires'), h('th', {}, ''))),
          secrets))),
      h('h2', {}, 'Tokens'),
      h('div', { class: 'card' }, h('div', { class: 'table-wrap' }, h('table', { id: 'tokens-table' },
        h('thead', {}, h('tr', {}, h('th', {}, 'Name'), h('th', {}, 'Client id'), h('th', {}, 'Role'), h('th', {}, 'Expires'), h('th', {}, 'Last used'), h('th', {}, ''))),
        tokens))),
    ]);
    loadTokens();
    loadSecrets();
    return { every: 30000, tick: () => { loadTokens(); loadSecrets(); } };
  }

  // Pages of this section, for the router.
  const CREDENTIAL_PAGES = {
    '#/audit': ['Audit', auditPage],
    '#/credentials': ['Credentials', credentialsPage],
  };

  // ---- Router ----------------------------------------------------------------------------------

  let current = null;
  let timer = null;

  live.listeners.add((name, data) => { if (current && current.onEvent) current.onEvent(name, data); });

  async function route() {
    clearInterval(timer);
    window.scrollTo(0, 0);
    current = null;
    const hash = location.hash || '#/agents';
    const path = hash.split('?')[0];
    if (!session.info) {
      try { session.info = await get('/api/v1/session'); } catch (_) { session.info = null; }
      session.signedIn = !!(session.info && session.info.signed_in);
    }
    if (path === '#/login' || !session.signedIn) {
      if (session.signedIn) { location.hash = '#/agents'; return; }
      if (path !== '#/login') { location.hash = '#/login'; return; }
      loginPage();
      return;
    }
    live.start();
    let page;
    const agent = path.match(/^#\/agents\/(.+)$/);
    const job = path.match(/^#\/jobs\/(.+)$/);
    if (agent) page = agentPage(shell('#/agents'), decodeURIComponent(agent[1]));
    else if (job) page = jobPage(shell('#/jobs'), decodeURIComponent(job[1]));
    else if (path === '#/jobs') page = jobsPage(shell('#/jobs'));
    else if (path === '#/binaries') page = binariesPage(shell('#/binaries'));
    else if (path === '#/cluster') page = clusterPage(shell('#/cluster'));
    else if (CREDENTIAL_PAGES[path]) page = CREDENTIAL_PAGES[path][1](shell(path));
    else page = agentsPage(shell('#/agents'));
    current = page;
    document.title = 'agent-server · ' + ({ '#/binaries': 'Binaries', '#/cluster': 'Cluster', '#/jobs': 'Jobs' }[path] || (CREDENTIAL_PAGES[path] || [])[0] || (job ? 'Job' : agent ? decodeURIComponent(agent[1]) : 'Agents'));
    if (page && page.every) timer = setInterval(() => page.tick(), page.every);
  }

  window.addEventListener('hashchange', () => {
    if (location.hash === '#/login') session.info = null;
    route();
  });
  route();
})();
