// The operator's page (/admin) in a real browser: headless Chromium (Debian's /usr/bin/chromium)
// driven by playwright-core, against a real server started with --admin-token. The page must
// show, live, the head, the epoch, the retention floor, connections, the busiest keys with
// their subscriber counts, the writer's group size and commit time, and the last errors.
// Run: SEQCAST_BIN=target/debug/seqcast node --test admin.browser.test.mjs

import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';

import { chromium } from 'playwright-core';
import WebSocket from 'ws';

import { API_KEY, ROOT, startServer, within } from './server.mjs';

const CHROMIUM = process.env.SEQCAST_CHROMIUM ?? '/usr/bin/chromium';
const ARTIFACTS = process.env.SEQCAST_BROWSER_ARTIFACTS ?? join(ROOT, 'target', 'browser');
const ADMIN_TOKEN = 'admin-browser-token';

/** A WebSocket client subscribed to `channel:requestId`, resolved once `sub_ack` arrived. */
async function subscriber(server, channel, requestId) {
  const ws = new WebSocket(server.wsUrl);
  const acked = new Promise((resolve, reject) => {
    ws.on('error', reject);
    ws.on('message', (raw) => {
      const frame = JSON.parse(raw.toString());
      if (frame.type === 'connected') ws.send(JSON.stringify({ type: 'subscribe', channel, request_id: requestId }));
      if (frame.type === 'sub_ack') resolve(ws);
    });
  });
  ws.on('open', async () => ws.send(JSON.stringify({ type: 'hello', token: await server.token() })));
  return within(10_000, `sub_ack for ${channel}:${requestId}`, acked);
}

test('admin page: live head, epoch, floor, connections, busiest keys, writer, last errors', { timeout: 90_000 }, async (t) => {
  assert.ok(existsSync(CHROMIUM), `no Chromium at ${CHROMIUM}: apt-get install chromium`);
  const server = await startServer({ args: ['--admin-token', ADMIN_TOKEN] });
  const profile = await mkdtemp(join(tmpdir(), 'seqcast-chromium-'));
  const sockets = [];
  let context;
  t.after(async () => {
    for (const ws of sockets) ws.terminate();
    await context?.close().catch(() => {});
    await server.stop();
    await rm(profile, { recursive: true, force: true });
  });

  // Two subscribers on one key, one on another; a few publishes; one refused publish.
  sockets.push(await subscriber(server, 'hot', 'k1'), await subscriber(server, 'hot', 'k1'), await subscriber(server, 'cold', 'k2'));
  for (let i = 0; i < 5; i++) await server.publish('hot', 'k1', { n: i });
  const bad = await fetch(`${server.httpUrl}/api/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `ApiKey ${API_KEY}` },
    body: JSON.stringify({ channel: 'bad channel', request_id: 'r', data: 1 }),
  });
  assert.equal(bad.status, 400);

  // The JSON the page is built on: behind the token.
  assert.equal((await fetch(`${server.httpUrl}/admin/api/overview`)).status, 401);
  const overview = await (await fetch(`${server.httpUrl}/admin/api/overview`, { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } })).json();
  assert.equal(overview.head, 5);
  assert.equal(overview.busiest_keys[0].subscription_key, 'hot:k1');
  assert.equal(overview.busiest_keys[0].subscribers, 2);

  context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    timeout: 30_000,
    viewport: { width: 1000, height: 800 },
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.setDefaultTimeout(10_000);
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(e.message));
  await context.route('**/*', (route) => {
    const url = new URL(route.request().url());
    if (url.host === server.addr) return route.continue();
    pageErrors.push(`unexpected request to ${url.href}`);
    return route.abort();
  });
  const text = (id) => page.locator(`#${id}`).innerText();

  // A wrong token shows the login form; the right one shows the live view.
  await page.goto(`${server.httpUrl}/admin#token=wrong`);
  await page.locator('#login:not([hidden])').waitFor();
  await page.fill('#token', ADMIN_TOKEN);
  await page.click('#login button');
  await page.waitForFunction(() => document.getElementById('head').textContent === '5');
  assert.equal(await page.locator('#login').isVisible(), false, 'the login form is hidden once the token works');
  assert.equal(await text('epoch'), overview.epoch);
  assert.equal(await text('retention-floor'), String(overview.retention_floor));
  assert.equal(await text('connections'), '3');
  assert.equal(await text('subscriptions'), '3');
  assert.match(await text('writer-group'), /^\d/);
  assert.match(await text('writer-commit'), /^\d/);
  const firstKey = page.locator('#keys tbody tr').first();
  assert.equal(await firstKey.locator('td').nth(0).innerText(), 'hot:k1');
  assert.equal(await firstKey.locator('td').nth(1).innerText(), '2');
  assert.match(await page.locator('#errors tbody').innerText(), /bad_request/);

  // Live: a publish moves the head without a reload.
  await server.publish('hot', 'k1', { n: 5 });
  await page.waitForFunction(() => document.getElementById('head').textContent === '6');
  assert.match(await text('status'), /^live/);

  await mkdir(ARTIFACTS, { recursive: true });
  const screenshot = join(ARTIFACTS, 'admin.png');
  await page.screenshot({ path: screenshot, fullPage: true });
  t.diagnostic(`screenshot: ${screenshot}`);
  assert.deepEqual(pageErrors, []);
});
