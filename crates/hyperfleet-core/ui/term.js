// The interactive terminal: xterm.js (vendored, vendor/VERSIONS) on the exec
// WebSocket. The guest gives the command no pseudo-terminal (docs/api.md),
// so this side does what a tty's line discipline would: it echoes what is
// typed, edits the line (backspace, Ctrl-U), sends it on Enter, and maps
// Ctrl-C to cancel (kill) and Ctrl-D to end of input.

import { Terminal } from './vendor/xterm/xterm.mjs';
import { FitAddon } from './vendor/addon-fit/addon-fit.mjs';
import { execSocket } from './api.js';

// xterm.js writes its runtime styles (theme colours, row sizes, scrollbar)
// into <style> elements, which a Content-Security-Policy without
// 'unsafe-inline' blocks. The console keeps that policy strict: each
// <style> xterm asks for is given as an inert stand-in element whose text
// goes into a constructed stylesheet (CSSOM, not subject to style-src).
const realCreate = Document.prototype.createElement;
Document.prototype.createElement = function createElement(name, options) {
  if (typeof name !== 'string' || name.toLowerCase() !== 'style') {
    return realCreate.call(this, name, options);
  }
  const doc = this;
  const el = realCreate.call(doc, 'hf-style');
  const sheet = new CSSStyleSheet();
  let text = '';
  doc.adoptedStyleSheets = [...doc.adoptedStyleSheets, sheet];
  const set = (v) => { text = String(v ?? ''); sheet.replaceSync(text); };
  Object.defineProperties(el, {
    textContent: { get: () => text, set },
    innerText: { get: () => text, set },
    sheet: { get: () => sheet },
  });
  const remove = el.remove.bind(el);
  el.remove = () => {
    doc.adoptedStyleSheets = doc.adoptedStyleSheets.filter((s) => s !== sheet);
    remove();
  };
  return el;
};

const decoder = () => new TextDecoder();

function b64bytes(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/**
 * Opens a terminal in `el` running `command` (an argv array) in machine
 * `id`. Returns {close()}. onExit(text) is called when the session ends.
 */
export function openTerminal(el, id, command, { onExit } = {}) {
  const term = new Terminal({
    convertEol: true, cursorBlink: true, fontSize: 14, scrollback: 5000,
    fontFamily: 'ui-monospace, SFMono-Regular, Menlo, Consolas, monospace',
    theme: { background: '#0d1117', foreground: '#e6edf3' },
  });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(el);
  fit.fit();
  const onResize = () => fit.fit();
  window.addEventListener('resize', onResize);

  const out = decoder();
  const err = decoder();
  const enc = new TextEncoder();
  let line = '';
  let ended = false;
  const ws = execSocket(id);
  term.write(`\x1b[2m$ ${command.join(' ')}\x1b[0m\r\n`);

  const end = (why) => {
    if (ended) return;
    ended = true;
    term.write(`\r\n\x1b[2m[${why}]\x1b[0m\r\n`);
    onExit?.(why);
  };
  ws.addEventListener('open', () => {
    ws.send(JSON.stringify({ command, timeout: 3600, env: { TERM: 'dumb', PS1: '$ ' } }));
    term.focus();
  });
  ws.addEventListener('message', (m) => {
    if (typeof m.data !== 'string') return;
    let ev;
    try { ev = JSON.parse(m.data); } catch { return; }
    if (ev.type === 'stdout') term.write(out.decode(b64bytes(ev.data), { stream: true }));
    else if (ev.type === 'stderr') term.write(err.decode(b64bytes(ev.data), { stream: true }));
    else if (ev.type === 'exit') {
      end(ev.signal ? `killed by signal ${ev.signal}` : `exited with ${ev.exit_code}`);
    } else if (ev.type === 'error') end(`${ev.code}: ${ev.message}`);
  });
  ws.addEventListener('close', () => end('disconnected'));
  ws.addEventListener('error', () => end('the connection failed'));

  term.onData((data) => {
    if (ended || ws.readyState !== WebSocket.OPEN) return;
    if (data.startsWith('\x1b')) return; // arrows and other keys: no line history here
    for (const ch of data) {
      if (ch === '\r' || ch === '\n') {
        term.write('\r\n');
        ws.send(enc.encode(`${line}\n`));
        line = '';
      } else if (ch === '\x7f' || ch === '\b') {
        if (line) {
          line = [...line].slice(0, -1).join('');
          term.write('\b \b');
        }
      } else if (ch === '\x03') {
        term.write('^C');
        ws.send(JSON.stringify({ type: 'cancel' }));
      } else if (ch === '\x04') {
        if (line) { ws.send(enc.encode(line)); line = ''; }
        ws.send(JSON.stringify({ type: 'eof' }));
      } else if (ch === '\x15') {
        term.write('\b \b'.repeat([...line].length));
        line = '';
      } else if (ch >= ' ' || ch === '\t') {
        line += ch;
        term.write(ch);
      }
    }
  });

  return {
    term,
    close() {
      window.removeEventListener('resize', onResize);
      if (ws.readyState === WebSocket.OPEN || ws.readyState === WebSocket.CONNECTING) ws.close();
      term.dispose();
    },
  };
}
