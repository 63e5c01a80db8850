// The machine list: status filter, name search, pagination, and live status
// from the tenant's event stream (GET /events over SSE), without reloading.

import { api, q, stream } from './api.js';
import { fmtMib, fmtTime, h, replace, STATUSES, statusBadge, toast } from './dom.js';

/** The filter and page survive navigation within the tab. */
const saved = () => JSON.parse(sessionStorage.getItem('hyperfleet.list') ?? '{}');
const save = (s) => sessionStorage.setItem('hyperfleet.list', JSON.stringify(s));

/** With a name search the list is filtered here, over at most this many. */
const SEARCH_CAP = 10000;

export function listView(main) {
  const st = { status: '', search: '', limit: 25, offset: 0, ...saved() };
  const ctl = new AbortController();
  let refreshTimer = null;
  let rows = new Map(); // machine id -> its <tr>

  const status = h('select', { id: 'f-status', 'aria-label': 'Status' },
    h('option', { value: '' }, 'all statuses'),
    STATUSES.map((s) => h('option', { value: s, selected: s === st.status }, s)));
  const search = h('input', { id: 'f-search', type: 'search', placeholder: 'Search names or ids',
    value: st.search, 'aria-label': 'Search' });
  const limit = h('select', { id: 'f-limit', 'aria-label': 'Per page' },
    [10, 25, 50, 100].map((n) => h('option', { value: n, selected: n === st.limit }, `${n} a page`)));
  const live = h('span', { class: 'live off', id: 'live', title: 'live updates' }, 'connecting');
  const tbody = h('tbody', { id: 'machines' });
  const pager = h('div', { class: 'row pager' });
  const table = h('table', { class: 'list' },
    h('thead', {}, h('tr', {}, ['Name', 'Status', 'Desired', 'VMM', 'vCPU', 'Memory', 'Created']
      .map((t) => h('th', {}, t)))), tbody);

  replace(main,
    h('div', { class: 'row between' }, h('h1', {}, 'Machines'),
      h('div', { class: 'row' }, live, h('a', { class: 'button', href: '#/new', id: 'new-machine' }, 'Create machine'))),
    h('div', { class: 'row filters' }, status, search, limit),
    table, pager);

  const changed = () => {
    st.status = status.value;
    st.search = search.value.trim();
    st.limit = Number(limit.value);
    st.offset = 0;
    save(st);
    refresh();
  };
  status.addEventListener('change', changed);
  limit.addEventListener('change', changed);
  let typing = null;
  search.addEventListener('input', () => { clearTimeout(typing); typing = setTimeout(changed, 250); });

  async function load() {
    if (!st.search) {
      const page = await api('GET', `/machines${q({ status: st.status, limit: st.limit, offset: st.offset })}`,
        undefined, { signal: ctl.signal });
      return page;
    }
    const needle = st.search.toLowerCase();
    const all = [];
    for (let offset = 0; offset < SEARCH_CAP; offset += 1000) {
      const page = await api('GET', `/machines${q({ status: st.status, limit: 1000, offset })}`,
        undefined, { signal: ctl.signal });
      all.push(...page.machines);
      if (all.length >= page.total || page.machines.length === 0) break;
    }
    const hits = all.filter((m) => m.name.toLowerCase().includes(needle) || m.id.includes(needle));
    return { machines: hits.slice(st.offset, st.offset + st.limit), total: hits.length };
  }

  function row(m) {
    return h('tr', { dataset: { id: m.id, name: m.name } },
      h('td', {}, h('a', { href: `#/machines/${m.id}`, class: 'mname' }, m.name), h('div', { class: 'muted mono small' }, m.id)),
      h('td', { class: 'status' }, statusBadge(m.status)),
      h('td', { class: 'desired' }, m.desired_status),
      h('td', {}, m.vmm), h('td', {}, m.vcpu_count), h('td', {}, fmtMib(m.mem_size_mib)),
      h('td', {}, fmtTime(m.created_at)));
  }

  async function refresh() {
    clearTimeout(refreshTimer);
    refreshTimer = null;
    try {
      const page = await load();
      if (page.machines.length === 0 && st.offset > 0 && page.total > 0) {
        st.offset = Math.max(0, Math.floor((page.total - 1) / st.limit) * st.limit);
        save(st);
        return refresh();
      }
      rows = new Map(page.machines.map((m) => [m.id, row(m)]));
      replace(tbody, page.machines.length ? [...rows.values()]
        : h('tr', {}, h('td', { colspan: 7, class: 'muted empty' },
          st.status || st.search ? 'No machine matches.' : 'No machines yet.')));
      const last = Math.min(st.offset + st.limit, page.total);
      const prev = h('button', { type: 'button', class: 'secondary', id: 'prev', disabled: st.offset === 0,
        onclick: () => { st.offset = Math.max(0, st.offset - st.limit); save(st); refresh(); } }, '← Previous');
      const next = h('button', { type: 'button', class: 'secondary', id: 'next', disabled: last >= page.total,
        onclick: () => { st.offset += st.limit; save(st); refresh(); } }, 'Next →');
      replace(pager, prev, h('span', { class: 'muted', id: 'range' },
        page.total ? `${st.offset + 1}–${last} of ${page.total}` : '0 of 0'), next);
    } catch (e) {
      if (e.name !== 'AbortError') toast(`Listing machines: ${e.message}`, 'error');
    }
  }

  const soon = () => { if (!refreshTimer) refreshTimer = setTimeout(refresh, 400); };

  function onEvent(ev) {
    let e;
    try { e = JSON.parse(ev.data); } catch { return; }
    const tr = rows.get(e.machine_id);
    if (ev.event === 'transition' && e.to_status && tr) {
      // In place at once; the debounced refresh brings the other fields.
      replace(tr.querySelector('td.status'), statusBadge(e.to_status));
      if (st.status && st.status !== e.to_status) soon();
    }
    if (tr || ev.event === 'created' || ev.event === 'deleted' || st.status) soon();
  }

  // One stream for the whole tenant; on its end (server restart, lagged)
  // reconnect and re-read the page, since events may have been missed.
  (async () => {
    let delay = 500;
    while (!ctl.signal.aborted) {
      try {
        await stream('/events', {
          signal: ctl.signal,
          onOpen: () => { live.className = 'live on'; live.textContent = 'live'; delay = 500; refresh(); },
          onEvent,
        });
      } catch (e) {
        if (ctl.signal.aborted) return;
        if (e.status === 401) return;
      }
      if (ctl.signal.aborted) return;
      live.className = 'live off';
      live.textContent = 'reconnecting';
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10000);
    }
  })();

  return () => { ctl.abort(); clearTimeout(refreshTimer); clearTimeout(typing); };
}
