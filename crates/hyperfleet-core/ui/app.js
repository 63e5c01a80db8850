// The console's shell: sign-in, the header, the hash router (#/, #/new,
// #/machines/<id>, #/keys) and the create form. Each view returns a cleanup
// function that the router calls when leaving it (streams, sockets, timers).

import { api, ApiError, clearKey, getKey, onUnauthorized, setKey } from './api.js';
import { h, replace, toast } from './dom.js';
import { listView } from './list.js';
import { machineView } from './machine.js';
import { keysView } from './keys.js';

const main = document.getElementById('main');
const session = { admin: false };
let cleanup = null;
/** While the sign-in form checks a key, a 401 is its answer, not a sign-out. */
let signingIn = false;

function signInView() {
  const input = h('input', { type: 'password', id: 'api-key', name: 'api-key', autocomplete: 'off',
    placeholder: 'hf_…', required: true, spellcheck: 'false' });
  const error = h('p', { class: 'error', id: 'signin-error', hidden: true });
  const button = h('button', { type: 'submit', id: 'signin' }, 'Sign in');
  const form = h('form', { class: 'card narrow', id: 'signin-form' },
    h('h1', {}, 'Sign in'),
    h('p', { class: 'muted' }, 'Paste an API key. It is kept in this tab only (sessionStorage) and sent to this server in a header.'),
    h('label', { for: 'api-key' }, 'API key'), input, error,
    h('div', { class: 'row end' }, button));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    button.disabled = true;
    error.hidden = true;
    setKey(input.value.trim());
    signingIn = true;
    try {
      await probe();
      signingIn = false;
      route();
    } catch (err) {
      signingIn = false;
      clearKey();
      error.textContent = err instanceof ApiError ? err.message : `Cannot reach the server: ${err.message}`;
      error.hidden = false;
      button.disabled = false;
    }
  });
  replace(main, form);
  input.focus();
  return null;
}

/** Checks the key and learns what it may do (the Keys page is for admins). */
async function probe() {
  await api('GET', '/machines?limit=1');
  try {
    await api('GET', '/keys');
    session.admin = true;
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 403)) throw e;
    session.admin = false;
  }
  sessionStorage.setItem('hyperfleet.admin', session.admin ? '1' : '0');
}

function createView() {
  const field = (label, input, hint) => h('div', { class: 'field' },
    h('label', { for: input.id }, label), input, hint ? h('small', { class: 'muted' }, hint) : null);
  const name = h('input', { id: 'c-name', name: 'name', placeholder: 'web-1', pattern: '[a-z][a-z0-9\\-]*', maxlength: 63 });
  const vcpu = h('input', { id: 'c-vcpu', name: 'vcpu', type: 'number', min: 1, max: 32, value: 1 });
  const mem = h('input', { id: 'c-mem', name: 'mem', type: 'number', min: 128, max: 65536, step: 64, value: 256 });
  const vmm = h('select', { id: 'c-vmm', name: 'vmm' },
    h('option', { value: '' }, 'server default'), h('option', { value: 'qemu' }, 'qemu'),
    h('option', { value: 'firecracker' }, 'firecracker'), h('option', { value: 'stub' }, 'stub'));
  const ports = h('input', { id: 'c-ports', name: 'ports', placeholder: '8080, 3000' });
  const pub = h('input', { id: 'c-public', type: 'checkbox' });
  const egress = h('input', { id: 'c-egress', type: 'checkbox', checked: true });
  const env = h('textarea', { id: 'c-env', rows: 3, placeholder: 'KEY=value' });
  const meta = h('textarea', { id: 'c-meta', rows: 2, placeholder: 'team=web' });
  const start = h('input', { id: 'c-start', type: 'checkbox', checked: true });
  const submit = h('button', { type: 'submit', id: 'c-submit' }, 'Create');
  const pairs = (text, what) => {
    const out = {};
    for (const line of text.split('\n').map((l) => l.trim()).filter(Boolean)) {
      const i = line.indexOf('=');
      if (i <= 0) throw new Error(`${what}: expected NAME=value, got '${line}'`);
      out[line.slice(0, i).trim()] = line.slice(i + 1);
    }
    return out;
  };
  const form = h('form', { class: 'card', id: 'create-form' },
    h('h1', {}, 'Create a machine'),
    h('div', { class: 'grid' },
      field('Name', name, 'optional; a DNS label'),
      field('vCPUs', vcpu), field('Memory (MiB)', mem), field('VMM', vmm),
      field('Exposed ports', ports, 'comma-separated, served by the proxy')),
    h('div', { class: 'row' },
      h('label', { class: 'check' }, pub, ' public ports (no credentials)'),
      h('label', { class: 'check' }, egress, ' internet egress'),
      h('label', { class: 'check' }, start, ' start after creating')),
    h('div', { class: 'grid two' }, field('Environment', env, 'one NAME=value a line'),
      field('Metadata', meta, 'one key=value a line')),
    h('div', { class: 'row end' }, submit));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    submit.disabled = true;
    try {
      const body = {
        vcpu_count: Number(vcpu.value), mem_size_mib: Number(mem.value),
        public: pub.checked, network: { egress: egress.checked },
        env: pairs(env.value, 'Environment'), metadata: pairs(meta.value, 'Metadata'),
        exposed_ports: ports.value.split(',').map((p) => p.trim()).filter(Boolean).map(Number),
      };
      if (name.value.trim()) body.name = name.value.trim();
      if (vmm.value) body.vmm = vmm.value;
      const m = await api('POST', '/machines', body);
      toast(`Created ${m.name}`);
      if (start.checked) {
        await api('POST', `/machines/${m.id}/start?wait=false`);
        toast(`Starting ${m.name}`);
      }
      location.hash = `#/machines/${m.id}`;
    } catch (err) {
      toast(err.message, 'error');
      submit.disabled = false;
    }
  });
  replace(main, form);
  name.focus();
  return null;
}

function header(signedIn) {
  document.getElementById('nav').hidden = !signedIn;
  document.getElementById('who').hidden = !signedIn;
  document.getElementById('nav-keys').hidden = !session.admin;
  const key = getKey();
  document.getElementById('who-text').textContent =
    signedIn ? `${key.slice(0, 11)}…${session.admin ? ' (admin)' : ''}` : '';
  const page = location.hash.startsWith('#/keys') ? 'keys'
    : location.hash.startsWith('#/new') ? 'new'
    : 'machines';
  for (const a of document.querySelectorAll('[data-nav]')) {
    a.classList.toggle('active', a.dataset.nav === page);
  }
}

function route() {
  if (cleanup) { try { cleanup(); } catch { /* already gone */ } }
  cleanup = null;
  if (!getKey()) {
    header(false);
    cleanup = signInView();
    return;
  }
  session.admin = sessionStorage.getItem('hyperfleet.admin') === '1';
  header(true);
  const hash = location.hash || '#/';
  let m;
  if (hash === '#/' || hash.startsWith('#/?')) cleanup = listView(main);
  else if (hash === '#/new') cleanup = createView();
  else if (hash === '#/keys') cleanup = keysView(main);
  else if ((m = hash.match(/^#\/machines\/([A-Za-z0-9-]+)$/))) cleanup = machineView(main, m[1]);
  else replace(main, h('p', {}, 'No such page. ', h('a', { href: '#/' }, 'Machines')));
}

function signOut() {
  clearKey();
  sessionStorage.removeItem('hyperfleet.admin');
  location.hash = '#/';
  route();
}

onUnauthorized(() => {
  if (signingIn) return;
  toast('The API key was refused (revoked or expired); sign in again.', 'error');
  signOut();
});
document.getElementById('signout').addEventListener('click', signOut);
window.addEventListener('hashchange', route);
route();
