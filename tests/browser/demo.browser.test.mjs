// The demo page in a real browser: headless Chromium (Debian's /usr/bin/chromium, never a
// downloaded one) driven by playwright-core, against a real server in development mode.
// Everything talks to 127.0.0.1 only, every wait is bounded, and the browser and server stop
// themselves. Run: SEQCAST_BIN=target/debug/seqcast node --test demo.browser.test.mjs

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
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

test('demo page: history on open, live, drop with pending, recovery, strict keying, reload — every message once, in order', { timeout: 120_000 }, async (t) => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: apt-get install chromium`);
  const server = await startServer({ dev: true });
  const profile = await mkdtemp(join(tmpdir(), 'seqcast-chromium-'));
  let context;
  t.after(async () => {
    await context?.close().catch(() => {});
    await server.stop();
    await rm(profile, { recursive: true, force: true });
  });

  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
    timeout: 30_000,
    viewport: { width: 1000, height: 1100 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(10_000);
  const pageErrors = [];
  const failedRequests = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('console', (m) => m.type() === 'error' && pageErrors.push(m.text()));
  page.on('response', (r) => r.status() >= 400 && failedRequests.push(`${r.status()} ${r.url()}`));
  // Nothing but the server under test: any other request fails the test.
  await context.route('**/*', (route) => {
    const url = new URL(route.request().url());
    if (url.protocol === 'data:' || url.host === server.addr) return route.continue();
    pageErrors.push(`unexpected request to ${url.href}`);
    return route.abort();
  });

  const text = (id) => page.locator(`#${id}`).innerText();
  const waitState = (state) => page.locator(`#state[data-state="${state}"]`).waitFor();
  const rows = () => page.locator('#messages li[data-seq]').evaluateAll((lis) => lis.map((li) => ({
    seq: Number(li.dataset.seq), key: li.dataset.key, origin: li.dataset.origin,
  })));
  const shownSeqs = async () => (await rows()).map((r) => r.seq);
  const waitForCount = (n, list = 'messages') =>
    page.waitForFunction(([n, list]) => document.querySelectorAll(`#${list} li[data-seq]`).length >= n, [n, list]);

  // 0. The README tour's key has history before anyone looks: a backend published it.
  const history = [];
  for (let i = 0; i < 2; i++) history.push((await server.publish('search', 'r1', { hits: i })).sequence_number);
  await server.publish('search', 'r2', { other: 'request' }); // another key: never on r1's view

  // 1. Open the page (default key search:r1): the history is there at once, then live messages.
  await page.goto(`${server.httpUrl}/?outage_ms=60000`);
  await waitState('open');
  assert.match(await page.locator('body').innerText(), /sequence number/i, 'the page explains itself');
  assert.equal(await page.locator('#key-picker').inputValue(), 'r1');
  await waitForCount(2);
  assert.deepEqual(await rows(), history.map((seq) => ({ seq, key: 'search:r1', origin: 'history' })));
  const sessionId = await text('session-id');
  assert.match(sessionId, /^[0-9a-f]{32}$/);
  assert.equal(await text('connection-sequence'), '1');
  const firstClientId = await text('client-id');
  await page.locator('#publish:not([disabled])').waitFor();

  const live = [];
  for (let i = 0; i < 3; i++) live.push((await server.publish('search', 'r1', { n: i })).sequence_number);
  await waitForCount(5);
  await page.locator('#publish').click();
  await waitForCount(6);
  live.push((await shownSeqs())[5]);
  assert.deepEqual(await shownSeqs(), [...history, ...live]);

  // 2. Drop the socket and keep it down; the server must have seen it go before we publish.
  await page.locator('#drop').click();
  await waitState('reconnecting');
  const dropped = await server.waitForLog(
    (e) => e.event === 'connection_closed' && e.session_id === sessionId && e.connection_sequence === 1,
    'connection_closed of connection 1',
  );
  assert.equal(dropped.client_id, firstClientId);
  assert.equal(dropped.close_code, 4000, 'a page drops with 4000 (browsers cannot close abnormally)');
  // The countdown counts down.
  const first = await text('state');
  assert.match(first, /^reconnecting in \d+\.\d s$/);
  await page.waitForFunction((first) => document.getElementById('state').innerText !== first, first);
  const second = await text('state');
  assert.ok(parseFloat(second.split(' ')[2]) < parseFloat(first.split(' ')[2]), `${first} → ${second}`);

  // What is published meanwhile shows up as pending on the server, not as received.
  const whileDown = [];
  for (let i = 0; i < 5; i++) whileDown.push((await server.publish('search', 'r1', { down: i })).sequence_number);
  await page.locator('#pending-box').waitFor();
  await waitForCount(5, 'pending');
  const pending = await page.locator('#pending li[data-seq]').evaluateAll((lis) => lis.map((li) => Number(li.dataset.seq)));
  assert.deepEqual(pending, whileDown);
  assert.equal(await page.locator('#messages li[data-seq]').count(), 6, 'nothing arrives while down');
  await mkdir(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: join(ARTIFACTS, 'demo-dropped.png'), fullPage: true });

  // 3. Reconnect: the five missed messages arrive, marked as recovered, then live ones again.
  await page.locator('#reconnect').click();
  await waitState('open');
  assert.equal(await text('connection-sequence'), '2');
  assert.equal(await text('session-id'), sessionId);
  assert.notEqual(await text('client-id'), firstClientId);
  await waitForCount(11);
  await page.locator('#pending-box').waitFor({ state: 'hidden' });
  const after = (await server.publish('search', 'r1', { n: 'after' })).sequence_number;
  await waitForCount(12);
  const all = await rows();
  assert.deepEqual(all.map((r) => r.seq), [...history, ...live, ...whileDown, after], 'every message exactly once, in order');
  assert.deepEqual(all.map((r) => r.origin), [
    ...Array(2).fill('history'), ...Array(4).fill('live'), ...Array(5).fill('recovered'), 'live',
  ]);
  assert.ok(all.every((r) => r.key === 'search:r1'));
  assert.equal(await text('last-sequence'), String(after));
  assert.equal(await text('message-count'), '12');
  assert.equal(await text('recovered-count'), '5');
  assert.equal(await page.locator('li[data-gap]').count(), 0);
  const screenshot = join(ARTIFACTS, 'demo.png');
  await page.screenshot({ path: screenshot, fullPage: true });
  t.diagnostic(`screenshot: ${screenshot}`);

  // 4. Strict keying: the page's publisher keeps sending to search:r1 while the page switches to
  //    search:r2 — r2's history and live messages appear, nothing of r1.
  await page.locator('#autopublish').click();
  await page.waitForFunction(() => Number(document.getElementById('auto-status').dataset.sent ?? 0) >= 1);
  await page.locator('#key-picker').selectOption('r2');
  await page.waitForFunction(() => document.querySelector('#messages li[data-seq]')?.dataset.key === 'search:r2');
  const sentBefore = Number(await page.locator('#auto-status').getAttribute('data-sent'));
  const r2live = (await server.publish('search', 'r2', { n: 'r2 live' })).sequence_number;
  await waitForCount(2);
  await page.waitForFunction((n) => Number(document.getElementById('auto-status').dataset.sent) >= n + 2, sentBefore);
  assert.match(await text('auto-status'), /publishing to search:r1/);
  const r2rows = await rows();
  assert.ok(r2rows.every((r) => r.key === 'search:r2'), JSON.stringify(r2rows));
  assert.deepEqual(r2rows.map((r) => r.origin), ['history', 'live']);
  assert.equal(r2rows[1].seq, r2live);
  await page.locator('#autopublish').click(); // stop
  assert.match(page.url(), /request_id=r2/, 'the key is in the address, so a reload keeps it');

  // 5. Reload: same key, the same messages (from history), same session, the next connection number.
  const beforeReload = await shownSeqs();
  await page.reload();
  await waitState('open');
  await waitForCount(beforeReload.length);
  assert.deepEqual(await shownSeqs(), beforeReload);
  assert.ok((await rows()).every((r) => r.origin === 'history'));
  assert.equal(await text('session-id'), sessionId);
  assert.equal(await text('connection-sequence'), '3');

  // 6. The server's JSON log follows the session across all of it.
  const closed2 = await server.waitForLog(
    (e) => e.event === 'connection_closed' && e.session_id === sessionId && e.connection_sequence === 2,
    'connection_closed of connection 2 (reload)',
  );
  assert.equal(closed2.close_code, 1001, 'a reload closes the socket as "going away"');
  assert.ok(closed2.messages_sent >= 9, `connection 2 sent connected, sub_acks and 7 messages; got ${closed2.messages_sent}`);
  await context.close();
  context = undefined;
  const closed3 = await server.waitForLog(
    (e) => e.event === 'connection_closed' && e.session_id === sessionId && e.connection_sequence === 3,
    'connection_closed of connection 3 (browser closed)',
  );
  t.diagnostic(`close codes: ${dropped.close_code}, ${closed2.close_code}, ${closed3.close_code}`);
  const opened = server.logs.filter((e) => e.event === 'connection_opened' && e.session_id === sessionId).map((e) => e.connection_sequence);
  const closed = server.logs.filter((e) => e.event === 'connection_closed' && e.session_id === sessionId).map((e) => e.connection_sequence);
  assert.deepEqual(opened, [1, 2, 3]);
  assert.deepEqual(closed, [1, 2, 3]);
  assert.deepEqual(pageErrors, []);
  assert.deepEqual(failedRequests, [], 'no request of the page failed (favicon included)');
});
