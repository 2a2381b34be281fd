// Types for seqcast.js, the seqcast browser client. See docs/client.md.

/** Channel names: `[A-Za-z0-9_.-]{1,64}`, never a `:`. */
export declare const CHANNEL_PATTERN: RegExp;
/** Request ids and session ids: `[A-Za-z0-9_.:-]{1,128}`. */
export declare const REQUEST_ID_PATTERN: RegExp;
/** Close code the client sends when it drops a connection on purpose in order to reconnect. */
export declare const RECONNECT_CLOSE_CODE: 4000;

/** Any JSON value, as published. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A message as the server sends it, live, from a backlog, on resume, and from `recover()`. */
export interface SeqcastMessage<T = Json> {
  type?: 'message';
  /** Deployment-wide, strictly increasing, never reused within an epoch. */
  sequence_number: number;
  /** Position of the row in its stream (`channel:request_id`); kept by an upsert. */
  stream_sequence: number;
  channel: string;
  request_id: string;
  message_id: string;
  /** Milliseconds since the Unix epoch, taken when the message was persisted. */
  timestamp: number;
  data: T;
}

export interface MessageMeta {
  /** Published before the current connection opened: a backlog drain or a resume replay. */
  replayed: boolean;
  subscriptionKey: string;
  /** The transport that carried it. */
  transport: Transport;
}

/** The server's `connected` frame (over SSE, before any socket: `clientId` null, `head` 0). */
export interface ConnectionInfo {
  clientId: string | null;
  sessionId: string;
  connectionSequence: number;
  /** Latest sequence number when the connection opened. */
  head: number;
  epoch: string | null;
}

/**
 * The `recovered: false` event: the server could not replay everything of this key after the
 * position the client had. Emitted once per key and incident, over either transport; re-fetch the
 * key's state (e.g. `GET /api/streams/{channel}/{request_id}/messages`).
 */
export interface GapEvent {
  channel: string;
  requestId: string;
  subscriptionKey: string;
  recovered: false;
  /** The position the client asked to resume from (null for a fresh subscription). */
  since: number | null;
  /** Oldest sequence number the server still had, if it said. */
  oldestSequence: number | null;
  epoch: string | null;
  previousEpoch: string | null;
  /** 'window': history no longer reaches back to `since + 1`; 'epoch': the store was replaced. */
  reason: 'window' | 'epoch';
  /** Which transport told: a `sub_ack`/`resume_ack` on the socket, or an SSE `reset`. */
  transport: Transport;
}

export interface SubscribedEvent {
  channel: string;
  requestId: string;
  subscriptionKey: string;
  /** Backlog messages that follow the ack. */
  drained: number;
  /** For a resumed subscription: whether the server could replay everything after `since` (null over SSE, where a `gap` says it). */
  recovered: boolean | null;
  epoch: string | null;
  /** The transport that now follows the key. */
  transport: Transport;
}

export interface DisconnectedEvent {
  code: number;
  reason: string;
  /** The connection that ended (0 if it never opened). */
  connectionSequence: number;
  /** Whether the server had accepted the connection. */
  wasOpen: boolean;
}

export type ConnectionState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';

/** What carries the messages: the WebSocket, or the Server-Sent Events stream while WebSocket fails. */
export type Transport = 'websocket' | 'sse';

export interface SeqcastClientEvents {
  state: (state: ConnectionState, detail: { delayMs?: number }) => void;
  /** The transport changed (to 'sse' after failed WebSocket attempts, back to 'websocket' after a hand-over or when the stream fails). */
  transport: (transport: Transport, detail: { reason: string }) => void;
  connected: (info: ConnectionInfo) => void;
  disconnected: (event: DisconnectedEvent) => void;
  subscribed: (event: SubscribedEvent) => void;
  message: (message: SeqcastMessage, meta: MessageMeta) => void;
  gap: (gap: GapEvent) => void;
  error: (error: SeqcastError) => void;
  /** A fresh token from the provider was accepted on the open connection (`auth_ok`). */
  token_refreshed: (event: { exp: number | null }) => void;
}

/** The part of `sessionStorage` the client uses. */
export interface StorageLike {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

export interface Backoff {
  /** Cap of the first retry's delay (default 500). */
  initialMs?: number;
  /** Largest cap (default 30000). */
  maxMs?: number;
}

/** A JWT, or a function that returns one; called on every (re)connect and recovery request. */
export type TokenSource = string | (() => string | undefined | Promise<string | undefined>);

/** The Server-Sent Events fallback (`GET /events` read with `fetch`). */
export interface FallbackOptions {
  /** WebSocket attempts in a row that never reached `connected` before the stream takes over (default 3). */
  afterFailures?: number;
  /** While on SSE, a WebSocket is tried after a random 50–100 % of this (default 30000). */
  probeMs?: number;
  /** The event-stream endpoint, relative to `httpUrl` (default `/events`). */
  path?: string;
  /** No byte (not even a heartbeat comment) for this long ends the stream (default 2 × `heartbeatMs`). */
  stallMs?: number;
}

export interface SeqcastClientOptions {
  /** WebSocket URL, e.g. `wss://push.example.com/ws`; in a page defaults to this host's `/ws`. */
  url?: string;
  /** Base of the HTTP API; defaults to `url` with http(s) and without `/ws`. */
  httpUrl?: string;
  token?: TokenSource;
  /** Where the session id and connection counter live (default: `sessionStorage`, else memory). */
  storage?: StorageLike;
  /** Key prefix in `storage` (default `seqcast`). */
  storagePrefix?: string;
  /** WebSocket constructor (default: the global one; in Node pass `WebSocket` from `ws`). */
  WebSocket?: new (url: string) => WebSocket | any;
  fetch?: typeof fetch;
  backoff?: Backoff;
  /** Random source for the backoff jitter, in [0, 1). */
  random?: () => number;
  /** Ping interval; two silent intervals drop the connection (default 25000, 0 = off). */
  heartbeatMs?: number;
  /** Give up on a connection the server has not accepted in this time (default 10000). */
  connectTimeoutMs?: number;
  /** Reconnect with one `resume` frame for all keys (default true); false: one `subscribe` per key. */
  resume?: boolean;
  /** The SSE fallback's settings, or false to never leave WebSocket. */
  fallback?: FallbackOptions | false;
}

export interface SubscribeOptions {
  /** Resume after this sequence number (e.g. one saved before a reload). */
  since?: number;
  /** The epoch `since` belongs to. */
  epoch?: string;
  /** Called when this subscription reports a gap. */
  onGap?: (gap: GapEvent) => void;
}

export interface RecoverOptions {
  channel?: string;
  requestId?: string;
  /** Page size (the client follows `next_since` pages itself). */
  limit?: number;
  epoch?: string;
}

export interface RecoveryResult {
  messages: SeqcastMessage[];
  head: number;
  oldestSequence: number | null;
  epoch: string;
  /** False where history no longer reaches back to `since + 1` or the epoch differs. */
  complete: boolean;
}

export interface PublishOptions {
  /** The idempotency key within the stream (default: one made by the client). A repeat with the
   * same data is answered with the numbers first committed; with other data it is an upsert. */
  messageId?: string;
}

/** The server's `publish_ack`: the numbers the message was committed with. */
export interface PublishAck {
  sequenceNumber: number;
  streamSequence: number;
  messageId: string;
}

export interface SubscriptionInfo {
  channel: string;
  requestId: string;
  subscriptionKey: string;
  lastSequence: number;
  epoch: string | null;
  /** Acknowledged by the server on the current connection, with no recovery pending. */
  active: boolean;
}

export interface ClientStats {
  delivered: number;
  duplicatesDropped: number;
  gaps: number;
  reconnects: number;
}

/** Capped exponential backoff with full jitter: uniform in [0, min(maxMs, initialMs · 2^attempt)). */
export declare function backoffDelay(attempt: number, backoff?: Backoff, random?: () => number): number;

/** A sessionStorage-like store kept in memory. */
export declare function memoryStorage(): StorageLike & { removeItem(key: string): void };

/** The tab's session id and connection counter, kept in `storage`. */
export declare class SessionCounter {
  constructor(storage?: StorageLike, prefix?: string);
  readonly sessionId: string;
  /** Number of the latest connection (0 before the first). */
  readonly current: number;
  /** Take the next connection number: 1, then +1 each time. */
  next(): number;
}

export declare class SeqcastError extends Error {
  constructor(code: string, message: string, details?: Record<string, unknown>);
  /** A server error code (`bad_request`, `unauthorized`, `forbidden`, …) or a client one (`token`, `socket`, `sse`, `bad_stream`, `recovery`, `closed`, `http_NNN`). */
  code: string;
  /** The HTTP status, for errors of HTTP calls. */
  status?: number;
  /** The key a `resume` refused alone. */
  subscriptionKey?: string;
}

/** One event of a `text/event-stream`. */
export interface SseEvent {
  /** The `event` field, `message` when absent. */
  event: string;
  /** The `data` lines, joined with `\n`. */
  data: string;
  /** The last `id` seen up to this event. */
  id: string;
}

/** Incremental `text/event-stream` parser: feed text in chunks cut anywhere. */
export declare class SseParser {
  /** The latest `id` field seen. */
  lastEventId: string;
  /** The latest `retry` field (ms), or null. */
  retry: number | null;
  /** Returns the events the chunk completed. Throws a SeqcastError `bad_stream` past a 16 Mi-character line. */
  push(text: string): SseEvent[];
}

export declare class SeqcastClient {
  constructor(options?: SeqcastClientOptions);
  readonly state: ConnectionState;
  /** 'websocket', or 'sse' while the event stream carries the messages. */
  readonly transport: Transport;
  readonly sessionId: string;
  readonly connectionSequence: number;
  readonly connection: ConnectionInfo | null;
  readonly reconnectAt: number | null;
  readonly stats: ClientStats;
  readonly subscriptions: SubscriptionInfo[];

  on<E extends keyof SeqcastClientEvents>(event: E, listener: SeqcastClientEvents[E]): () => void;
  off<E extends keyof SeqcastClientEvents>(event: E, listener: SeqcastClientEvents[E]): void;

  connect(): Promise<ConnectionInfo>;
  subscribe<T = Json>(
    channel: string,
    requestId: string,
    onMessage?: (message: SeqcastMessage<T>, meta: MessageMeta) => void,
    options?: SubscribeOptions,
  ): () => void;
  unsubscribe(channel: string, requestId: string): boolean;
  clearAllSubscriptions(): void;
  /**
   * Publish over this connection (the token needs `publish: true`): resolves once committed,
   * rejects with a SeqcastError when refused (`forbidden`, `rate_limited`, …) or `closed`.
   * Pipelined and in order; unanswered publishes are sent again after a reconnect with their
   * message id, so nothing is published twice.
   */
  publish(channel: string, requestId: string, data: Json, options?: PublishOptions): Promise<PublishAck>;
  /** Publishes sent (or waiting for the connection) and not answered yet. */
  readonly pendingPublishes: number;
  close(): void;
  dropConnection(options?: { downMs?: number }): boolean;
  recover(since: number, options?: RecoverOptions): Promise<RecoveryResult>;
}
