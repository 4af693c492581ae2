// The watch rules without sockets: the Rust client's fixtures (the shared
// conformance cases) through the real parser glue and the machine, fed whole,
// byte by byte, and in 7-byte chunks; the status table; dedupe and resets.
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { Machine, verdict, JobcastError } from '../src/machine.js';
import { connectionParser } from '../src/watch.js';

const fixtures = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../crates/jobcast-client/tests/fixtures');
const settings = { giveUpAfterMs: 300_000, healthyAfterMs: 5_000, baseMs: 1_000, maxMs: 30_000 };

/** @param {any} item */
function itemJson(item) {
  switch (item.kind) {
    case 'event':
      return { event: { id: item.event.id, type: item.event.type, data: item.event.data } };
    case 'reset':
      return { reset: item.reset };
    case 'end':
      return { end: item.end };
    default:
      return { error: item.error.code };
  }
}

/** Orders keys so that deepEqual ignores member order. */
const canon = (/** @type {any} */ v) => JSON.parse(JSON.stringify(v, (_k, x) => (x && typeof x === 'object' && !Array.isArray(x) ? Object.fromEntries(Object.entries(x).sort()) : x)));

test('client fixtures through parser and machine, whole and split', () => {
  const files = readdirSync(fixtures).filter((f) => f.endsWith('.sse'));
  assert.ok(files.length >= 10, `only ${files.length} fixtures`);
  for (const f of files) {
    const body = readFileSync(path.join(fixtures, f));
    const expect = JSON.parse(readFileSync(path.join(fixtures, f.replace(/\.sse$/, '.json')), 'utf8'));
    for (const split of [body.length || 1, 1, 7]) {
      const now = Date.now();
      const m = new Machine('start', settings, now);
      /** @type {any[]} */
      const out = [];
      m.onOpen(now);
      const p = connectionParser(m, out, () => 0);
      for (let i = 0; i < body.length; i += split) p.feed(body.subarray(i, i + split));
      m.onClosed(Date.now(), null, 0, out);
      const name = `${f} split ${split}`;
      assert.deepEqual(canon(out.map(itemJson)), canon(expect.items), name);
      if (expect.reconnect === null) {
        assert.equal(m.status, 'closed', name);
      } else {
        assert.equal(m.status, 'reconnecting', name);
        assert.equal(m.position().kind === 'after' ? /** @type {any} */ (m.position()).id : null, expect.reconnect.last_event_id, name);
        // random 0: the delay is exactly the floor.
        assert.equal(m.delayMs, expect.reconnect.floor_ms ?? 0, name);
      }
    }
  }
});

test('status table', () => {
  /** @type {[number, boolean, string][]} */
  const table = [
    [200, true, 'open'], [200, false, 'stop'], [201, true, 'stop'], [204, false, 'finish'], [204, true, 'finish'],
    [301, false, 'stop'], [400, false, 'stop'], [401, false, 'stop'], [403, false, 'stop'], [404, false, 'stop'],
    [408, false, 'retry'], [409, false, 'stop'], [429, false, 'retry'], [500, false, 'retry'], [502, false, 'retry'],
    [503, false, 'retry'], [504, false, 'retry'],
  ];
  for (const [status, es, want] of table) assert.equal(verdict(status, es), want, String(status));
  for (const status of [401, 404]) {
    const m = new Machine('start', settings, 0);
    /** @type {any[]} */
    const out = [];
    m.onRefused(0, status, new JobcastError(`http_${status}`, 'x', { status }), 0.5, out);
    assert.equal(m.status, 'closed');
    assert.equal(m.reason, 'error');
    assert.equal(out.length, 1);
  }
  const m = new Machine('start', settings, 0);
  /** @type {any[]} */
  const out = [];
  m.onRefused(0, 204, new JobcastError('http_204', 'x'), 0.5, out);
  assert.equal(m.reason, 'no_content');
  assert.deepEqual(out, [], '204 yields nothing more');
});

test('dedupe by seq across connections, and a reset moves the position to the server\'s', () => {
  const m = new Machine('old-7', settings, 0);
  /** @type {any[]} */
  const out = [];
  assert.deepEqual(m.position(), { kind: 'after', id: 'old-7' });
  m.onOpen(0);
  m.onSseEvent(1, { id: undefined, event: 'jobcast.reset', data: '{"reason":"epoch_mismatch","requested":"old-7","resumed_from":"new-0"}' }, 0, out);
  m.onSseEvent(2, { id: 'new-1', event: undefined, data: 'a' }, 0, out);
  m.onSseEvent(3, { id: 'new-2', event: undefined, data: 'b' }, 0, out);
  m.onClosed(4, null, 0, out);
  m.onTimer();
  m.onOpen(5);
  for (const id of ['new-1', 'new-2', 'new-3', 'new-3']) m.onSseEvent(6, { id, event: 'tick', data: id }, 0, out);
  assert.deepEqual(out.map((i) => (i.kind === 'event' ? i.event.id : i.kind)), ['reset', 'new-1', 'new-2', 'new-3']);
  // The long-poll transport dedupes the same way and stops at the end.
  m.onPage(7, { events: [{ id: 'new-3', seq: 3, type: 'tick', data: 'x', time: 't' }, { id: 'new-4', seq: 4, type: 'tick', data: 'y', time: 't' }, { id: 'new-5', seq: 5, type: 'jobcast.end', data: '{"state":"failed","error":"boom"}', time: 't' }], next: null, state: 'failed' }, out);
  assert.deepEqual(out.slice(4).map(itemJson), [{ event: { id: 'new-4', type: 'tick', data: 'y' } }, { end: { id: 'new-5', state: 'failed', error: 'boom' } }]);
  assert.equal(m.reason, 'end');
});

test('CR LF split across chunks is one line break; CR alone is one too', () => {
  for (const chunks of [['id: ab-1\r', '\n', 'data: x\r', '\n', '\r', '\n'], ['id: ab-1\rdata: x\r', '\r'], ['id: ab-1\r\ndata: x\r\n\r\n']]) {
    const m = new Machine('start', settings, Date.now());
    /** @type {any[]} */
    const out = [];
    m.onOpen(Date.now());
    const p = connectionParser(m, out, () => 0);
    for (const c of chunks) p.feed(new TextEncoder().encode(c));
    assert.deepEqual(out.map(itemJson), [{ event: { id: 'ab-1', type: 'message', data: 'x' } }], JSON.stringify(chunks));
  }
});

test('tail:N is asked for until an event is delivered; a bad N is refused', () => {
  const settings = { giveUpAfterMs: 300_000, healthyAfterMs: 5_000, baseMs: 1_000, maxMs: 30_000, canRefresh: false };
  const m = new Machine('tail:25', settings, 0);
  assert.deepEqual(m.position(), { kind: 'tail', n: 25 });
  assert.equal(m.needsLivePosition(), false);
  assert.throws(() => new Machine('tail:-1', settings, 0), (e) => e instanceof JobcastError && e.code === 'invalid_from');
  assert.throws(() => new Machine('tail:abc', settings, 0), JobcastError);
  assert.throws(() => new Machine('tail:12345678', settings, 0), JobcastError);
});
