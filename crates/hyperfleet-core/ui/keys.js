// The keys page (admin keys only): the tenant's keys (every tenant's, for
// operator admins), creating one (its secret is shown once) and revoking.

import { api } from './api.js';
import { confirmAction, fmtTime, h, replace, toast } from './dom.js';

const SCOPES = ['read', 'write', 'exec', 'admin'];

export function keysView(main) {
  const ctl = new AbortController();
  const tbody = h('tbody', { id: 'keys' });
  const secret = h('div', { id: 'new-key', class: 'secret', hidden: true });
  const name = h('input', { id: 'k-name', required: true, placeholder: 'ci', maxlength: 63 });
  const tenant = h('input', { id: 'k-tenant', placeholder: 'this key\'s tenant' });
  const expires = h('input', { id: 'k-expires', type: 'number', min: 1, placeholder: 'never' });
  const scopes = SCOPES.map((s) => h('input', { type: 'checkbox', id: `k-scope-${s}`, value: s, checked: s === 'read' }));
  const submit = h('button', { type: 'submit', id: 'k-submit' }, 'Create key');
  const form = h('form', { class: 'card', id: 'key-form' },
    h('h2', {}, 'New key'),
    h('div', { class: 'grid' },
      h('div', { class: 'field' }, h('label', { for: 'k-name' }, 'Name'), name),
      h('div', { class: 'field' }, h('label', { for: 'k-tenant' }, 'Tenant'), tenant,
        h('small', { class: 'muted' }, 'optional; operator admins only')),
      h('div', { class: 'field' }, h('label', { for: 'k-expires' }, 'Expires in (seconds)'), expires)),
    h('div', { class: 'row' }, scopes.map((c) => h('label', { class: 'check' }, c, ` ${c.value}`))),
    h('div', { class: 'row end' }, submit), secret);

  replace(main, h('h1', {}, 'API keys'),
    h('table', { class: 'list' }, h('thead', {}, h('tr', {},
      ['Name', 'Prefix', 'Tenant', 'Scopes', 'Created', 'Expires', 'Revoked', ''].map((t) => h('th', {}, t)))), tbody),
    form);

  async function refresh() {
    try {
      const { keys } = await api('GET', '/keys', undefined, { signal: ctl.signal });
      replace(tbody, keys.map((k) => h('tr', { dataset: { id: k.id }, class: k.revoked_at ? 'revoked' : '' },
        h('td', {}, k.name, h('div', { class: 'muted mono small' }, k.id)),
        h('td', { class: 'mono' }, `${k.prefix}…`), h('td', {}, k.tenant), h('td', {}, k.scopes.join(', ')),
        h('td', {}, fmtTime(k.created_at)), h('td', {}, fmtTime(k.expires_at)), h('td', {}, fmtTime(k.revoked_at)),
        h('td', {}, k.revoked_at ? '' : h('button', { type: 'button', class: 'danger small', onclick: () => revoke(k) }, 'Revoke')))));
    } catch (e) {
      if (e.name !== 'AbortError') toast(`Listing keys: ${e.message}`, 'error');
    }
  }

  async function revoke(k) {
    if (!(await confirmAction(`Revoke key ${k.name} (${k.prefix}…)? Requests with it are refused at once.`, 'Revoke'))) return;
    try {
      await api('DELETE', `/keys/${encodeURIComponent(k.id)}`);
      toast(`Revoked ${k.name}`);
      refresh();
    } catch (e) {
      toast(`Revoke: ${e.message}`, 'error');
    }
  }

  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const body = { name: name.value.trim(), scopes: scopes.filter((c) => c.checked).map((c) => c.value) };
    if (tenant.value.trim()) body.tenant = tenant.value.trim();
    if (expires.value) body.expires_in_seconds = Number(expires.value);
    submit.disabled = true;
    try {
      const k = await api('POST', '/keys', body);
      const value = h('code', { id: 'new-key-value' }, k.key);
      replace(secret, h('p', {}, `Key ${k.name} created. Copy it now: it is not shown again.`), value, ' ',
        h('button', { type: 'button', class: 'secondary small', onclick: async () => {
          try { await navigator.clipboard.writeText(k.key); toast('Copied'); } catch { toast('Select and copy it by hand', 'error'); }
        } }, 'Copy'));
      secret.hidden = false;
      form.reset();
      scopes.forEach((c) => { c.checked = c.value === 'read'; });
      refresh();
    } catch (err) {
      toast(`Create key: ${err.message}`, 'error');
    }
    submit.disabled = false;
  });

  refresh();
  return () => ctl.abort();
}
