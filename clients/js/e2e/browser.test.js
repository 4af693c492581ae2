// Browser end-to-end tests: Playwright (playwright-core) driving Debian's
// Chromium headless against the real jobcast binary.
// (1) The browser's native EventSource resumes after a server restart and
//     stops reconnecting after the end (the server answers its reconnect 204).
// (2) The dashboard watching a stream being produced, with the server
//     restarted in the middle, shows every event exactly once, then the end.
// Screenshots go to clients/js/artifacts/ (gitignored); their paths are printed.
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { complete, publishRange, sleep, startServer, until } from '../test/support.js';

const ARTIFACTS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../artifacts');
mkdirSync(ARTIFACTS, { recursive: true });
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
 * Saves a screenshot and prints its path.
 * @param {import('playwright-core').Page} page
 * @param {string} name
 * @param {boolean} [fullPage] the whole page, not only the viewport
 */
async function shot(page, name, fullPage = true) {
  const file = path.join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path: file, fullPage });
  console.log(`screenshot: ${file}`);
}

/**
 * Collects what would show a broken page: uncaught errors and CSP refusals.
 * @param {import('playwright-core').Page} page
 */
function watchForProblems(page) {
  /** @type {string[]} */
  const problems = [];
  page.on('pageerror', (e) => problems.push(`pageerror: ${e.message}`));
  page.on('console', (m) => {
    if (/Content Security Policy|Refused to/i.test(m.text())) problems.push(`console: ${m.text()}`);
  });
  return problems;
}

test('native EventSource: resumes after a server restart, stops after the end (204)', async () => {
  const stream = 'es-native';
  await publishRange(server.url, stream, 1, 3);
  const page = await browser.newPage();
  try {
    // A same-origin page without the dashboard's CSP, to run a bare EventSource.
    await page.goto(`${server.url}/healthz`);
    await page.evaluate((s) => {
      const w = /** @type {any} */ (window);
      w.got = [];
      w.opens = 0;
      w.errors = 0;
      const es = new EventSource(`/v1/streams/${s}/events`);
      w.es = es;
      es.addEventListener('tick', (e) => w.got.push(/** @type {MessageEvent} */ (e).lastEventId));
      es.addEventListener('jobcast.end', (e) => w.got.push(`end ${/** @type {MessageEvent} */ (e).lastEventId}`));
      es.onopen = () => (w.opens += 1);
      es.onerror = () => (w.errors += 1);
    }, stream);
    const got = () => page.evaluate(() => /** @type {string[]} */ (/** @type {any} */ (window).got));
    await until(async () => (await got()).length === 3, 10_000, 'the first 3 events in the browser');
    await server.restart();
    await publishRange(server.url, stream, 4, 6);
    await until(async () => (await got()).length === 6, 20_000, 'events 4..6 after the restart');
    await complete(server.url, stream);
    // After the end the server closes; EventSource reconnects with the end's
    // id, gets 204 and closes for good (readyState 2).
    await until(async () => (await page.evaluate(() => /** @type {any} */ (window).es.readyState)) === 2, 20_000, 'EventSource CLOSED after 204');
    const ids = await got();
    const epoch = ids[0].split('-')[0];
    assert.deepEqual(ids, [1, 2, 3, 4, 5, 6].map((n) => `${epoch}-${n}`).concat([`end ${epoch}-7`]));
    const opens = await page.evaluate(() => /** @type {any} */ (window).opens);
    assert.equal(opens, 2, 'one open before the restart, one after');
    // The server counted the 204 resume (the browser stopped because of it).
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    const line = metrics.split('\n').find((l) => l.startsWith('jobcast_resumes_total{outcome="no_content"}'));
    assert.ok(line && Number(line.trim().split(' ').pop()) >= 1, `a 204 resume in /metrics: ${line}`);
  } finally {
    await page.close();
  }
});

test('dashboard: every event exactly once across a server restart, then the end; list and phone layouts', async () => {
  const stream = 'dash-build-42';
  const total = 30;
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const problems = watchForProblems(page);
  try {
    await page.goto(`${server.url}/#/streams/${stream}`);
    await page.waitForSelector('#conn-state');
    // A producer: events arrive while the page watches; a restart at the middle.
    for (let i = 1; i <= total; i++) {
      await publishRange(server.url, stream, i, i);
      if (i === total / 2) {
        await until(async () => (await page.locator('#events li').count()) === i, 10_000, `${i} cards before the restart`);
        await server.restart();
      } else if (i === total / 2 + 5) {
        await until(async () => (await page.locator('#events li').count()) === i, 10_000, `${i} cards after the restart`);
        await shot(page, 'dashboard-stream-live', false);
      } else {
        await sleep(20);
      }
    }
    await complete(server.url, stream);
    await page.waitForSelector('#end', { timeout: 20_000 });
    const seqs = await page.locator('#events li').evaluateAll((els) => els.map((e) => Number(e.getAttribute('data-seq'))));
    assert.deepEqual(seqs, Array.from({ length: total }, (_, i) => i + 1), 'every event once, in order');
    assert.equal(await page.locator('#event-count').textContent(), String(total));
    assert.ok(Number(await page.locator('#reconnects').textContent()) >= 1, 'the page reconnected');
    assert.equal(await page.locator('#end').getAttribute('data-state'), 'completed');
    assert.match(String(await page.locator('#conn-state').textContent()), /closed: end/);
    // The data is shown pretty-printed, as text.
    assert.equal(await page.locator('#events li').first().locator('pre').textContent(), '{\n  "n": 1\n}');
    await shot(page, 'dashboard-stream-desktop');
    await page.setViewportSize({ width: 390, height: 844 });
    await shot(page, 'dashboard-stream-phone', false);

    // The list: the stream with its state and event count (31: the end counts).
    await page.goto(`${server.url}/#/`);
    const row = page.locator(`tr[data-stream="${stream}"]`);
    await row.waitFor({ timeout: 10_000 });
    await until(async () => /completed/.test(String(await row.textContent())), 10_000, 'the list to show completed');
    assert.match(String(await row.locator('td').nth(2).textContent()), new RegExp(`^${total + 1}$`));
    await shot(page, 'dashboard-list-phone');
    await page.setViewportSize({ width: 1280, height: 900 });
    await shot(page, 'dashboard-list-desktop');
    // Escaping: a stream id and data with markup stay text.
    const evil = 'x-img';
    await fetch(`${server.url}/v1/streams/${evil}/events`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ type: 'html', data: '<img src=x onerror=alert(1)>' }) });
    await page.goto(`${server.url}/#/streams/${evil}`);
    await page.waitForSelector('#events li');
    assert.equal(await page.locator('#events li pre').textContent(), '<img src=x onerror=alert(1)>');
    assert.equal(await page.locator('#events img').count(), 0);
    assert.deepEqual(problems, []);
  } finally {
    await page.close();
  }
});
