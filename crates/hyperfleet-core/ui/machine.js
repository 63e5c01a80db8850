// A machine's page: its spec, live status and action buttons (each asks for
// confirmation), the events timeline with step timings (the machine's SSE
// stream: history, then live), the console log (followed), and a terminal
// over the exec WebSocket.

import { api, ApiError, mpath, stream, textStream } from './api.js';
import { allowed, confirmAction, fmtMib, fmtMs, fmtTime, h, replace, statusBadge, toast } from './dom.js';
import { openTerminal } from './term.js';

const ACTIONS = [
  ['start', 'Start', 'Start machine {name}?'],
  ['stop', 'Stop', 'Stop machine {name}? The guest is asked to shut down.'],
  ['restart', 'Restart', 'Restart machine {name}?'],
  ['pause', 'Pause', 'Pause machine {name}? Its vCPUs stop; memory stays.'],
  ['suspend', 'Suspend', 'Suspend machine {name}? Its memory is saved to disk and the VMM stops.'],
  ['resume', 'Resume', 'Resume machine {name}?'],
  ['kill', 'Kill', 'Kill machine {name}? The VMM is killed without a graceful shutdown.'],
];

const LOG_TAIL = 500;
const LOG_MAX_CHARS = 400000;

export function machineView(main, ref) {
  const ctl = new AbortController();
  let m = null;
  let term = null;
  let logCtl = null;

  const title = h('h1', { id: 'm-name' }, ref);
  const badge = h('span', { id: 'm-status' });
  const buttons = h('div', { class: 'row actions', id: 'actions' });
  const spec = h('dl', { class: 'spec', id: 'spec' });
  const timeline = h('tbody', { id: 'timeline' });
  const log = h('pre', { class: 'log', id: 'console-log' });
  const follow = h('input', { type: 'checkbox', id: 'log-follow', checked: true });
  const termBox = h('div', { class: 'term', id: 'terminal', hidden: true });
  const command = h('input', { id: 'term-cmd', value: '/bin/sh -i', 'aria-label': 'Command' });
  const connect = h('button', { type: 'button', id: 'term-connect' }, 'Open terminal');
  const termNote = h('p', { class: 'muted small', id: 'term-note' },
    'Runs the command in the guest over the exec WebSocket. There is no pseudo-terminal: the line is edited here and sent on Enter; Ctrl-C kills, Ctrl-D ends input.');

  replace(main,
    h('p', {}, h('a', { href: '#/' }, '← Machines')),
    h('div', { class: 'row between' }, h('div', { class: 'row' }, title, badge), buttons),
    h('p', { class: 'error', id: 'm-error', hidden: true }),
    h('section', { class: 'card' }, h('h2', {}, 'Spec'), spec),
    h('section', { class: 'card' }, h('h2', {}, 'Terminal'),
      h('div', { class: 'row' }, command, connect), termNote, termBox),
    h('section', { class: 'card' }, h('h2', {}, 'Events'),
      h('table', { class: 'events' }, h('thead', {}, h('tr', {},
        ['Time', 'Event', 'Status', 'Steps', 'Message'].map((t) => h('th', {}, t)))), timeline)),
    h('section', { class: 'card' },
      h('div', { class: 'row between' }, h('h2', {}, 'Console log'),
        h('label', { class: 'check' }, follow, ' follow')), log));

  function render() {
    title.textContent = m.name;
    replace(badge, statusBadge(m.status));
    const err = document.getElementById('m-error');
    err.hidden = !(m.status === 'failed' && m.error_message);
    err.textContent = m.error_message ?? '';
    replace(buttons,
      ACTIONS.map(([a, label, ask]) => h('button', {
        type: 'button', class: 'secondary', id: `act-${a}`, disabled: !allowed(m.status, a),
        onclick: () => act(a, ask.replace('{name}', m.name)),
      }, label)),
      h('button', { type: 'button', class: 'danger', id: 'act-delete', disabled: !allowed(m.status, 'delete'),
        onclick: del }, 'Delete'));
    const dd = (k, v) => [h('dt', {}, k), h('dd', {}, v)];
    const kv = (o) => Object.keys(o ?? {}).length
      ? h('ul', { class: 'kv' }, Object.entries(o).map(([k, v]) => h('li', {}, h('code', {}, k), ' = ', h('code', {}, v))))
      : '—';
    replace(spec,
      dd('Id', h('code', {}, m.id)),
      dd('Status', `${m.status} (desired: ${m.desired_status}, generation ${m.generation})`),
      dd('VMM', m.vmm), dd('vCPUs', m.vcpu_count), dd('Memory', fmtMib(m.mem_size_mib)),
      dd('Image', m.image ?? '—'),
      ...(m.process ? [
        dd('Main process', h('code', {}, m.process.argv.join(' '))),
        dd('Restart', `${m.restart_policy.policy}${m.restart_policy.max_retries != null ? ` (at most ${m.restart_policy.max_retries})` : ''}, ${m.restart_count} so far`),
      ] : []),
      ...(m.status === 'stopped' && m.exit_reason ? [dd('Exit', m.exit_reason)] : []),
      dd('Network', m.network ? `${m.network.ip ?? 'no address yet'}${m.network.egress ? '' : ', no egress'}` : '—'),
      dd('Exposed ports', m.exposed_ports?.length ? m.exposed_ports.join(', ') + (m.public ? ' (public)' : '') : '—'),
      dd('URLs', Object.keys(m.urls ?? {}).length
        ? h('ul', { class: 'kv' }, Object.entries(m.urls).map(([p, u]) => h('li', {}, `${p}: `, h('code', {}, u))))
        : '—'),
      dd('Environment', kv(m.env)), dd('Metadata', kv(m.metadata)),
      dd('Created', fmtTime(m.created_at)), dd('Started', fmtTime(m.started_at)),
      dd('Updated', fmtTime(m.updated_at)));
  }

  async function reload() {
    try {
      m = await api('GET', mpath(ref), undefined, { signal: ctl.signal });
      ref = m.id;
      render();
    } catch (e) {
      if (e.name === 'AbortError') return;
      if (e instanceof ApiError && e.status === 404) {
        replace(main, h('p', {}, `Machine ${ref} does not exist (any more). `, h('a', { href: '#/' }, 'Machines')));
        ctl.abort();
        return;
      }
      toast(e.message, 'error');
    }
  }

  async function act(action, question) {
    if (!(await confirmAction(question, action[0].toUpperCase() + action.slice(1)))) return;
    try {
      const r = await api('POST', `${mpath(m.id)}/${action}?wait=false`);
      if (r) { m = r; render(); }
      toast(`${action}: requested`);
    } catch (e) {
      toast(`${action}: ${e.message}`, 'error');
    }
  }

  async function del() {
    const running = !['pending', 'stopped', 'suspended', 'failed'].includes(m.status);
    const q = running
      ? `Delete machine ${m.name}? It is ${m.status}: it will be stopped first, and its disk is removed.`
      : `Delete machine ${m.name} and its disk?`;
    if (!(await confirmAction(q, 'Delete'))) return;
    try {
      await api('DELETE', `${mpath(m.id)}?wait=false${running ? '&force=true' : ''}`);
      toast(`Deleting ${m.name}`);
      location.hash = '#/';
    } catch (e) {
      toast(`delete: ${e.message}`, 'error');
    }
  }

  function eventRow(e) {
    const status = e.kind === 'transition' ? `${e.from_status ?? '—'} → ${e.to_status}`
      : e.kind === 'created' ? (e.to_status ?? '')
      : '';
    const total = e.steps?.reduce((a, s) => a + s.duration_ms, 0) ?? 0;
    const steps = (e.steps ?? []).map((s) => h('div', { class: `step ${s.outcome === 'ok' ? '' : 'failed'}` },
      h('span', { class: 'sname' }, s.step), ' ',
      h('span', { class: 'bar' }, h('meter', { min: 0, max: total || 1, value: s.duration_ms })), ' ',
      h('span', { class: 'mono' }, fmtMs(s.duration_ms)),
      s.detail ? h('span', { class: 'muted' }, ` ${s.detail}`) : null));
    return h('tr', { dataset: { kind: e.kind, id: e.id } },
      h('td', { class: 'nowrap' }, fmtTime(e.at)),
      h('td', {}, e.kind, e.operation_id ? h('div', { class: 'muted mono small' }, e.operation_id) : null),
      h('td', { class: 'nowrap' }, status),
      h('td', {}, steps),
      h('td', {}, e.message ?? ''));
  }

  async function watchEvents() {
    let last = null;
    let delay = 500;
    while (!ctl.signal.aborted) {
      try {
        await stream(`${mpath(ref)}/events`, {
          signal: ctl.signal, lastEventId: last,
          onOpen: () => { delay = 500; },
          onEvent: (ev) => {
            if (ev.event === 'lagged') return;
            let e;
            try { e = JSON.parse(ev.data); } catch { return; }
            last = ev.id ?? last;
            timeline.prepend(eventRow(e));
            if (e.kind === 'deleted') {
              toast(`${m?.name ?? ref} was deleted`);
              ctl.abort();
              location.hash = '#/';
              return;
            }
            if (m && e.kind === 'transition' && e.to_status) {
              m.status = e.to_status;
              render();
            }
            if (e.kind !== 'steps') reload();
          },
        });
      } catch (e) {
        if (ctl.signal.aborted) return;
        if (e instanceof ApiError && (e.status === 404 || e.status === 401)) return;
      }
      if (ctl.signal.aborted) return;
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10000);
    }
  }

  function appendLog(text) {
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
    log.append(text);
    if (log.textContent.length > LOG_MAX_CHARS) {
      log.textContent = log.textContent.slice(-LOG_MAX_CHARS / 2);
    }
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  async function watchLog() {
    logCtl?.abort();
    logCtl = new AbortController();
    const signal = AbortSignal.any([ctl.signal, logCtl.signal]);
    log.textContent = '';
    try {
      await textStream(`${mpath(ref)}/logs?tail=${LOG_TAIL}${follow.checked ? '&follow=true' : ''}`,
        { signal, onText: appendLog });
    } catch (e) {
      if (e.name !== 'AbortError' && !signal.aborted) appendLog(`\n[console log: ${e.message}]\n`);
    }
  }
  follow.addEventListener('change', watchLog);

  let termLive = false;
  connect.addEventListener('click', () => {
    if (term && termLive) {
      term.close();
      term = null;
      termLive = false;
      connect.textContent = 'Open terminal';
      return;
    }
    const argv = command.value.trim().split(/\s+/).filter(Boolean);
    if (!argv.length) return;
    term?.close();
    replace(termBox);
    termBox.hidden = false;
    termLive = true;
    term = openTerminal(termBox, m?.id ?? ref, argv, {
      onExit: () => { termLive = false; connect.textContent = 'Open terminal'; },
    });
    connect.textContent = 'Close terminal';
  });

  (async () => {
    await reload();
    if (ctl.signal.aborted) return;
    watchEvents();
    watchLog();
  })();

  return () => {
    ctl.abort();
    logCtl?.abort();
    term?.close();
  };
}
