#!/usr/bin/env node
// Runs the official Durable Streams conformance suite against the real jobcast
// binary: a fresh server on a free loopback port with a fresh SQLite file
// (`--store sqlite`) or a fresh PostgreSQL database on 127.0.0.1:5432
// (`--store postgres`, dropped afterwards). Prints the counts as
// "conformance (STORE): N passed, N failed" and exits non-zero when any case
// failed (or with --min N, when fewer than N passed).
//
//   node run.mjs --store sqlite [--bin PATH] [--min N] [-- vitest args…]
//
// The binary is --bin, else JOBCAST_BIN, else the workspace's target/debug/jobcast.
// The PostgreSQL server is JOBCAST_TEST_PG (default postgres://postgres@127.0.0.1:5432).
// Every wait here is bounded.

import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const argv = process.argv.slice(2);
const dashdash = argv.indexOf('--');
const own = dashdash >= 0 ? argv.slice(0, dashdash) : argv;
const vitestExtra = dashdash >= 0 ? argv.slice(dashdash + 1) : [];
/** @param {string} name */
const opt = (name) => {
  const i = own.indexOf(name);
  return i >= 0 ? own[i + 1] : undefined;
};
const store = opt('--store') ?? 'sqlite';
const bin = opt('--bin') ?? process.env.JOBCAST_BIN ?? path.resolve(here, '../../target/debug/jobcast');
const min = opt('--min') ? Number(opt('--min')) : undefined;
if (store !== 'sqlite' && store !== 'postgres') {
  console.error(`--store must be sqlite or postgres, not ${store}`);
  process.exit(2);
}

/** @returns {Promise<number>} a free loopback port */
function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const addr = s.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      s.close(() => resolve(port));
    });
  });
}

const pgBase = process.env.JOBCAST_TEST_PG ?? 'postgres://postgres@127.0.0.1:5432';
/** @param {string} sql */
function psql(sql) {
  execFileSync('psql', ['-X', '-q', '-w', '-v', 'ON_ERROR_STOP=1', '-d', `${pgBase}/postgres`, '-c', sql], { stdio: ['ignore', 'ignore', 'inherit'] });
}

const dir = mkdtempSync(path.join(os.tmpdir(), 'jobcast-ds-conf-'));
let dbName = null;
let db;
if (store === 'sqlite') {
  db = `sqlite://${path.join(dir, 'jobcast.db')}`;
} else {
  dbName = `jobcast_ds_${process.pid}_${Date.now() % 1e9}`;
  psql(`CREATE DATABASE ${dbName}`);
  db = `${pgBase}/${dbName}`;
}

const port = await freePort();
const origin = `http://127.0.0.1:${port}`;
let log = '';
const child = spawn(bin, ['serve', '--listen', `127.0.0.1:${port}`, '--db', db, '--ds-long-poll', '3s'], {
  stdio: ['ignore', 'pipe', 'pipe'],
  env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'warn' },
});
child.stdout.on('data', (b) => (log += b));
child.stderr.on('data', (b) => (log += b));
let exited = false;
child.on('exit', () => (exited = true));

function cleanup() {
  if (!exited) child.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
  if (dbName) {
    try {
      psql(`DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`);
    } catch {
      console.error(`could not drop database ${dbName}`);
    }
  }
}

const deadline = Date.now() + 20_000;
for (;;) {
  if (exited) {
    console.error(`jobcast exited before it was ready:\n${log}`);
    cleanup();
    process.exit(2);
  }
  try {
    if ((await fetch(`${origin}/healthz`)).ok) break;
  } catch {
    // not listening yet
  }
  if (Date.now() > deadline) {
    console.error(`jobcast did not answer /healthz within 20 s:\n${log}`);
    cleanup();
    process.exit(2);
  }
  await new Promise((r) => setTimeout(r, 50));
}

const report = path.join(dir, 'report.json');
const vitest = path.join(here, 'node_modules', '.bin', 'vitest');
const code = await new Promise((resolve) => {
  const v = spawn(
    vitest,
    // The suite's 5 s default per case is too tight for a loaded 2-core machine (its
    // 100 KiB byte-by-byte check alone can take that long); cases with their own
    // timeouts keep them.
    ['run', 'suite.test.js', '--testTimeout=30000', '--no-coverage', '--reporter=dot', '--reporter=json', `--outputFile.json=${report}`, ...vitestExtra],
    { cwd: here, stdio: 'inherit', env: { ...process.env, CONFORMANCE_TEST_URL: `${origin}/ds` } },
  );
  v.on('close', (c) => resolve(c ?? 1));
});

let passed = 0;
let failed = 0;
let skipped = 0;
try {
  const r = JSON.parse(readFileSync(report, 'utf8'));
  passed = r.numPassedTests;
  failed = r.numFailedTests;
  skipped = r.numPendingTests + (r.numTodoTests ?? 0);
  if (process.env.DS_CONFORMANCE_LIST_FAILED) {
    for (const file of r.testResults) {
      for (const t of file.assertionResults) {
        if (t.status === 'failed') console.log(`FAILED: ${t.fullName}`);
      }
    }
  }
} catch (e) {
  console.error(`no vitest report (${e}); vitest exited ${code}`);
  failed = failed || 1;
}
if (exited) console.error(`jobcast exited during the suite:\n${log}`);
cleanup();
console.log(`conformance (${store}): ${passed} passed, ${failed} failed, ${skipped} skipped`);
const ok = min === undefined ? failed === 0 && code === 0 : passed >= min;
process.exit(ok ? 0 : 1);
