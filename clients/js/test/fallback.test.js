// The long-poll fallback: a proxy in front of the real server breaks SSE
// (it buffers event streams whole, or answers 502 to them) and passes JSON
// through. The watch must notice, switch to `GET …/events?after=ID&wait=S`
// pages, deliver every event once and in order, and stop at the end.
import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, describe, test } from 'node:test';
import { watch } from '../src/index.js';
import { complete, publishRange, record, startServer, until } from './support.js';

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
before(async () => {
  server = await startServer({ args: ['--max-wait', '2s'] });
});
after(async () => {
  await server?.dispose();
});

/**
 * A proxy to `upstream` that breaks event streams.
 * @param {string} upstream
 * @param {'buffer' | '502'} mode
 */
async function breakingProxy(upstream, mode) {
  const target = new URL(upstream);
  const seen = { sse: 0, json: 0 };
  const proxy = http.createServer((req, res) => {
    const sse = String(req.headers.accept ?? '').includes('text/event-stream');
    if (sse) seen.sse += 1;
    else seen.json += 1;
    if (sse && mode === '502') {
      res.writeHead(502, { 'content-type': 'text/html' }).end('<h1>502 Bad Gateway</h1>');
      return;
    }
    const up = http.request(
      { host: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers },
      (upRes) => {
        if (!sse) {
          res.writeHead(upRes.statusCode ?? 502, upRes.headers);
          upRes.pipe(res);
          return;
        }
        // A buffering proxy: nothing (not even the headers) until the upstream ends.
        /** @type {Buffer[]} */
        const chunks = [];
        upRes.on('data', (c) => chunks.push(c));
        upRes.on('end', () => {
          res.writeHead(upRes.statusCode ?? 502, upRes.headers);
          res.end(Buffer.concat(chunks));
        });
      },
    );
    up.on('error', () => res.destroy());
    res.on('close', () => up.destroy());
    req.pipe(up);
  });
  await new Promise((r) => proxy.listen(0, '127.0.0.1', () => r(undefined)));
  const addr = proxy.address();
  const port = typeof addr === 'object' && addr ? addr.port : 0;
  return {
    url: `http://127.0.0.1:${port}`,
    seen,
    close: () => {
      proxy.closeAllConnections();
      return new Promise((r) => proxy.close(() => r(undefined)));
    },
  };
}

for (const mode of /** @type {const} */ (['buffer', '502'])) {
  describe(`SSE blocked by a proxy (${mode})`, () => {
    test('falls back to long-poll: every event once, in order, then the end', async () => {
      const stream = `fallback-${mode}`;
      const proxy = await breakingProxy(server.url, mode);
      try {
        await publishRange(server.url, stream, 1, 3);
        const r = record(watch, {
          server: proxy.url,
          stream,
          backoffBaseMs: 50,
          backoffMaxMs: 200,
          random: () => 0.5,
          firstByteTimeoutMs: 300,
          fallbackAfter: 2,
          pollWaitSeconds: 1,
        });
        await until(() => r.events.length === 3, 15_000, 'events 1..3 through long-poll');
        await publishRange(server.url, stream, 4, 6);
        await until(() => r.events.length === 6, 15_000, 'events 4..6 through long-poll');
        await publishRange(server.url, stream, 7, 7);
        await complete(server.url, stream);
        const final = await r.w.done;
        assert.deepEqual(r.events.map((e) => e.seq), [1, 2, 3, 4, 5, 6, 7]);
        assert.ok(r.events.every((e) => typeof e.time === 'string'), 'pages carry the time');
        assert.equal(r.result.end?.state, 'completed');
        assert.equal(final.status === 'closed' && final.reason, 'end');
        assert.equal(r.w.transport, 'poll');
        assert.ok(r.states.some((s) => s.status === 'open' && s.transport === 'poll'), 'open over poll');
        assert.equal(proxy.seen.sse, 2, 'two SSE attempts before the fallback');
        assert.ok(proxy.seen.json >= 2, 'long-poll requests went through');
        assert.equal(r.result.error, null);
      } finally {
        await proxy.close();
      }
    });
  });
}

test('a server restart during long-poll: resumes from the last id, no duplicates', async () => {
  const stream = 'poll-restart';
  await publishRange(server.url, stream, 1, 2);
  const r = record(watch, { server: server.url, stream, transport: 'poll', pollWaitSeconds: 1, backoffBaseMs: 50, backoffMaxMs: 200, random: () => 0.5 });
  await until(() => r.events.length === 2, 10_000, 'events 1, 2');
  await server.restart();
  await publishRange(server.url, stream, 3, 4);
  await complete(server.url, stream);
  await r.w.done;
  assert.deepEqual(r.events.map((e) => e.seq), [1, 2, 3, 4]);
  assert.equal(r.result.end?.state, 'completed');
});
