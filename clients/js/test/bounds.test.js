// A broken proxy that never ends a line must not grow the client without
// bound: past 16 MiB without a line break (or in one event) the connection
// counts as broken and the watch reconnects from the last event it
// delivered. A scripted server on loopback: the first answer sends one
// event, then an endless line and holds; the second sends the rest.
import assert from 'node:assert/strict';
import http from 'node:http';
import { test } from 'node:test';
import { watch } from '../src/index.js';
import { record } from './support.js';

test('an endless line is cut off at 16 MiB and the watch reconnects', async () => {
  /** @type {(string | undefined)[]} */
  const lastIds = [];
  /** @type {http.ServerResponse[]} */
  const held = [];
  const srv = http.createServer((req, res) => {
    lastIds.push(/** @type {string | undefined} */ (req.headers['last-event-id']));
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-store' });
    if (lastIds.length === 1) {
      res.write('id: ab-1\ndata: x\n\ndata: ');
      const mib = 'z'.repeat(1 << 20);
      for (let i = 0; i < 17; i++) res.write(mib);
      held.push(res); // never ends the line, never closes
    } else {
      res.end('id: ab-2\ndata: y\n\nevent: jobcast.end\nid: ab-3\ndata: {"state":"completed"}\n\n');
    }
  });
  await new Promise((resolve) => srv.listen(0, '127.0.0.1', () => resolve(undefined)));
  const port = /** @type {import('node:net').AddressInfo} */ (srv.address()).port;
  try {
    const r = record(watch, {
      server: `http://127.0.0.1:${port}`,
      stream: 'job',
      backoffBaseMs: 10,
      backoffMaxMs: 50,
      random: () => 0.5,
      readTimeoutMs: 300_000,
    });
    const final = await Promise.race([
      r.w.done,
      new Promise((_, reject) => setTimeout(() => reject(new Error('the watch did not reconnect within 20 s')), 20_000)),
    ]);
    assert.deepEqual(
      r.events.map((e) => e.data),
      ['x', 'y'],
    );
    assert.equal(r.result.end?.state, 'completed');
    assert.equal(/** @type {any} */ (final).status, 'closed');
    assert.deepEqual(lastIds, [undefined, 'ab-1']);
  } finally {
    for (const res of held) res.destroy();
    srv.close();
  }
});
