// The seqcast JavaScript client, tested with Node's test runner against a real server process
// (and, where a misbehaving server is the point, a small fake one).
// Run: SEQCAST_BIN=target/debug/seqcast node --test client.test.mjs

import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import { after, before, describe, test } from 'node:test';

import WebSocket, { WebSocketServer } from 'ws';
import { SeqcastClient, SessionCounter, backoffDelay, memoryStorage } from '@seqcast/client';

import { JWT_SECRET, mintToken, startServer, within } from './server.mjs';

const EVENTS = ['state', 'connected', 'disconnected', 'subscribed', 'message', 'gap', 'error', 'token_refreshed'];

/** Resolve once `check()` is truthy, re-checked after every event of `clients`; bounded. */
function until(clients, check, what, ms = 10_000) {
  const offs = [];
  const done = new Promise((resolve) => {
    const probe = () => {
      const v = check();
      if (v) resolve(v);
    };
    for (const c of [clients].flat()) for (const ev of EVENTS) offs.push(c.on(ev, probe));
    probe();
  });
  return within(ms, what, done).finally(() => offs.forEach((off) => off()));
}

/** A `ws` WebSocket that records every frame the client sends. */
function recordingSocket(sent) {
  return class RecordingWebSocket extends WebSocket {
    send(data) {
      sent.push(JSON.parse(data));
      super.send(data);
    }
  };
}

function newClient(server, options = {}) {
  return new SeqcastClient({
    url: server.wsUrl,
    token: () => server.token(),
    WebSocket,
    storage: memoryStorage(),
    backoff: { initialMs: 20, maxMs: 200 },
    ...options,
  });
}

/** Subscribe and record what the application sees. */
function follow(client, channel, requestId, options) {
  const seen = [];
  client.subscribe(channel, requestId, (m, meta) => seen.push({ seq: m.sequence_number, data: m.data, replayed: meta.replayed }), options);
  return seen;
}

function strictlyIncreasing(seqs) {
  return seqs.every((s, i) => i === 0 || s > seqs[i - 1]);
}

async function freePort() {
  const srv = createServer();
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  const { port } = srv.address();
  await new Promise((r) => srv.close(r));
  return port;
}

describe('backoffDelay (pure)', () => {
  test('grows exponentially from initialMs and is capped at maxMs', () => {
    const top = () => 0.999_999;
    const b = { initialMs: 100, maxMs: 1_000 };
    const delays = [0, 1, 2, 3, 4, 5, 10, 60, 5000].map((a) => backoffDelay(a, b, top));
    assert.deepEqual(delays, [99, 199, 399, 799, 999, 999, 999, 999, 999]);
  });

  test('full jitter: the delay is the random fraction of the cap, down to zero', () => {
    const b = { initialMs: 100, maxMs: 10_000 };
    assert.equal(backoffDelay(3, b, () => 0), 0);
    assert.equal(backoffDelay(3, b, () => 0.25), 200);
    assert.equal(backoffDelay(3, b, () => 0.5), 400);
    assert.equal(backoffDelay(20, b, () => 0.5), 5_000);
  });

  test('draws from a uniform spread, never reaching the cap', () => {
    let x = 0x2545f491;
    const lcg = () => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0) / 2 ** 32);
    const draws = Array.from({ length: 2_000 }, () => backoffDelay(4, { initialMs: 50, maxMs: 10_000 }, lcg));
    assert.ok(draws.every((d) => Number.isInteger(d) && d >= 0 && d < 800));
    const low = draws.filter((d) => d < 400).length;
    assert.ok(low > 850 && low < 1_150, `expected about half below the middle, got ${low}`);
  });

  test('defaults: 500 ms initial cap, 30 s ceiling', () => {
    assert.equal(backoffDelay(0, undefined, () => 0.5), 250);
    assert.equal(backoffDelay(30, undefined, () => 0.5), 15_000);
  });
});

describe('SessionCounter (sessionStorage)', () => {
  test('1 on the first connection of a tab, +1 each time, surviving a reload', () => {
    const tab = memoryStorage();
    const first = new SessionCounter(tab);
    assert.equal(first.current, 0);
    assert.deepEqual([first.next(), first.next()], [1, 2]);
    const id = first.sessionId;
    assert.match(id, /^[0-9a-f]{32}$/);

    const reloaded = new SessionCounter(tab); // same sessionStorage after a page reload
    assert.equal(reloaded.sessionId, id);
    assert.equal(reloaded.current, 2);
    assert.equal(reloaded.next(), 3);

    const otherTab = new SessionCounter(memoryStorage());
    assert.notEqual(otherTab.sessionId, id);
    assert.equal(otherTab.next(), 1);
  });

  test('a Map-backed storage sees exactly the documented keys; garbage restarts the counter', () => {
    const map = new Map();
    const storage = { getItem: (k) => map.get(k) ?? null, setItem: (k, v) => map.set(k, v) };
    const counter = new SessionCounter(storage, 'app1');
    counter.next();
    const id = counter.sessionId;
    assert.deepEqual(Object.fromEntries(map), { 'app1.connection_sequence': '1', 'app1.session_id': id });
    map.set('app1.connection_sequence', 'NaN?');
    assert.equal(counter.next(), 1);
    map.set('app1.session_id', 'has spaces');
    assert.notEqual(counter.sessionId, 'has spaces');
  });
});

describe('against a real server', () => {
  let server;
  before(async () => {
    server = await startServer();
  });
  after(async () => {
    await server?.stop();
  });

  test('hello carries session_id and connection_sequence; both are echoed and logged', async () => {
    const storage = memoryStorage();
    const client = newClient(server, { storage });
    try {
      const info = await within(10_000, 'connected', client.connect());
      assert.equal(info.connectionSequence, 1);
      assert.equal(info.sessionId, client.sessionId);
      assert.match(info.clientId, /^\S+$/);
      assert.equal(client.state, 'open');
      const opened = await server.waitForLog((e) => e.event === 'connection_opened' && e.client_id === info.clientId, 'connection_opened');
      assert.equal(opened.session_id, client.sessionId);
      assert.equal(opened.connection_sequence, 1);
      assert.equal(storage.getItem('seqcast.connection_sequence'), '1');
    } finally {
      client.close();
    }
  });

  test('a drop reconnects with the next connection sequence, a fresh token, the same session', async () => {
    let calls = 0;
    const users = [];
    const client = newClient(server, {
      token: () => {
        calls++;
        users.push(`user-${calls}`);
        return Promise.resolve(mintToken(JWT_SECRET, { sub: `user-${calls}` }));
      },
    });
    try {
      const first = await within(10_000, 'connected', client.connect());
      assert.equal(client.dropConnection(), true);
      const second = await until(client, () => client.state === 'open' && client.connection.clientId !== first.clientId && client.connection, 'reconnect');
      assert.equal(second.connectionSequence, 2);
      assert.equal(second.sessionId, first.sessionId);
      assert.equal(calls, 2, 'the token provider runs on every connect');

      const closed = await server.waitForLog((e) => e.event === 'connection_closed' && e.client_id === first.clientId, 'connection_closed of the first');
      assert.equal(closed.session_id, first.sessionId);
      assert.equal(closed.connection_sequence, 1);
      assert.equal(closed.close_code, 1006, 'dropConnection with `ws` is an abnormal close');
      assert.ok(closed.duration_seconds >= 0);
      const reopened = await server.waitForLog((e) => e.event === 'connection_opened' && e.client_id === second.clientId, 'connection_opened of the second');
      assert.equal(reopened.connection_sequence, 2);
      assert.equal(reopened.user, 'user-2', 'the second connection used the refreshed token');
    } finally {
      client.close();
    }
  });

  test('a token is refreshed through the provider before exp: the connection and its subscription stay', async () => {
    let calls = 0;
    const client = newClient(server, {
      token: () => {
        calls++;
        // The first token lives 3 s; the server would close at exp without a refresh.
        const exp = Math.floor(Date.now() / 1000) + (calls === 1 ? 3 : 3600);
        return mintToken(JWT_SECRET, { sub: 'refreshing', exp });
      },
    });
    const refreshed = [];
    const closes = [];
    client.on('token_refreshed', (e) => refreshed.push(e.exp));
    client.on('disconnected', (d) => closes.push(d.code));
    try {
      const first = await within(10_000, 'connected', client.connect());
      await until(client, () => refreshed.length === 1, 'auth_ok', 10_000);
      assert.ok(refreshed[0] > Date.now() / 1000 + 3000, 'auth_ok carries the fresh exp');
      // Past the first token's exp: still the same connection.
      await new Promise((r) => setTimeout(r, 2_500));
      assert.deepEqual(closes, []);
      assert.equal(client.connection.clientId, first.clientId);
      assert.equal(calls, 2);
    } finally {
      client.close();
    }
  });

  test('an expired token is refused (4001) and the provider is asked again for a fresh one', async () => {
    const issued = [];
    const client = newClient(server, {
      token: () => {
        const exp = Math.floor(Date.now() / 1000) + (issued.length === 0 ? -600 : 600);
        issued.push(exp);
        return mintToken(JWT_SECRET, { sub: 'expiring', exp });
      },
    });
    const errors = [];
    const closes = [];
    client.on('error', (e) => errors.push(e.code));
    client.on('disconnected', (d) => closes.push(d.code));
    try {
      const info = await within(10_000, 'connected with the fresh token', client.connect());
      assert.equal(issued.length, 2);
      assert.deepEqual(errors, ['unauthorized']);
      assert.deepEqual(closes, [4001]);
      assert.equal(info.connectionSequence, 2, 'the refused connection took number 1');
    } finally {
      client.close();
    }
  });

  test('resumes after a drop with one resume frame (since, epoch): what was published while down arrives once, in order', async () => {
    const sent = [];
    const client = newClient(server, { WebSocket: recordingSocket(sent) });
    const received = [];
    client.on('subscribed', (e) => received.push(e));
    try {
      const info = await client.connect();
      const seen = follow(client, 'resume', 'r1');
      await until(client, () => client.subscriptions[0]?.active, 'sub_ack');
      const before = [];
      for (let i = 0; i < 3; i++) before.push((await server.publish('resume', 'r1', { i })).sequence_number);
      await until(client, () => seen.length === 3, '3 live messages');

      client.dropConnection({ downMs: 60_000 });
      await server.waitForLog((e) => e.event === 'connection_closed' && e.client_id === info.clientId, 'the server to see the drop');
      assert.equal(client.state, 'reconnecting');
      const missed = [];
      for (let i = 3; i < 7; i++) missed.push((await server.publish('resume', 'r1', { i })).sequence_number);

      await client.connect();
      await until(client, () => seen.length === 7, 'the 4 missed messages');
      assert.deepEqual(seen.map((s) => s.seq), [...before, ...missed]);
      assert.deepEqual(seen.map((s) => s.data.i), [0, 1, 2, 3, 4, 5, 6]);
      assert.deepEqual(seen.map((s) => s.replayed), [false, false, false, true, true, true, true]);

      const subscribes = sent.filter((f) => f.type === 'subscribe');
      assert.equal(subscribes[0].since, undefined, 'a fresh subscription asks for no history');
      const resumes = sent.filter((f) => f.type === 'resume');
      assert.deepEqual(resumes, [{ type: 'resume', subscriptions: [{ channel: 'resume', request_id: 'r1', since: before[2] }], epoch: info.epoch }]);
      assert.equal(subscribes.length, 1, 'the resumed key is not subscribed again');
      assert.equal(received.length, 2);
      assert.equal(received[1].recovered, true, 'the resume_ack verdict');
      const live = (await server.publish('resume', 'r1', { i: 7 })).sequence_number;
      await until(client, () => seen.length === 8, 'live after resume');
      assert.equal(seen[7].seq, live);
      assert.equal(client.stats.gaps, 0);
    } finally {
      client.close();
    }
  });

  test('re-subscribing 1,000 keys at once after a drop: every sub_ack and every missed message, no 1013', { timeout: 120_000 }, async () => {
    const big = await startServer({ args: ['--recovery-max-messages', '100000'] });
    const client = newClient(big);
    try {
      const info = await client.connect();
      const keys = Array.from({ length: 1000 }, (_, k) => `k${k}`);
      const seen = new Map(keys.map((k) => [k, []]));
      for (const k of keys) client.subscribe('many', k, (m) => seen.get(k).push(m.sequence_number));
      await until(client, () => client.subscriptions.length === 1000 && client.subscriptions.every((s) => s.active), '1,000 sub_acks', 60_000);

      client.dropConnection({ downMs: 60_000 });
      await big.waitForLog((e) => e.event === 'connection_closed' && e.client_id === info.clientId, 'the server to see the drop');
      // Two messages per key while the client is away.
      const missed = new Map(keys.map((k) => [k, []]));
      for (let round = 0; round < 2; round++) {
        const results = await big.publishBatch(keys.map((k) => ({ channel: 'many', request_id: k, data: { round } })));
        results.forEach((r, i) => missed.get(keys[i]).push(r.sequence_number));
      }

      await client.connect();
      await until(client, () => keys.every((k) => seen.get(k).length === 2), 'every missed message', 60_000);
      for (const k of keys) assert.deepEqual(seen.get(k), missed.get(k), `key ${k}`);
      assert.equal(client.stats.gaps, 0);
      assert.ok(!big.logs.some((e) => e.event === 'connection_closed' && e.close_code === 1013), 'no connection was closed with 1013');
    } finally {
      client.close();
      await big.stop();
    }
  });

  test('resume is served from the recovery window while another subscriber keeps the key (no backlog)', async () => {
    const watcher = newClient(server);
    const client = newClient(server);
    try {
      await Promise.all([watcher.connect(), client.connect()]);
      const watched = follow(watcher, 'window', 'r1');
      const seen = follow(client, 'window', 'r1');
      await until([watcher, client], () => watcher.subscriptions[0]?.active && client.subscriptions[0]?.active, 'both sub_acks');
      await server.publish('window', 'r1', 'a');
      await until(client, () => seen.length === 1, 'first message');
      const id = client.connection.clientId;
      client.dropConnection({ downMs: 60_000 });
      await server.waitForLog((e) => e.event === 'connection_closed' && e.client_id === id, 'drop');
      for (const d of ['b', 'c', 'd']) await server.publish('window', 'r1', d);
      await client.connect();
      await until(client, () => seen.length === 4, 'replay');
      await until(watcher, () => watched.length === 4, 'watcher');
      assert.deepEqual(seen.map((s) => s.data), ['a', 'b', 'c', 'd']);
      assert.deepEqual(seen.map((s) => s.seq), watched.map((s) => s.seq));
      assert.ok(strictlyIncreasing(seen.map((s) => s.seq)));
    } finally {
      watcher.close();
      client.close();
    }
  });

  test('a late subscriber gets the history another tab saw, then resumes from where it was', async () => {
    const watcher = newClient(server); // another tab follows the key: history is still the log's
    const sent = [];
    const client = newClient(server, { WebSocket: recordingSocket(sent) });
    try {
      await watcher.connect();
      follow(watcher, 'quiet', 'r1');
      await until(watcher, () => watcher.subscriptions[0]?.active, 'watcher sub_ack');
      await server.publish('quiet', 'r1', 'before'); // published before the client came: its backlog
      await client.connect();
      const seen = follow(client, 'quiet', 'r1');
      await until(client, () => client.subscriptions[0]?.active, 'sub_ack');
      const head = client.connection.head;
      const id = client.connection.clientId;
      client.dropConnection({ downMs: 60_000 });
      await server.waitForLog((e) => e.event === 'connection_closed' && e.client_id === id, 'drop');
      for (const d of ['x', 'y']) await server.publish('quiet', 'r1', d);
      await client.connect();
      await until(client, () => seen.length === 3, 'the backlog and the two missed messages');
      assert.deepEqual(seen.map((s) => s.data), ['before', 'x', 'y']);
      assert.deepEqual(sent.filter((f) => f.type === 'resume').at(-1).subscriptions, [{ channel: 'quiet', request_id: 'r1', since: head }]);
    } finally {
      watcher.close();
      client.close();
    }
  });

  test('clearAllSubscriptions before a new search: only the new request is resubscribed and delivered (seed 003)', async () => {
    const sent = [];
    const client = newClient(server, { WebSocket: recordingSocket(sent) });
    const all = [];
    client.on('message', (m) => all.push(`${m.request_id}:${m.data}`));
    try {
      await client.connect();
      follow(client, 'search', 'req_A');
      await until(client, () => client.subscriptions[0]?.active, 'sub_ack A');
      await server.publish('search', 'req_A', 'a1');
      await until(client, () => all.length === 1, 'a1');
      const id = client.connection.clientId;
      client.dropConnection({ downMs: 60_000 });
      await server.waitForLog((e) => e.event === 'connection_closed' && e.client_id === id, 'drop');

      await server.publish('search', 'req_A', 'a2'); // backlogged for req_A: must stay there
      client.clearAllSubscriptions();
      const seenB = follow(client, 'search', 'req_B');
      for (const d of ['b1', 'b2', 'b3']) await server.publish('search', 'req_B', d);
      const sentBefore = sent.length;
      await client.connect();
      await until(client, () => seenB.length === 3, 'req_B backlog');
      assert.deepEqual(all, ['req_A:a1', 'req_B:b1', 'req_B:b2', 'req_B:b3']);
      const resent = sent.slice(sentBefore).filter((f) => f.type === 'subscribe');
      assert.deepEqual(resent.map((f) => f.request_id), ['req_B']);
      const drained = await server.waitForLog((e) => e.event === 'backlog_drained' && e.subscription_key === 'search:req_B', 'backlog_drained for req_B');
      assert.equal(drained.count, 3);
      assert.equal(server.logs.some((e) => e.event === 'backlog_drained' && e.subscription_key === 'search:req_A'), false);
    } finally {
      client.close();
    }
  });

  test('unsubscribe stops delivery at once; a later publish to the key is not delivered', async () => {
    const client = newClient(server);
    try {
      await client.connect();
      const seen = [];
      const stop = client.subscribe('unsub', 'r1', (m) => seen.push(m.data));
      const other = follow(client, 'unsub', 'r2');
      await until(client, () => client.subscriptions.every((s) => s.active), 'sub_acks');
      await server.publish('unsub', 'r1', 1);
      await until(client, () => seen.length === 1, 'one');
      stop();
      assert.deepEqual(client.subscriptions.map((s) => s.subscriptionKey), ['unsub:r2']);
      await server.publish('unsub', 'r1', 2);
      await server.publish('unsub', 'r2', 'marker');
      await until(client, () => other.length === 1, 'marker on r2'); // frames on one socket arrive in order
      assert.deepEqual(seen, [1]);
    } finally {
      client.close();
    }
  });

  test('recover() pages through GET /websocket/messages; another epoch is incomplete', async () => {
    const client = newClient(server);
    const seqs = [];
    for (let i = 0; i < 5; i++) seqs.push((await server.publish('rest', 'r1', i)).sequence_number);
    await server.publish('rest', 'other', 'x');
    const all = await client.recover(seqs[0] - 1, { channel: 'rest', requestId: 'r1' });
    assert.equal(all.complete, true);
    assert.deepEqual(all.messages.map((m) => m.sequence_number), seqs);
    const paged = await client.recover(seqs[0] - 1, { channel: 'rest', requestId: 'r1', limit: 2 });
    assert.deepEqual(paged.messages.map((m) => m.data), [0, 1, 2, 3, 4]);
    const foreign = await client.recover(0, { channel: 'rest', requestId: 'r1', epoch: 'not-this-store' });
    assert.equal(foreign.complete, false);
    assert.deepEqual(foreign.messages, []);
    const stranger = new SeqcastClient({ url: server.wsUrl, WebSocket, token: 'not-a-jwt' });
    await assert.rejects(stranger.recover(0), (e) => e.code === 'unauthorized' && e.status === 401);
  });

  test('the backoff schedule is used while the server is unreachable', async () => {
    const port = await freePort();
    const delays = [];
    const client = new SeqcastClient({
      url: `ws://127.0.0.1:${port}/ws`,
      token: 'unused',
      WebSocket,
      storage: memoryStorage(),
      backoff: { initialMs: 8, maxMs: 30 },
      random: () => 0.5,
    });
    client.on('state', (s, d) => s === 'reconnecting' && delays.push(d.delayMs));
    client.connect().catch(() => {});
    try {
      await until(client, () => delays.length >= 5, '5 failed attempts');
      assert.deepEqual(delays.slice(0, 5), [4, 8, 15, 15, 15]);
      assert.equal(client.connectionSequence, 0, 'connections that never opened take no number');
    } finally {
      client.close();
    }
  });
});

describe('gaps against a real server with a 5-message recovery window', () => {
  let server;
  before(async () => {
    server = await startServer({ args: ['--recovery-max-messages', '5'] });
  });
  after(async () => {
    await server?.stop();
  });

  test('recovered:false becomes a gap event; what the server still has arrives once, in order', async () => {
    const watcher = newClient(server); // keeps the key subscribed, so nothing is backlogged
    const client = newClient(server);
    const gaps = [];
    const keyGaps = [];
    client.on('gap', (g) => gaps.push(g));
    try {
      await Promise.all([watcher.connect(), client.connect()]);
      follow(watcher, 'gap', 'r1');
      const seen = follow(client, 'gap', 'r1', { onGap: (g) => keyGaps.push(g) });
      await until([watcher, client], () => watcher.subscriptions[0]?.active && client.subscriptions[0]?.active, 'sub_acks');
      const first = (await server.publish('gap', 'r1', 0)).sequence_number;
      await until(client, () => seen.length === 1, 'first');
      const id = client.connection.clientId;
      client.dropConnection({ downMs: 60_000 });
      await server.waitForLog((e) => e.event === 'connection_closed' && e.client_id === id, 'drop');
      const published = [];
      for (let i = 1; i <= 20; i++) published.push((await server.publish('gap', 'r1', i)).sequence_number);

      await client.connect();
      await until(client, () => seen.length === 6, 'the 5 retained messages');
      assert.equal(gaps.length, 1);
      assert.deepEqual(keyGaps, gaps);
      assert.equal(gaps[0].reason, 'window');
      assert.equal(gaps[0].since, first);
      assert.equal(gaps[0].oldestSequence, published[15]);
      assert.equal(gaps[0].subscriptionKey, 'gap:r1');
      assert.deepEqual(seen.map((s) => s.seq), [first, ...published.slice(15)]);
      assert.deepEqual(seen.map((s) => s.data), [0, 16, 17, 18, 19, 20]);
      // The socket replay and the HTTP fallback both returned those five: each delivered once.
      assert.equal(client.stats.duplicatesDropped, 5);
      assert.equal(client.stats.gaps, 1);
      assert.ok(server.logs.some((e) => e.event === 'connection_opened' && e.connection_sequence === 2 && e.session_id === client.sessionId));
    } finally {
      watcher.close();
      client.close();
    }
  });
});

describe('a restarted server (new epoch)', () => {
  test('reconnects by itself, reports an epoch gap, and delivers the new store numbers from 1', async () => {
    let server = await startServer();
    const port = server.addr.split(':').pop();
    const client = newClient(server, { token: () => mintToken(JWT_SECRET, { sub: 'restart' }) });
    const gaps = [];
    client.on('gap', (g) => gaps.push(g));
    try {
      const info = await client.connect();
      const seen = follow(client, 'restart', 'r1');
      await until(client, () => client.subscriptions[0]?.active, 'sub_ack');
      for (let i = 0; i < 3; i++) await server.publish('restart', 'r1', `old-${i}`);
      await until(client, () => seen.length === 3, 'old messages');
      await server.stop();
      await until(client, () => client.state === 'reconnecting', 'the client to notice');
      server = await startServer({ listen: `127.0.0.1:${port}` });
      const fresh = await until(client, () => client.state === 'open' && client.connection.epoch !== info.epoch && client.connection, 'reconnect to the new store', 15_000);
      await until(client, () => gaps.length === 1, 'the epoch gap');
      assert.equal(gaps[0].reason, 'epoch');
      assert.equal(gaps[0].previousEpoch, info.epoch);
      assert.equal(gaps[0].epoch, fresh.epoch);
      const n = (await server.publish('restart', 'r1', 'new-0')).sequence_number;
      assert.equal(n, 1, 'the new store numbers from 1 again');
      await until(client, () => seen.length === 4, 'the first message of the new store');
      assert.deepEqual(seen.map((s) => s.data), ['old-0', 'old-1', 'old-2', 'new-0']);
      assert.ok(fresh.connectionSequence >= 2);
    } finally {
      client.close();
      await server.stop();
    }
  });
});

describe('against a misbehaving fake server', () => {
  /**
   * A WebSocket server that answers hello with `connected` and then runs
   * `script(socket, hello, nth)` (`nth`: the connection's number, from 1). Every frame after
   * hello is kept in `frames` as `{ nth, ...frame }`.
   */
  async function fakeServer(script) {
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    await new Promise((r) => wss.once('listening', r));
    const hellos = [];
    const frames = [];
    wss.on('connection', (socket) => {
      socket.once('message', (raw) => {
        const hello = JSON.parse(String(raw));
        hellos.push(hello);
        const nth = hellos.length;
        socket.send(JSON.stringify({ type: 'connected', sequence_number: 0, client_id: `fake-${nth}`, session_id: hello.session_id, connection_sequence: hello.connection_sequence, head: 100, epoch: 'e1' }));
        socket.on('message', (frame) => frames.push({ nth, ...JSON.parse(String(frame)) }));
        script(socket, hello, nth);
      });
    });
    return {
      url: `ws://127.0.0.1:${wss.address().port}/ws`,
      hellos,
      frames,
      close: () => new Promise((r) => {
        for (const c of wss.clients) c.terminate();
        wss.close(r);
      }),
    };
  }

  /** A `message` frame on channel `c`: number `n` of key `key`. */
  const msg = (n, key = 'r') => JSON.stringify({ type: 'message', sequence_number: n, stream_sequence: n, channel: 'c', request_id: key, message_id: `m${n}`, timestamp: 0, data: n });

  test('duplicates, reordering and frames before sub_ack never reach the application', async () => {
    const fake = await fakeServer((socket) => {
      socket.on('message', (raw) => {
        const f = JSON.parse(String(raw));
        if (f.type !== 'subscribe') return;
        socket.send(msg(1)); // before the ack: left over from an earlier subscription
        socket.send(JSON.stringify({ type: 'sub_ack', channel: 'c', request_id: 'r', subscription_key: 'c:r', drained: 0, epoch: 'e1' }));
        for (const n of [101, 102, 102, 99, 103, 101, 104]) socket.send(msg(n));
      });
    });
    const client = new SeqcastClient({ url: fake.url, token: 't', WebSocket, storage: memoryStorage(), fetch: () => assert.fail('no HTTP expected') });
    try {
      await client.connect();
      const seen = [];
      client.subscribe('c', 'r', (m) => seen.push(m.sequence_number));
      await until(client, () => seen.includes(104), 'message 104');
      assert.deepEqual(seen, [101, 102, 103, 104]);
      assert.equal(client.stats.duplicatesDropped, 3);
      assert.equal(fake.hellos[0].token, 't');
    } finally {
      client.close();
      await fake.close();
    }
  });

  test('resume_ack: one verdict per key — recovered, refused alone (an error naming the key), recovered: false (a gap)', async () => {
    const fake = await fakeServer((socket, hello, nth) => {
      socket.on('message', (raw) => {
        const f = JSON.parse(String(raw));
        if (f.type === 'subscribe') {
          socket.send(JSON.stringify({ type: 'sub_ack', channel: 'c', request_id: f.request_id, subscription_key: `c:${f.request_id}`, drained: 0, head: 100, epoch: 'e1' }));
          socket.send(msg(f.request_id === 'a' ? 101 : f.request_id === 'b' ? 102 : 103, f.request_id));
        }
        if (f.type === 'resume') {
          socket.send(JSON.stringify({
            type: 'resume_ack',
            results: [
              { subscription_key: 'c:a', recovered: true },
              { subscription_key: 'c:b', error: { code: 'forbidden', message: 'key c:b is not allowed' } },
              { subscription_key: 'c:g', recovered: false, oldest_sequence: 150 },
            ],
            head: 200,
            epoch: 'e1',
          }));
          socket.send(msg(160, 'a'));
          socket.send(msg(170, 'g'));
          socket.send(msg(201, 'a'));
        }
      });
    });
    const recoveries = [];
    const client = new SeqcastClient({
      url: fake.url, token: 't', WebSocket, storage: memoryStorage(), backoff: { initialMs: 1, maxMs: 1 },
      fetch: async (url) => {
        recoveries.push(new URL(url));
        return new Response(JSON.stringify({ messages: [], head: 200, oldest_sequence: 150, epoch: 'e1', complete: false }), { status: 200 });
      },
    });
    const seen = { a: [], b: [], g: [] };
    const gaps = [];
    const errors = [];
    client.on('gap', (g) => gaps.push(g));
    client.on('error', (e) => errors.push(e));
    try {
      await client.connect();
      for (const k of ['a', 'b', 'g']) client.subscribe('c', k, (m) => seen[k].push(m.sequence_number));
      await until(client, () => seen.a.length && seen.b.length && seen.g.length, 'the first messages');
      client.dropConnection();
      await until(client, () => seen.a.length === 3 && seen.g.length === 2, 'the resumed messages');
      const resume = fake.frames.find((f) => f.type === 'resume');
      assert.deepEqual(resume, {
        nth: 2, type: 'resume', epoch: 'e1',
        subscriptions: [{ channel: 'c', request_id: 'a', since: 101 }, { channel: 'c', request_id: 'b', since: 102 }, { channel: 'c', request_id: 'g', since: 103 }],
      });
      assert.equal(fake.frames.filter((f) => f.nth === 2 && f.type === 'subscribe').length, 0);
      assert.deepEqual(seen, { a: [101, 160, 201], b: [102], g: [103, 170] });
      assert.deepEqual(errors.map((e) => [e.code, e.subscriptionKey]), [['forbidden', 'c:b']]);
      assert.equal(gaps.length, 1);
      assert.deepEqual({ key: gaps[0].subscriptionKey, recovered: gaps[0].recovered, since: gaps[0].since, oldest: gaps[0].oldestSequence, reason: gaps[0].reason },
        { key: 'c:g', recovered: false, since: 103, oldest: 150, reason: 'window' });
      assert.equal(recoveries[0]?.searchParams.get('request_id'), 'g', 'the HTTP endpoint was asked for the rest first');
      const active = Object.fromEntries(client.subscriptions.map((s) => [s.requestId, s.active]));
      assert.deepEqual(active, { a: true, b: false, g: true });
    } finally {
      client.close();
      await fake.close();
    }
  });

  test('resume_ack with another epoch: a drop in the middle of the key\'s backlog (drained) resumes after what arrived, not after head', async () => {
    const fake = await fakeServer((socket, hello, nth) => {
      socket.on('message', (raw) => {
        const f = JSON.parse(String(raw));
        if (f.type === 'subscribe') {
          socket.send(JSON.stringify({ type: 'sub_ack', channel: 'c', request_id: 'r', subscription_key: 'c:r', drained: 0, head: 100, epoch: 'e1' }));
          socket.send(msg(101));
        }
        if (f.type === 'resume' && nth === 2) {
          // A restored store (epoch e2): the key starts over with a backlog of 3 up to head 9,
          // and the connection drops after 2 of them.
          socket.send(JSON.stringify({ type: 'resume_ack', results: [{ subscription_key: 'c:r', recovered: false, oldest_sequence: 1, drained: 3 }], head: 9, epoch: 'e2' }));
          socket.send(msg(2));
          socket.send(msg(5));
          socket.terminate();
        }
        if (f.type === 'resume' && nth === 3) {
          socket.send(JSON.stringify({ type: 'resume_ack', results: [{ subscription_key: 'c:r', recovered: true }], head: 9, epoch: 'e2' }));
          socket.send(msg(7));
        }
      });
    });
    const client = new SeqcastClient({ url: fake.url, token: 't', WebSocket, storage: memoryStorage(), backoff: { initialMs: 1, maxMs: 1 }, fetch: () => assert.fail('no HTTP expected') });
    const seen = [];
    try {
      await client.connect();
      client.subscribe('c', 'r', (m) => seen.push(m.sequence_number));
      await until(client, () => seen.length === 1, 'the first message');
      client.dropConnection();
      await until(client, () => seen.length === 4, 'the rest of the backlog after a second drop');
      const resumes = fake.frames.filter((f) => f.type === 'resume').map((f) => [f.nth, f.epoch, f.subscriptions[0].since]);
      assert.deepEqual(resumes, [[2, 'e1', 101], [3, 'e2', 5]], 'the third connection resumes after 5, the last backlog message received');
      assert.deepEqual(seen, [101, 2, 5, 7]);
    } finally {
      client.close();
      await fake.close();
    }
  });

  test('a server that does not know resume: its bad_request turns the client to subscribe-with-since, key by key, for good', async () => {
    const fake = await fakeServer((socket, hello, nth) => {
      socket.on('message', (raw) => {
        const f = JSON.parse(String(raw));
        if (f.type === 'resume') {
          socket.send(JSON.stringify({ type: 'error', code: 'bad_request', message: 'unknown frame type "resume"; expected hello, subscribe, unsubscribe, ping, auth or publish' }));
        }
        if (f.type === 'subscribe') {
          socket.send(JSON.stringify({ type: 'sub_ack', channel: 'c', request_id: f.request_id, subscription_key: `c:${f.request_id}`, drained: 0, head: 100, epoch: 'e1', ...(f.since != null ? { recovered: true } : {}) }));
        }
      });
    });
    const client = new SeqcastClient({ url: fake.url, token: 't', WebSocket, storage: memoryStorage(), backoff: { initialMs: 1, maxMs: 1 } });
    const errors = [];
    client.on('error', (e) => errors.push(e));
    try {
      await client.connect();
      client.subscribe('c', 'a', () => {});
      client.subscribe('c', 'b', () => {});
      await until(client, () => client.subscriptions.every((s) => s.active), 'both acks');
      client.dropConnection();
      await until(client, () => fake.hellos.length === 2 && client.subscriptions.every((s) => s.active), 'both acks again');
      client.dropConnection();
      await until(client, () => fake.hellos.length === 3 && client.subscriptions.every((s) => s.active), 'both acks a third time');
      const second = fake.frames.filter((f) => f.nth === 2);
      assert.deepEqual(second.map((f) => [f.type, f.request_id ?? null, f.since ?? null]),
        [['resume', null, null], ['subscribe', 'a', 100], ['subscribe', 'b', 100]]);
      const third = fake.frames.filter((f) => f.nth === 3);
      assert.deepEqual(third.map((f) => [f.type, f.request_id, f.since]), [['subscribe', 'a', 100], ['subscribe', 'b', 100]]);
      assert.deepEqual(errors, [], 'the refusal is handled, not reported');
    } finally {
      client.close();
      await fake.close();
    }
  });

  test('a server that stops answering pings is dropped and reconnected (heartbeat)', async () => {
    const fake = await fakeServer(() => {}); // never answers anything after `connected`
    const client = new SeqcastClient({ url: fake.url, token: 't', WebSocket, storage: memoryStorage(), heartbeatMs: 50, backoff: { initialMs: 10, maxMs: 10 } });
    const reasons = [];
    client.on('disconnected', (d) => reasons.push(d.reason));
    try {
      await client.connect();
      await until(client, () => fake.hellos.length === 2 && client.state === 'open', 'the reconnect', 5_000);
      assert.deepEqual(reasons, ['heartbeat timeout']);
      assert.deepEqual(fake.hellos.map((h) => h.connection_sequence), [1, 2]);
      assert.equal(fake.hellos[1].session_id, fake.hellos[0].session_id);
    } finally {
      client.close();
      await fake.close();
    }
  });
});

describe('publish() against a real server', () => {
  let server;
  before(async () => {
    server = await startServer();
  });
  after(async () => {
    await server?.stop();
  });

  /** Every message of one key from the log, over HTTP. */
  async function logOf(client, channel, requestId) {
    return (await client.recover(0, { channel, requestId, limit: 10_000 })).messages;
  }

  test('pipelined publishes resolve in order with dense numbers; the same connection follows the key', async () => {
    const client = newClient(server, { token: () => server.token({ sub: 'pub', publish: true }) });
    try {
      await within(10_000, 'connected', client.connect());
      const seen = follow(client, 'jspub', 'r1');
      await until(client, () => client.subscriptions[0]?.active, 'sub_ack');
      const acks = await within(20_000, '500 acks', Promise.all(Array.from({ length: 500 }, (_, i) => client.publish('jspub', 'r1', { i }))));
      const first = acks[0].sequenceNumber;
      acks.forEach((a, i) => {
        assert.equal(a.sequenceNumber, first + i, 'committed in the order called');
        assert.equal(a.streamSequence, i + 1);
        assert.match(a.messageId, /^[A-Za-z0-9_.:-]+$/);
      });
      await until(client, () => seen.length === 500, 'the key\'s 500 messages');
      assert.deepEqual(seen.map((m) => m.seq), acks.map((a) => a.sequenceNumber));
      const log = await logOf(client, 'jspub', 'r1');
      assert.deepEqual(log.map((m) => [m.sequence_number, m.message_id]), acks.map((a) => [a.sequenceNumber, a.messageId]));
      assert.equal(client.pendingPublishes, 0);
    } finally {
      client.close();
    }
  });

  test('a token without publish: true is refused with forbidden; the connection stays open', async () => {
    const client = newClient(server, { token: () => server.token({ sub: 'reader' }) });
    try {
      await within(10_000, 'connected', client.connect());
      await assert.rejects(within(10_000, 'the refusal', client.publish('jspub', 'nope', 'x')), (err) => {
        assert.equal(err.code, 'forbidden');
        return true;
      });
      assert.equal(client.state, 'open');
      const seen = follow(client, 'jspub', 'nope');
      await until(client, () => client.subscriptions.find((s) => s.requestId === 'nope')?.active, 'sub_ack');
      assert.equal(seen.length, 0, 'nothing was published');
    } finally {
      client.close();
    }
  });

  test('a refused publish rejects alone; the ones around it resolve', async () => {
    const client = newClient(server, { token: () => server.token({ sub: 'narrow', publish: true, channels: ['mine:*'] }) });
    try {
      await within(10_000, 'connected', client.connect());
      const [a, b, c] = await within(10_000, 'three answers', Promise.allSettled([
        client.publish('mine', 'r', 'a'),
        client.publish('theirs', 'r', 'b'),
        client.publish('mine', 'r', 'c'),
      ]));
      assert.equal(a.status, 'fulfilled');
      assert.equal(b.status, 'rejected');
      assert.equal(b.reason.code, 'forbidden');
      assert.equal(c.status, 'fulfilled');
      assert.equal(c.value.sequenceNumber, a.value.sequenceNumber + 1);
    } finally {
      client.close();
    }
  });

  test('publishes in flight when the connection drops are sent again and committed once', async () => {
    const client = newClient(server, { token: () => server.token({ sub: 'dropper', publish: true }) });
    try {
      await within(10_000, 'connected', client.connect());
      const n = 400;
      const answers = Array.from({ length: n }, (_, i) => client.publish('jsdrop', 'r', { i }));
      // Drop mid-stream: some are committed and unanswered, some not yet sent.
      await answers[50];
      assert.ok(client.pendingPublishes > 0, 'publishes still in flight at the drop');
      client.dropConnection({ downMs: 50 });
      const acks = await within(20_000, 'every answer after the reconnect', Promise.all(answers));
      assert.ok(client.stats.reconnects >= 1);
      const log = await logOf(client, 'jsdrop', 'r');
      assert.equal(log.length, n, 'each publish once');
      assert.equal(new Set(log.map((m) => m.message_id)).size, n);
      log.forEach((m, i) => assert.equal(m.data.i, i, 'in the order called'));
      const bySeq = new Map(log.map((m) => [m.message_id, m.sequence_number]));
      for (const a of acks) assert.equal(bySeq.get(a.messageId), a.sequenceNumber, 'an answer is the log\'s number');
    } finally {
      client.close();
    }
  });
});
