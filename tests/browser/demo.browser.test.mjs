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

test('demo page: live, drop, publish while down, reconnect, reload — every message once, in order', { timeout: 90_000 }, async (t) => {
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
    viewport: { width: 900, height: 900 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(10_000);
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  page.on('console', (m) => m.type() === 'error' && pageErrors.push(m.text()));
  // Nothing but the server under test: any other request fails the test.
  await context.route('**/*', (route) => {
    const url = new URL(route.request().url());
    if (url.host === server.addr) return route.continue();
    pageErrors.push(`unexpected request to ${url.href}`);
    return route.abort();
  });

  const text = (id) => page.locator(`#${id}`).innerText();
  const waitState = (state) => page.locator(`#state[data-state="${state}"]`).waitFor();
  const shownSeqs = () => page.locator('#messages li[data-seq]').evaluateAll((lis) => lis.map((li) => Number(li.dataset.seq)));
  const waitForCount = (n) => page.waitForFunction((n) => document.querySelectorAll('#messages li[data-seq]').length >= n, n);

  // 1. Load the page and receive live messages (three from a backend, one from the page's own button).
  await page.goto(`${server.httpUrl}/?channel=demo&request_id=r1&outage_ms=60000`);
  await waitState('open');
  const sessionId = await text('session-id');
  assert.match(sessionId, /^[0-9a-f]{32}$/);
  assert.equal(await text('connection-sequence'), '1');
  const firstClientId = await text('client-id');
  await page.locator('#publish:not([disabled])').waitFor();

  const published = [];
  for (let i = 0; i < 3; i++) published.push((await server.publish('demo', 'r1', { n: i })).sequence_number);
  await waitForCount(3);
  await page.locator('#publish').click();
  await waitForCount(4);
  const live = await shownSeqs();
  assert.deepEqual(live.slice(0, 3), published);
  published.push(live[3]);

  // 2. Drop the socket and keep it down; the server must have seen it go before we publish.
  await page.locator('#drop').click();
  await waitState('reconnecting');
  const dropped = await server.waitForLog(
    (e) => e.event === 'connection_closed' && e.session_id === sessionId && e.connection_sequence === 1,
    'connection_closed of connection 1',
  );
  assert.equal(dropped.client_id, firstClientId);
  assert.equal(dropped.close_code, 4000, 'a page drops with 4000 (browsers cannot close abnormally)');
  const whileDown = [];
  for (let i = 0; i < 5; i++) whileDown.push((await server.publish('demo', 'r1', { down: i })).sequence_number);
  assert.equal(await page.locator('#messages li[data-seq]').count(), 4, 'nothing arrives while down');

  // 3. Reconnect: the five missed messages arrive, marked as recovered, then live ones again.
  await page.locator('#reconnect').click();
  await waitState('open');
  assert.equal(await text('connection-sequence'), '2');
  assert.equal(await text('session-id'), sessionId);
  assert.notEqual(await text('client-id'), firstClientId);
  await waitForCount(9);
  const after = (await server.publish('demo', 'r1', { n: 'after' })).sequence_number;
  await waitForCount(10);
  const all = await shownSeqs();
  assert.deepEqual(all, [...published, ...whileDown, after], 'every message exactly once, in order');
  assert.equal(new Set(all).size, all.length);
  const replayed = await page.locator('#messages li[data-seq]').evaluateAll((lis) => lis.map((li) => li.dataset.replayed));
  assert.deepEqual(replayed, [...Array(4).fill('false'), ...Array(5).fill('true'), 'false']);
  assert.equal(await text('last-sequence'), String(after));
  assert.equal(await text('message-count'), '10');
  assert.equal(await page.locator('li[data-gap]').count(), 0);

  await mkdir(ARTIFACTS, { recursive: true });
  const screenshot = join(ARTIFACTS, 'demo.png');
  await page.screenshot({ path: screenshot, fullPage: true });
  t.diagnostic(`screenshot: ${screenshot}`);

  // 4. Reload: same tab, same session, the connection sequence carries on.
  await page.reload();
  await waitState('open');
  assert.equal(await text('session-id'), sessionId);
  assert.equal(await text('connection-sequence'), '3');

  // 5. The server's JSON log follows the session across all of it.
  const closed2 = await server.waitForLog(
    (e) => e.event === 'connection_closed' && e.session_id === sessionId && e.connection_sequence === 2,
    'connection_closed of connection 2 (reload)',
  );
  assert.equal(closed2.close_code, 1001, 'a reload closes the socket as "going away"');
  assert.ok(closed2.messages_sent >= 7, `connection 2 sent connected, sub_ack and 6 messages; got ${closed2.messages_sent}`);
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
});
