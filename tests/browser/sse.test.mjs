// The client's Server-Sent Events reader: the parser on tricky input (chunks cut anywhere, CRLF
// and CR, multi-line data, comments, a UTF-8 character split between network reads), and the
// client reading a real HTTP event stream from a small local server (node:http, written here)
// when WebSocket attempts fail: the token in a header only, Last-Event-ID on the resume after
// the server ends a stream, `reset` as a gap, a new stream when the key set changes, publishes
// over HTTP. Then the same client against the real server's `GET /events`: blocked, unblocked,
// and told `reset`.
// Run: SEQCAST_BIN=target/debug/seqcast node --test sse.test.mjs

import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { after, before, describe, test } from 'node:test';

import WebSocket from 'ws';
import { SeqcastClient, SseParser, memoryStorage } from '@seqcast/client';

import { startServer, within } from './server.mjs';

/** Feed `chunks` to a fresh parser; the events it completes, in order. */
function parse(chunks) {
  const parser = new SseParser();
  const events = [];
  for (const c of chunks) events.push(...parser.push(c));
  return { events, parser };
}

const TRICKY = [
  '\uFEFF: a comment first, as a heartbeat\r\n',
  'retry: 1500\r\n',
  '\r\n',
  'id: 7\r\nevent: message\r\ndata: {"a":\r\ndata: 1}\r\n\r\n',
  ':another comment\n',
  'event: reset\ndata:{"recovered":false}\n\n',
  'id: 9\rdata: line one\rdata\rdata:  two spaces\r\r',
  'id: 10\nevent: ping\nunknown: field\n\n',
  'data: é ☃ 𝄞 end\n\n',
  'id: 11\ndata: never finished',
].join('');

const TRICKY_EVENTS = [
  { event: 'message', data: '{"a":\n1}', id: '7' },
  { event: 'reset', data: '{"recovered":false}', id: '7' },
  { event: 'message', data: 'line one\n\n two spaces', id: '9' },
  { event: 'message', data: 'é ☃ 𝄞 end', id: '10' },
];

describe('SseParser (pure)', () => {
  test('whole input: fields, comments, CRLF and CR, multi-line data, BOM, retry; an event without data is not dispatched', () => {
    const { events, parser } = parse([TRICKY]);
    assert.deepEqual(events, TRICKY_EVENTS);
    assert.equal(parser.retry, 1500);
    assert.equal(parser.lastEventId, '11', 'id persists, also from an event not finished yet');
  });

  test('the same events whatever the chunking: cut at every position, and into single characters', () => {
    for (let i = 0; i <= TRICKY.length; i++) {
      assert.deepEqual(parse([TRICKY.slice(0, i), TRICKY.slice(i)]).events, TRICKY_EVENTS, `cut at ${i}`);
    }
    for (let i = 0; i < TRICKY.length; i += 7) {
      for (let j = i; j <= TRICKY.length; j += 5) {
        const chunks = [TRICKY.slice(0, i), TRICKY.slice(i, j), TRICKY.slice(j)];
        assert.deepEqual(parse(chunks).events, TRICKY_EVENTS, `cut at ${i} and ${j}`);
      }
    }
    assert.deepEqual(parse([...TRICKY]).events, TRICKY_EVENTS, 'one character at a time');
  });

  test('a CRLF split between chunks is one line end, not two (no empty event line in between)', () => {
    const { events } = parse(['data: a\r', '\ndata: b\r', '\n\r', '\n']);
    assert.deepEqual(events, [{ event: 'message', data: 'a\nb', id: '' }]);
  });

  test('bytes cut inside a UTF-8 character decode right with a streaming TextDecoder', () => {
    const bytes = new TextEncoder().encode(TRICKY);
    for (let i = 0; i <= bytes.length; i += 3) {
      const decoder = new TextDecoder();
      const parser = new SseParser();
      const events = [
        ...parser.push(decoder.decode(bytes.subarray(0, i), { stream: true })),
        ...parser.push(decoder.decode(bytes.subarray(i), { stream: true })),
      ];
      assert.deepEqual(events, TRICKY_EVENTS, `bytes cut at ${i}`);
    }
  });

  test('a line that never ends is refused past the bound instead of growing memory', () => {
    const parser = new SseParser();
    const piece = 'x'.repeat(1024 * 1024);
    assert.throws(() => {
      for (let i = 0; i < 20; i++) parser.push(i === 0 ? `data: ${piece}` : piece);
    }, (e) => e.code === 'bad_stream');
  });
});

/**
 * A small event-stream server over node:http: an in-memory log, `GET /events` (keys, since,
 * Last-Event-ID, `reset` where asked, each event written in pieces cut at odd places, comments,
 * CRLF, multi-line data; ends each stream after `endAfter` events) and `POST /api/publish`.
 */
async function eventServer() {
  const log = [];
  const streams = new Set();
  const requests = [];
  const positions = new Map();
  const state = { endAfter: Infinity, resetOldest: null, epoch: 'epoch-1' };

  function frame(m) {
    // Pretty-printed JSON: several `data:` lines that join back into the same JSON.
    const data = JSON.stringify(m, null, 1).split('\n').map((l) => `data: ${l}`).join('\r\n');
    return `: heartbeat\r\nid: ${m.sequence_number}\r\nevent: message\r\n${data}\r\n\r\n`;
  }
  async function send(stream, text) {
    // Three writes cut at odd places, each in its own turn of the event loop.
    const cuts = [Math.floor(text.length / 3) + 1, Math.floor((2 * text.length) / 3) - 1];
    for (const piece of [text.slice(0, cuts[0]), text.slice(cuts[0], cuts[1]), text.slice(cuts[1])]) {
      if (stream.closed) return;
      stream.res.write(piece);
      await new Promise((r) => setImmediate(r));
    }
  }
  async function pump(stream) {
    if (stream.pumping) return;
    stream.pumping = true;
    while (!stream.closed) {
      const m = log.find((e) => e.sequence_number > stream.since && stream.keys.has(`${e.channel}:${e.request_id}`));
      if (!m) break;
      stream.since = m.sequence_number;
      await send(stream, frame(m));
      if (++stream.sent >= state.endAfter) {
        stream.closed = true;
        streams.delete(stream);
        stream.res.end();
      }
    }
    stream.pumping = false;
  }
  function append(channel, requestId, data, messageId) {
    const key = `${channel}:${requestId}`;
    positions.set(key, (positions.get(key) ?? 0) + 1);
    const m = {
      sequence_number: log.length + 1,
      stream_sequence: positions.get(key),
      channel,
      request_id: requestId,
      message_id: messageId ?? `m${log.length + 1}`,
      timestamp: Date.now(),
      data,
    };
    log.push(m);
    for (const s of streams) pump(s);
    return m;
  }

  const http = createServer((req, res) => {
    const url = new URL(req.url, 'http://localhost');
    requests.push({ method: req.method, path: url.pathname, url: req.url, headers: req.headers });
    if (req.method === 'POST' && url.pathname === '/api/publish') {
      let body = '';
      req.on('data', (c) => (body += c));
      req.on('end', () => {
        const p = JSON.parse(body);
        const m = append(p.channel, p.request_id, p.data, p.message_id);
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ sequence_number: m.sequence_number, stream_sequence: m.stream_sequence, message_id: m.message_id }));
      });
      return;
    }
    if (req.method !== 'GET' || url.pathname !== '/events') {
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { code: 'not_found', message: 'no such endpoint' } }));
      return;
    }
    if (!/^Bearer \S+$/.test(req.headers.authorization ?? '')) {
      res.writeHead(401, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: { code: 'unauthorized', message: 'no token' } }));
      return;
    }
    const lastId = req.headers['last-event-id'];
    const since = Number(lastId ?? url.searchParams.get('since') ?? 0);
    const stream = { res, keys: new Set(url.searchParams.getAll('key')), since, sent: 0, closed: false, pumping: false };
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-store' });
    res.write(':ok\n\n');
    if (state.resetOldest !== null && since + 1 < state.resetOldest) {
      res.write(`event: reset\ndata: ${JSON.stringify({ recovered: false, oldest_sequence: state.resetOldest, epoch: state.epoch })}\n\n`);
      stream.since = state.resetOldest - 1;
    }
    streams.add(stream);
    req.on('close', () => {
      stream.closed = true;
      streams.delete(stream);
    });
    pump(stream);
  });
  await new Promise((r) => http.listen(0, '127.0.0.1', r));
  const { port } = http.address();
  return {
    url: `http://127.0.0.1:${port}`,
    log,
    requests,
    state,
    streams,
    append,
    async stop() {
      for (const s of streams) s.res.destroy();
      http.closeAllConnections();
      await new Promise((r) => http.close(r));
    },
  };
}

/** A WebSocket that can never connect: the client's attempts fail as behind a proxy that blocks it. */
class BlockedWebSocket {
  constructor() {
    throw new Error('WebSocket blocked');
  }
}

/** Resolve once `check()` is truthy, re-checked on every client event; bounded. */
function until(client, check, what, ms = 10_000) {
  const offs = [];
  const done = new Promise((resolve) => {
    const probe = () => {
      const v = check();
      if (v) resolve(v);
    };
    for (const ev of ['state', 'transport', 'subscribed', 'message', 'gap', 'error']) offs.push(client.on(ev, probe));
    probe();
  });
  return within(ms, what, done).finally(() => offs.forEach((off) => off()));
}

describe('the client on a real HTTP event stream (local server)', () => {
  let server;
  before(async () => {
    server = await eventServer();
  });
  after(async () => {
    await server?.stop();
  });

  function blockedClient(options = {}) {
    const client = new SeqcastClient({
      url: server.url.replace('http', 'ws') + '/ws',
      token: 'a.b.c',
      WebSocket: BlockedWebSocket,
      storage: memoryStorage(),
      backoff: { initialMs: 5, maxMs: 20 },
      fallback: { probeMs: 3_600_000 }, // no socket to come back to here
      ...options,
    });
    const errors = [];
    client.on('error', (e) => e.code !== 'socket' && errors.push(e));
    return { client, errors };
  }

  test('after 3 failed WebSocket attempts the stream takes over: every message once, in order, across streams the server ends', async () => {
    server.state.endAfter = 3;
    const { client, errors } = blockedClient();
    const seen = [];
    const subscribed = [];
    const transports = [];
    client.on('transport', (t) => transports.push(t));
    client.on('subscribed', (e) => subscribed.push(e));
    for (let i = 0; i < 4; i++) server.append('search', 'r1', { before: i });
    const other = server.append('search', 'r2', { other: true });
    client.subscribe('search', 'r1', (m) => seen.push(m), { since: 0 });
    try {
      const info = await within(10_000, 'connect over SSE', client.connect());
      assert.equal(info.clientId, null, 'no socket: no client id');
      assert.equal(client.transport, 'sse');
      assert.deepEqual(transports, ['sse']);
      assert.equal(subscribed.length, 1);
      assert.equal(subscribed[0].transport, 'sse');
      for (let i = 0; i < 6; i++) server.append('search', 'r1', { live: i });
      await until(client, () => seen.length >= 10, '10 messages of search:r1');
      const mine = server.log.filter((m) => m.request_id === 'r1');
      assert.deepEqual(seen.map((m) => m.sequence_number), mine.map((m) => m.sequence_number));
      assert.deepEqual(seen.map((m) => m.data), mine.map((m) => m.data), 'multi-line data came back whole');
      assert.ok(!seen.some((m) => m.sequence_number === other.sequence_number));

      const opens = server.requests.filter((r) => r.path === '/events');
      assert.ok(opens.length >= 3, `the server ended streams every 3 events; ${opens.length} opened`);
      for (const r of opens) {
        assert.match(r.headers.authorization, /^Bearer a\.b\.c$/);
        assert.ok(!r.url.includes('a.b.c') && !/token|ticket/.test(r.url), `no token in the URL: ${r.url}`);
        assert.equal(r.headers.accept, 'text/event-stream');
      }
      assert.equal(opens[0].headers['last-event-id'], undefined);
      assert.equal(new URL(opens[0].url, server.url).searchParams.get('since'), '0');
      assert.deepEqual(new URL(opens[0].url, server.url).searchParams.getAll('key'), ['search:r1']);
      // Each resume after the server ended a stream says where the last one stopped.
      for (let i = 1; i < opens.length; i++) assert.match(opens[i].headers['last-event-id'] ?? '', /^[0-9]+$/);
      assert.equal(client.stats.duplicatesDropped, 0);
      assert.deepEqual(errors, []);
      assert.equal(client.state, 'open');
    } finally {
      client.close();
      server.state.endAfter = Infinity;
    }
  });

  test('a new key opens a new stream over both keys, from where each stands; publish() goes over HTTP', async () => {
    const { client, errors } = blockedClient();
    const seen = { r3: [], r4: [] };
    const start = server.log.length;
    client.subscribe('chat', 'r3', (m) => seen.r3.push(m.sequence_number), { since: start });
    await within(10_000, 'connect over SSE', client.connect());
    const a = server.append('chat', 'r3', { n: 1 });
    await until(client, () => seen.r3.length === 1, 'first message of chat:r3');
    const before = server.requests.filter((r) => r.path === '/events').length;
    client.subscribe('chat', 'r4', (m) => seen.r4.push(m.sequence_number), { since: start });
    await until(client, () => server.requests.filter((r) => r.path === '/events').length > before, 'a new stream');
    const last = server.requests.filter((r) => r.path === '/events').at(-1);
    assert.deepEqual(new URL(last.url, server.url).searchParams.getAll('key').sort(), ['chat:r3', 'chat:r4']);
    try {
      const ack = await within(5_000, 'publish over HTTP', client.publish('chat', 'r4', { hello: 'sse' }));
      const b = server.append('chat', 'r3', { n: 2 });
      await until(client, () => seen.r3.length === 2 && seen.r4.length === 1, 'both keys');
      assert.deepEqual(seen.r3, [a.sequence_number, b.sequence_number], 'nothing of chat:r3 twice across the new stream');
      assert.deepEqual(seen.r4, [ack.sequenceNumber]);
      const post = server.requests.find((r) => r.method === 'POST');
      assert.equal(post.headers.authorization, 'Bearer a.b.c');
      assert.deepEqual(errors, []);
    } finally {
      client.close();
    }
  });

  test('event: reset becomes a gap (recovered: false) for the keys it leaves behind, then what the window holds', async () => {
    const oldest = server.log.length + 3;
    for (let i = 0; i < 5; i++) server.append('feed', 'r5', { i });
    server.state.resetOldest = oldest;
    const { client } = blockedClient();
    const gaps = [];
    const seen = [];
    client.on('gap', (g) => gaps.push(g));
    client.subscribe('feed', 'r5', (m) => seen.push(m.sequence_number), { since: 1, epoch: 'epoch-1' });
    try {
      await within(10_000, 'connect over SSE', client.connect());
      await until(client, () => seen.length === 3, 'the 3 messages the window holds');
      assert.equal(gaps.length, 1);
      assert.deepEqual(
        { ...gaps[0] },
        {
          channel: 'feed', requestId: 'r5', subscriptionKey: 'feed:r5', recovered: false, since: 1,
          oldestSequence: oldest, epoch: 'epoch-1', previousEpoch: 'epoch-1', reason: 'window', transport: 'sse',
        },
      );
      assert.deepEqual(seen, [oldest, oldest + 1, oldest + 2]);
    } finally {
      client.close();
      server.state.resetOldest = null;
    }
  });

  test('a server without GET /events (404): back to WebSocket attempts, with the error reported', async () => {
    const { client, errors } = blockedClient({ fallback: { path: '/no-such-events', probeMs: 3_600_000 } });
    const transports = [];
    client.on('transport', (t) => transports.push(t));
    client.subscribe('search', 'r1', () => {});
    client.connect().catch(() => {});
    try {
      await until(client, () => transports.length >= 4, 'SSE tried, given up, and tried again');
      assert.deepEqual(transports.slice(0, 4), ['sse', 'websocket', 'sse', 'websocket']);
      assert.ok(errors.some((e) => e.code === 'not_found' && e.status === 404), errors.map((e) => e.code).join());
    } finally {
      client.close();
    }
  });
});

describe("the client on the real server's GET /events", () => {
  /** The `ws` WebSocket behind a switch: while `blocked`, every attempt fails as behind a proxy. */
  function switchableSocket() {
    const sw = { blocked: false };
    sw.WebSocket = class extends WebSocket {
      constructor(url, protocols) {
        if (sw.blocked) throw new Error('WebSocket blocked');
        super(url, protocols);
      }
    };
    return sw;
  }

  test('blocked → SSE → unblocked → WebSocket: every message once, in order, while a publisher runs through both switches', { timeout: 60_000 }, async (t) => {
    const server = await startServer({ args: ['--sse-max-secs', '1'] });
    const sw = switchableSocket();
    const sent = [];
    const Recording = class extends sw.WebSocket {
      send(data) {
        sent.push(JSON.parse(data));
        super.send(data);
      }
    };
    const client = new SeqcastClient({
      url: server.wsUrl, token: () => server.token(), WebSocket: Recording, storage: memoryStorage(),
      backoff: { initialMs: 20, maxMs: 100 }, fallback: { probeMs: 400 },
    });
    const transports = [];
    const errors = [];
    client.on('transport', (tr) => transports.push(tr));
    client.on('error', (e) => e.code !== 'socket' && errors.push(e));
    const seen = { a: [], b: [] };
    const published = { a: [], b: [] };
    let stop = false;
    const publisher = (async () => {
      for (let i = 0; !stop; i++) {
        const k = i % 3 === 0 ? 'b' : 'a';
        published[k].push((await server.publish('fb', k, { i })).sequence_number);
        await new Promise((r) => setTimeout(r, 15));
      }
    })();
    t.after(async () => {
      stop = true;
      await publisher.catch(() => {});
      client.close();
      await server.stop();
    });
    await client.connect();
    for (const k of ['a', 'b']) client.subscribe('fb', k, (m, meta) => seen[k].push([m.sequence_number, meta.transport]));
    await until(client, () => client.subscriptions.every((s) => s.active), 'both keys acknowledged');

    sw.blocked = true;
    client.dropConnection();
    await until(client, () => client.transport === 'sse' && client.state === 'open', 'the switch to SSE');
    const onSse = seen.a.length;
    await until(client, () => seen.a.slice(onSse).filter(([, tr]) => tr === 'sse').length >= 20, '20 messages of fb:a over SSE (streams end every second)', 20_000);

    sw.blocked = false;
    await until(client, () => client.transport === 'websocket', 'the hand-over back to WebSocket', 10_000);
    const back = seen.a.length;
    await until(client, () => seen.a.length >= back + 10, '10 more messages over the socket');
    stop = true;
    await publisher;
    const last = published.a.at(-1);
    await until(client, () => seen.a.at(-1)?.[0] === last && seen.b.at(-1)?.[0] === published.b.at(-1), 'the last messages');

    for (const k of ['a', 'b']) assert.deepEqual(seen[k].map(([s]) => s), published[k], `fb:${k}: every message once, in commit order`);
    assert.deepEqual(transports, ['sse', 'websocket']);
    assert.ok(seen.a.some(([, tr]) => tr === 'sse') && seen.a.at(-1)[1] === 'websocket');
    assert.equal(client.stats.gaps, 0);
    assert.deepEqual(errors, []);
    const resumes = sent.filter((f) => f.type === 'resume');
    t.diagnostic(`fb:a ${published.a.length}, fb:b ${published.b.length} messages; over SSE ${seen.a.filter(([, tr]) => tr === 'sse').length + seen.b.filter(([, tr]) => tr === 'sse').length}; resume frames ${resumes.length}; duplicates dropped ${client.stats.duplicatesDropped}`);
  });

  test('a window that no longer reaches: event: reset becomes a gap (recovered: false) for that key, then the window, once', { timeout: 30_000 }, async (t) => {
    const server = await startServer({ args: ['--recovery-max-messages', '5'] });
    t.after(() => server.stop());
    const first = await server.publish('win', 'k', { i: 0 });
    const info = await (async () => {
      const probe = new SeqcastClient({ url: server.wsUrl, token: () => server.token(), WebSocket, storage: memoryStorage() });
      try {
        return await probe.connect();
      } finally {
        probe.close();
      }
    })();
    const later = [];
    for (let i = 1; i <= 10; i++) later.push((await server.publish('win', 'k', { i })).sequence_number);
    const client = new SeqcastClient({
      url: server.wsUrl, token: () => server.token(), WebSocket: BlockedWebSocket, storage: memoryStorage(),
      backoff: { initialMs: 5, maxMs: 20 }, fallback: { probeMs: 3_600_000 },
    });
    t.after(() => client.close());
    const gaps = [];
    const seen = [];
    client.on('gap', (g) => gaps.push(g));
    client.subscribe('win', 'k', (m, meta) => seen.push([m.sequence_number, meta.transport]), { since: first.sequence_number, epoch: info.epoch });
    await client.connect();
    await until(client, () => seen.length === 5, 'the 5 messages the window holds');
    assert.equal(gaps.length, 1);
    assert.equal(gaps[0].recovered, false);
    assert.equal(gaps[0].transport, 'sse');
    assert.equal(gaps[0].reason, 'window');
    assert.equal(gaps[0].since, first.sequence_number);
    assert.equal(gaps[0].oldestSequence, later[5]);
    assert.deepEqual(seen, later.slice(5).map((s) => [s, 'sse']));
  });
});
