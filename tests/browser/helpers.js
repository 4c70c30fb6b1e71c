// Shared by the browser tests: start the real server binary, launch Debian's
// Chromium through playwright-core, check that the server has every transport, and drive
// the chat page.

import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const BIN = process.env.HERALD_BIN || path.join(ROOT, 'target/debug/herald');
export const ASSETS = path.join(ROOT, 'crates/herald-server/assets');
export const TRANSPORTS = ['ws', 'sse', 'longpoll', 'poll', 'iframe', 'mqtt'];
/** Every test's time limit: a hang fails with its name instead of stalling the run. */
export const LIMIT = { timeout: 90_000 };

/** A temporary directory, removed by the returned function. */
export function tempDir(prefix = 'herald-browser-') {
  const dir = mkdtempSync(path.join(tmpdir(), prefix));
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/**
 * Starts `herald serve` on 127.0.0.1 (port 0 unless given), without the MQTT
 * TCP listener, in memory unless `data` names a directory, with `env` added to
 * a copy of the environment that has no other HERALD_ settings. Resolves once the server has printed its
 * address. The process runs in a temporary directory so no ./herald.toml is read.
 */
export async function startServer({ data = null, env = {}, port = 0 } = {}) {
  const cwd = tempDir('herald-cwd-');
  const cleanEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('HERALD_')));
  // No MQTT TCP listener: a fixed port (1883) would collide with any other
  // server on the machine. MQTT over WebSocket (/mqtt) is on the HTTP port.
  const args = ['serve', '--http', `127.0.0.1:${port}`, '--mqtt', 'off', ...(data ? ['--data', data] : ['--memory'])];
  const proc = spawn(BIN, args, { cwd: cwd.dir, env: { ...cleanEnv, HERALD_LOG: 'warn', ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  proc.stderr.on('data', d => { stderr += d; });
  // Attached first, so the exit is seen whenever it comes.
  const exited = new Promise(resolve => proc.once('exit', resolve));
  const url = await new Promise((resolve, reject) => {
    let out = '';
    const done = () => { clearTimeout(timer); proc.off('exit', early); proc.off('error', fail); };
    const fail = err => { done(); proc.kill('SIGKILL'); reject(new Error(`${err.message}\nstderr:\n${stderr}`)); };
    const early = code => fail(new Error(`the server exited with ${code} before listening`));
    const timer = setTimeout(() => fail(new Error('the server did not say where it listens within 15 s')), 15000);
    proc.on('error', fail);
    proc.on('exit', early);
    const read = d => {
      out += d;
      const m = out.match(/herald listening on (http:\/\/[\d.]+:\d+)/);
      if (!m) return;
      done();
      proc.stdout.off('data', read);
      proc.stdout.resume(); // keep draining whatever else it prints
      resolve(m[1]);
    };
    proc.stdout.on('data', read);
  });
  const server = {
    url,
    port: Number(new URL(url).port),
    pid: proc.pid,
    stderr: () => stderr,
    /** Kills the process (SIGKILL by default: nothing acknowledged may be lost) and waits for it. */
    async stop(signal = 'SIGKILL') {
      if (proc.exitCode === null && proc.signalCode === null) {
        process.kill(proc.pid, signal);
        // A graceful stop gets the server's grace period (10 s) and a little more.
        const late = setTimeout(() => proc.kill('SIGKILL'), 15000);
        await exited;
        clearTimeout(late);
      }
      cwd.remove();
    },
  };
  return server;
}

/** Chromium from Debian's package, headless. */
export function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic',
      // Pages fulfilled from disk have no address space, so Chromium would
      // treat their WebSocket to 127.0.0.1 as a local-network access and block it.
      ...(process.env.HERALD_TEST_ASSETS === 'disk' ? ['--disable-features=LocalNetworkAccessChecks'] : [])],
  });
}

/** `POST /api/publish`; resolves to the new id. */
export async function publish(url, channel, data, event) {
  const res = await fetch(`${url}/api/publish`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ channel, data, ...(event ? { event } : {}) }),
  });
  const body = await res.json();
  if (!res.ok) throw new Error(`publish failed: ${res.status} ${JSON.stringify(body)}`);
  return body.id;
}

/**
 * Fails unless the server has every transport endpoint the suite drives
 * (WebSocket, hidden iframe, MQTT over WebSocket): a route that went missing
 * must fail the suite, not skip its tests.
 */
export async function expectEndpoints(url) {
  const missing = [];
  if ((await fetch(`${url}/api/ws`)).status === 404) missing.push('GET /api/ws answers 404');
  const ctrl = new AbortController();
  const iframe = await fetch(`${url}/api/channels/probe/iframe?callback=cb&since=now`, { signal: ctrl.signal });
  if (iframe.status === 404) missing.push('GET /api/channels/{c}/iframe answers 404');
  ctrl.abort();
  if ((await fetch(`${url}/mqtt`)).status === 404) missing.push('GET /mqtt answers 404');
  if (missing.length) throw new Error(`the server lacks transport endpoints: ${missing.join('; ')}`);
}

/** Warns when the binary serves a different herald.js than the one on disk (rebuild needed). */
export async function checkAssetsFresh(url) {
  if (process.env.HERALD_TEST_ASSETS === 'disk') return;
  const served = await (await fetch(`${url}/herald.js`)).text();
  if (served !== readFileSync(path.join(ASSETS, 'herald.js'), 'utf8')) {
    console.warn(`warning: ${BIN} serves an older herald.js than ${ASSETS}; run cargo build -p herald`);
  }
}

/** The demo pages by URL path, as pages.rs serves them. */
const PAGES = {
  '/': 'index.html', '/chat': 'chat.html', '/bell': 'bell.html', '/admin': 'admin.html', '/style.css': 'style.css',
  '/herald.js': 'herald.js', '/vendor/mqtt.min.js': 'vendor/mqtt.min.js',
};
const TYPES = { html: 'text/html; charset=utf-8', css: 'text/css; charset=utf-8', js: 'text/javascript; charset=utf-8' };

/**
 * A fresh browser context. With HERALD_TEST_ASSETS=disk the demo pages and
 * herald.js come from crates/herald-server/assets instead of the binary, for
 * working on them without a rebuild (the API still comes from the server).
 */
export async function newContext(browser, url) {
  const context = await browser.newContext();
  if (process.env.HERALD_TEST_ASSETS === 'disk') {
    await context.route(u => u.origin === url && u.pathname in PAGES, route => {
      const file = PAGES[new URL(route.request().url()).pathname];
      route.fulfill({ body: readFileSync(path.join(ASSETS, file)), contentType: TYPES[file.split('.').pop()] });
    });
  }
  return context;
}

/** A page in a fresh context, collecting uncaught errors in `page.errors`. */
export async function newPage(browser, url) {
  const page = await (await newContext(browser, url)).newPage();
  page.errors = [];
  page.on('pageerror', e => page.errors.push(e));
  return page;
}

/**
 * Opens /chat in a fresh browser context and waits until it is connected.
 * `init` (script text) runs in the page before any of its scripts, and
 * `before(page)` runs before the page loads (to break WebSocket, say).
 * Page errors are collected in `page.errors` so tests can assert there were none.
 */
export async function openChat(browser, url, { name, room, transport, init, before, expectTransport = transport }) {
  const page = await newPage(browser, url);
  if (init) await page.addInitScript(init);
  if (before) await before(page);
  const q = new URLSearchParams({ name, room, transport });
  await page.goto(`${url}/chat?${q}`);
  await page.waitForSelector(`#status[data-state="open"][data-transport="${expectTransport}"]`, { timeout: 15000 });
  return page;
}

/** Types a message into the chat and sends it; resolves once the send went through. */
export async function send(page, text) {
  await page.fill('#text', text);
  await page.click('#send');
  await page.waitForFunction(() => document.querySelector('#text').value === '' && !document.querySelector('#send').disabled);
}

/** Waits until the chat shows at least `n` messages. */
export async function waitForMessages(page, n, timeout = 15000) {
  await page.waitForFunction(k => document.querySelectorAll('#messages .msg').length >= k, n, { timeout });
}

/** The messages the chat shows, in order: { id, from, text }. */
export function messages(page) {
  return page.$$eval('#messages .msg', els => els.map(el => ({
    id: Number(el.dataset.id),
    from: el.querySelector('.from').textContent,
    text: el.querySelector('.text').textContent,
  })));
}

/** Resolves as `promise` does, or rejects naming `what` after `ms`. */
export function within(ms, what, promise) {
  let t;
  return Promise.race([promise, new Promise((_, reject) => { t = setTimeout(() => reject(new Error(`timed out: ${what}`)), ms); })])
    .finally(() => clearTimeout(t));
}
