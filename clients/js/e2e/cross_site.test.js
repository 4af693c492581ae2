// Cross-site writes from a real browser: a page on another origin
// (http://127.0.0.2:PORT, a tiny server of this test) does what any web page
// can do to a jobcast on loopback without authentication — a `no-cors`
// fetch POST with a Blob body (no Content-Type, no preflight) to append and
// to fail a stream. The server must refuse both (403 `cross_site_write`,
// checked through the API afterwards: the stream does not exist). The same
// fetch succeeds where it should: from the server's own origin, and from a
// page whose origin is listed with --cors-origin.
import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, test } from 'node:test';
import { chromium } from 'playwright-core';
import { startServer } from '../test/support.js';

const CHROMIUM = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';

/** @type {import('playwright-core').Browser} */
let browser;
/** @type {http.Server} */
let evil;
/** @type {string} */
let evilOrigin;

/** The attacker's page: nothing but an origin of its own. */
const PAGE = '<!doctype html><meta charset="utf-8"><title>another site</title>';

before(async () => {
  evil = http.createServer((_req, res) => {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    res.end(PAGE);
  });
  await new Promise((resolve) => evil.listen(0, '127.0.0.2', () => resolve(undefined)));
  const addr = /** @type {import('node:net').AddressInfo} */ (evil.address());
  evilOrigin = `http://127.0.0.2:${addr.port}`;
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking'],
  });
});
after(async () => {
  await browser?.close();
  evil?.close();
});

/**
 * Runs the attack from `pageUrl` against `server`, then reads the stream's
 * metadata through the API (no Origin): its status and state.
 * @param {string} pageUrl
 * @param {{url: string}} server
 * @param {string} stream
 */
async function attackFrom(pageUrl, server, stream) {
  const page = await browser.newPage();
  try {
    await page.goto(pageUrl);
    // What any page's script can do: no-cors POSTs with a Blob body (no
    // Content-Type, no preflight); the answers are opaque to the page.
    await page.evaluate(
      async ([base, s]) => {
        /** @param {string} p @param {string} body */
        const post = (p, body) =>
          fetch(base + p, { method: 'POST', mode: 'no-cors', body: new Blob([body]) }).then(
            (r) => r.type,
            (e) => `error: ${e.message}`,
          );
        return [
          await post(`/v1/streams/${s}/events`, '{"data":"written by another site"}'),
          await post(`/v1/streams/${s}/fail`, ''),
        ];
      },
      [server.url, stream],
    );
  } finally {
    await page.close();
  }
  const res = await fetch(`${server.url}/v1/streams/${stream}`);
  return { status: res.status, body: await res.json() };
}

test('a page on another site cannot write to a jobcast without auth', async () => {
  const server = await startServer();
  try {
    const got = await attackFrom(`${evilOrigin}/`, server, 'xsite-1');
    assert.equal(got.status, 404, `the stream was written: ${JSON.stringify(got.body)}`);
  } finally {
    await server.dispose();
  }
});

test('the same fetch writes from the server’s own origin', async () => {
  const server = await startServer();
  try {
    const got = await attackFrom(`${server.url}/healthz`, server, 'xsite-2');
    assert.equal(got.status, 200, JSON.stringify(got.body));
    assert.equal(got.body.state, 'failed');
    assert.equal(got.body.events, 2);
  } finally {
    await server.dispose();
  }
});

test('the same fetch writes from an origin listed with --cors-origin', async () => {
  const server = await startServer({ args: ['--cors-origin', evilOrigin] });
  try {
    const got = await attackFrom(`${evilOrigin}/`, server, 'xsite-3');
    assert.equal(got.status, 200, JSON.stringify(got.body));
    assert.equal(got.body.state, 'failed');
  } finally {
    await server.dispose();
  }
});
