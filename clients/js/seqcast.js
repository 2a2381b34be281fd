// seqcast browser client: one WebSocket to a seqcast server, reconnecting on its own.
//
// Boundary: this module speaks the wire protocol of docs/protocol.md: the WebSocket `/ws`, the
// recovery endpoint `GET /websocket/messages`, and — where WebSocket connections keep failing —
// the Server-Sent Events stream `GET /events` read with `fetch` (publishing then goes to
// `POST /api/publish`); it has no dependencies and works wherever a WebSocket constructor exists
// (browsers; Node with the `ws` package passed as the `WebSocket` option).
// Invariant: per subscription key, the application sees every message at most once and in
// strictly increasing `sequence_number` order, whichever transport carried it and across every
// switch between them; whatever the server says it could not replay is reported as a `gap`
// event (`recovered: false`), never hidden.

/** Channel names: never contain `:`. */
export const CHANNEL_PATTERN = /^[A-Za-z0-9_.-]{1,64}$/;
/** Request ids (also the grammar of session ids). */
export const REQUEST_ID_PATTERN = /^[A-Za-z0-9_.:-]{1,128}$/;
/** Close code the client sends when it drops a connection on purpose in order to reconnect. */
export const RECONNECT_CLOSE_CODE = 4000;

const DEFAULT_BACKOFF = Object.freeze({ initialMs: 500, maxMs: 30_000 });
const DEFAULT_FALLBACK = Object.freeze({ afterFailures: 3, probeMs: 30_000, path: '/events' });
const MAX_RECOVERY_PAGES = 1_000;
/** Keys per `resume` frame: the server's default `--max-subscriptions`. */
const MAX_RESUME_KEYS = 1_000;
/** The longest SSE line the parser holds (a message is at most 1 MiB of JSON by default). */
const MAX_SSE_LINE_CHARS = 16 * 1024 * 1024;

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

/**
 * An incremental parser of a `text/event-stream` body (the WHATWG rules): feed it text as it
 * arrives, in chunks cut anywhere, and it returns the events each chunk completes. Lines end with
 * LF, CRLF or CR (also when a CRLF is split between chunks); `:` lines are comments; `data` lines
 * of one event are joined with LF; an event without data is not dispatched; `id` persists.
 */
export class SseParser {
  #line = '';
  #event = '';
  #data = [];
  #afterCR = false;
  #started = false;
  /** The latest `id` field seen (sent back as `Last-Event-ID`). */
  lastEventId = '';
  /** The latest `retry` field, in ms, or null. */
  retry = null;

  /** Feed decoded text; returns `[{event, data, id}]` for the events it completed. */
  push(text) {
    const out = [];
    let s = String(text);
    if (!this.#started && s.length > 0) {
      this.#started = true;
      if (s.charCodeAt(0) === 0xfeff) s = s.slice(1); // a leading BOM is not part of the stream
    }
    let start = 0;
    if (this.#afterCR && s.charCodeAt(0) === 10) start = 1; // the LF of a CRLF split across chunks
    this.#afterCR = false;
    for (let i = start; i < s.length; i++) {
      const c = s.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      this.#takeLine(this.#line + s.slice(start, i), out);
      this.#line = '';
      if (c === 13) {
        if (i + 1 === s.length) this.#afterCR = true;
        else if (s.charCodeAt(i + 1) === 10) i++;
      }
      start = i + 1;
    }
    this.#line += s.slice(start);
    if (this.#line.length > MAX_SSE_LINE_CHARS) {
      this.#line = '';
      throw new SeqcastError('bad_stream', `an event-stream line longer than ${MAX_SSE_LINE_CHARS} characters`);
    }
    return out;
  }

  #takeLine(line, out) {
    if (line === '') {
      if (this.#data.length > 0) out.push({ event: this.#event || 'message', data: this.#data.join('\n'), id: this.lastEventId });
      this.#data = [];
      this.#event = '';
      return;
    }
    if (line.charCodeAt(0) === 58) return; // ':' — a comment (the server's heartbeat)
    const colon = line.indexOf(':');
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? '' : line.slice(colon + 1);
    if (value.charCodeAt(0) === 32) value = value.slice(1);
    if (field === 'data') this.#data.push(value);
    else if (field === 'event') this.#event = value;
    else if (field === 'id' && !value.includes('\0')) this.lastEventId = value;
    else if (field === 'retry' && /^[0-9]+$/.test(value)) this.retry = Number(value);
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
  #useResume;
  /** The SSE fallback's settings, or null when it is off. */
  #fallback;

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
  /** WebSocket attempts in a row that never reached `connected`. */
  #wsFailures = 0;
  /** The current socket got `connected` (frames other than `hello` may go). */
  #wsReady = false;
  /** `resume` frames sent on the current socket and not answered yet: their keys. */
  #pendingResumes = [];
  /** The SSE stream while it is the transport (a WebSocket is then only a probe), else null. */
  #sse = null;
  #probeTimer = null;
  #httpPublishing = false;

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
    this.#useResume = options.resume ?? true;
    this.#fallback = options.fallback === false ? null : { ...DEFAULT_FALLBACK, ...(options.fallback ?? {}) };
  }

  /**
   * 'websocket', or 'sse' while WebSocket connections fail and the Server-Sent Events stream
   * carries the messages (a WebSocket is probed now and then, and taken back without a gap).
   */
  get transport() {
    return this.#sse ? 'sse' : 'websocket';
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
      active: (this.#sse ? s.sseActive : s.acked) && !s.buffer,
    }));
  }

  /** Listen to 'state', 'transport', 'connected', 'disconnected', 'subscribed', 'message', 'gap', 'error' or 'token_refreshed'. Returns a function that stops listening. */
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
    if (this.#state === 'open' && this.#sse) return Promise.resolve(this.#connectionInfo());
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
        sseActive: false,
      };
      this.#subs.set(key, sub);
      if (this.#sse) this.#restartSse();
      if (this.#wsReady) this.#sendSubscribe(sub);
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
    if (this.#sse) this.#restartSse();
    if (this.#wsReady) this.#send({ type: 'unsubscribe', channel, request_id: requestId });
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
    const body = JSON.stringify({ channel, request_id: requestId, data, message_id: messageId });
    return new Promise((resolve, reject) => {
      this.#publishes.set(ref, { text, body, resolve, reject });
      if (this.#sse) this.#publishOverHttp();
      else if (this.#state === 'open') this.#sendText(text);
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
    this.#stopSse();
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
    // While the SSE stream carries the messages, a WebSocket attempt is a probe: the state
    // stays what the stream makes it.
    if (!this.#sse) this.#setState('connecting');
    let token;
    try {
      token = await this.#token();
    } catch (err) {
      if (generation !== this.#generation) return;
      this.#emit('error', new SeqcastError('token', `token provider failed: ${err?.message ?? err}`, { cause: err }));
      if (this.#sse) this.#scheduleProbe();
      else this.#scheduleReconnect();
      return;
    }
    if (generation !== this.#generation) return; // closed or reopened while the token was coming
    let ws;
    try {
      ws = new this.#WebSocket(this.#url);
    } catch (err) {
      this.#emit('error', new SeqcastError('socket', `cannot open ${this.#url}: ${err?.message ?? err}`, { cause: err }));
      this.#webSocketFailed();
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
    const wasOpen = this.#wsReady;
    const connectionSequence = this.#wsConnectionSequence;
    this.#teardownSocket();
    if (!alreadyClosed) this.#abort(ws, code, reason);
    if (this.#sse) {
      // A probe (or a hand-over back from SSE) that did not work out: the stream goes on.
      for (const sub of this.#subs.values()) sub.acked = false;
      if (wasOpen) this.#emit('disconnected', { code, reason, connectionSequence, wasOpen });
      this.#scheduleProbe();
      return;
    }
    for (const sub of this.#subs.values()) this.#resetForReconnect(sub);
    // A refused token arrives as an `error` frame before the close (4001); the provider gets
    // another chance on the next attempt.
    this.#emit('disconnected', { code, reason, connectionSequence, wasOpen });
    if (wasOpen || downMs != null) {
      this.#wsFailures = 0;
      this.#scheduleReconnect(downMs);
    } else {
      this.#webSocketFailed();
    }
  }

  /**
   * A WebSocket attempt never reached `connected`. After `fallback.afterFailures` of them in a
   * row the messages come over Server-Sent Events instead (a proxy or network that lets HTTP
   * through but not WebSocket); otherwise the next attempt comes after the backoff.
   */
  #webSocketFailed() {
    if (this.#sse) {
      this.#scheduleProbe();
      return;
    }
    this.#wsFailures++;
    // Only a client that follows something has anything for a stream to carry.
    if (this.#fallback && this.#fetch && this.#subs.size > 0 && this.#wsFailures >= this.#fallback.afterFailures) {
      this.#wsFailures = 0;
      this.#startSse();
      return;
    }
    this.#scheduleReconnect();
  }

  #teardownSocket() {
    const ws = this.#ws;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    this.#ws = null;
    this.#wsReady = false;
    this.#pendingResumes = [];
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

  // ---- the Server-Sent Events fallback ----------------------------------------------------

  /** What `connect()` resolves with: the latest `connected`, or what is known without one. */
  #connectionInfo() {
    return this.#info ?? {
      clientId: null,
      sessionId: this.#session.sessionId,
      connectionSequence: this.#session.current,
      head: 0,
      epoch: null,
    };
  }

  #newSse(previous) {
    return {
      abort: new AbortController(),
      lastEventId: previous?.lastEventId ?? '',
      announced: new Set([...(previous?.announced ?? [])].filter((k) => this.#subs.has(k))),
      watchdog: null,
      restartQueued: false,
      quickEnds: 0,
      openedAt: 0,
      events: 0,
    };
  }

  /** WebSocket keeps failing: carry the messages over `GET /events` and probe WebSocket now and then. */
  #startSse() {
    this.#clearReconnectTimer();
    const sse = this.#newSse(null);
    this.#sse = sse;
    for (const sub of this.#subs.values()) this.#resetForReconnect(sub);
    this.#emit('transport', 'sse', { reason: `${this.#fallback.afterFailures} WebSocket attempts failed in a row` });
    this.#setState('connecting');
    this.#runSse(sse, false);
    this.#scheduleProbe();
  }

  /** Stop the SSE stream and its probes (the socket took over, the stream failed, or `close()`). */
  #stopSse() {
    const sse = this.#sse;
    if (!sse) return;
    this.#sse = null;
    sse.abort.abort();
    clearTimeout(sse.watchdog);
    clearTimeout(this.#probeTimer);
    this.#probeTimer = null;
    for (const sub of this.#subs.values()) sub.sseActive = false;
  }

  /** The set of keys changed: open a stream over the new set, from where each key stands. */
  #restartSse() {
    const old = this.#sse;
    if (!old || old.restartQueued) return;
    old.restartQueued = true;
    // One new stream for all the subscribe/unsubscribe calls of this turn.
    queueMicrotask(() => {
      if (this.#sse !== old) return;
      old.abort.abort();
      clearTimeout(old.watchdog);
      const next = this.#newSse(old);
      this.#sse = next;
      this.#runSse(next, false);
    });
  }

  /**
   * Where a new stream starts: the lowest position of the keys it carries (a key without one
   * starts where the stream or the last connection stood). Each key drops what it already has.
   */
  #sseSince(sse, subs) {
    const fallback = sse.lastEventId && /^[0-9]+$/.test(sse.lastEventId) ? Number(sse.lastEventId) : this.#info?.head ?? null;
    let since = null;
    for (const sub of subs) {
      const position = sub.resumeFrom ?? fallback;
      if (position === null) return null;
      since = since === null ? position : Math.min(since, position);
    }
    return since;
  }

  async #runSse(sse, afterEnd) {
    const subs = [...this.#subs.values()];
    if (subs.length === 0) {
      // Nothing left to follow, so nothing for a stream to carry: back to WebSocket attempts.
      this.#stopSse();
      this.#emit('transport', 'websocket', { reason: 'no subscriptions left' });
      if (!this.#ws) this.#scheduleReconnect();
      return;
    }
    const path = this.#fallback.path;
    const q = new URLSearchParams();
    for (const sub of subs) q.append('key', sub.key);
    const since = this.#sseSince(sse, subs);
    if (since !== null) q.set('since', String(since));
    const epoch = subs.find((s) => s.epoch)?.epoch ?? this.#info?.epoch;
    if (epoch) q.set('epoch', epoch);
    // The token goes in a header, never in the URL (URLs end up in logs and histories).
    const headers = { accept: 'text/event-stream' };
    let res;
    try {
      const token = await this.#token();
      if (this.#sse !== sse) return;
      if (token) headers.authorization = `Bearer ${token}`;
      if (afterEnd && sse.lastEventId) headers['last-event-id'] = sse.lastEventId;
      res = await this.#fetch(`${this.#httpBase}${path}?${q}`, { headers, signal: sse.abort.signal, cache: 'no-store' });
    } catch (err) {
      if (this.#sse !== sse) return;
      this.#sseFailed(sse, new SeqcastError('sse', `GET ${path} failed: ${err?.message ?? err}`, { cause: err }));
      return;
    }
    if (this.#sse !== sse) {
      res.body?.cancel().catch(() => {});
      return;
    }
    if (!res.ok || !res.body) {
      const body = await res.json().catch(() => null);
      const e = body?.error ?? {};
      this.#sseFailed(sse, new SeqcastError(e.code ?? `http_${res.status}`, e.message ?? `GET ${path}: HTTP ${res.status}`, { status: res.status }));
      return;
    }
    this.#sseOpened(sse, subs);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    const parser = new SseParser();
    this.#armSseWatchdog(sse);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (this.#sse !== sse) return;
        if (done) break;
        this.#armSseWatchdog(sse);
        for (const event of parser.push(decoder.decode(value, { stream: true }))) {
          this.#onSseEvent(sse, event);
          if (this.#sse !== sse) return; // handed over to a socket, or restarted
        }
      }
    } catch (err) {
      if (this.#sse !== sse) return;
      this.#sseFailed(sse, new SeqcastError('sse', `the event stream broke: ${err?.message ?? err}`, { cause: err }));
      return;
    }
    clearTimeout(sse.watchdog);
    // The server ends every stream after `--sse-max-secs`: take it up again at once, from the
    // last event id. A server that keeps ending empty streams at once is a failure, not a rhythm.
    const empty = sse.events === 0 && Date.now() - sse.openedAt < 1_000;
    sse.quickEnds = empty ? sse.quickEnds + 1 : 0;
    if (sse.quickEnds >= 3) {
      this.#sseFailed(sse, new SeqcastError('sse', `GET ${path} keeps ending at once`));
      return;
    }
    this.#runSse(sse, true);
  }

  /** The stream answered 200: its keys are followed. */
  #sseOpened(sse, subs) {
    sse.openedAt = Date.now();
    sse.events = 0;
    const fresh = [];
    for (const sub of subs) {
      if (this.#subs.get(sub.key) !== sub) continue;
      sub.sseActive = true;
      if (!sse.announced.has(sub.key)) {
        sse.announced.add(sub.key);
        fresh.push(sub);
      }
    }
    this.#setState('open');
    for (const w of this.#waiters.splice(0)) w.resolve(this.#connectionInfo());
    for (const sub of fresh) {
      this.#emit('subscribed', {
        channel: sub.channel,
        requestId: sub.requestId,
        subscriptionKey: sub.key,
        drained: 0,
        recovered: null,
        epoch: sub.epoch,
        transport: 'sse',
      });
    }
    this.#publishOverHttp();
  }

  /** No byte (not even the server's comment heartbeat) for two heartbeat intervals: the path is dead. */
  #armSseWatchdog(sse) {
    clearTimeout(sse.watchdog);
    const stallMs = this.#fallback.stallMs ?? 2 * this.#heartbeatMs;
    if (!(stallMs > 0)) return;
    sse.watchdog = setTimeout(() => {
      if (this.#sse === sse) this.#sseFailed(sse, new SeqcastError('sse', `no data on the event stream for ${stallMs} ms`));
    }, stallMs);
  }

  /**
   * The stream could not be opened or broke: back to WebSocket attempts (the server may be
   * restarting; a blocked WebSocket sends us back here after `afterFailures` attempts).
   */
  #sseFailed(sse, err) {
    if (this.#sse !== sse) return;
    this.#emit('error', err);
    this.#stopSse();
    this.#emit('transport', 'websocket', { reason: err.message });
    if (this.#ws) {
      // A probe is under way: its outcome decides what comes next.
      if (!this.#wsReady) this.#setState('connecting');
      return;
    }
    for (const sub of this.#subs.values()) this.#resetForReconnect(sub);
    this.#scheduleReconnect();
  }

  #onSseEvent(sse, event) {
    sse.events++;
    if (event.id) sse.lastEventId = event.id;
    if (event.event !== 'message' && event.event !== 'reset') return; // newer servers' events
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      this.#emit('error', new SeqcastError('bad_frame', `the server sent an event whose data is not JSON (${event.event})`));
      return;
    }
    if (event.event === 'reset') {
      this.#onSseReset(data);
      return;
    }
    const sub = this.#subs.get(keyOf(data.channel, data.request_id));
    if (!sub) return; // unsubscribed meanwhile
    if (sub.buffer) sub.buffer.push(data);
    else this.#deliver(sub, data, 'sse');
  }

  /**
   * `event: reset` (`recovered: false`, `oldest_sequence`, `epoch`) comes first on a stream whose
   * window no longer reaches back to `since + 1`: a `gap` for each key that lost something.
   */
  #onSseReset(reset) {
    const epoch = reset.epoch ?? null;
    const oldest = reset.oldest_sequence ?? null;
    for (const sub of [...this.#subs.values()]) {
      if (reset.subscription_key && reset.subscription_key !== sub.key) continue;
      const previousEpoch = sub.epoch;
      const since = sub.resumeFrom;
      const epochChanged = previousEpoch !== null && epoch !== null && epoch !== previousEpoch;
      if (epoch) sub.epoch = epoch;
      if (epochChanged) {
        sub.lastSeq = 0;
        sub.resumeFrom = null;
      } else if (since === null || (oldest !== null && since + 1 >= oldest)) {
        continue; // nothing of this key is missing
      }
      this.#reportGap(sub, {
        channel: sub.channel,
        requestId: sub.requestId,
        subscriptionKey: sub.key,
        recovered: false,
        since,
        oldestSequence: oldest,
        epoch: sub.epoch,
        previousEpoch,
        reason: epochChanged ? 'epoch' : 'window',
        transport: 'sse',
      });
    }
  }

  /** While SSE carries the messages, try a WebSocket again now and then (`fallback.probeMs`). */
  #scheduleProbe() {
    clearTimeout(this.#probeTimer);
    this.#probeTimer = null;
    if (!this.#sse) return;
    const ms = this.#fallback.probeMs;
    const delay = Math.floor(ms / 2 + (this.#random() * ms) / 2);
    this.#probeTimer = setTimeout(() => {
      this.#probeTimer = null;
      if (this.#sse && !this.#ws) this.#open();
    }, delay);
  }

  /**
   * The socket follows every key now: close the SSE stream. It ran until this moment, and the
   * socket replays everything after the positions it resumed from, so nothing falls between.
   */
  #finishHandover() {
    if (!this.#sse || !this.#wsReady) return;
    for (const sub of this.#subs.values()) if (!sub.acked && !sub.refused) return;
    this.#stopSse();
    this.#emit('transport', 'websocket', { reason: 'a WebSocket connection works again' });
  }

  /**
   * Publishes while SSE carries the messages go to `POST /api/publish`, one at a time, in the
   * order called (the same message ids, so a publish also sent over a socket is not doubled).
   * One that fails on the network stays pending for the next transport.
   */
  async #publishOverHttp() {
    if (this.#httpPublishing) return;
    this.#httpPublishing = true;
    try {
      while (this.#sse) {
        const next = this.#publishes.entries().next();
        if (next.done) break;
        const [ref, p] = next.value;
        let res;
        let body;
        try {
          const token = await this.#token();
          const headers = { 'content-type': 'application/json' };
          if (token) headers.authorization = `Bearer ${token}`;
          res = await this.#fetch(`${this.#httpBase}/api/publish`, { method: 'POST', headers, body: p.body });
          body = await res.json().catch(() => null);
        } catch {
          break; // the network: sent again by whichever transport comes next
        }
        if (this.#publishes.get(ref) !== p) continue; // answered over a socket meanwhile
        this.#publishes.delete(ref);
        if (res.ok && body) {
          p.resolve({ sequenceNumber: body.sequence_number, streamSequence: body.stream_sequence, messageId: body.message_id });
        } else {
          const e = body?.error ?? {};
          p.reject(new SeqcastError(e.code ?? `http_${res.status}`, e.message ?? `publish failed with HTTP ${res.status}`, { status: res.status }));
        }
      }
    } finally {
      this.#httpPublishing = false;
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
      case 'resume_ack':
        return this.#onResumeAck(frame);
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
        if (this.#resumeRefused(err)) return undefined;
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
    this.#wsFailures = 0;
    this.#wsReady = true;
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
    // The server never subscribes on its own: re-send what we still follow, each from where it
    // stopped. While the SSE stream still carries the messages, it goes on until the socket has
    // acknowledged every key (the hand-over), so nothing falls between the two.
    this.#resubscribeAll();
    this.#finishHandover();
    // Publishes not answered on the last connection (or made while offline) go now, in order.
    for (const p of this.#publishes.values()) this.#sendText(p.text);
  }

  /**
   * Follow every key again on a new socket: the keys with a position in one `resume` frame per
   * epoch (answered by one `resume_ack`), the others with `subscribe`.
   */
  #resubscribeAll() {
    const groups = new Map();
    for (const sub of this.#subs.values()) {
      if (!this.#useResume || sub.resumeFrom === null) {
        this.#sendSubscribe(sub);
        continue;
      }
      const epoch = sub.epoch ?? '';
      if (!groups.has(epoch)) groups.set(epoch, []);
      groups.get(epoch).push(sub);
    }
    for (const [epoch, subs] of groups) {
      for (let i = 0; i < subs.length; i += MAX_RESUME_KEYS) {
        const chunk = subs.slice(i, i + MAX_RESUME_KEYS);
        const frame = {
          type: 'resume',
          subscriptions: chunk.map((s) => ({ channel: s.channel, request_id: s.requestId, since: s.resumeFrom })),
        };
        if (epoch) frame.epoch = epoch;
        this.#pendingResumes.push(chunk.map((s) => s.key));
        this.#send(frame);
      }
    }
  }

  /** `resume_ack`: one verdict per key, in the order asked; then the replay, then live. */
  #onResumeAck(frame) {
    const ws = this.#ws;
    this.#pendingResumes.shift();
    const head = frame.head ?? this.#info?.head ?? 0;
    for (const result of Array.isArray(frame.results) ? frame.results : []) {
      if (this.#ws !== ws) return; // a hand-over given up on
      const sub = this.#subs.get(result.subscription_key);
      if (!sub) continue; // unsubscribed meanwhile
      if (result.error) {
        sub.refused = true;
        this.#emit('error', new SeqcastError(result.error.code ?? 'internal', result.error.message ?? 'resume refused', { subscriptionKey: sub.key }));
        continue;
      }
      this.#onKeyAcknowledged(sub, {
        head,
        epoch: frame.epoch ?? null,
        // With another epoch the key starts over: its backlog (`drained` frames) follows.
        drained: result.drained ?? 0,
        recovered: result.recovered ?? null,
        oldestSequence: result.oldest_sequence ?? null,
      });
    }
    this.#finishHandover();
  }

  /**
   * A `resume` refused as a whole (`bad_request` naming it): follow its keys with `subscribe`,
   * each with its `since`. A server that does not know the frame is not asked again; for any other
   * refusal the error is reported too. False when the error is not about a pending `resume`.
   */
  #resumeRefused(err) {
    if (this.#pendingResumes.length === 0 || err.code !== 'bad_request' || !/resume/.test(err.message)) return false;
    if (/unknown frame type|not served/.test(err.message)) this.#useResume = false;
    else this.#emit('error', err);
    const keys = this.#pendingResumes.flat();
    this.#pendingResumes = [];
    for (const key of keys) {
      const sub = this.#subs.get(key);
      if (sub && !sub.acked) this.#sendSubscribe(sub);
    }
    return true;
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
    sub.refused = false;
    sub.catchUp = 0;
    sub.buffer = null;
    sub.recoveryToken++;
  }

  #onSubAck(frame) {
    const sub = this.#subs.get(frame.subscription_key ?? keyOf(frame.channel, frame.request_id));
    if (!sub) return; // unsubscribed meanwhile
    this.#onKeyAcknowledged(sub, {
      // sub_ack carries the head at the moment of subscribing (the exact seam); an older server
      // without it leaves the connection's head, the closest lower bound.
      head: frame.head ?? this.#info?.head ?? 0,
      epoch: frame.epoch ?? null,
      drained: frame.drained ?? 0,
      recovered: frame.recovered ?? null,
      oldestSequence: frame.oldest_sequence ?? null,
    });
    this.#finishHandover();
  }

  /** The socket follows `sub` now (a `sub_ack`, or its verdict in a `resume_ack`). */
  #onKeyAcknowledged(sub, ack) {
    if (this.#sse && ack.recovered === false) {
      // Handing over from SSE: this socket cannot replay all the stream has not delivered yet.
      // The stream goes on; a later probe tries again.
      this.#lostConnection(this.#ws, RECONNECT_CLOSE_CODE, 'hand-over from SSE could not resume');
      return;
    }
    const head = ack.head;
    const previousEpoch = sub.epoch;
    const since = sub.resumeFrom;
    sub.acked = true;
    sub.ackHead = head;
    sub.epoch = ack.epoch ?? previousEpoch;
    const epochChanged = previousEpoch !== null && ack.epoch != null && ack.epoch !== previousEpoch;
    if (epochChanged) {
      // A new store numbers from 1 again: the old positions mean nothing in it.
      sub.lastSeq = 0;
      sub.resumeFrom = null;
    }
    if (sub.resumeFrom === null) {
      // A fresh subscription starts following at this connection's head; until its backlog has
      // arrived, resuming must start from what was really delivered.
      sub.catchUp = ack.drained;
      sub.resumeFrom = sub.catchUp === 0 ? Math.max(sub.lastSeq, head) : sub.lastSeq;
    }
    this.#emit('subscribed', {
      channel: sub.channel,
      requestId: sub.requestId,
      subscriptionKey: sub.key,
      drained: ack.drained,
      recovered: ack.recovered,
      epoch: sub.epoch,
      transport: 'websocket',
    });
    if (ack.recovered !== false) return;
    const gap = {
      channel: sub.channel,
      requestId: sub.requestId,
      subscriptionKey: sub.key,
      recovered: false,
      since,
      oldestSequence: ack.oldestSequence,
      epoch: sub.epoch,
      previousEpoch,
      reason: epochChanged ? 'epoch' : 'window',
      transport: 'websocket',
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

  #deliver(sub, message, transport = 'websocket') {
    const seq = message.sequence_number;
    if (!(seq > sub.lastSeq)) {
      this.#stats.duplicatesDropped++;
      return;
    }
    sub.lastSeq = seq;
    const head = this.#info?.head ?? 0;
    sub.resumeFrom = Math.max(sub.resumeFrom ?? 0, seq);
    this.#stats.delivered++;
    const meta = { replayed: seq <= head, subscriptionKey: sub.key, transport };
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
