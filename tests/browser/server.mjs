// A real seqcast server process for the tests: started on 127.0.0.1 port 0 with JSON logs, its
// log lines collected so tests can wait for (never sleep on) what the server reports.

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const JWT_SECRET = 'browser-test-secret';
export const API_KEY = 'browser-test-key';

/** Servers still running; killed if this process ends early, so none is ever left behind. */
const running = new Set();
const killRunning = () => {
  for (const child of running) child.kill('SIGKILL');
};
process.on('exit', killRunning);
for (const [signal, number] of [['SIGINT', 2], ['SIGTERM', 15], ['SIGHUP', 1]]) {
  process.once(signal, () => {
    killRunning();
    process.exit(128 + number);
  });
}

/** The server binary: $SEQCAST_BIN, else <root>/target/debug/seqcast. */
export function serverBinary() {
  const bin = process.env.SEQCAST_BIN ?? join(ROOT, 'target', 'debug', 'seqcast');
  if (!existsSync(bin)) {
    throw new Error(`no server binary at ${bin}: run \`cargo build -p seqcast-server --bin seqcast\` or set SEQCAST_BIN`);
  }
  return bin;
}

function base64url(value) {
  return Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');
}

/** An HS256 JWT signed with `secret`, as `seqcast token` would mint it. */
export function mintToken(secret, claims) {
  const body = `${base64url({ alg: 'HS256', typ: 'JWT' })}.${base64url({ exp: Math.floor(Date.now() / 1000) + 3600, ...claims })}`;
  return `${body}.${createHmac('sha256', secret).update(body).digest('base64url')}`;
}

/** Reject after `ms` with `what` in the message: every wait in these tests is bounded. */
export function within(ms, what, promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/**
 * Start `seqcast serve`. `dev: true` omits the JWT secret (development mode: `/dev/token`);
 * otherwise the server uses JWT_SECRET and API_KEY. `listen` defaults to a free port on
 * 127.0.0.1; `args` are appended.
 */
export async function startServer({ dev = false, listen = '127.0.0.1:0', args = [], startTimeoutMs = 20_000 } = {}) {
  const dataDir = await mkdtemp(join(tmpdir(), 'seqcast-browser-'));
  const argv = ['serve', '--listen', listen, '--log-format', 'json', '--data-dir', dataDir];
  if (!dev) argv.push('--jwt-secret', JWT_SECRET, '--api-key', API_KEY);
  argv.push(...args);
  const child = spawn(serverBinary(), argv, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'info' } });
  const logs = [];
  const waiters = new Set();
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    stderr += chunk;
  });
  createInterface({ input: child.stdout }).on('line', (line) => {
    let entry;
    try {
      entry = JSON.parse(line);
    } catch {
      return; // not a log object
    }
    logs.push(entry);
    for (const w of [...waiters]) {
      if (w.predicate(entry)) {
        waiters.delete(w);
        w.resolve(entry);
      }
    }
  });
  const exited = new Promise((res) => child.once('exit', (code, signal) => res({ code, signal })));
  running.add(child);
  exited.then(() => running.delete(child));

  /** Resolve with the first log entry (already seen or coming) that satisfies `predicate`. */
  function waitForLog(predicate, what = 'a log line', timeoutMs = 10_000) {
    const seen = logs.find(predicate);
    if (seen) return Promise.resolve(seen);
    let waiter;
    const found = new Promise((res) => {
      waiter = { predicate, resolve: res };
      waiters.add(waiter);
    });
    return within(timeoutMs, what, found).finally(() => waiters.delete(waiter));
  }

  let listening;
  try {
    listening = await within(
      startTimeoutMs,
      'the server to log `listening`',
      Promise.race([
        waitForLog((e) => e.event === 'listening', 'listening', startTimeoutMs + 1_000),
        exited.then(({ code }) => {
          throw new Error(`server exited with ${code} before listening:\n${stderr}`);
        }),
      ]),
    );
  } catch (err) {
    child.kill('SIGKILL');
    await rm(dataDir, { recursive: true, force: true });
    throw err;
  }
  const addr = listening.addr;
  const httpUrl = `http://${addr}`;

  const server = {
    addr,
    httpUrl,
    wsUrl: `ws://${addr}/ws`,
    logs,
    waitForLog,
    get stderr() {
      return stderr;
    },
    /** A client token: the dev token in development mode, else one signed with JWT_SECRET. */
    async token(claims = {}) {
      if (!dev) return mintToken(JWT_SECRET, { sub: 'test', ...claims });
      const res = await fetch(`${httpUrl}/dev/token`);
      if (!res.ok) throw new Error(`GET /dev/token: HTTP ${res.status}`);
      return (await res.json()).token;
    },
    /** Publish one message; resolves with the server's answer. */
    async publish(channel, requestId, data, messageId) {
      const auth = dev ? `Bearer ${await server.token()}` : `ApiKey ${API_KEY}`;
      const body = { channel, request_id: requestId, data };
      if (messageId) body.message_id = messageId;
      const res = await fetch(`${httpUrl}/api/publish`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: auth },
        body: JSON.stringify(body),
      });
      const answer = await res.json();
      if (!res.ok) throw new Error(`publish: HTTP ${res.status} ${JSON.stringify(answer)}`);
      return answer;
    },
    /** Publish `messages` ({channel, request_id, data}) in one transaction; resolves with the results. */
    async publishBatch(messages) {
      const res = await fetch(`${httpUrl}/api/publish/batch`, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: `ApiKey ${API_KEY}` },
        body: JSON.stringify({ messages }),
      });
      const answer = await res.json();
      if (!res.ok) throw new Error(`publish batch: HTTP ${res.status} ${JSON.stringify(answer)}`);
      return answer.results;
    },
    /** Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its data directory. */
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGTERM');
        const killer = setTimeout(() => child.kill('SIGKILL'), 5_000);
        await exited;
        clearTimeout(killer);
      }
      await rm(dataDir, { recursive: true, force: true });
    },
  };
  return server;
}
