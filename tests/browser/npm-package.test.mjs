// The npm package as a user gets it: `npm pack` in clients/js, the tarball installed into a fresh
// project (no registry needed: it has no dependencies), imported in Node, its types checked with
// `tsc --noEmit` against npm-check/check.ts; and the server's `/client/seqcast.js` and
// `/client/seqcast.d.ts` are the very files that were packed.
// Run: SEQCAST_BIN=target/debug/seqcast node --test npm-package.test.mjs

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { copyFile, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

import { ROOT, startServer } from './server.mjs';

const run = promisify(execFile);
const HERE = dirname(fileURLToPath(import.meta.url));
const PACKAGE_DIR = join(ROOT, 'clients', 'js');
const TSC = join(HERE, 'node_modules', '.bin', 'tsc');
const NPM_ENV = { ...process.env, npm_config_audit: 'false', npm_config_fund: 'false', npm_config_update_notifier: 'false' };

test('npm pack → install → import → tsc: the package works as published; the server serves the same files', { timeout: 120_000 }, async (t) => {
  const project = await mkdtemp(join(tmpdir(), 'seqcast-npm-'));
  t.after(() => rm(project, { recursive: true, force: true }));

  // 1. Pack exactly what `files` names.
  const { stdout } = await run('npm', ['pack', '--json', '--pack-destination', project], { cwd: PACKAGE_DIR, env: NPM_ENV, timeout: 60_000 });
  const [packed] = JSON.parse(stdout);
  const manifest = JSON.parse(await readFile(join(PACKAGE_DIR, 'package.json'), 'utf8'));
  assert.equal(packed.name, '@seqcast/client');
  assert.equal(packed.version, manifest.version);
  assert.deepEqual(packed.files.map((f) => f.path).sort(), ['README.md', 'package.json', 'seqcast.d.ts', 'seqcast.js']);

  // 2. Install the tarball into a fresh ESM project, offline: nothing but the tarball is needed.
  await writeFile(join(project, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
  await run('npm', ['install', '--offline', '--no-package-lock', `./${packed.filename}`], { cwd: project, env: NPM_ENV, timeout: 60_000 });
  const installed = join(project, 'node_modules', '@seqcast', 'client');
  assert.deepEqual((await readdir(installed)).sort(), ['README.md', 'package.json', 'seqcast.d.ts', 'seqcast.js']);

  // 3. Import it by name in Node and construct a client (Node 20 has no global WebSocket: one is passed).
  const script = [
    "import * as seqcast from '@seqcast/client';",
    "class NoSocket { constructor() { throw new Error('not used'); } }",
    "const client = new seqcast.SeqcastClient({ url: 'ws://127.0.0.1:9/ws', WebSocket: NoSocket, storage: seqcast.memoryStorage() });",
    'console.log(JSON.stringify({ exports: Object.keys(seqcast).sort(), state: client.state, transport: client.transport }));',
  ].join('\n');
  await writeFile(join(project, 'main.mjs'), script);
  const imported = JSON.parse((await run(process.execPath, ['main.mjs'], { cwd: project, timeout: 30_000 })).stdout);
  assert.deepEqual(imported, {
    exports: ['CHANNEL_PATTERN', 'RECONNECT_CLOSE_CODE', 'REQUEST_ID_PATTERN', 'SeqcastClient', 'SeqcastError', 'SessionCounter', 'SseParser', 'backoffDelay', 'memoryStorage'],
    state: 'idle',
    transport: 'websocket',
  });

  // 4. The declarations type-check an application (strict, NodeNext resolution through `exports`).
  for (const f of ['check.ts', 'tsconfig.json']) await copyFile(join(HERE, 'npm-check', f), join(project, f));
  try {
    await run(TSC, ['-p', join(project, 'tsconfig.json')], { cwd: project, timeout: 60_000 });
  } catch (err) {
    assert.fail(`tsc --noEmit failed on npm-check/check.ts against the packed declarations:\n${err.stdout}${err.stderr}`);
  }
  // ...and a misuse is caught (the check is not vacuous).
  await writeFile(join(project, 'check.ts'), "import { SeqcastClient } from '@seqcast/client';\nconst c = new SeqcastClient();\nconst t: number = c.transport;\nconsole.log(t);\n");
  await assert.rejects(run(TSC, ['-p', join(project, 'tsconfig.json')], { cwd: project, timeout: 60_000 }), (err) => /TS2322/.test(err.stdout));

  // 5. The server serves the files that were packed, byte for byte.
  const server = await startServer({ dev: true });
  t.after(() => server.stop());
  for (const file of ['seqcast.js', 'seqcast.d.ts']) {
    const res = await fetch(`${server.httpUrl}/client/${file}`);
    assert.equal(res.status, 200);
    assert.equal(await res.text(), await readFile(join(installed, file), 'utf8'), `/client/${file} is the packed file`);
  }
});
