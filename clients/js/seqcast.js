// seqcast browser client: one WebSocket to a seqcast server, reconnecting on its own.
//
// Boundary: this module speaks the wire protocol of docs/protocol.md: the WebSocket `/ws` and the
// recovery endpoint `GET /websocket/messages`; it has no dependencies and works wherever a
// WebSocket constructor exists (browsers; Node with the `ws` package passed as the `WebSocket`
// option).
// Invariant: per subscription key, the application sees every message at most once and in
// strictly increasing `sequence_number` order; whatever the server says it could not replay is
// reported as a `gap` event, never hidden.

/** Channel names: never contain `:`. */
export const CHANNEL_PATTERN = /^[A-Za-z0-9_.-]{1,64}$/;
/** Request ids (also the grammar of session ids). */
export const REQUEST_ID_PATTERN = /^[A-Za-z0-9_.:-]{1,128}$/;
/** Close code the client sends when it drops a connection on purpose in order to reconnect. */
export const RECONNECT_CLOSE_CODE = 4000;

const DEFAULT_BACKOFF = Object.freeze({ initialMs: 500, maxMs: 30_000 });
const MAX_RECOVERY_PAGES = 1_000;

/**
 * Delay before reconnect attempt number `attempt` (0 for the first retry): capped exponential
 * backoff with full jitter, a uniform draw from [0, min(maxMs, initialMs · 2^attempt)).
 * Full jitter spreads a crowd of clients that lost the same server over the whole interval.
 */
export function backoffDelay(attempt, backoff = DEFAULT_BACKOFF, random = Math.random) {
  const initialMs = backoff.initialMs ?? DEFAULT_BACKOFF.initialMs;
  const maxMs = backoff.maxMs ?? DEFAULT_BACKOFF.maxMs;
  const exponent = Math.min(Math.max(0, Math.floor(attempt)), 52);
  const cap = Math.min(maxMs, initialMs * 2 ** exponent);
  return Math.floor(random() * cap);
}

/** A sessionStorage-like store kept in memory (Node, or a browser where sessionStorage throws). */
export function memoryStorage() {
  const items = new Map();
  return {
    getItem: (key) => (items.has(key) ? items.get(key) : null),
    setItem: (key, value) => void items.set(key, String(value)),
    removeItem: (key) => void items.delete(key),
  };
}

function defaultStorage() {
  try {
    const s = globalThis.sessionStorage;
    if (s) {
      s.getItem('seqcast.probe'); // throws in sandboxed frames and with storage disabled
      return s;
    }
  } catch {
    // fall through: no usable sessionStorage
  }
  return memoryStorage();
}

function randomSessionId() {
  const bytes = new Uint8Array(16);
  if (globalThis.crypto?.getRandomValues) {
    globalThis.crypto.getRandomValues(bytes); // unlike randomUUID, also there on plain http
  } else {
    for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  }
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * The tab's identity for log correlation: a session id made once per tab and a
 * connection counter, both in sessionStorage so they survive a page reload but not a new tab.
 */
export class SessionCounter {
  #storage;
  #prefix;

  constructor(storage = defaultStorage(), prefix = 'seqcast') {
    this.#storage = storage;
    this.#prefix = prefix;
  }

  /** The tab's session id, made and stored on first use. */
  get sessionId() {
    const key = `${this.#prefix}.session_id`;
    let id = this.#storage.getItem(key);
    if (!id || !REQUEST_ID_PATTERN.test(id)) {
      id = randomSessionId();
      this.#storage.setItem(key, id);
    }
    return id;
  }

  /** The number of the latest connection of this tab (0 before the first). */
  get current() {
    const n = Number.parseInt(this.#storage.getItem(`${this.#prefix}.connection_sequence`) ?? '', 10);
    return Number.isSafeInteger(n) && n > 0 ? n : 0;
  }

  /** Take the number for a new connection: 1 for the first of the tab, then +1 each time. */
  next() {
    const n = this.current + 1;
    this.#storage.setItem(`${this.#prefix}.connection_sequence`, String(n));
    return n;
  }
}

/** An error from the server (an `error` frame or a failed HTTP call) or from the client itself. */
export class SeqcastError extends Error {
  constructor(code, message, details = {}) {
    super(message);
    this.name = 'SeqcastError';
    this.code = code;
    Object.assign(this, details);
  }
}

function reportListenerError(err) {
  // A broken listener must not break delivery to the others, nor stay silent.
  if (typeof globalThis.reportError === 'function') globalThis.reportError(err);
  else setTimeout(() => { throw err; }, 0);
}

function keyOf(channel, requestId) {
  return `${channel}:${requestId}`;
}

function checkNames(channel, requestId) {
  if (typeof channel !== 'string' || !CHANNEL_PATTERN.test(channel)) {
    throw new TypeError(`invalid channel ${JSON.stringify(channel)}: expected [A-Za-z0-9_.-]{1,64}`);
  }
  if (typeof requestId !== 'string' || !REQUEST_ID_PATTERN.test(requestId)) {
    throw new TypeError(`invalid request id ${JSON.stringify(requestId)}: expected [A-Za-z0-9_.:-]{1,128}`);
  }
}

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc?.host) return undefined;
  return `${loc.protocol === 'https:' ? 'wss' : 'ws'}://${loc.host}/ws`;
}

function httpBaseOf(wsUrl) {
  const u = new URL(wsUrl);
  u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
  u.pathname = u.pathname.replace(/\/ws\/?$/, '') || '/';
  u.search = '';
  u.hash = '';
  return u.toString().replace(/\/$/, '');
}

/**
 * A seqcast connection with its subscriptions. See docs/client.md.
 */
export class SeqcastClient {
  #url;
  #httpBase;
  #tokenSource;
  #tokenExp = null;
  #refreshTimer = null;
  #WebSocket;
  #fetch;
  #backoff;
  #random;
  #heartbeatMs;
  #connectTimeoutMs;
  #session;

  #state = 'idle';
  #ws = null;
  #wsConnectionSequence = 0;
  #info = null;
  #attempt = 0;
  #generation = 0;
  #reconnectTimer = null;
  #reconnectAt = null;
  #connectTimer = null;
  #heartbeatTimer = null;
  #lastFrameAt = 0;
  #waiters = [];
  #listeners = new Map();
  /** key → subscription state; the only subscriptions the client re-sends after a reconnect. */
  #subs = new Map();
  /** ref → publish not answered yet, in the order sent (Map keeps insertion order). */
  #publishes = new Map();
  #nextRef = 1;
  #idPrefix = `js${Math.floor(Math.random() * 2 ** 48).toString(16).padStart(12, '0')}`;
  #nextId = 1;
  #stats = { delivered: 0, duplicatesDropped: 0, gaps: 0, reconnects: 0 };

  constructor(options = {}) {
    this.#url = options.url ?? defaultUrl();
    if (!this.#url) throw new TypeError('SeqcastClient: `url` is required outside a browser page');
    this.#httpBase = options.httpUrl ? String(options.httpUrl).replace(/\/$/, '') : httpBaseOf(this.#url);
    this.#tokenSource = options.token;
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== 'function') {
      throw new TypeError('SeqcastClient: no WebSocket constructor; pass one as the `WebSocket` option (e.g. from the `ws` package)');
    }
    this.#fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);
    this.#backoff = { ...DEFAULT_BACKOFF, ...(options.backoff ?? {}) };
    this.#random = options.random ?? Math.random;
    this.#heartbeatMs = options.heartbeatMs ?? 25_000;
    this.#connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    this.#session = new SessionCounter(options.storage ?? defaultStorage(), options.storagePrefix ?? 'seqcast');
  }

  /** 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed' */
  get state() {
    return this.#state;
  }

  /** The tab's session id, sent in every `hello`. */
  get sessionId() {
    return this.#session.sessionId;
  }

  /** The number of the latest connection this tab opened (survives reloads). */
  get connectionSequence() {
    return this.#session.current;
  }

  /** What the server said in the latest `connected` frame, or null before the first. */
  get connection() {
    return this.#info;
  }

  /** When the next reconnect attempt starts (ms since the epoch), while `state` is 'reconnecting'. */
  get reconnectAt() {
    return this.#reconnectAt;
  }

  /** Counters: delivered messages, duplicates dropped, gaps reported, reconnects. */
  get stats() {
    return { ...this.#stats };
  }

  /**
   * The subscriptions the client follows, with the last sequence number delivered for each;
   * `active` once the server acknowledged it on the current connection (and no recovery is pending).
   */
  get subscriptions() {
    return [...this.#subs.values()].map((s) => ({
      channel: s.channel,
      requestId: s.requestId,
      subscriptionKey: s.key,
      lastSequence: s.lastSeq,
      epoch: s.epoch,
      active: s.acked && !s.buffer,
    }));
  }

  /** Listen to 'state', 'connected', 'disconnected', 'subscribed', 'message', 'gap' or 'error'. Returns a function that stops listening. */
  on(event, listener) {
    let set = this.#listeners.get(event);
    if (!set) this.#listeners.set(event, (set = new Set()));
    set.add(listener);
    return () => set.delete(listener);
  }

  /** Stop calling `listener` for `event`. */
  off(event, listener) {
    this.#listeners.get(event)?.delete(listener);
  }

  /**
   * Open the connection (reconnecting on its own from then on). Resolves with the `connected`
   * frame's contents once the server accepted the hello; rejects if `close()` comes first.
   */
  connect() {
    if (this.#state === 'open' && this.#info) return Promise.resolve(this.#info);
    const ready = new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
    if (this.#state !== 'connecting') {
      this.#clearReconnectTimer();
      this.#open();
    }
    return ready;
  }

  /**
   * Follow `channel:requestId`. `onMessage(message, meta)` gets each message once, in order;
   * `meta.replayed` is true for messages published before the current connection opened (backlog
   * or resume replay). Returns a function that removes this listener (and unsubscribes after the
   * last one). Options: `since`/`epoch` to resume from a known position, `onGap` for this key.
   */
  subscribe(channel, requestId, onMessage, options = {}) {
    checkNames(channel, requestId);
    const key = keyOf(channel, requestId);
    let sub = this.#subs.get(key);
    if (!sub) {
      const since = options.since ?? null;
      if (since !== null && !(Number.isSafeInteger(since) && since >= 0)) {
        throw new TypeError(`invalid since ${JSON.stringify(since)}: expected a non-negative integer`);
      }
      sub = {
        key,
        channel,
        requestId,
        handlers: new Set(),
        gapHandlers: new Set(),
        lastSeq: since ?? 0,
        resumeFrom: since,
        epoch: options.epoch ?? null,
        acked: false,
        catchUp: 0,
        ackHead: 0,
        buffer: null,
        recoveryToken: 0,
      };
      this.#subs.set(key, sub);
      if (this.#state === 'open') this.#sendSubscribe(sub);
    }
    const handler = typeof onMessage === 'function' ? onMessage : null;
    if (handler) sub.handlers.add(handler);
    if (typeof options.onGap === 'function') sub.gapHandlers.add(options.onGap);
    const onGap = options.onGap;
    let removed = false;
    return () => {
      if (removed) return;
      removed = true;
      if (this.#subs.get(key) !== sub) return;
      if (handler) sub.handlers.delete(handler);
      if (onGap) sub.gapHandlers.delete(onGap);
      if (sub.handlers.size === 0) this.unsubscribe(channel, requestId);
    };
  }

  /** Stop following `channel:requestId`; frames for it that are still in flight are dropped. */
  unsubscribe(channel, requestId) {
    const key = keyOf(channel, requestId);
    const sub = this.#subs.get(key);
    if (!sub) return false;
    this.#subs.delete(key);
    sub.recoveryToken++;
    if (this.#state === 'open') this.#send({ type: 'unsubscribe', channel, request_id: requestId });
    return true;
  }

  /**
   * Publish `data` (any JSON value) to `channel:requestId` over this connection; the token must
   * carry `publish: true`. Resolves with `{ sequenceNumber, streamSequence, messageId }` once the
   * server committed it; rejects with a SeqcastError (`forbidden`, `bad_request`,
   * `rate_limited`, `unavailable`, …) when the server refused it, or `closed` after `close()`.
   * Many may be in flight; they are committed in the order called. Every publish carries a
   * `messageId` (`options.messageId`, else one made here), and one not answered when the
   * connection drops is sent again after the reconnect: the server answers a message it had
   * already committed with its first numbers, so nothing is published twice.
   */
  publish(channel, requestId, data, options = {}) {
    checkNames(channel, requestId);
    const messageId = options.messageId ?? `${this.#idPrefix}-${this.#nextId++}`;
    if (typeof messageId !== 'string' || !REQUEST_ID_PATTERN.test(messageId)) {
      return Promise.reject(new TypeError(`invalid message id ${JSON.stringify(messageId)}: expected [A-Za-z0-9_.:-]{1,128}`));
    }
    const ref = this.#nextRef++;
    // Encoded once: a re-send after a reconnect is byte for byte the same message.
    const text = JSON.stringify({ type: 'publish', ref, channel, request_id: requestId, data, message_id: messageId });
    return new Promise((resolve, reject) => {
      this.#publishes.set(ref, { text, resolve, reject });
      if (this.#state === 'open') this.#sendText(text);
    });
  }

  /** Publishes sent (or waiting for the connection) and not answered yet. */
  get pendingPublishes() {
    return this.#publishes.size;
  }

  /** Unsubscribe everything: before a new search, so old results can never reach the new view. */
  clearAllSubscriptions() {
    for (const sub of [...this.#subs.values()]) this.unsubscribe(sub.channel, sub.requestId);
  }

  /** Close for good: no reconnect until `connect()` is called again. Subscriptions are kept. */
  close() {
    this.#generation++;
    this.#clearReconnectTimer();
    const ws = this.#ws;
    this.#teardownSocket();
    if (ws) this.#closeSocket(ws, 1000, 'client closed');
    for (const sub of this.#subs.values()) this.#resetForReconnect(sub);
    const waiters = this.#waiters.splice(0);
    for (const w of waiters) w.reject(new SeqcastError('closed', 'client closed before it connected'));
    const publishes = [...this.#publishes.values()];
    this.#publishes.clear();
    for (const p of publishes) p.reject(new SeqcastError('closed', 'client closed before the server answered the publish'));
    this.#setState('closed');
  }

  /**
   * Drop the connection abnormally and reconnect, as after a network failure (demos, tests).
   * With the `ws` package the socket is terminated (the server logs 1006); a browser can only
   * close with a code, so it sends 4000. `downMs` keeps the connection down that long before
   * reconnecting (default: the normal backoff); `connect()` reconnects at once.
   */
  dropConnection(options = {}) {
    const ws = this.#ws;
    if (!ws) {
      if (this.#state === 'reconnecting' && options.downMs != null) this.#scheduleReconnect(options.downMs);
      return false;
    }
    this.#lostConnection(ws, RECONNECT_CLOSE_CODE, 'dropped by client', options.downMs);
    return true;
  }

  /**
   * Fetch missed messages over HTTP (`GET /websocket/messages`), following `next_since` pages.
   * Filter with `channel`/`requestId`; pass the `epoch` your `since` belongs to. `complete` is
   * false where the server's window no longer reaches `since + 1` or the epoch changed.
   */
  async recover(since, options = {}) {
    if (!(Number.isSafeInteger(since) && since >= 0)) throw new TypeError(`invalid since ${JSON.stringify(since)}`);
    if (!this.#fetch) throw new SeqcastError('no_fetch', 'no fetch function; pass one as the `fetch` option');
    const messages = [];
    let cursor = since;
    let complete = true;
    let last = null;
    for (let page = 0; page < MAX_RECOVERY_PAGES; page++) {
      const q = new URLSearchParams({ since: String(cursor) });
      if (options.channel) q.set('channel', options.channel);
      if (options.requestId) q.set('request_id', options.requestId);
      if (options.limit) q.set('limit', String(options.limit));
      if (options.epoch) q.set('epoch', options.epoch);
      const token = await this.#token();
      const headers = token ? { Authorization: `Bearer ${token}` } : {};
      const res = await this.#fetch(`${this.#httpBase}/websocket/messages?${q}`, { headers });
      const body = await res.json().catch(() => null);
      if (!res.ok) {
        const err = body?.error ?? {};
        throw new SeqcastError(err.code ?? `http_${res.status}`, err.message ?? `recovery failed with HTTP ${res.status}`, { status: res.status });
      }
      messages.push(...body.messages);
      complete &&= body.complete;
      last = body;
      if (body.next_since == null || body.next_since <= cursor) break;
      cursor = body.next_since;
    }
    return {
      messages,
      head: last.head,
      oldestSequence: last.oldest_sequence ?? null,
      epoch: last.epoch,
      complete,
    };
  }

  // ---- connection lifecycle -------------------------------------------------------------

  async #open() {
    const generation = ++this.#generation;
    this.#setState('connecting');
    let token;
    try {
      token = await this.#token();
    } catch (err) {
      if (generation !== this.#generation) return;
      this.#emit('error', new SeqcastError('token', `token provider failed: ${err?.message ?? err}`, { cause: err }));
      this.#scheduleReconnect();
      return;
    }
    if (generation !== this.#generation) return; // closed or reopened while the token was coming
    let ws;
    try {
      ws = new this.#WebSocket(this.#url);
    } catch (err) {
      this.#emit('error', new SeqcastError('socket', `cannot open ${this.#url}: ${err?.message ?? err}`, { cause: err }));
      this.#scheduleReconnect();
      return;
    }
    this.#ws = ws;
    this.#wsConnectionSequence = 0;
    this.#lastFrameAt = Date.now();
    this.#connectTimer = setTimeout(() => {
      if (this.#ws === ws && this.#state !== 'open') this.#lostConnection(ws, RECONNECT_CLOSE_CODE, 'connect timeout');
    }, this.#connectTimeoutMs);
    ws.onopen = () => {
      if (this.#ws !== ws) return;
      // The number is taken when the server can see it, so the log shows no holes.
      this.#wsConnectionSequence = this.#session.next();
      const hello = { type: 'hello', session_id: this.#session.sessionId, connection_sequence: this.#wsConnectionSequence };
      if (token) hello.token = token;
      this.#tokenExp = tokenExpiry(token);
      this.#send(hello);
    };
    ws.onmessage = (event) => {
      if (this.#ws !== ws) return;
      this.#lastFrameAt = Date.now();
      this.#onFrame(typeof event.data === 'string' ? event.data : String(event.data));
    };
    ws.onerror = () => {
      // Always followed by close, which decides what happens next.
    };
    ws.onclose = (event) => {
      if (this.#ws !== ws) return;
      this.#lostConnection(ws, event.code, event.reason, undefined, true);
    };
  }

  /** The socket is gone (or given up on): forget it and plan the reconnect. */
  #lostConnection(ws, code, reason, downMs, alreadyClosed = false) {
    const wasOpen = this.#state === 'open';
    const connectionSequence = this.#wsConnectionSequence;
    this.#teardownSocket();
    if (!alreadyClosed) this.#abort(ws, code, reason);
    for (const sub of this.#subs.values()) this.#resetForReconnect(sub);
    // A refused token arrives as an `error` frame before the close (4001); the provider gets
    // another chance on the next attempt.
    this.#emit('disconnected', { code, reason, connectionSequence, wasOpen });
    this.#scheduleReconnect(downMs);
  }

  #teardownSocket() {
    const ws = this.#ws;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    this.#ws = null;
    clearTimeout(this.#connectTimer);
    this.#connectTimer = null;
    clearInterval(this.#heartbeatTimer);
    this.#heartbeatTimer = null;
    clearTimeout(this.#refreshTimer);
    this.#refreshTimer = null;
  }

  /**
   * The server closes a connection (4001) when its token's `exp` passes: shortly before, ask the
   * token provider for a fresh one and send it in an `auth` frame (answered `auth_ok`).
   */
  #scheduleRefresh(ws) {
    clearTimeout(this.#refreshTimer);
    this.#refreshTimer = null;
    if (typeof this.#tokenSource !== 'function' || this.#tokenExp == null) return;
    const leftMs = this.#tokenExp * 1000 - Date.now();
    // A tenth of what is left, at least 2 s and at most 60 s before expiry.
    const marginMs = Math.min(60_000, Math.max(2_000, leftMs / 10));
    this.#refreshTimer = setTimeout(async () => {
      this.#refreshTimer = null;
      if (this.#ws !== ws) return;
      let token;
      try {
        token = await this.#token();
      } catch (err) {
        this.#emit('error', new SeqcastError('token', `token provider failed: ${err?.message ?? err}`, { cause: err }));
        return;
      }
      if (this.#ws !== ws || !token) return;
      this.#send({ type: 'auth', token });
    }, Math.max(0, leftMs - marginMs));
  }

  #abort(ws, code, reason) {
    if (typeof ws.terminate === 'function') {
      ws.terminate(); // `ws` package: no close frame, like a network failure
      return;
    }
    this.#closeSocket(ws, code, reason);
  }

  #closeSocket(ws, code, reason) {
    try {
      ws.close(code, reason);
    } catch {
      try {
        ws.close();
      } catch {
        // nothing more to do for a socket that cannot even close
      }
    }
  }

  #scheduleReconnect(downMs) {
    this.#clearReconnectTimer();
    const delay = downMs ?? backoffDelay(this.#attempt++, this.#backoff, this.#random);
    this.#reconnectAt = Date.now() + delay;
    this.#setState('reconnecting', { delayMs: delay });
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = null;
      this.#reconnectAt = null;
      this.#stats.reconnects++;
      this.#open();
    }, delay);
  }

  #clearReconnectTimer() {
    clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = null;
    this.#reconnectAt = null;
  }

  #startHeartbeat(ws) {
    if (!(this.#heartbeatMs > 0)) return;
    this.#heartbeatTimer = setInterval(() => {
      if (this.#ws !== ws) return;
      // Any frame counts as a sign of life; two quiet intervals mean the path is dead.
      if (Date.now() - this.#lastFrameAt > 2 * this.#heartbeatMs) {
        this.#lostConnection(ws, RECONNECT_CLOSE_CODE, 'heartbeat timeout');
      } else {
        this.#send({ type: 'ping' });
      }
    }, this.#heartbeatMs);
  }

  async #token() {
    const t = this.#tokenSource;
    const value = typeof t === 'function' ? await t() : t;
    return value == null || value === '' ? undefined : String(value);
  }

  #send(frame) {
    return this.#sendText(JSON.stringify(frame));
  }

  #sendText(text) {
    const ws = this.#ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(text);
    return true;
  }

  #setState(state, detail = {}) {
    if (this.#state === state && state !== 'reconnecting') return;
    this.#state = state;
    this.#emit('state', state, detail);
  }

  #emit(event, ...args) {
    const set = this.#listeners.get(event);
    if (!set) return;
    for (const listener of [...set]) {
      try {
        listener(...args);
      } catch (err) {
        reportListenerError(err);
      }
    }
  }

  // ---- frames --------------------------------------------------------------------------

  #onFrame(text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      this.#emit('error', new SeqcastError('bad_frame', 'the server sent a frame that is not JSON'));
      return;
    }
    switch (frame?.type) {
      case 'connected':
        return this.#onConnected(frame);
      case 'sub_ack':
        return this.#onSubAck(frame);
      case 'message':
        return this.#onMessage(frame);
      case 'publish_ack':
        return this.#onPublishAnswer(frame.ref, (p) => p.resolve({
          sequenceNumber: frame.sequence_number,
          streamSequence: frame.stream_sequence,
          messageId: frame.message_id,
        }));
      case 'error': {
        const err = new SeqcastError(frame.code ?? 'internal', frame.message ?? 'server error');
        // An error with the `ref` of a publish answers that publish (its promise rejects).
        if (frame.ref != null && this.#onPublishAnswer(frame.ref, (p) => p.reject(err))) return undefined;
        return this.#emit('error', err);
      }
      case 'pong':
        return undefined;
      case 'auth_ok':
        this.#tokenExp = typeof frame.exp === 'number' ? frame.exp : null;
        this.#emit('token_refreshed', { exp: this.#tokenExp });
        return this.#scheduleRefresh(this.#ws);
      default:
        return undefined; // frames from a newer server are ignored
    }
  }

  #onConnected(frame) {
    const ws = this.#ws;
    clearTimeout(this.#connectTimer);
    this.#connectTimer = null;
    this.#attempt = 0;
    this.#info = {
      clientId: frame.client_id,
      sessionId: frame.session_id ?? this.#session.sessionId,
      connectionSequence: frame.connection_sequence ?? this.#wsConnectionSequence,
      head: frame.head ?? 0,
      epoch: frame.epoch ?? null,
    };
    this.#setState('open');
    this.#startHeartbeat(ws);
    this.#scheduleRefresh(ws);
    for (const w of this.#waiters.splice(0)) w.resolve(this.#info);
    this.#emit('connected', this.#info);
    // The server never subscribes on its own: re-send what we still follow, each from where it stopped.
    for (const sub of this.#subs.values()) this.#sendSubscribe(sub);
    // Publishes not answered on the last connection (or made while offline) go now, in order.
    for (const p of this.#publishes.values()) this.#sendText(p.text);
  }

  /** Settle the publish `ref` with `settle`; false when none waits for that ref. */
  #onPublishAnswer(ref, settle) {
    const p = this.#publishes.get(ref);
    if (!p) return false;
    this.#publishes.delete(ref);
    settle(p);
    return true;
  }

  #sendSubscribe(sub) {
    const frame = { type: 'subscribe', channel: sub.channel, request_id: sub.requestId };
    if (sub.resumeFrom !== null) {
      frame.since = sub.resumeFrom;
      if (sub.epoch) frame.epoch = sub.epoch;
    }
    this.#send(frame);
  }

  #resetForReconnect(sub) {
    sub.acked = false;
    sub.catchUp = 0;
    sub.buffer = null;
    sub.recoveryToken++;
  }

  #onSubAck(frame) {
    const sub = this.#subs.get(frame.subscription_key ?? keyOf(frame.channel, frame.request_id));
    if (!sub) return; // unsubscribed meanwhile
    // sub_ack carries the head at the moment of subscribing (the exact seam); an older server
    // without it leaves the connection's head, the closest lower bound.
    const head = frame.head ?? this.#info?.head ?? 0;
    const previousEpoch = sub.epoch;
    const since = sub.resumeFrom;
    sub.acked = true;
    sub.ackHead = head;
    sub.epoch = frame.epoch ?? previousEpoch;
    const epochChanged = previousEpoch !== null && frame.epoch != null && frame.epoch !== previousEpoch;
    if (epochChanged) {
      // A new store numbers from 1 again: the old positions mean nothing in it.
      sub.lastSeq = 0;
      sub.resumeFrom = null;
    }
    if (sub.resumeFrom === null) {
      // A fresh subscription starts following at this connection's head; until its backlog has
      // arrived, resuming must start from what was really delivered.
      sub.catchUp = frame.drained ?? 0;
      sub.resumeFrom = sub.catchUp === 0 ? Math.max(sub.lastSeq, head) : sub.lastSeq;
    }
    this.#emit('subscribed', {
      channel: sub.channel,
      requestId: sub.requestId,
      subscriptionKey: sub.key,
      drained: frame.drained ?? 0,
      recovered: frame.recovered ?? null,
      epoch: sub.epoch,
    });
    if (frame.recovered !== false) return;
    const gap = {
      channel: sub.channel,
      requestId: sub.requestId,
      subscriptionKey: sub.key,
      since,
      oldestSequence: frame.oldest_sequence ?? null,
      epoch: sub.epoch,
      previousEpoch,
      reason: epochChanged ? 'epoch' : 'window',
    };
    if (epochChanged || since === null) {
      this.#reportGap(sub, gap);
      return;
    }
    // The socket's window did not reach back far enough; the HTTP endpoint may (a server can
    // serve it from the database). Hold this key's frames until we know.
    const token = ++sub.recoveryToken;
    sub.buffer = [];
    this.recover(since, { channel: sub.channel, requestId: sub.requestId, epoch: previousEpoch ?? undefined })
      .then(
        (r) => ({ messages: r.messages, complete: r.complete, oldestSequence: r.oldestSequence }),
        (err) => {
          this.#emit('error', err instanceof SeqcastError ? err : new SeqcastError('recovery', String(err?.message ?? err)));
          return { messages: [], complete: false, oldestSequence: null };
        },
      )
      .then((r) => {
        if (sub.recoveryToken !== token || this.#subs.get(sub.key) !== sub) return; // superseded
        const buffered = sub.buffer ?? [];
        sub.buffer = null;
        if (!r.complete) this.#reportGap(sub, { ...gap, oldestSequence: gap.oldestSequence ?? r.oldestSequence });
        const merged = [...r.messages.filter((m) => m.channel === sub.channel && m.request_id === sub.requestId), ...buffered];
        merged.sort((a, b) => a.sequence_number - b.sequence_number);
        for (const m of merged) this.#deliver(sub, m);
      });
  }

  #reportGap(sub, gap) {
    this.#stats.gaps++;
    for (const h of [...sub.gapHandlers]) {
      try {
        h(gap);
      } catch (err) {
        reportListenerError(err);
      }
    }
    this.#emit('gap', gap);
  }

  #onMessage(frame) {
    const sub = this.#subs.get(keyOf(frame.channel, frame.request_id));
    // Frames before this connection's sub_ack belong to an earlier subscription of the key.
    if (!sub || !sub.acked) return;
    if (sub.catchUp > 0) {
      // The first `drained` frames after a fresh sub_ack are the backlog; once all are in, the
      // subscription has caught up with the connection's head.
      sub.catchUp--;
      if (sub.catchUp === 0) sub.resumeFrom = Math.max(sub.resumeFrom ?? 0, sub.ackHead);
    }
    if (sub.buffer) {
      sub.buffer.push(frame);
      return;
    }
    this.#deliver(sub, frame);
  }

  #deliver(sub, message) {
    const seq = message.sequence_number;
    if (!(seq > sub.lastSeq)) {
      this.#stats.duplicatesDropped++;
      return;
    }
    sub.lastSeq = seq;
    const head = this.#info?.head ?? 0;
    sub.resumeFrom = Math.max(sub.resumeFrom ?? 0, seq);
    this.#stats.delivered++;
    const meta = { replayed: seq <= head, subscriptionKey: sub.key };
    for (const h of [...sub.handlers]) {
      try {
        h(message, meta);
      } catch (err) {
        reportListenerError(err);
      }
    }
    this.#emit('message', message, meta);
  }
}

/** The `exp` claim (Unix seconds) of a JWT, or null when it has none or cannot be read. */
function tokenExpiry(token) {
  try {
    const part = String(token).split('.')[1];
    const json = typeof atob === 'function'
      ? atob(part.replace(/-/g, '+').replace(/_/g, '/'))
      : Buffer.from(part, 'base64url').toString('utf8');
    const exp = JSON.parse(json).exp;
    return typeof exp === 'number' ? exp : null;
  } catch {
    return null;
  }
}
