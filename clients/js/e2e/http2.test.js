// Chromium (Debian's, driven by playwright-core) against jobcast serving
// TLS with a certificate made here (openssl), over HTTP/2: one page with
// 50 native EventSources on 50 streams, all live, every event exactly
// once and in order, then the end — and all of it on ONE TCP connection,
// counted by the server (jobcast_connections_accepted_total). The page
// also publishes (fetch POST, same connection); it prints the delivery
// latency (publish → the EventSource's message) p50/p99/max it measured.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { chromium } from 'playwright-core';
import { httpsRequest, startServer } from '../test/support.js';

const CHROMIUM = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';
const STREAMS = 50;
const ROUNDS = 20;

/** @type {string} */
let dir;
/** @type {string} */
let ca;
/** @type {string} base64 SHA-256 of the certificate's public key, for Chromium's SPKI allow-list */
let spki;
/** @type {import('playwright-core').Browser} */
let browser;
/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;

before(async () => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'jobcast-h2-'));
  const cert = path.join(dir, 'cert.pem');
  const key = path.join(dir, 'key.pem');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=127.0.0.1',
    '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
  ], { stdio: 'ignore' });
  ca = readFileSync(cert, 'utf8');
  const pub = execFileSync('openssl', ['x509', '-in', cert, '-pubkey', '-noout']);
  const der = execFileSync('openssl', ['pkey', '-pubin', '-outform', 'der'], { input: pub });
  spki = execFileSync('openssl', ['dgst', '-sha256', '-binary'], { input: der }).toString('base64');
  server = await startServer({ args: ['--tls-cert', cert, '--tls-key', key], ca });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      '--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking',
      // Trust exactly this test's key, nothing else.
      `--ignore-certificate-errors-spki-list=${spki}`,
    ],
  });
});
after(async () => {
  await browser?.close();
  await server?.dispose();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/**
 * The server's accepted-connection counters, read over a new HTTP/1.1 TLS
 * connection (which counts itself as `http1_tls`).
 * @returns {Promise<Record<string, number>>}
 */
async function accepted() {
  const { status, body } = await httpsRequest(`${server.url}/metrics`, ca);
  assert.equal(status, 200);
  /** @type {Record<string, number>} */
  const out = {};
  for (const m of body.matchAll(/^jobcast_connections_accepted_total\{proto="([a-z0-9_]+)"\} (\d+)/gm)) out[m[1]] = Number(m[2]);
  return out;
}

test('50 native EventSources over HTTP/2 on one TLS connection: every event once, in order', async () => {
  const beforeCount = await accepted();
  const page = await browser.newPage();
  try {
    await page.goto(`${server.url}/healthz`);
    const protocol = await page.evaluate(() => /** @type {PerformanceNavigationTiming} */ (performance.getEntriesByType('navigation')[0]).nextHopProtocol);
    assert.equal(protocol, 'h2', 'the page came over HTTP/2');
    const result = await page.evaluate(
      async ({ streams, rounds }) => {
        /** @type {Record<string, {ids: string[], data: string[], lat: number[], end: string | null, opened: boolean, errors: number}>} */
        const got = {};
        /** @type {EventSource[]} */
        const sources = [];
        for (let i = 0; i < streams; i++) {
          const s = `grid-${i}`;
          const rec = { ids: /** @type {string[]} */ ([]), data: /** @type {string[]} */ ([]), lat: /** @type {number[]} */ ([]), end: /** @type {string | null} */ (null), opened: false, errors: 0 };
          got[s] = rec;
          const es = new EventSource(`/v1/streams/${s}/events?from=live`);
          sources.push(es);
          es.onopen = () => (rec.opened = true);
          es.onerror = () => (rec.errors += 1);
          es.onmessage = (e) => {
            const now = Date.now();
            rec.ids.push(e.lastEventId);
            rec.data.push(e.data);
            rec.lat.push(now - JSON.parse(e.data).t);
          };
          es.addEventListener('jobcast.end', (e) => {
            rec.end = /** @type {MessageEvent} */ (e).lastEventId;
            es.close();
          });
        }
        const sleep = (/** @type {number} */ ms) => new Promise((r) => setTimeout(r, ms));
        const deadline = Date.now() + 30_000;
        while (Object.values(got).some((r) => !r.opened)) {
          if (Date.now() > deadline) throw new Error('not every EventSource opened');
          await sleep(20);
        }
        const post = async (/** @type {string} */ url, /** @type {unknown} */ body) => {
          const res = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
          if (!res.ok) throw new Error(`${url}: ${res.status} ${await res.text()}`);
        };
        for (let r = 0; r < rounds; r++) {
          await Promise.all(Object.keys(got).map((s) => post(`/v1/streams/${s}/events`, { data: JSON.stringify({ t: Date.now(), s, r }) })));
        }
        await Promise.all(Object.keys(got).map((s) => post(`/v1/streams/${s}/complete`, {})));
        while (Object.values(got).some((r) => r.end === null)) {
          if (Date.now() > deadline + 30_000) throw new Error('not every EventSource got jobcast.end');
          await sleep(20);
        }
        for (const es of sources) es.close();
        return got;
      },
      { streams: STREAMS, rounds: ROUNDS },
    );
    const latencies = [];
    for (let i = 0; i < STREAMS; i++) {
      const s = `grid-${i}`;
      const rec = result[s];
      const seqs = rec.ids.map((id) => Number(id.split('-')[1]));
      assert.deepEqual(seqs, Array.from({ length: ROUNDS }, (_, k) => k + 1), `${s}: every seq once, in order`);
      assert.deepEqual(rec.data.map((d) => JSON.parse(d).r), Array.from({ length: ROUNDS }, (_, k) => k), `${s}: its own data`);
      assert.ok(rec.data.every((d) => JSON.parse(d).s === s), `${s}: no event of another stream`);
      assert.equal(Number(rec.end?.split('-')[1]), ROUNDS + 1, `${s}: the end after the last event`);
      assert.equal(rec.errors, 0, `${s}: no error, no reconnect`);
      latencies.push(...rec.lat);
    }
    const afterCount = await accepted();
    // The server's side of it: mean append (receive → commit) and publish → write times.
    const { body: metrics } = await httpsRequest(`${server.url}/metrics`, ca);
    const num = (/** @type {string} */ name) => Number(new RegExp(`^jobcast_${name} ([0-9.e+-]+)`, 'm').exec(metrics)?.[1] ?? NaN);
    const mean = (/** @type {string} */ h) => ((1000 * num(`${h}_seconds_sum`)) / num(`${h}_seconds_count`)).toFixed(1);
    console.log(`server: append mean ${mean('append_duration')} ms, publish -> write mean ${mean('publish_to_write')} ms`);
    const delta = (/** @type {string} */ p) => (afterCount[p] ?? 0) - (beforeCount[p] ?? 0);
    const total = Object.keys(afterCount).reduce((n, p) => n + delta(p), 0);
    console.log(`connections accepted during the page: h2 ${delta('h2')}, all protocols ${total} (one of them the metrics read after it)`);
    assert.equal(delta('h2'), 1, 'the page used one HTTP/2 connection');
    assert.equal(total, 2, 'and no other connection: the page\'s one and the metrics read');
    latencies.sort((a, b) => a - b);
    const at = (/** @type {number} */ q) => latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))];
    console.log(`delivery latency over ${latencies.length} events on ${STREAMS} streams (publish -> EventSource message): p50 ${at(0.5)} ms, p99 ${at(0.99)} ms, max ${latencies[latencies.length - 1]} ms`);
  } finally {
    await page.close();
  }
});
