// producer() and requestCancel() against the real jobcast binary (no mock of
// the server; fetch wrappers only cut an answer or stand in for a proxy's
// 503): appends, batches, idempotent retries, errors with their codes,
// labels, and a cancel request reaching a producer that appends in a loop.
import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { JobcastError, producer, requestCancel, watch } from '../src/index.js';
import { record, sleep, startServer, until } from './support.js';

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
before(async () => {
  server = await startServer({ args: ['--max-wait', '2s'] });
});
after(async () => {
  await server?.dispose();
});

/** Fast, deterministic retries for tests. */
const fast = { baseMs: 20, maxMs: 100, random: () => 0.5 };

/**
 * A fetch that records every request (method, URL, headers).
 * @param {typeof fetch} [inner]
 */
function recording(inner = fetch) {
  /** @type {{method: string, url: string, headers: Record<string, string>}[]} */
  const calls = [];
  /** @type {typeof fetch} */
  const f = (input, init) => {
    calls.push({ method: init?.method ?? 'GET', url: String(input), headers: { .../** @type {Record<string, string>} */ (init?.headers ?? {}) } });
    return inner(input, init);
  };
  return { calls, fetch: f };
}

/**
 * The whole log as the JSON page API returns it (bounded: ≤ 1000 events).
 * @param {string} stream
 * @returns {Promise<{id: string, type: string, data: string}[]>}
 */
async function log(stream) {
  const res = await fetch(`${server.url}/v1/streams/${stream}/events?limit=1000`);
  assert.equal(res.status, 200);
  return (await res.json()).events;
}

/**
 * @param {unknown} e
 * @param {string} code
 * @param {number} status
 */
function isJobcastError(e, code, status) {
  assert.ok(e instanceof JobcastError, `a JobcastError, got ${e}`);
  assert.equal(e.code, code);
  assert.equal(e.status, status);
  return true;
}

describe('producer against a real server', () => {
  test('append: one event per call, string data as is, other JSON compact, a type', async () => {
    const p = producer({ server: server.url, stream: 'p-append' });
    const a = await p.append('hello');
    assert.equal(a.count, 1);
    assert.equal(a.first_id, a.last_id);
    assert.equal(a.replayed, false);
    assert.equal(a.cancel_requested, undefined);
    const b = await p.append({ n: 1, s: 'é' }, { type: 'tick' });
    assert.equal(b.count, 1);
    const events = await log('p-append');
    assert.deepEqual(
      events.map((e) => [e.id, e.type, e.data]),
      [
        [a.first_id, 'message', 'hello'],
        [b.first_id, 'tick', '{"n":1,"s":"é"}'],
      ],
    );
    assert.equal(p.cancelRequested, false);
    assert.equal(p.signal.aborted, false);
  });

  test('appendBatch: all events in one request, in order', async () => {
    const f = recording();
    const p = producer({ server: server.url, stream: 'p-batch', fetch: f.fetch });
    const r = await p.appendBatch([{ type: 'a', data: 1 }, { data: 'two' }, { type: 'c', data: [3] }]);
    assert.equal(r.count, 3);
    assert.equal(f.calls.length, 1);
    const events = await log('p-batch');
    assert.deepEqual(
      events.map((e) => [e.type, e.data]),
      [
        ['a', '1'],
        ['message', 'two'],
        ['c', '[3]'],
      ],
    );
    assert.equal(events[0].id, r.first_id);
    assert.equal(events[2].id, r.last_id);
  });

  test('a cut answer is retried with the same Idempotency-Key: Idempotent-Replayed, one event in the log', async () => {
    let cut = 0;
    /** @type {typeof fetch} */
    const cutFirst = async (input, init) => {
      const res = await fetch(input, init);
      if (init?.method === 'POST' && cut === 0) {
        cut += 1;
        await res.text(); // the server answered (and appended) …
        throw new TypeError('fetch failed: connection reset'); // … but the answer is lost
      }
      return res;
    };
    const f = recording(cutFirst);
    /** @type {number[]} */
    const retries = [];
    const p = producer({ server: server.url, stream: 'p-retry', fetch: f.fetch, retry: { ...fast, onRetry: (r) => retries.push(r.attempt) } });
    const r = await p.append({ token: 'x' }, { type: 'token' });
    assert.equal(r.replayed, true, 'the retry was answered from the idempotency record');
    assert.equal(r.count, 1);
    assert.deepEqual(retries, [0]);
    assert.equal(f.calls.length, 2);
    const keys = f.calls.map((c) => c.headers['idempotency-key']);
    assert.match(keys[0], /^[0-9a-f]{32}$/);
    assert.equal(keys[1], keys[0], 'the retry sends the same key');
    const events = await log('p-retry');
    assert.equal(events.length, 1, 'appended once');
    assert.equal(events[0].id, r.first_id);

    // Another call gets another key; a key given by the caller is sent as is.
    await p.append('y');
    await p.append('z', { key: 'my-key-1' });
    assert.notEqual(f.calls[2].headers['idempotency-key'], keys[0]);
    assert.equal(f.calls[3].headers['idempotency-key'], 'my-key-1');
    const again = await p.append('z', { key: 'my-key-1' });
    assert.equal(again.replayed, true);
    assert.equal((await log('p-retry')).length, 3);
  });

  test('errors surface with the server code; other 4xx are not retried', async () => {
    const f = recording();
    const p = producer({ server: server.url, stream: 'p-errors', fetch: f.fetch, retry: fast });
    await assert.rejects(p.append('x', { type: 'jobcast.mine' }), (e) => isJobcastError(e, 'reserved_event_type', 400));
    await assert.rejects(p.append(''), (e) => isJobcastError(e, 'empty_data', 400));
    await assert.rejects(p.appendBatch([]), (e) => isJobcastError(e, 'empty_batch', 400));
    await p.append('a', { key: 'k1' });
    await assert.rejects(p.append('b', { key: 'k1' }), (e) => isJobcastError(e, 'idempotency_key_reused', 422));
    assert.equal(f.calls.length, 5, 'one request per call: no retry of a 4xx');
    const end = await p.complete({ ok: true });
    assert.equal(end.state, 'completed');
    await assert.rejects(p.append('late'), (e) => isJobcastError(e, 'stream_ended', 409));
    await assert.rejects(p.fail('late'), (e) => isJobcastError(e, 'stream_ended', 409));
    assert.equal(f.calls.length, 8);
    assert.throws(() => producer({ server: server.url, stream: 'no spaces' }), (e) => e instanceof JobcastError && e.code === 'invalid_stream_id');
  });

  test('5xx and network errors are retried (Retry-After is a floor), then thrown with the code', async () => {
    // A proxy in front of the server that answers 503 twice, then passes requests on.
    let refused = 0;
    /** @type {typeof fetch} */
    const flaky = async (input, init) => {
      if (refused < 2) {
        refused += 1;
        return new Response('{"error":{"code":"store_unavailable","message":"try later"}}', {
          status: 503,
          headers: { 'content-type': 'application/json', 'retry-after': refused === 1 ? '0' : '1' },
        });
      }
      return fetch(input, init);
    };
    /** @type {{attempt: number, delayMs: number, code: string}[]} */
    const retries = [];
    const onRetry = (/** @type {{attempt: number, delayMs: number, error: JobcastError}} */ r) => retries.push({ attempt: r.attempt, delayMs: r.delayMs, code: r.error.code });
    const p = producer({ server: server.url, stream: 'p-5xx', fetch: flaky, retry: { ...fast, random: () => 0, onRetry } });
    const r = await p.append('through');
    assert.equal(r.count, 1);
    assert.deepEqual(retries, [
      { attempt: 0, delayMs: 0, code: 'store_unavailable' },
      { attempt: 1, delayMs: 1000, code: 'store_unavailable' }, // Retry-After: 1
    ]);

    // Always 503: retries, then the server's code.
    let calls = 0;
    /** @type {typeof fetch} */
    const down = async () => {
      calls += 1;
      return new Response('{"error":{"code":"shutting_down","message":"bye"}}', { status: 503 });
    };
    const q = producer({ server: server.url, stream: 'p-5xx', fetch: down, retry: { ...fast, retries: 3 } });
    await assert.rejects(q.append('never'), (e) => isJobcastError(e, 'shutting_down', 503) && /** @type {JobcastError} */ (e).retryable);
    assert.equal(calls, 4, 'the first attempt and 3 retries');

    // Nothing listens: network errors, retried, then `network`.
    const gone = producer({ server: 'http://127.0.0.1:9', stream: 'p-5xx', retry: { ...fast, retries: 2 } });
    await assert.rejects(gone.append('x'), (e) => e instanceof JobcastError && e.code === 'network' && e.retryable);
    assert.equal((await log('p-5xx')).length, 1);
  });

  test('setLabels replaces the labels (creating the stream); complete and fail end it; a token is sent', async () => {
    const f = recording();
    const p = producer({ server: server.url, stream: 'p-labels', token: 'tok-1', fetch: f.fetch });
    const m = await p.setLabels({ team: 'web', 'app.example.com/tier': 'gold' });
    assert.deepEqual(m.labels, { team: 'web', 'app.example.com/tier': 'gold' });
    assert.equal(m.state, 'open');
    assert.equal(m.cancel_requested, false);
    const meta = await (await fetch(`${server.url}/v1/streams/p-labels`)).json();
    assert.deepEqual(meta.labels, { team: 'web', 'app.example.com/tier': 'gold' });
    assert.deepEqual((await p.setLabels({})).labels, {});
    await assert.rejects(p.setLabels({ 'bad key': 'x' }), (e) => isJobcastError(e, 'invalid_labels', 400));
    assert.ok(f.calls.every((c) => c.headers.authorization === 'Bearer tok-1'));

    const failed = producer({ server: server.url, stream: 'p-fail' });
    await failed.append(1);
    const end = await failed.fail('boom');
    assert.equal(end.state, 'failed');
    const events = await log('p-fail');
    assert.deepEqual(JSON.parse(events[events.length - 1].data), { state: 'failed', error: 'boom' });
  });

  test('requestCancel: 404 for a missing stream, 409 once ended', async () => {
    await assert.rejects(requestCancel({ server: server.url, stream: 'p-nobody' }), (e) => isJobcastError(e, 'stream_not_found', 404));
    const p = producer({ server: server.url, stream: 'p-ended' });
    await p.append(1);
    await p.complete();
    await assert.rejects(requestCancel({ server: server.url, stream: 'p-ended' }), (e) => isJobcastError(e, 'stream_ended', 409));
  });

  test('a cancel requested by another party aborts the producer signal by its first append after the answer', async () => {
    const stream = 'p-cancel';
    const p = producer({ server: server.url, stream });
    /** @type {number | null} */
    let abortedAt = null;
    p.signal.addEventListener('abort', () => (abortedAt = performance.now()), { once: true });
    const w = record(watch, { server: server.url, stream, backoffBaseMs: 50 });

    // The producer: an append every ~10 ms until its signal aborts (at most 1000).
    let started = 0; // appends started
    let answered = 0; // appends answered
    /** @type {number | null} appends started when the cancel's answer arrived */
    let startedBeforeCancelAnswer = null;
    /** @type {number | null} the append (1-based) whose answer aborted the signal */
    let abortingAppend = null;
    const loop = (async () => {
      for (let i = 1; i <= 1000 && !p.signal.aborted; i++) {
        started = i;
        const r = await p.append({ i }, { type: 'token' });
        answered = i;
        if (p.signal.aborted && abortingAppend === null) {
          abortingAppend = i;
          assert.equal(r.cancel_requested, true);
        }
        await sleep(10);
      }
    })();

    // Another party: once some tokens went out, requests the cancel (twice: idempotent).
    await until(() => answered >= 5, 10_000, 'five appends');
    const meta = await requestCancel({ server: server.url, stream });
    const cancelAnsweredAt = performance.now();
    startedBeforeCancelAnswer = started;
    assert.equal(meta.cancel_requested, true);
    assert.equal(meta.state, 'open', 'the stream stays open until its producer ends it');
    assert.equal((await requestCancel({ server: server.url, stream })).cancel_requested, true);

    await loop;
    assert.equal(p.signal.aborted, true);
    assert.equal(p.cancelRequested, true);
    assert.equal(p.signal.reason?.name, 'CancelRequested');
    assert.ok(abortingAppend !== null, 'an append answer carried cancel_requested');
    // Ordering, by count: the append that aborted started no later than the
    // first append started after the cancel answered.
    assert.ok(
      abortingAppend <= startedBeforeCancelAnswer + 1,
      `aborted by append ${abortingAppend}; ${startedBeforeCancelAnswer} had started before the cancel answered`,
    );
    assert.ok(abortedAt !== null);
    console.log(
      `cancel → abort: ${(abortedAt - cancelAnsweredAt).toFixed(1)} ms after the cancel's answer ` +
        `(aborted by append ${abortingAppend}; ${startedBeforeCancelAnswer} started before the answer; ` +
        'negative: an append in flight during the cancel was answered first)',
    );

    // The producer ends the stream; it says so in its end data.
    const end = await p.complete({ cancelled: p.cancelRequested });
    assert.equal(end.state, 'completed');
    assert.equal(end.cancel_requested, true);

    // The watcher: every token once, then the end (it skips jobcast.* control events).
    await w.w.done;
    assert.equal(w.result.error, null);
    assert.equal(w.result.end?.state, 'completed');
    assert.deepEqual(w.result.end?.data, { cancelled: true });
    assert.deepEqual(
      w.events.map((e) => JSON.parse(e.data).i),
      Array.from({ length: answered }, (_, i) => i + 1),
    );
    // The log: one jobcast.cancel_requested among the tokens, then the end.
    const events = await log(stream);
    const types = events.map((e) => e.type);
    assert.equal(types.filter((t) => t === 'jobcast.cancel_requested').length, 1);
    assert.equal(types[types.length - 1], 'jobcast.end');
    assert.equal(types.filter((t) => t === 'token').length, answered);
    // Every token after the cancel event was answered with cancel_requested: the
    // aborting append is at most one past the cancel event's position.
    const cancelIndex = types.indexOf('jobcast.cancel_requested');
    const tokensBeforeCancel = types.slice(0, cancelIndex).filter((t) => t === 'token').length;
    assert.ok(abortingAppend <= tokensBeforeCancel + 1, `aborting append ${abortingAppend}, ${tokensBeforeCancel} tokens before the cancel event`);
  });
});
