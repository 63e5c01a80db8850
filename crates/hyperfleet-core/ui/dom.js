// Small DOM helpers: an element builder (no innerHTML anywhere: every value
// from the API lands in the page as text), toasts, the confirmation dialog,
// and formatting.

/**
 * h('a', {href: '#/', class: 'x', onclick: f}, 'text', child, …). Children
 * that are strings become text nodes; null/false are skipped.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k in el && typeof v !== 'string') el[k] = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function toast(message, kind = 'info') {
  const box = document.getElementById('toasts');
  const t = h('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, message);
  box.append(t);
  setTimeout(() => t.remove(), kind === 'error' ? 8000 : 4000);
}

/** Asks the user; resolves true when they confirm. */
export function confirmAction(message, okLabel = 'Confirm') {
  const dlg = document.getElementById('confirm');
  document.getElementById('confirm-text').textContent = message;
  const ok = document.getElementById('confirm-ok');
  const cancel = document.getElementById('confirm-cancel');
  ok.textContent = okLabel;
  return new Promise((resolve) => {
    const done = (v) => {
      ok.removeEventListener('click', yes);
      cancel.removeEventListener('click', no);
      dlg.removeEventListener('cancel', no);
      if (dlg.open) dlg.close();
      resolve(v);
    };
    const yes = () => done(true);
    const no = () => done(false);
    ok.addEventListener('click', yes);
    cancel.addEventListener('click', no);
    dlg.addEventListener('cancel', no);
    dlg.showModal();
    ok.focus();
  });
}

export const statusBadge = (s) => h('span', { class: `badge s-${s}`, dataset: { status: s } }, s);

export function fmtTime(t) {
  if (!t) return '—';
  const d = new Date(t);
  return Number.isNaN(d.getTime()) ? t : d.toLocaleString();
}

export function fmtMs(ms) {
  if (ms === undefined || ms === null) return '';
  if (ms < 1000) return `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
  return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
}

export function fmtMib(m) {
  return m >= 1024 ? `${(m / 1024).toFixed(m % 1024 ? 1 : 0)} GiB` : `${m} MiB`;
}

export const STATUSES = ['pending', 'starting', 'running', 'paused', 'stopping', 'stopped',
  'suspending', 'suspended', 'failed', 'deleting'];

/** The actions each status accepts (docs/api.md "The state table"). */
const TABLE = {
  pending: ['start', 'delete'],
  starting: ['start', 'stop', 'restart', 'kill'],
  running: ['start', 'stop', 'restart', 'pause', 'resume', 'kill', 'suspend'],
  paused: ['stop', 'restart', 'pause', 'resume', 'kill', 'suspend'],
  stopping: ['start', 'stop', 'kill'],
  stopped: ['start', 'stop', 'restart', 'kill', 'delete'],
  suspending: ['stop', 'resume', 'kill', 'suspend'],
  suspended: ['start', 'stop', 'resume', 'kill', 'suspend', 'delete'],
  failed: ['start', 'stop', 'restart', 'kill', 'delete'],
  deleting: ['delete'],
};

/** Whether `action` is worth offering in `status` (a no-op is not). */
export function allowed(status, action) {
  if (action === 'delete') return status !== 'deleting';
  const ok = TABLE[status]?.includes(action) ?? false;
  const noop = { start: ['running', 'starting'], stop: ['stopped', 'stopping'],
    pause: ['paused'], resume: ['running'], suspend: ['suspended', 'suspending'] };
  return ok && !(noop[action] ?? []).includes(status);
}
