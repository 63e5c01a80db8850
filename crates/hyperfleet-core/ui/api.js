// The API client of the console: the key (sessionStorage only: gone when
// the tab closes, never in localStorage, a cookie or a URL), JSON calls,
// event streams over fetch() (EventSource cannot send an Authorization
// header), the console log stream, and the exec WebSocket.

const KEY = 'hyperfleet.apiKey';
export const BASE = '/api/v1';

export const getKey = () => sessionStorage.getItem(KEY);
export const setKey = (k) => sessionStorage.setItem(KEY, k);
export const clearKey = () => sessionStorage.removeItem(KEY);

/** Called when the API answers 401 (the key was revoked or expired). */
let unauthorized = () => {};
export function onUnauthorized(f) { unauthorized = f; }

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${getKey()}`, ...extra };
}

async function failure(r) {
  const text = await r.text().catch(() => '');
  let err = null;
  try { err = JSON.parse(text).error; } catch { /* not the envelope */ }
  if (r.status === 401) unauthorized();
  return new ApiError(r.status, err?.code ?? `HTTP_${r.status}`, err?.message ?? (text || r.statusText));
}

/** One JSON call; resolves to the parsed body (null for 204). */
export async function api(method, path, body, { signal } = {}) {
  const init = { method, headers: authHeaders(), signal, cache: 'no-store' };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const r = await fetch(BASE + path, init);
  if (!r.ok) throw await failure(r);
  if (r.status === 204) return null;
  return r.json();
}

export const q = (params) => {
  const s = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') s.set(k, v);
  const t = s.toString();
  return t ? `?${t}` : '';
};

export const mpath = (id) => `/machines/${encodeURIComponent(id)}`;

/**
 * Reads a server-sent event stream with the key in a header. Calls onOpen()
 * once the server answered (it subscribed before answering), then
 * onEvent({event, id, data}) per event; resolves when the stream ends.
 */
export async function stream(path, { signal, onOpen, onEvent, lastEventId }) {
  const headers = authHeaders({ Accept: 'text/event-stream' });
  if (lastEventId) headers['Last-Event-ID'] = String(lastEventId);
  const r = await fetch(BASE + path, { headers, signal, cache: 'no-store' });
  if (!r.ok) throw await failure(r);
  onOpen?.();
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  let ev = { event: 'message', id: null, data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n?/g, '\n');
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (line === '') {
        if (ev.data.length) onEvent({ event: ev.event, id: ev.id, data: ev.data.join('\n') });
        ev = { event: 'message', id: null, data: [] };
        continue;
      }
      if (line.startsWith(':')) continue; // keep-alive comment
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? '' : line.slice(colon + 1);
      if (val.startsWith(' ')) val = val.slice(1);
      if (field === 'data') ev.data.push(val);
      else if (field === 'event') ev.event = val;
      else if (field === 'id') ev.id = val;
    }
  }
}

/** Streams a text response (the console log), calling onText per chunk. */
export async function textStream(path, { signal, onText }) {
  const r = await fetch(BASE + path, { headers: authHeaders(), signal, cache: 'no-store' });
  if (!r.ok) throw await failure(r);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onText(value);
  }
}

/**
 * The exec WebSocket. A browser cannot set Authorization on a WebSocket, so
 * the key travels as the subprotocol `hyperfleet.bearer.<key>` beside
 * `hyperfleet.exec.v1` (a request header, like Authorization: never in the
 * URL); the server answers with `hyperfleet.exec.v1` only.
 */
export function execSocket(id) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${scheme}//${location.host}${BASE}${mpath(id)}/exec/ws`,
    ['hyperfleet.exec.v1', `hyperfleet.bearer.${getKey()}`]);
  ws.binaryType = 'arraybuffer';
  return ws;
}
