// One log, two protocols, in a real browser: a Durable Streams JSON stream
// (written with the DS protocol under /ds) watched by Chromium's native
// EventSource through jobcast's own API, across a server restart, then the
// DS close seen as jobcast.end (the reconnect gets 204 and the browser stops).
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { chromium } from 'playwright-core';
import { startServer, until } from '../test/support.js';

const CHROMIUM = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';

/** @type {import('playwright-core').Browser} */
let browser;
/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;

before(async () => {
  server = await startServer();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking'],
  });
});
after(async () => {
  await browser?.close();
  await server?.dispose();
});

/**
 * A DS request; returns the response.
 * @param {string} method
 * @param {string} stream
 * @param {string | undefined} body
 * @param {Record<string, string>} [headers]
 */
async function ds(method, stream, body, headers = {}) {
  const res = await fetch(`${server.url}/ds/v1/stream/${stream}`, {
    method,
    headers: { 'content-type': 'application/json', ...headers },
    body,
  });
  await res.arrayBuffer();
  return res;
}

test('a DS JSON stream through native EventSource: every message once across a restart, the DS close ends it (204)', async () => {
  const stream = 'ds-es-native';
  assert.equal((await ds('PUT', stream, JSON.stringify([{ n: 1 }, { n: 2 }]))).status, 201);
  assert.equal((await ds('POST', stream, JSON.stringify({ n: 3 }))).status, 204);
  const page = await browser.newPage();
  try {
    await page.goto(`${server.url}/healthz`);
    await page.evaluate((s) => {
      const w = /** @type {any} */ (window);
      w.got = [];
      w.opens = 0;
      const es = new EventSource(`/v1/streams/${s}/events`);
      w.es = es;
      es.onmessage = (e) => w.got.push(`${e.lastEventId} ${e.data}`);
      es.addEventListener('jobcast.end', (e) => w.got.push(`end ${/** @type {MessageEvent} */ (e).lastEventId}`));
      es.onopen = () => (w.opens += 1);
    }, stream);
    const got = () => page.evaluate(() => /** @type {string[]} */ (/** @type {any} */ (window).got));
    await until(async () => (await got()).length === 3, 10_000, 'the first 3 messages in the browser');
    await server.restart();
    assert.equal((await ds('POST', stream, JSON.stringify([{ n: 4 }, { n: 5 }]))).status, 204);
    await until(async () => (await got()).length === 5, 20_000, 'messages 4 and 5 after the restart');
    const close = await ds('POST', stream, undefined, { 'stream-closed': 'true' });
    assert.equal(close.status, 204);
    await until(async () => (await page.evaluate(() => /** @type {any} */ (window).es.readyState)) === 2, 20_000, 'EventSource CLOSED after 204');
    const lines = await got();
    const epoch = lines[0].split('-')[0];
    assert.deepEqual(
      lines,
      [1, 2, 3, 4, 5].map((n) => `${epoch}-${n} {"n":${n}}`).concat([`end ${epoch}-6`]),
    );
    assert.equal(await page.evaluate(() => /** @type {any} */ (window).opens), 2, 'one open before the restart, one after');
  } finally {
    await page.close();
  }
});
