// The demo page in headless Chromium when WebSocket is blocked: the client falls back to the
// server's Server-Sent Events stream (`GET /events`, read with fetch), receives every message
// published before, during and after the switch exactly once and in order, publishes over
// `POST /api/publish`, resumes each stream the server ends with Last-Event-ID, and — unblocked —
// moves back to a WebSocket with no gap. A publisher runs the whole time, so messages are
// committed while each switch is under way. Every wait is bounded; nothing sleeps to synchronize.
// Run: SEQCAST_BIN=target/debug/seqcast node --test fallback.browser.test.mjs

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { chromium } from 'playwright-core';

import { ROOT, startServer } from './server.mjs';

const CHROMIUM = process.env.SEQCAST_CHROMIUM ?? '/usr/bin/chromium';
const ARTIFACTS = process.env.SEQCAST_BROWSER_ARTIFACTS ?? join(ROOT, 'target', 'browser');
const CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'];

/** Resolve once `check()` holds, looking again every 20 ms; fail after `ms`. */
async function waitUntil(check, what, ms = 15_000) {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test('demo page: WebSocket blocked → SSE → WebSocket again, every message once and in order, no gap at either switch', { timeout: 120_000 }, async (t) => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: apt-get install chromium`);
  // Streams end every 2 s, so the client resumes them with Last-Event-ID while we watch.
  const server = await startServer({ dev: true, args: ['--sse-max-secs', '2'] });
  const profile = await mkdtemp(join(tmpdir(), 'seqcast-chromium-'));
  let context;
  let publisher;
  t.after(async () => {
    publisher?.stop();
    await publisher?.done.catch(() => {});
    await context?.close().catch(() => {});
    await server.stop();
    await rm(profile, { recursive: true, force: true });
  });

  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, timeout: 30_000, viewport: { width: 1000, height: 1400 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(15_000);
  const pageErrors = [];
  const failedRequests = [];
  const eventsRequests = [];
  const publishRequests = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('console', (m) => m.type() === 'error' && pageErrors.push(m.text()));
  page.on('response', (r) => r.status() >= 400 && failedRequests.push(`${r.status()} ${r.url()}`));
  page.on('request', async (r) => {
    const url = new URL(r.url());
    if (url.pathname === '/events') eventsRequests.push({ url, headers: await r.allHeaders() });
    if (url.pathname === '/api/publish') publishRequests.push({ headers: await r.allHeaders() });
  });
  await context.route('**/*', (route) => {
    const url = new URL(route.request().url());
    if (url.protocol === 'data:' || url.host === server.addr) return route.continue();
    pageErrors.push(`unexpected request to ${url.href}`);
    return route.abort();
  });

  const published = []; // sequence numbers of search:r1, in commit order
  const publish = async (data) => {
    const answer = await server.publish('search', 'r1', data);
    published.push(answer.sequence_number);
    return answer;
  };
  /** Publish to search:r1 (and to r2, never shown) every 40 ms until stopped. */
  function startPublisher() {
    let stopped = false;
    let n = 0;
    const done = (async () => {
      while (!stopped) {
        await publish({ background: ++n });
        if (n % 5 === 0) await server.publish('search', 'r2', { other: n });
        await new Promise((r) => setTimeout(r, 40));
      }
    })();
    return { stop: () => { stopped = true; }, done, count: () => n };
  }
  const transport = () => page.locator('#transport').getAttribute('data-transport');
  const rows = () => page.locator('#messages li[data-seq]').evaluateAll((lis) => lis.map((li) => ({
    seq: Number(li.dataset.seq), key: li.dataset.key, position: Number(li.dataset.position), transport: li.dataset.transport,
  })));
  const waitForSeq = (seq) => page.waitForFunction((s) => !!document.querySelector(`#messages li[data-seq="${s}"]`), seq);

  // 1. Before: history and live over WebSocket.
  await publish({ before: 1 });
  await publish({ before: 2 });
  await page.goto(`${server.httpUrl}/?probe_ms=1500`);
  await page.locator('#state[data-state="open"]').waitFor();
  assert.equal(await transport(), 'websocket');
  await publish({ live: 1 });
  await waitForSeq(published.at(-1));

  // 2. Block WebSocket while a publisher runs: the client drops, fails 3 times, takes the stream.
  publisher = startPublisher();
  await page.locator('#block-ws').check();
  await page.locator('#transport[data-transport="sse"]').waitFor();
  await page.locator('#state[data-state="open"]').waitFor();
  const sseFrom = published.length;
  await publish({ during: 'sse' });
  await waitForSeq(published.at(-1));
  // A publish from the page while on SSE goes over HTTP, with the token in the header.
  const ack = await page.evaluate(() => window.seqcastClient.publish('search', 'r1', { from: 'page over HTTP' }));
  published.push(ack.sequenceNumber);
  await waitForSeq(ack.sequenceNumber);
  assert.ok(publishRequests.some((r) => /^Bearer \S+$/.test(r.headers.authorization ?? '')), 'client.publish() went to POST /api/publish with a Bearer token');
  // The server ends each stream after 2 s: the client takes it up again with Last-Event-ID.
  await waitUntil(() => eventsRequests.some((r) => /^[0-9]+$/.test(r.headers['last-event-id'] ?? '')), 'a stream resumed with Last-Event-ID');
  for (const r of eventsRequests) {
    assert.match(r.headers.authorization ?? '', /^Bearer \S+$/, 'the token goes in the Authorization header');
    assert.ok(!r.url.search.includes('token') && !r.url.search.includes('ticket'), `no token in the URL: ${r.url}`);
    assert.deepEqual(r.url.searchParams.getAll('key'), ['search:r1']);
  }
  const sseRows = (await rows()).filter((r) => r.transport === 'sse');
  assert.ok(sseRows.length >= 2, `messages arrived over SSE: ${sseRows.length}`);
  await mkdir(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: join(ARTIFACTS, 'fallback.png'), fullPage: true });

  // 3. Unblock: the next probe opens a WebSocket, resumes from the last numbers, then the stream closes.
  const opened = server.logs.filter((e) => e.event === 'connection_opened').length;
  await page.locator('#block-ws').uncheck();
  await page.locator('#transport[data-transport="websocket"]').waitFor();
  await page.locator('#state[data-state="open"]').waitFor();
  assert.ok(server.logs.filter((e) => e.event === 'connection_opened').length > opened, 'a new WebSocket connection');
  const backAt = published.length;
  await waitUntil(() => published.length >= backAt + 5, 'five more background publishes after the switch back');
  publisher.stop();
  await publisher.done;
  await publish({ after: 'all' });

  // 4. Everything of search:r1 once, in order; stream positions 1..N with none missing.
  await waitForSeq(published.at(-1));
  const all = await rows();
  assert.deepEqual(all.map((r) => r.seq), published, 'every message exactly once, in commit order');
  assert.ok(all.every((r) => r.key === 'search:r1'));
  assert.deepEqual(all.map((r) => r.position), all.map((_, i) => i + 1));
  assert.equal(await page.locator('#continuity').getAttribute('data-ok'), 'true');
  assert.equal(await page.locator('li[data-gap]').count(), 0);
  const lastRows = all.slice(-3);
  assert.ok(lastRows.every((r) => r.transport === 'websocket'), 'after the switch back, messages come over the socket');
  assert.ok(all.slice(sseFrom).some((r) => r.transport === 'sse'));
  const stats = await page.evaluate(() => window.seqcastClient.stats);
  t.diagnostic(`published ${published.length} (background ${publisher.count()}), over SSE ${(await rows()).filter((r) => r.transport === 'sse').length}, streams opened ${eventsRequests.length}, duplicates dropped ${stats.duplicatesDropped}`);
  assert.equal(stats.gaps, 0);
  assert.deepEqual(pageErrors, []);
  assert.deepEqual(failedRequests, []);
});
