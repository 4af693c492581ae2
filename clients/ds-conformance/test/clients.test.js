// The TypeScript Durable Streams client (@durable-streams/client, pinned in
// package-lock.json) against the real jobcast binary: writes with an
// idempotent producer, reads catch-up, long-poll and SSE, resumes from an
// offset, across a kill -9 of the server; and reads a stream written with
// jobcast's own API (one log, two protocols). Exactly once, in order.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { DurableStream, IdempotentProducer, stream } from '@durable-streams/client';
import { startServer, until } from './support.js';

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.dispose();
});

const range = (/** @type {number} */ a, /** @type {number} */ b) => Array.from({ length: b - a + 1 }, (_, i) => ({ n: a + i }));

/**
 * A live reader collecting items from `offset` with `live` mode.
 * @param {string} url
 * @param {string} offset
 * @param {'sse' | 'long-poll'} live
 */
async function follow(url, offset, live) {
  /** @type {unknown[]} */
  const items = [];
  const state = { offset };
  const res = await stream({ url, offset, live });
  const unsubscribe = res.subscribeJson(async (batch) => {
    items.push(...batch.items);
    state.offset = batch.offset;
  });
  const stop = () => {
    unsubscribe();
    res.cancel();
  };
  return { items, stop, res, state };
}

test('TS client: producer, catch-up, SSE and long-poll resume from an offset, exactly once across kill -9', async () => {
  const url = `${server.ds}/ts-client-log`;
  const handle = await DurableStream.create({ url, contentType: 'application/json' });
  const errors = [];
  const producer = new IdempotentProducer(handle, 'ts-producer', { autoClaim: true, onError: (e) => errors.push(e) });
  for (const item of range(1, 20)) producer.append(JSON.stringify(item));
  await producer.flush();

  const first = await stream({ url, live: false });
  assert.deepEqual(await first.json(), range(1, 20));
  const saved = first.offset;

  const sse = await follow(url, saved, 'sse');
  const poll = await follow(url, saved, 'long-poll');
  for (const item of range(21, 30)) producer.append(JSON.stringify(item));
  await producer.flush();
  await until(() => sse.items.length >= 10 && poll.items.length >= 10, 15_000, 'both live readers to get 21..30');

  // The readers stop (as an app that goes away), keeping their offsets;
  // the server is killed with SIGKILL and started again on the same file.
  sse.stop();
  poll.stop();
  await server.kill();
  await server.start();
  const handle2 = await DurableStream.connect({ url });
  // A restarted producer starts a new epoch (the old one's seqs would be
  // taken as retries and deduplicated, as the protocol says).
  const producer2 = new IdempotentProducer(handle2, 'ts-producer', { epoch: 1, onError: (e) => errors.push(e) });
  for (const item of range(31, 40)) producer2.append(JSON.stringify(item));
  await producer2.flush();
  const sse2 = await follow(url, sse.state.offset, 'sse');
  const poll2 = await follow(url, poll.state.offset, 'long-poll');
  await until(() => sse2.items.length >= 10 && poll2.items.length >= 10, 30_000, 'both resumed readers to get 31..40');
  sse2.stop();
  poll2.stop();
  assert.deepEqual([...sse.items, ...sse2.items], range(21, 40), 'SSE: every item once, in order');
  assert.deepEqual([...poll.items, ...poll2.items], range(21, 40), 'long-poll: every item once, in order');

  const all = await stream({ url, live: false });
  assert.deepEqual(await all.json(), range(1, 40), 'the whole log after kill -9');
  const resumed = await stream({ url, offset: saved, live: false });
  assert.deepEqual(await resumed.json(), range(21, 40), 'a catch-up resumed from the saved offset');
  assert.deepEqual(errors, []);
  await producer2.close();
});

test('TS client reads a stream written with jobcast API; the jobcast end is the DS close', async () => {
  const id = 'jobcast-native-for-ds';
  const events = range(1, 5).map((d) => ({ type: 'tick', data: d }));
  const post = (/** @type {string} */ path, /** @type {unknown} */ body) =>
    fetch(`${server.url}/v1/streams/${id}${path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
  assert.equal((await post('/events', events)).status, 201);
  const live = await follow(`${server.ds}/${id}`, '-1', 'sse');
  await until(() => live.items.length >= 5, 10_000, 'the SSE reader to get the jobcast events');
  assert.equal((await post('/events', [{ data: 'plain text' }])).status, 201);
  assert.equal((await post('/complete', {})).status, 200);
  await until(() => live.items.length >= 6, 10_000, 'the text event');
  live.stop();
  assert.deepEqual(live.items, [...range(1, 5), 'plain text']);
  const res = await stream({ url: `${server.ds}/${id}`, live: false });
  assert.deepEqual(await res.json(), [...range(1, 5), 'plain text']);
  assert.equal(res.streamClosed, true, 'completed reads as closed');
});
