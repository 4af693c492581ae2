// Test support: the real jobcast binary on a free loopback port with a real
// SQLite file, restartable on the same port and file; small API helpers.
// Every wait here is bounded.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
/** The release binary: JOBCAST_BIN (scripts/test sets it) or the workspace's target/. */
export const BIN = process.env.JOBCAST_BIN ?? path.resolve(here, '../../../target/release/jobcast');

/** A free loopback port (bound, read, released). */
export function freePort() {
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

/**
 * An HTTPS request on a connection of its own (no keep-alive), trusting
 * only `ca`; resolves with the status and body text.
 * @param {string} url
 * @param {string} ca PEM certificate to trust
 * @param {{method?: string, body?: string, headers?: Record<string, string>}} [opts]
 * @returns {Promise<{status: number, body: string}>}
 */
export function httpsRequest(url, ca, opts = {}) {
  return new Promise((resolve, reject) => {
    const req = https.request(url, { method: opts.method ?? 'GET', ca, agent: false, headers: opts.headers, timeout: 10_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`${url}: no answer in 10 s`)));
    req.on('error', reject);
    req.end(opts.body);
  });
}

/**
 * A jobcast server process; with `ca` (the PEM of its `--tls-cert`) it
 * serves HTTPS and is checked over HTTPS trusting only that certificate.
 * @param {{args?: string[], env?: Record<string, string>, ca?: string}} [opts]
 */
export async function startServer(opts = {}) {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'jobcast-js-'));
  const port = await freePort();
  const url = `${opts.ca ? 'https' : 'http'}://127.0.0.1:${port}`;
  /** @type {import('node:child_process').ChildProcess | null} */
  let child = null;
  let log = '';
  const args = [
    'serve',
    '--listen',
    `127.0.0.1:${port}`,
    '--db',
    `sqlite://${path.join(dir, 'jobcast.db')}`,
    '--retry',
    '200ms',
    '--heartbeat',
    '1s',
    '--shutdown-grace',
    '2s',
    ...(opts.args ?? []),
  ];
  const server = {
    url,
    port,
    dir,
    get log() {
      return log;
    },
    /** Starts the process and waits until /healthz answers (≤ 10 s). */
    async start() {
      const c = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'warn', ...(opts.env ?? {}) } });
      child = c;
      c.stdout?.on('data', (d) => (log += d));
      c.stderr?.on('data', (d) => (log += d));
      await until(
        async () => {
          if (c.exitCode !== null) throw new Error(`jobcast exited ${c.exitCode}: ${log}`);
          try {
            if (opts.ca) return (await httpsRequest(`${url}/healthz`, opts.ca)).status === 200;
            return (await fetch(`${url}/healthz`)).ok;
          } catch {
            return false;
          }
        },
        10_000,
        'the server to answer /healthz',
      );
    },
    /** SIGTERM and wait for the exit (≤ 10 s, then SIGKILL). */
    async stop() {
      const c = child;
      child = null;
      if (!c || c.exitCode !== null) return;
      const exited = new Promise((r) => c.once('exit', r));
      c.kill('SIGTERM');
      const t = setTimeout(() => c.kill('SIGKILL'), 10_000);
      await exited;
      clearTimeout(t);
    },
    /** Stop, then start again on the same port and database file. */
    async restart() {
      await server.stop();
      await server.start();
    },
    /** Stops and removes the directory. */
    async dispose() {
      await server.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  await server.start();
  return server;
}

/**
 * POSTs JSON; returns [status, body].
 * @param {string} url
 * @param {unknown} [body]
 * @param {Record<string, string>} [headers]
 */
export async function post(url, body, headers = {}) {
  const res = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return [res.status, text ? JSON.parse(text) : null];
}

/**
 * Appends events with data `prefix-N` for N in [from, to].
 * @param {string} server
 * @param {string} stream
 * @param {number} from
 * @param {number} to
 */
export async function publishRange(server, stream, from, to) {
  const batch = [];
  for (let i = from; i <= to; i++) batch.push({ type: 'tick', data: { n: i } });
  const [status, body] = await post(`${server}/v1/streams/${stream}/events`, batch);
  if (status !== 201) throw new Error(`publish: ${status} ${JSON.stringify(body)}`);
  return body;
}

/**
 * @param {string} server
 * @param {string} stream
 */
export async function complete(server, stream) {
  const [status, body] = await post(`${server}/v1/streams/${stream}/complete`, { data: { ok: true } });
  if (status !== 200) throw new Error(`complete: ${status} ${JSON.stringify(body)}`);
}

/**
 * Runs a watch and records everything it reports.
 * @param {typeof import('../src/index.js').watch} watch
 * @param {import('../src/watch.js').WatchOptions} options
 */
export function record(watch, options) {
  /** @type {import('../src/machine.js').JobEvent[]} */
  const events = [];
  /** @type {import('../src/watch.js').ConnectionState[]} */
  const states = [];
  /** @type {import('../src/machine.js').ResetInfo[]} */
  const resets = [];
  /** @type {{end: import('../src/machine.js').EndInfo | null, error: import('../src/machine.js').JobcastError | null}} */
  const result = { end: null, error: null };
  const w = watch(options, {
    onEvent: (e) => events.push(e),
    onReset: (r) => resets.push(r),
    onEnd: (e) => (result.end = e),
    onError: (e) => (result.error = e),
    onState: (s) => states.push(s),
  });
  return { w, events, states, resets, result };
}
