// watch() against the real jobcast binary (no mock): restart and resume,
// the backoff schedule, the statuses that stop (404, 204), the end, a
// non-retryable error, a live start.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { watch } from '../src/index.js';
import { complete, freePort, publishRange, record, startServer, until } from './support.js';

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
before(async () => {
  server = await startServer({ args: ['--max-wait', '2s'] });
});
after(async () => {
  await server?.dispose();
});

/** Fast retries for tests: 100 ms base, fixed jitter sample. */
const fast = { backoffBaseMs: 100, backoffMaxMs: 400, random: () => 0.5 };

/**
 * A fetch that counts its calls.
 * @returns {{fetch: typeof fetch, calls: string[]}}
 */
function counting() {
  /** @type {string[]} */
  const calls = [];
  return {
    calls,
    fetch: (input, init) => {
      calls.push(String(input));
      return fetch(input, init);
    },
  };
}

const seqs = (/** @type {{seq: number}[]} */ events) => events.map((e) => e.seq);
const range = (/** @type {number} */ a, /** @type {number} */ b) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

describe('watch against a real server', () => {
  test('from tail:N: the last N events, then live, then the end (SSE and long-poll)', async () => {
    for (const transport of /** @type {const} */ (['sse', 'poll'])) {
      const stream = `tail-${transport}`;
      await publishRange(server.url, stream, 1, 6);
      const r = record(watch, { server: server.url, stream, from: 'tail:2', transport, ...fast });
      await until(() => r.events.length === 2, 10_000, 'the last 2 events');
      await publishRange(server.url, stream, 7, 7);
      await until(() => r.events.length === 3, 10_000, 'the live event');
      await complete(server.url, stream);
      await r.w.done;
      assert.deepEqual(seqs(r.events), [5, 6, 7], transport);
      assert.equal(r.result.end?.state, 'completed', transport);
      assert.equal(r.resets.length, 0, `${transport}: a tail is not a reset`);
    }
  });

  test('resumes after the server restarts: every event once, in order, then the end', async () => {
    const stream = 'restart-1';
    await publishRange(server.url, stream, 1, 5);
    const r = record(watch, { server: server.url, stream, ...fast });
    await until(() => r.events.length === 5, 10_000, 'the first 5 events');
    await server.restart();
    await publishRange(server.url, stream, 6, 10);
    await until(() => r.events.length >= 10, 15_000, 'events 6..10 after the restart');
    await complete(server.url, stream);
    const final = await r.w.done;
    assert.deepEqual(seqs(r.events), range(1, 10));
    assert.deepEqual(r.events.map((e) => JSON.parse(e.data).n), range(1, 10));
    assert.equal(r.result.end?.state, 'completed');
    assert.equal(final.status, 'closed');
    assert.equal(final.status === 'closed' && final.reason, 'end');
    assert.ok(r.w.reconnects >= 1, 'it reconnected');
    const statuses = r.states.map((s) => s.status);
    assert.ok(statuses.includes('reconnecting'), statuses.join(','));
    assert.equal(r.result.error, null);
  });

  test('backoff schedule while the server is down, then it connects and resumes', async () => {
    const stream = 'backoff-1';
    await publishRange(server.url, stream, 1, 2);
    await server.stop();
    const r = record(watch, { server: server.url, stream, ...fast, from: 'x-0' });
    // Five failed attempts against a closed port: 0.5 × min(400, 100 × 2^n).
    await until(() => r.states.filter((s) => s.status === 'reconnecting').length >= 5, 15_000, 'five reconnect waits');
    await server.start();
    await until(() => r.events.length === 2 || r.result.error, 15_000, 'the events after the restart');
    r.w.close();
    const waits = r.states.filter((s) => s.status === 'reconnecting').slice(0, 5);
    assert.deepEqual(waits.map((s) => s.status === 'reconnecting' && s.delayMs), [50, 100, 200, 200, 200]);
    assert.deepEqual(waits.map((s) => s.status === 'reconnecting' && s.attempt), [1, 2, 3, 4, 5]);
    assert.ok(waits.every((s) => s.status === 'reconnecting' && s.error.code === 'network'));
    // x-0 is another epoch: the server says so, then replays the log.
    assert.equal(r.resets[0]?.reason, 'epoch_mismatch');
    assert.deepEqual(seqs(r.events), [1, 2]);
  });

  test('404 stops at once (unknown route), with the server\'s error code', async () => {
    const c = counting();
    const r = record(watch, { server: `${server.url}/nope`, stream: 'any', ...fast, fetch: c.fetch });
    const final = await r.w.done;
    assert.equal(final.status === 'closed' && final.reason, 'error');
    assert.equal(r.result.error?.status, 404);
    assert.equal(r.result.error?.code, 'not_found');
    assert.equal(c.calls.length, 1, 'no retry');
  });

  test('a stream that never appears: stream_not_found stops (SSE), and 404 stops (long-poll)', async () => {
    const sse = record(watch, { server: server.url, stream: 'never-1', ...fast });
    await sse.w.done;
    assert.equal(sse.result.error?.code, 'stream_not_found');
    const c = counting();
    const poll = record(watch, { server: server.url, stream: 'never-2', ...fast, transport: 'poll', pollWaitSeconds: 1, fetch: c.fetch });
    await poll.w.done;
    assert.equal(poll.result.error?.status, 404);
    assert.equal(poll.result.error?.code, 'stream_not_found');
    assert.equal(c.calls.length, 1, 'no retry');
  });

  test('204 stops: resuming from the end event delivers nothing and makes one request', async () => {
    const stream = 'nocontent-1';
    await publishRange(server.url, stream, 1, 3);
    await complete(server.url, stream);
    const first = record(watch, { server: server.url, stream, ...fast });
    await first.w.done;
    const endId = first.result.end?.id;
    assert.ok(endId, 'the end has an id');
    assert.equal(first.w.lastEventId, endId);
    const c = counting();
    const again = record(watch, { server: server.url, stream, ...fast, from: endId, fetch: c.fetch });
    const final = await again.w.done;
    assert.equal(final.status === 'closed' && final.reason, 'no_content');
    assert.deepEqual([again.events.length, again.result.end, again.result.error], [0, null, null]);
    assert.equal(c.calls.length, 1);
  });

  test('the end stops: no request after jobcast.end', async () => {
    const stream = 'end-1';
    await publishRange(server.url, stream, 1, 4);
    const c = counting();
    const r = record(watch, { server: server.url, stream, ...fast, fetch: c.fetch });
    await until(() => r.events.length === 4, 10_000, '4 events');
    await complete(server.url, stream);
    const final = await r.w.done;
    assert.equal(final.status === 'closed' && final.reason, 'end');
    assert.deepEqual(seqs(r.events), [1, 2, 3, 4]);
    assert.deepEqual(r.result.end?.data, { ok: true });
    assert.equal(c.calls.length, 1, 'one connection, no reconnect');
  });

  test('a deleted stream stops with stream_deleted (not retryable)', async () => {
    const stream = 'deleted-1';
    await publishRange(server.url, stream, 1, 1);
    const r = record(watch, { server: server.url, stream, ...fast });
    await until(() => r.events.length === 1, 10_000, 'the event');
    const res = await fetch(`${server.url}/v1/streams/${stream}`, { method: 'DELETE' });
    assert.equal(res.status, 204);
    const final = await r.w.done;
    assert.equal(final.status === 'closed' && final.reason, 'error');
    assert.equal(r.result.error?.code, 'stream_deleted');
  });

  test('a live start skips the log and keeps every later event across a reconnect', async () => {
    const stream = 'live-1';
    await publishRange(server.url, stream, 1, 3);
    const r = record(watch, { server: server.url, stream, ...fast, from: 'live' });
    await until(() => r.states.some((s) => s.status === 'open'), 10_000, 'open');
    await publishRange(server.url, stream, 4, 5);
    await until(() => r.events.length === 2, 10_000, 'events 4, 5');
    await server.restart();
    await publishRange(server.url, stream, 6, 6);
    await complete(server.url, stream);
    await r.w.done;
    assert.deepEqual(seqs(r.events), [4, 5, 6]);
    assert.equal(r.result.end?.state, 'completed');
  });

  test('giving up: a server that never comes back ends the watch with gave_up', async () => {
    const port = await freePort();
    const r = record(watch, { server: `http://127.0.0.1:${port}`, stream: 's', ...fast, giveUpAfterMs: 300 });
    const final = await r.w.done;
    assert.equal(final.status === 'closed' && final.reason, 'gave_up');
    assert.equal(r.result.error?.code, 'gave_up');
    assert.equal(r.result.error?.last?.code, 'network');
  });

  test('bad input is refused before any request', async () => {
    const r = record(watch, { server: server.url, stream: 'bad/id', ...fast });
    await r.w.done;
    assert.equal(r.result.error?.code, 'invalid_stream_id');
    const r2 = record(watch, { server: server.url, stream: 'ok', from: 'nope' });
    await r2.w.done;
    assert.equal(r2.result.error?.code, 'invalid_event_id');
  });
});
