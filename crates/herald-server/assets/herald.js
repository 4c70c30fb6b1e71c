/**
 * herald.js — the browser client of Herald, as one ES module with no build step
 * and no dependencies.
 *
 *   import { Herald } from '/herald.js';
 *   const h = new Herald(location.origin, { transports: ['ws', 'sse', 'longpoll', 'poll'] });
 *   const stop = h.subscribe('chat/room/Default', msg => console.log(msg), { since: 0 });
 *   const id = await h.publish('chat/room/Default', { from: 'bob', msg: 'Hi' }, { event: 'chat' });
 *   h.on('status', s => console.log(s.state, s.transport));
 *
 * How it works. The client keeps one connection at a time, over the first
 * transport of `transports` that works. It remembers, per channel, the id of the
 * last message it handed to the application (the cursor). Every (re)connection,
 * on any transport, asks the server for exactly the messages after those
 * cursors, and anything at or below a cursor is dropped: the application sees
 * each message once, in order, whatever the network does. A transport that
 * cannot open while the server answers plain HTTP is skipped for the next one
 * at once; a connection that drops, or a server out of reach, is retried on the
 * same transport with exponential backoff and jitter.
 *
 * A transport is a function `(herald, ctx) => connection` that reports through
 * `ctx` (opened, message, gap, unread, error, closed) and returns an object with
 * `close()` and, when it can change its channels in place, `add(key)` and
 * `remove(key)`; the WebSocket one also has `publish(frame)`. Filters such as
 * `chat/room/+` work over 'ws', 'sse' and 'mqtt' (the multiplexed transports);
 * 'longpoll', 'poll' and 'iframe' follow named channels only. 'iframe' needs the
 * page to be on the same origin as the server. 'mqtt' is MQTT over WebSocket
 * through MQTT.js, which the server serves next to this file
 * (`/vendor/mqtt.min.js`) and which is loaded only when that transport is used.
 */

/** An error the server (or the client) reports with a stable code. */
export class HeraldError extends Error {
  /** `retryAfter`: seconds the server asked to wait (a limit's refusal), else 0. */
  constructor(code, message, status = 0, retryAfter = 0) {
    super(message);
    this.name = 'HeraldError';
    this.code = code;
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

const DEFAULTS = {
  transports: ['ws', 'sse', 'longpoll', 'poll'],
  pollInterval: 1000,    // ms between short polls
  longPollWait: 25,      // s a long poll waits (the server caps it, 30 s by default)
  backoffBase: 500,      // ms: first retry delay after a dropped connection
  backoffMax: 15000,     // ms: the longest wait between two attempts
  connectTimeout: 10000, // ms a transport may take to open before it counts as failed
  publishTimeout: 10000, // ms to wait for a WebSocket publish acknowledgement
  iframeStallTimeout: 45000, // ms of silence after which an iframe stream counts as dead
  mqttModule: null,      // URL of the MQTT.js ES module (default: vendor/mqtt.min.js next to this file)
};

export class Herald {
  /**
   * @param {string} url  the server, e.g. 'http://127.0.0.1:8080' (default: this page's origin)
   * @param {object} options  token, transports, and the timings of DEFAULTS
   */
  constructor(url, options = {}) {
    this.url = String(url || location.origin).replace(/\/+$/, '');
    this.token = options.token || null;
    this.options = { ...DEFAULTS, ...options };
    this.transports = checkTransports(this.options.transports);
    this._subs = new Map();       // channel or filter -> { handlers: Set, since }
    this._cursors = new Map();    // channel -> id of the last message handed over, or 'now'
    this._listeners = new Map();  // event name -> Set of functions
    this._pending = new Map();    // WebSocket publish ref -> { resolve, reject, timer }
    this._ref = 0;
    this._index = 0;              // which of this.transports is in use
    this._failures = 0;           // attempts in a row that did not open
    this._strikes = 0;            // failures of this transport while the server answered
    this._everOpened = false;     // 'connecting' before the first open, 'reconnecting' after
    this._decision = null;        // set while _lost() checks whether the server is reachable
    this._attempt = null;         // the current connection attempt (stale callbacks check it)
    this._conn = null;            // the current transport connection
    this._timer = null;           // the scheduled (re)connect
    this._closed = false;
    this._status = { state: 'closed', transport: null };
    this.unread = null;           // the inbox's unread count, once the server has said
    this._onOnline = () => { if (this._timer) this._restart(); };
    if (typeof addEventListener === 'function') addEventListener('online', this._onOnline);
  }

  /** The transport in use or being tried ('ws', 'sse', ...), or null. */
  get transport() { return this._status.transport; }

  /** 'connecting', 'open', 'reconnecting' or 'closed'. */
  get state() { return this._status.state; }

  /** The id of the last message of `channel` handed to the application (0: none). */
  lastId(channel) {
    const id = this._cursors.get(channel);
    return typeof id === 'number' ? id : 0;
  }

  /**
   * Follows a channel (or a filter such as `chat/room/+`). `since`: a message id
   * (start after it), 'now' (live messages only) or omitted (0: the retained
   * history first). A channel this client already followed resumes from its
   * cursor instead, so nothing is handed over twice. Returns `stop()`.
   */
  subscribe(channel, handler, { since = 0 } = {}) {
    if (typeof channel !== 'string' || !channel) throw new TypeError('subscribe: channel must be a non-empty string');
    if (typeof handler !== 'function') throw new TypeError('subscribe: handler must be a function');
    if (!(since === 'now' || (Number.isSafeInteger(since) && since >= 0))) {
      throw new TypeError("subscribe: since must be a message id, 'now' or omitted");
    }
    let sub = this._subs.get(channel);
    const added = !sub;
    if (added) {
      sub = { handlers: new Set(), since, filter: isFilter(channel) };
      this._subs.set(channel, sub);
      if (!sub.filter && !this._cursors.has(channel)) this._cursors.set(channel, since);
    }
    sub.handlers.add(handler);
    if (added) this._changed('add', channel);
    return () => {
      if (!sub.handlers.delete(handler) || sub.handlers.size || this._subs.get(channel) !== sub) return;
      this._subs.delete(channel);
      this._changed('remove', channel);
    };
  }

  /**
   * Publishes `data` (any JSON value) and resolves to the new message's id.
   * Goes over the open WebSocket when there is one, else `POST /api/publish`.
   * Rejects with a HeraldError carrying the server's code.
   */
  async publish(channel, data, { event } = {}) {
    if (this._conn?.publish && this._status.state === 'open') {
      const ref = String(++this._ref);
      const frame = { type: 'publish', channel, data, ref, ...(event ? { event } : {}) };
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => this._settle(ref, new HeraldError('timeout', 'no acknowledgement for the publish')),
          this.options.publishTimeout);
        this._pending.set(ref, { resolve, reject, timer });
        if (!this._conn.publish(frame)) this._settle(ref, new HeraldError('disconnected', 'the connection closed'));
      });
    }
    const body = await this._fetchJson('/api/publish', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ channel, ...(event ? { event } : {}), data }),
    });
    return body.id;
  }

  /**
   * Listens for 'status' ({state, transport, reason?}), 'unread' (the count of
   * an inbox `user/{id}` this client follows, on every change; also in
   * `h.unread`), 'gap' ({channel, from, to, reset?}: ids known lost) or 'error'
   * (a HeraldError). Returns `off()`.
   */
  on(name, fn) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(fn);
    return () => this.off(name, fn);
  }

  off(name, fn) { this._listeners.get(name)?.delete(fn); }

  /** Drops the connection and opens a new one at once (resuming every channel). */
  reconnect() {
    if (this._closed && typeof addEventListener === 'function') addEventListener('online', this._onOnline);
    this._closed = false;
    this._failures = 0;
    this._restart();
  }

  /** Changes the order of preference and reconnects over the new first choice. */
  setTransports(transports) {
    this.transports = checkTransports(transports);
    this._index = 0;
    this._strikes = 0;
    this.reconnect();
  }

  /** Closes the connection for good (until `reconnect()`). */
  close() {
    this._closed = true;
    this._disconnect(new HeraldError('closed', 'the client was closed'));
    if (typeof removeEventListener === 'function') removeEventListener('online', this._onOnline);
    this._setStatus('closed', null);
  }

  // --- connection management ------------------------------------------------

  /** Called when the subscriptions change: adjust the connection in place or reopen it. */
  _changed(op, key) {
    if (this._closed) return;
    if (this._subs.size === 0) { // nothing to follow: idle
      this._disconnect(null);
      return this._setStatus('closed', null);
    }
    // A channel added with since 'now' goes through a reconnect, which first
    // turns 'now' into the channel's head (see _resolveNow).
    const fresh = op === 'add' && this._cursors.get(key) === 'now';
    if (this._conn?.[op] && !fresh) return this._conn[op](key);
    if (this._timer) return; // a (re)connect is already scheduled and will see the change
    this._restart();
  }

  _restart() {
    this._disconnect(null);
    if (!this._closed && this._subs.size) this._schedule(0);
  }

  /** Ends the current attempt and connection; pending WebSocket publishes fail with `err`. */
  _disconnect(err) {
    clearTimeout(this._timer);
    this._timer = null;
    this._decision = null;
    if (this._attempt) clearTimeout(this._attempt.timer);
    this._attempt = null;
    const conn = this._conn;
    this._conn = null;
    conn?.close();
    for (const ref of [...this._pending.keys()]) {
      this._settle(ref, err || new HeraldError('disconnected', 'the connection closed before the publish was acknowledged'));
    }
  }

  _schedule(delay) {
    clearTimeout(this._timer);
    this._timer = setTimeout(() => { this._timer = null; this._connect(); }, delay);
  }

  async _connect() {
    if (this._closed || this._conn || this._attempt || this._subs.size === 0) return;
    const name = this.transports[this._index];
    const attempt = { name, opened: false, timer: null };
    this._attempt = attempt;
    this._setStatus(this._everOpened ? 'reconnecting' : 'connecting', name);
    const live = () => this._attempt === attempt;
    attempt.timer = setTimeout(() => this._lost(attempt, new HeraldError('timeout', `${name} did not open in time`)),
      this.options.connectTimeout);
    try {
      await this._resolveNow();
    } catch (e) {
      return this._lost(attempt, e);
    }
    if (!live()) return;
    const ctx = {
      opened: () => live() && !attempt.opened && this._opened(attempt),
      message: msg => live() && this._deliver(msg),
      gap: gap => live() && this._gap(gap),
      unread: count => live() && this._setUnread(count),
      error: err => live() && this._emit('error', err),
      closed: err => this._lost(attempt, err),
    };
    let conn;
    try {
      conn = TRANSPORTS[name](this, ctx);
    } catch (e) {
      return this._lost(attempt, e);
    }
    if (live()) this._conn = conn;
    else conn.close(); // it failed while starting
  }

  _opened(attempt) {
    attempt.opened = true;
    attempt.openedAt = Date.now();
    clearTimeout(attempt.timer);
    this._everOpened = true;
    this._setStatus('open', attempt.name);
  }

  /** A connection attempt failed or an open connection dropped: decide what comes next. */
  async _lost(attempt, err) {
    if (this._attempt !== attempt) return; // stale: already replaced or closed
    this._disconnect(err);
    if (this._closed) return;
    // The server said no (a missing or expired token, a forbidden channel):
    // the application should hear of it; retrying is still right (a new token
    // may come), but the backoff keeps it slow.
    if (err?.status >= 400 && err.status < 500) this._emit('error', err);
    this._setStatus('reconnecting', attempt.name, err?.message);
    // It worked for a while: the same transport again, soon. (One that drops
    // right after opening, as behind a proxy that accepts and then cuts
    // WebSockets, counts as not having opened.)
    // A limit's refusal says how long to wait: never sooner than that.
    const wait = (err?.retryAfter || 0) * 1000;
    if (attempt.opened && Date.now() - attempt.openedAt > 2000) {
      this._failures = 0;
      this._strikes = 0;
      return this._schedule(Math.max(wait, this._backoff()));
    }
    this._failures++;
    // A transport that cannot open while the server is reachable is blocked
    // somewhere (a proxy, a firewall): the next one is tried at once. When the
    // server itself is out of reach (restarting, or this device offline), no
    // transport is to blame: the same one is tried again after a backoff.
    const decision = this._decision = {};
    const reachable = await this._reachable();
    if (this._decision !== decision) return; // reconnect(), close() or a subscription change came first
    this._decision = null;
    // Two strikes, so that a server that came back between the failure and the
    // check does not cost the preferred transport (a timeout counts as both).
    // A refusal the server gave (4xx: a missing or expired token) is not the
    // transport's fault, and costs it nothing.
    const refused = (err?.status >= 400 && err.status < 500) || wait > 0;
    if (!refused) this._strikes = reachable ? this._strikes + (err?.code === 'timeout' ? 2 : 1) : 0;
    if (this._strikes >= 2) {
      this._strikes = 0;
      this._index = (this._index + 1) % this.transports.length;
    }
    const firstRound = reachable && this._failures < 2 * this.transports.length;
    this._setStatus('reconnecting', this.transports[this._index], err?.message);
    this._schedule(Math.max(wait, firstRound && !refused ? 50 : this._backoff()));
  }

  /** Does the server answer at all? (Any HTTP answer counts; `no-cors` so another origin works too.) */
  async _reachable() {
    const ctrl = new AbortController();
    const timer = setTimeout(() => ctrl.abort(), 5000);
    try {
      await fetch(`${this.url}/healthz`, { mode: 'no-cors', cache: 'no-store', signal: ctrl.signal });
      return true;
    } catch {
      return false;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Exponential backoff with "equal jitter": half fixed, half random, so a herd spreads out. */
  _backoff() {
    const { backoffBase, backoffMax } = this.options;
    const d = Math.min(backoffMax, backoffBase * 2 ** Math.max(0, this._failures - 1));
    return d / 2 + Math.random() * (d / 2);
  }

  /** Turns 'now' cursors into the channel's current head, so every transport resumes by id. */
  async _resolveNow() {
    for (const [channel, cursor] of this._cursors) {
      if (cursor !== 'now' || !this._subs.has(channel)) continue;
      const body = await this._fetchJson(`/api/channels/${channelPath(channel)}/messages?since=now&limit=1`);
      if (this._cursors.get(channel) === 'now') this._cursors.set(channel, body.next);
    }
  }

  // --- delivery --------------------------------------------------------------

  /** Hands a message to the application unless it already had it. */
  _deliver(msg) {
    if (!msg || typeof msg.channel !== 'string' || !Number.isSafeInteger(msg.id)) return;
    const last = this._cursors.get(msg.channel);
    if (typeof last === 'number' && msg.id <= last) return; // a duplicate after a resume
    this._cursors.set(msg.channel, msg.id);
    for (const [key, sub] of this._subs) {
      if (key !== msg.channel && !(sub.filter && matches(key, msg.channel))) continue;
      for (const fn of sub.handlers) {
        try { fn(msg); } catch (e) { console.error('herald: a subscriber threw', e); }
      }
    }
  }

  /** Ids `from..to` of a channel are known lost: move the cursor past them and say so. */
  _gap(gap) {
    if (!gap || typeof gap.channel !== 'string') return;
    const { type, ...g } = gap;
    const last = this._cursors.get(g.channel);
    // `reset`: the server has a different history; what follows replaces ours.
    if (g.reset || typeof last !== 'number' || g.to > last) this._cursors.set(g.channel, g.to);
    this._emit('gap', g);
  }

  /** An inbox's unread count (the red dot): emitted when it changes. */
  _setUnread(count) {
    if (!Number.isSafeInteger(count) || count === this.unread) return;
    this.unread = count;
    this._emit('unread', count);
  }

  _settle(ref, err, id) {
    const p = this._pending.get(ref);
    if (!p) return;
    this._pending.delete(ref);
    clearTimeout(p.timer);
    if (err) p.reject(err); else p.resolve(id);
  }

  /** Emits 'status' on a change; `reason` says why a connection was lost. */
  _setStatus(state, transport, reason) {
    if (this._status.state === state && this._status.transport === transport) return;
    this._status = reason ? { state, transport, reason } : { state, transport };
    this._emit('status', { ...this._status });
  }

  _emit(name, value) {
    for (const fn of this._listeners.get(name) || []) {
      try { fn(value); } catch (e) { console.error(`herald: a '${name}' listener threw`, e); }
    }
  }

  // --- helpers the transports share -----------------------------------------

  /** The cursor to resume `key` from: a channel's last id, or a filter's own `since`. */
  _sinceFor(key) {
    const sub = this._subs.get(key);
    if (sub?.filter) return sub.since;
    const c = this._cursors.get(key);
    return c === undefined ? 0 : c;
  }

  /** Does this client follow `channel`, by name or through a filter? */
  _wants(channel) {
    if (this._subs.has(channel)) return true;
    for (const [key, sub] of this._subs) if (sub.filter && matches(key, channel)) return true;
    return false;
  }

  _headers(extra = {}) {
    return this.token ? { ...extra, Authorization: `Bearer ${this.token}` } : extra;
  }

  /** fetch() that answers the JSON body or throws a HeraldError. */
  async _fetchJson(path, init = {}) {
    const res = await fetch(this.url + path, { cache: 'no-store', ...init, headers: this._headers(init.headers) });
    return readJson(res);
  }
}

// --- transports ---------------------------------------------------------------

/** WebSocket: one connection multiplexing every channel; publishes go over it too. */
function connectWs(h, ctx) {
  const url = `${h.url.replace(/^http/, 'ws')}/api/ws${h.token ? `?token=${encodeURIComponent(h.token)}` : ''}`;
  const ws = new WebSocket(url);
  let heard = Date.now();
  const send = frame => {
    if (ws.readyState !== WebSocket.OPEN) return false;
    ws.send(JSON.stringify(frame));
    return true;
  };
  const subscribe = key => send({ type: 'subscribe', channel: key, since: h._sinceFor(key) });
  ws.onopen = () => {
    for (const key of h._subs.keys()) subscribe(key);
    ctx.opened();
  };
  ws.onmessage = e => {
    heard = Date.now();
    let f;
    try { f = JSON.parse(e.data); } catch { return; }
    switch (f.type) {
      case 'message': { const { type, ...msg } = f; ctx.message(msg); break; }
      case 'gap': ctx.gap(f); break;
      case 'unread': ctx.unread(f.count); break;
      case 'published': h._settle(f.ref, null, f.id); break;
      case 'error': {
        const err = new HeraldError(f.code, f.message, 0, f.retry_after || 0);
        if (f.ref != null && h._pending.has(String(f.ref))) h._settle(String(f.ref), err);
        else ctx.error(err);
        break;
      }
      default: break; // subscribed, unsubscribed, pong
    }
  };
  // 4029: a publish flood; slow down before coming back (4008, a slow
  // consumer, and the rest: reconnect and resume as usual).
  ws.onclose = e => ctx.closed(new HeraldError('ws_closed', `WebSocket closed (${e.code}${e.reason ? `: ${e.reason}` : ''})`,
    0, e.code === 4029 ? 5 : 0));
  // The server pings at the protocol level; this ping lets the client notice a
  // dead connection too (no frame at all for a minute).
  const pinger = setInterval(() => {
    if (Date.now() - heard > 60000) ws.close(4000, 'no answer');
    else send({ type: 'ping' });
  }, 25000);
  return {
    close() { clearInterval(pinger); ws.onclose = null; ws.close(); },
    add: key => subscribe(key),
    remove: key => send({ type: 'unsubscribe', channel: key }),
    publish: send,
  };
}

/**
 * Server-Sent Events over the multi-channel stream. `envelope=1` makes every
 * message an unnamed event (so `onmessage` sees them all) whose data is the
 * message object. The client resumes from its own cursors: it sends them as a
 * cursor token `chan=id,chan2=id2` and reopens the stream itself after an error
 * rather than letting EventSource retry, so a change of subscriptions or of
 * transport resumes the same way.
 */
function connectSse(h, ctx) {
  const q = new URLSearchParams();
  for (const key of h._subs.keys()) q.append('channel', key);
  q.set('envelope', '1');
  const token = [...h._cursors]
    .filter(([ch, id]) => typeof id === 'number' && h._wants(ch))
    .map(([ch, id]) => `${ch}=${id}`).join(',');
  if (token) q.set('lastEventId', token);
  // A filter's channels not seen yet start from its `since`.
  const filters = [...h._subs.values()].filter(s => s.filter);
  if (filters.some(s => s.since === 'now')) q.set('since', 'now');
  if (h.token) q.set('token', h.token);
  const es = new EventSource(`${h.url}/api/events?${q}`);
  const json = fn => e => { try { fn(JSON.parse(e.data)); } catch { /* not ours */ } };
  es.onopen = () => ctx.opened();
  es.onmessage = json(msg => ctx.message(msg));
  es.addEventListener('gap', json(g => ctx.gap(g)));
  es.addEventListener('unread', json(u => ctx.unread(u.count)));
  // A refusal for a limit comes in band (EventSource gives up on any answer
  // but 200): one `error` event whose data is the JSON error, with the wait.
  es.onerror = e => {
    let info = null;
    try { info = e.data ? JSON.parse(e.data) : null; } catch { /* not ours */ }
    ctx.closed(info?.code
      ? new HeraldError(info.code, info.message, info.code === 'server_busy' ? 503 : 429, info.retry_after || 0)
      : new HeraldError('sse_error', 'the event stream failed or ended'));
  };
  return { close: () => es.close() };
}

/** Long polling: one request per channel waits for what comes after its cursor. */
function connectLongPoll(h, ctx) {
  return pollChannels(h, ctx, h.options.longPollWait);
}

/** Short polling: asks every `pollInterval` ms. */
function connectPoll(h, ctx) {
  return pollChannels(h, ctx, 0);
}

function pollChannels(h, ctx, wait) {
  const loops = new Map(); // channel -> AbortController
  let opened = false;
  const run = async (channel, ctrl) => {
    let first = true; // the first request never waits, so the connection opens at once
    let full = false;
    let unread = null; // an inbox's count as last answered: a long poll also returns when it changes
    while (!ctrl.signal.aborted) {
      const since = h._sinceFor(channel);
      const w = (wait && !first ? `&wait=${wait}` : '') + (wait && unread !== null ? `&unread=${unread}` : '');
      let res;
      try {
        res = await fetch(`${h.url}/api/channels/${channelPath(channel)}/messages?since=${since}&limit=100${w}`,
          { cache: 'no-store', signal: ctrl.signal, headers: h._headers() });
        full = false;
        if (res.status !== 304) {
          const body = await readJson(res);
          if (body.missed) ctx.gap(body.missed);
          for (const m of body.messages) ctx.message({ channel, ...m });
          if (h._cursors.get(channel) === 'now') h._cursors.set(channel, body.next);
          if (Number.isSafeInteger(body.unread)) ctx.unread(unread = body.unread);
          full = body.messages.length >= 100; // more is waiting: ask again at once
        }
      } catch (e) {
        if (!ctrl.signal.aborted) ctx.closed(e);
        return;
      }
      if (!opened) { opened = true; ctx.opened(); }
      first = false;
      if (!wait && !full) await sleep(h.options.pollInterval, ctrl.signal);
    }
  };
  const add = key => {
    if (loops.has(key)) return;
    if (isFilter(key)) return ctx.error(new HeraldError('unsupported', `polling cannot follow the filter '${key}'; use ws or sse`));
    const ctrl = new AbortController();
    loops.set(key, ctrl);
    run(key, ctrl);
  };
  const remove = key => { loops.get(key)?.abort(); loops.delete(key); };
  for (const key of h._subs.keys()) add(key);
  return { add, remove, close: () => { for (const key of [...loops.keys()]) remove(key); } };
}

/**
 * Hidden iframe ("forever frame"): one never-ending HTML document per channel
 * whose scripts call `parent[callback](obj)`. The stream counts as open once the
 * frame's document is streaming; it counts as ended when the frame finishes
 * loading (an error page, or the server closed it) or stays silent for 45 s
 * (the server writes a keep-alive comment every 15 s).
 */
let frameSeq = 0;
function connectIframe(h, ctx) {
  if (new URL(h.url).origin !== location.origin) throw new HeraldError('unsupported', 'iframe needs the page on the server\'s origin');
  const frames = new Map(); // channel -> { el, callback, watch }
  let opened = false;
  const open = () => { if (!opened) { opened = true; ctx.opened(); } };
  const add = key => {
    if (frames.has(key)) return;
    if (isFilter(key)) return ctx.error(new HeraldError('unsupported', `iframe cannot follow the filter '${key}'; use ws or sse`));
    const callback = `__herald_frame${++frameSeq}`;
    const q = new URLSearchParams({ callback, since: String(h._sinceFor(key)) });
    if (h.token) q.set('token', h.token);
    const el = document.createElement('iframe');
    el.setAttribute('aria-hidden', 'true');
    el.tabIndex = -1;
    el.style.cssText = 'position:absolute;width:0;height:0;border:0;visibility:hidden';
    const f = { el, callback, heard: Date.now(), lastNode: null, streaming: false };
    window[callback] = obj => {
      f.heard = Date.now();
      open();
      if (obj?.type === 'gap') ctx.gap(obj);
      else if (obj?.type === 'unread') ctx.unread(obj.count);
      else ctx.message(obj);
    };
    el.onload = () => ctx.closed(new HeraldError('iframe_ended', `the iframe stream of '${key}' ended`));
    // Watch the frame: a document still loading is a live stream (open), one
    // that stopped loading has ended. A connection cut mid-stream (server
    // killed, network gone) leaves Chromium's document 'loading' for ever with
    // no event at all: only silence tells, so no new node for 45 s (three
    // missed keep-alives) counts as dead.
    f.watch = setInterval(() => {
      let doc = null;
      try { doc = el.contentDocument; } catch { /* an error page is not readable */ }
      if (doc && doc.URL !== 'about:blank' && doc.readyState === 'loading' && doc.body) {
        f.streaming = true;
        open();
        const node = doc.body.lastChild;
        if (node !== f.lastNode) { f.lastNode = node; f.heard = Date.now(); }
      } else if (f.streaming) {
        return ctx.closed(new HeraldError('iframe_ended', `the iframe stream of '${key}' ended`));
      }
      if (Date.now() - f.heard > h.options.iframeStallTimeout) ctx.closed(new HeraldError('iframe_stalled', 'the iframe stream went silent'));
    }, 250);
    el.src = `${h.url}/api/channels/${channelPath(key)}/iframe?${q}`;
    document.body.appendChild(el);
    frames.set(key, f);
  };
  const remove = key => {
    const f = frames.get(key);
    if (!f) return;
    frames.delete(key);
    clearInterval(f.watch);
    f.el.onload = null;
    f.el.remove();
    // A script already queued in the frame may still call back: make it a no-op.
    window[f.callback] = () => {};
    setTimeout(() => { delete window[f.callback]; }, 1000);
  };
  for (const key of h._subs.keys()) add(key);
  return { add, remove, close: () => { for (const key of [...frames.keys()]) remove(key); } };
}

/**
 * MQTT over WebSocket (`ws(s)://host/mqtt`, subprotocol `mqtt`) with MQTT.js,
 * loaded on first use. The password carries the token; every channel or filter
 * is one subscription at QoS 1, and an inbox `user/{id}` also subscribes
 * `$herald/unread/{id}` (payload `{"count":N}`: the red dot).
 *
 * MQTT carries no Herald id, and a message's id is what resuming and
 * de-duplication rest on. So an MQTT PUBLISH is taken as a doorbell, not as
 * the message: it makes the client ask `GET /api/channels/{topic}/messages
 * ?since=<last id>` (a short poll) and hand over what that answers, with ids,
 * events and times exactly as every other transport has them. The cursor rule
 * ("nothing at or below the last id") makes a repeated or coalesced poll
 * harmless, and one poll at a time per channel (another one queued when a
 * PUBLISH comes in meanwhile) keeps the order. On every (re)connection the
 * client first subscribes, then polls each channel it has a cursor for, and
 * only then reports the connection open: what was published while it was
 * away is fetched by id, and what is published from then on rings the bell.
 * Publishing goes over HTTP (`POST /api/publish`), as on every transport but
 * 'ws'. MQTT.js's own reconnecting is off: the client reconnects, falls back
 * and resumes as it does for every transport.
 */
const mqttLoads = new Map(); // module URL -> Promise of the MQTT.js module
function loadMqtt(h) {
  const url = h.options.mqttModule || new URL('./vendor/mqtt.min.js', import.meta.url).href;
  if (!mqttLoads.has(url)) {
    const p = import(url).then(m => {
      const lib = m.default?.connect ? m.default : m;
      if (typeof lib.connect !== 'function') throw new Error('the module has no connect()');
      return lib;
    });
    p.catch(() => mqttLoads.delete(url)); // let a later attempt try again
    mqttLoads.set(url, p);
  }
  return mqttLoads.get(url);
}

const UNREAD_TOPIC = '$herald/unread/';
/** The user whose inbox `key` is, or null. */
const inboxOf = key => /^user\/([^/]+)$/.exec(key)?.[1] ?? null;

function connectMqtt(h, ctx) {
  let client = null;
  let closed = false;
  let connected = false;
  let reason = '';
  const ctrl = new AbortController(); // aborts the polls when the connection ends
  const pulls = new Map();            // channel -> { running: Promise|null, again: bool }
  const fail = err => { if (!closed) ctx.closed(err); };

  /** One short poll of `channel` after its cursor, repeated while more is waiting. */
  const pollOnce = async channel => {
    const cursor = h._cursors.get(channel);
    let since = typeof cursor === 'number' || cursor === 'now' ? cursor : null;
    if (since === null) {
      // A channel first seen through a filter: start where the filter says.
      // ('now': from the message that rang, i.e. after the head minus one.)
      const filter = [...h._subs].find(([k, sub]) => sub.filter && matches(k, channel))?.[1];
      since = filter && filter.since !== 'now' ? filter.since : null;
      if (since === null) {
        const head = await h._fetchJson(`/api/channels/${channelPath(channel)}/messages?since=now&limit=1`, { signal: ctrl.signal });
        since = Math.max(0, head.next - 1);
      }
    }
    const body = await h._fetchJson(`/api/channels/${channelPath(channel)}/messages?since=${since}&limit=100`, { signal: ctrl.signal });
    if (closed) return false;
    if (body.missed) ctx.gap(body.missed);
    for (const m of body.messages) ctx.message({ channel, ...m });
    if (typeof h._cursors.get(channel) !== 'number' && h._wants(channel)) h._cursors.set(channel, body.next);
    // The count comes from `$herald/unread/{id}` only (first on subscribe, then
    // each change, in order). The poll's `unread` is left alone: a poll answered
    // before a change can arrive after the topic has announced it, and would
    // set the dot back to a stale count.
    return body.messages.length >= 100; // more is waiting
  };

  /** Polls `channel` now, or once more after the poll in flight; resolves when caught up. */
  const pull = channel => {
    let p = pulls.get(channel);
    if (!p) pulls.set(channel, p = { running: null, again: false });
    if (p.running) { p.again = true; return p.running; }
    p.running = (async () => {
      try {
        do { p.again = false; if (await pollOnce(channel)) p.again = true; } while (p.again && !closed);
      } finally {
        p.running = null;
      }
    })();
    return p.running;
  };

  /** Every channel to catch up on: the named ones followed, and those seen through a filter. */
  const resumable = () => {
    const chans = new Set([...h._subs].filter(([, sub]) => !sub.filter).map(([k]) => k));
    for (const [ch, id] of h._cursors) if (typeof id === 'number' && h._wants(ch)) chans.add(ch);
    return [...chans];
  };

  /**
   * SUBSCRIBE (QoS 1) `key` and, for an inbox, its unread count. Resolves to
   * whether the server granted `key`; a refusal is reported as an 'error' and
   * the connection carries on (as a refused WebSocket subscribe does).
   */
  const subscribe = key => new Promise((resolve, reject) => {
    const user = inboxOf(key);
    const topics = user ? [key, UNREAD_TOPIC + user] : [key];
    client.subscribe(topics, { qos: 1 }, (err, granted) => {
      if (err) return reject(new HeraldError('mqtt_error', `MQTT subscribe failed: ${err.message}`));
      for (const g of granted || []) {
        if (g.qos < 0x80) continue;
        const code = g.qos === 0x87 ? 'forbidden' : 'mqtt_refused';
        if (!closed) ctx.error(new HeraldError(code, `the server refused the subscription to '${g.topic}' (MQTT reason ${g.qos})`, 403));
      }
      resolve(!(granted || []).some(g => g.topic === key && g.qos >= 0x80));
    });
  });

  const add = key => {
    if (!connected) return; // the 'connect' handler subscribes whatever is followed by then
    subscribe(key).then(ok => { if (ok && !isFilter(key)) return pull(key); })
      .catch(err => { if (err?.name !== 'AbortError' && !closed) ctx.error(err); });
  };

  const remove = key => {
    pulls.delete(key);
    if (!connected) return;
    const user = inboxOf(key);
    client.unsubscribe(user ? [key, UNREAD_TOPIC + user] : [key]);
  };

  loadMqtt(h).then(mqtt => {
    if (closed) return;
    const url = `${h.url.replace(/^http/, 'ws')}/mqtt`;
    client = mqtt.connect(url, {
      protocolVersion: 5,
      clean: true,
      clientId: `herald-js-${Math.random().toString(36).slice(2, 12)}`,
      // The server ignores the username; the password is the token.
      ...(h.token ? { username: 'herald', password: h.token } : {}),
      keepalive: 30,
      reconnectPeriod: 0, // Herald reconnects (and falls back) itself
      connectTimeout: h.options.connectTimeout,
      resubscribe: false,
    });
    client.on('connect', async () => {
      connected = true;
      try {
        // Subscribe first, then fetch what was missed: nothing falls in between.
        const keys = [...h._subs.keys()];
        const granted = await Promise.all(keys.map(subscribe));
        const refused = new Set(keys.filter((k, i) => !granted[i]));
        await Promise.all(resumable().filter(ch => !refused.has(ch)).map(pull));
      } catch (e) {
        if (e?.name === 'AbortError') return;
        return fail(e instanceof HeraldError ? e : new HeraldError('mqtt_error', e.message));
      }
      if (!closed) ctx.opened();
    });
    client.on('message', (topic, payload) => {
      if (closed) return;
      if (topic.startsWith(UNREAD_TOPIC)) {
        try { ctx.unread(JSON.parse(new TextDecoder().decode(payload)).count); } catch { /* not a count */ }
        return;
      }
      if (!h._wants(topic)) return;
      pull(topic).catch(e => {
        if (e?.name !== 'AbortError' && !closed) fail(e instanceof HeraldError ? e : new HeraldError('poll_failed', e.message));
      });
    });
    client.on('disconnect', packet => { reason = `server sent DISCONNECT (reason ${packet?.reasonCode ?? '?'})`; });
    client.on('error', err => {
      // A refused CONNECT: 0x86/0x87 (v5), 4/5 (v3.1.1) mean the token.
      const auth = [0x86, 0x87, 4, 5].includes(err?.code);
      fail(new HeraldError(auth ? 'unauthorized' : 'mqtt_error', `MQTT: ${err?.message || err}`, auth ? 401 : 0));
    });
    client.on('close', () => fail(new HeraldError('mqtt_closed', `the MQTT connection closed${reason ? ` (${reason})` : ''}`)));
  }, err => fail(new HeraldError('unsupported', `could not load MQTT.js: ${err.message}`)));

  return {
    close() {
      closed = true; // every handler above is inert from now on
      ctrl.abort();
      client?.end(true);
    },
    add,
    remove,
  };
}

const TRANSPORTS = {
  ws: connectWs,
  sse: connectSse,
  longpoll: connectLongPoll,
  poll: connectPoll,
  iframe: connectIframe,
  mqtt: connectMqtt,
};

// --- small helpers --------------------------------------------------------------

function checkTransports(list) {
  if (!Array.isArray(list) || list.length === 0) throw new TypeError('transports must be a non-empty array');
  for (const t of list) if (!(t in TRANSPORTS)) throw new TypeError(`unknown transport '${t}'`);
  return [...list];
}

function isFilter(key) {
  return key.split('/').some(s => s === '+' || s === '#');
}

/** MQTT-style match: `+` is one segment, a final `#` any number (even none). */
export function matches(filter, channel) {
  const f = filter.split('/');
  const c = channel.split('/');
  for (let i = 0; i < f.length; i++) {
    if (f[i] === '#') return true;
    if (i >= c.length || (f[i] !== '+' && f[i] !== c[i])) return false;
  }
  return f.length === c.length;
}

/** A channel as URL path segments (valid names need no escaping; this is belt and braces). */
function channelPath(channel) {
  return channel.split('/').map(encodeURIComponent).join('/');
}

/** The JSON body of a response, or a HeraldError from the server's `{code, message}`. */
async function readJson(res) {
  let body = null;
  try { body = await res.json(); } catch { /* no JSON body */ }
  if (!res.ok) {
    const retryAfter = body?.retry_after || Number(res.headers.get('retry-after')) || 0;
    throw new HeraldError(body?.code || `http_${res.status}`, body?.message || `HTTP ${res.status}`, res.status, retryAfter);
  }
  return body;
}

/** Resolves after `ms`, or at once when `signal` aborts. */
function sleep(ms, signal) {
  return new Promise(resolve => {
    const done = () => { clearTimeout(t); signal?.removeEventListener('abort', done); resolve(); };
    const t = setTimeout(done, ms);
    signal?.addEventListener('abort', done);
  });
}
