// The backoff schedule, deterministic: the random source is an argument.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { backoff, parseRetryAfter, parseHttpDate, MAX_FLOOR_MS } from '../src/backoff.js';
import { Machine, JobcastError } from '../src/machine.js';

test('the ceiling doubles from 1 s to 30 s (full jitter, random near 1)', () => {
  const ceilings = [0, 1, 2, 3, 4, 5, 6, 7].map((a) => backoff(a, 0, 0.999));
  assert.deepEqual(ceilings, [999, 1998, 3996, 7992, 15984, 29970, 29970, 29970]);
});

test('full jitter scales the ceiling', () => {
  assert.equal(backoff(0, 0, 0), 0);
  assert.equal(backoff(0, 0, 0.5), 500);
  assert.equal(backoff(2, 0, 0.25), 1000);
  assert.equal(backoff(10, 0, 0.5), 15000);
});

test('a floor wins when larger, up to MAX_FLOOR', () => {
  assert.equal(backoff(0, 3000, 0.9), 3000);
  assert.equal(backoff(5, 3000, 0.5), 15000);
  assert.equal(backoff(5, 20000, 0.5), 20000);
  assert.equal(backoff(9, 90000, 0.99), 90000);
  assert.equal(backoff(0, 1e12, 0), MAX_FLOOR_MS);
});

test('huge attempts and odd random values', () => {
  for (const a of [31, 32, 64, 2 ** 32, 1e9]) assert.equal(backoff(a, 0, 0.5), 15000, `attempt ${a}`);
  assert.equal(backoff(1, 0, NaN), 0);
  assert.equal(backoff(1, 0, -3), 0);
  assert.equal(backoff(1, 0, 7), 2000);
  assert.equal(backoff(1, 0, Infinity), 2000);
});

test('custom base and max', () => {
  assert.deepEqual([0, 1, 2, 3, 4, 20].map((a) => backoff(a, 0, 0.5, 10, 100)), [5, 10, 20, 40, 50, 50]);
});

test('Retry-After: seconds and the three HTTP-date formats', () => {
  const now = 1_000_000_000_000;
  assert.equal(parseRetryAfter('0', now), 0);
  assert.equal(parseRetryAfter(' 120 ', now), 120_000);
  assert.equal(parseRetryAfter('99999999999999999999999', now), MAX_FLOOR_MS);
  for (const bad of ['', '-1', '1.5', '+3', 'soon', '3 s', '0x10', null, undefined]) {
    assert.equal(parseRetryAfter(bad, now), null, String(bad));
  }
  const at = 784_111_777_000; // 1994-11-06T08:49:37Z
  for (const v of ['Sun, 06 Nov 1994 08:49:37 GMT', 'Sunday, 06-Nov-94 08:49:37 GMT', 'Sun Nov  6 08:49:37 1994']) {
    assert.equal(parseRetryAfter(v, at - 30_000), 30_000, v);
  }
  assert.equal(parseRetryAfter('Sun, 06 Nov 1994 08:49:37 GMT', at + 5000), 0);
  assert.equal(parseHttpDate('Thu, 29 Feb 2024 00:00:00 GMT'), 1_709_164_800_000);
  for (const bad of ['Sun, 06 Nov 1994 08:49:37 UTC', 'Sun, 06 Foo 1994 08:49:37 GMT', 'Sun, 32 Nov 1994 08:49:37 GMT', 'Sun, 06 Nov 1994 24:00:00 GMT', '2024-02-29T00:00:00Z']) {
    assert.equal(parseHttpDate(bad), null, bad);
  }
});

const settings = { giveUpAfterMs: 300_000, healthyAfterMs: 5_000, baseMs: 1_000, maxMs: 30_000 };
const net = () => new JobcastError('network', 'refused', { retryable: true });

test('the schedule of a watch: grows while unhealthy, resets after a healthy connection, gives up after 5 min', () => {
  const m = new Machine('start', settings, 0);
  /** @type {any[]} */
  const out = [];
  let t = 0;
  const delays = [];
  for (let i = 0; i < 7; i++) {
    m.onNetworkError(t, net(), 0.5, out);
    assert.equal(m.status, 'reconnecting');
    delays.push(m.retryAt - t);
    t = m.retryAt;
    m.onTimer();
  }
  assert.deepEqual(delays, [500, 1000, 2000, 4000, 8000, 15000, 15000]);
  // A connection that delivers an event is healthy: back to attempt 0.
  m.onOpen(t);
  m.onSseEvent(t + 1, { id: 'ab-1', event: undefined, data: 'x' }, 0.5, out);
  m.onClosed(t + 2, null, 0.5, out);
  assert.equal(m.retryAt - (t + 2), 500);
  // A connection open 100 ms without events is not healthy; one open 5 s is.
  m.onTimer();
  m.onOpen(t + 600);
  m.onClosed(t + 700, null, 0.5, out);
  assert.equal(m.retryAt - (t + 700), 1000);
  m.onTimer();
  m.onOpen(t + 2000);
  m.onClosed(t + 7000, null, 0.5, out);
  assert.equal(m.retryAt - (t + 7000), 500);

  // Giving up: the first failure at or after 5 min without a healthy connection.
  const g = new Machine('start', settings, 0);
  let now = 0;
  let attempts = 0;
  while (g.status !== 'closed') {
    g.onNetworkError(now, net(), 0.99, out);
    attempts += 1;
    if (g.status === 'reconnecting') {
      now = g.retryAt;
      g.onTimer();
    }
    assert.ok(attempts < 100, 'never gave up');
  }
  assert.ok(now >= 300_000, `gave up early at ${now}`);
  assert.equal(g.reason, 'gave_up');
  assert.equal(out.at(-1).error.code, 'gave_up');
});

test('floors: retry: is kept across connections, Retry-After and retry_after_ms once', () => {
  const m = new Machine('start', settings, 0);
  /** @type {any[]} */
  const out = [];
  m.onRefused(0, 503, new JobcastError('http_503', 'x', { retryAfterMs: 9000 }), 0.5, out);
  assert.equal(m.retryAt, 9000);
  m.onTimer();
  m.onRefused(9000, 429, new JobcastError('http_429', 'x'), 0.5, out);
  assert.equal(m.retryAt - 9000, 1000); // attempt 1, no floor: 0.5 × 2 s
  m.onTimer();
  m.onOpen(10_000);
  m.onRetry(4000);
  m.onClosed(10_001, null, 0.5, out);
  assert.equal(m.retryAt - 10_001, 4000);
  m.onTimer();
  m.onNetworkError(20_000, net(), 0.5, out);
  assert.equal(m.retryAt - 20_000, 4000, 'retry: stays a floor');
  m.onTimer();
  m.onOpen(30_000);
  m.onSseEvent(30_001, { id: undefined, event: 'jobcast.error', data: '{"code":"shutting_down","message":"m","retryable":true,"retry_after_ms":7000}' }, 0, out);
  assert.equal(m.retryAt - 30_001, 7000, 'retry_after_ms is a floor (random 0: the delay is the floor)');
});
