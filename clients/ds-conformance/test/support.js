// Test support: the real jobcast binary on a free loopback port with a real
// SQLite file, killed with SIGKILL and started again on the same port and
// file. Every wait here is bounded.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.JOBCAST_BIN ?? path.resolve(here, '../../../target/debug/jobcast');

/** @returns {Promise<number>} */
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

/** @param {number} ms */
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Waits until `cond()` is truthy, checking every 20 ms, at most `ms`.
 * @param {() => unknown} cond
 * @param {number} ms
 * @param {string} what
 */
export async function until(cond, ms, what) {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(20);
  }
}

/** A jobcast server: start, kill -9, start again on the same port and file. */
export async function startServer() {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'jobcast-ds-'));
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  /** @type {import('node:child_process').ChildProcess | null} */
  let child = null;
  let log = '';
  const args = ['serve', '--listen', `127.0.0.1:${port}`, '--db', `sqlite://${path.join(dir, 'jobcast.db')}`, '--ds-long-poll', '2s', '--shutdown-grace', '1s'];
  const server = {
    url,
    ds: `${url}/ds/v1/stream`,
    get log() {
      return log;
    },
    async start() {
      const c = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'warn' } });
      child = c;
      c.stdout?.on('data', (d) => (log += d));
      c.stderr?.on('data', (d) => (log += d));
      await until(
        async () => {
          if (c.exitCode !== null) throw new Error(`jobcast exited ${c.exitCode}: ${log}`);
          try {
            return (await fetch(`${url}/healthz`)).ok;
          } catch {
            return false;
          }
        },
        10_000,
        'the server to answer /healthz',
      );
    },
    /** SIGKILL (nothing flushed, nothing said goodbye) and wait for the exit. */
    async kill() {
      const c = child;
      child = null;
      if (!c || c.exitCode !== null) return;
      const exited = new Promise((r) => c.once('exit', r));
      c.kill('SIGKILL');
      await exited;
    },
    async dispose() {
      await server.kill();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  await server.start();
  return server;
}
