// useJobStream in a real React renderer (react-test-renderer) against the
// real server: events arrive in order, then the end; unmounting closes the watch.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import React from 'react';
import TestRenderer from 'react-test-renderer';
import { useJobStream } from '../src/react.js';
import { complete, publishRange, startServer, until } from './support.js';

// React's act() environment flag for non-DOM test renderers.
/** @type {any} */ (globalThis).IS_REACT_ACT_ENVIRONMENT = false;

/** @type {Awaited<ReturnType<typeof startServer>>} */
let server;
before(async () => {
  server = await startServer();
});
after(async () => {
  await server?.dispose();
});

test('useJobStream returns events, state and end', async () => {
  const stream = 'react-1';
  await publishRange(server.url, stream, 1, 3);
  /** @type {import('../src/store.js').JobStreamSnapshot[]} */
  const seen = [];
  function Probe() {
    const snap = useJobStream(stream, { server: server.url });
    seen.push(snap);
    return null;
  }
  const r = TestRenderer.create(React.createElement(Probe));
  await until(() => seen.at(-1)?.events.length === 3, 10_000, 'three events in the hook');
  assert.equal(seen.at(-1)?.state.status, 'open');
  await publishRange(server.url, stream, 4, 4);
  await complete(server.url, stream);
  await until(() => seen.at(-1)?.end !== null, 10_000, 'the end in the hook');
  const last = /** @type {import('../src/store.js').JobStreamSnapshot} */ (seen.at(-1));
  assert.deepEqual(last.events.map((e) => e.seq), [1, 2, 3, 4]);
  assert.equal(last.end?.state, 'completed');
  assert.equal(last.error, null);
  await until(() => seen.at(-1)?.state.status === 'closed', 10_000, 'closed');
  r.unmount();
});

test('unmounting closes the watch (no more renders, no more requests)', async () => {
  const stream = 'react-2';
  let renders = 0;
  function Probe() {
    useJobStream(stream, { server: server.url });
    renders += 1;
    return null;
  }
  const r = TestRenderer.create(React.createElement(Probe));
  await publishRange(server.url, stream, 1, 1);
  await until(() => renders >= 2, 10_000, 'a render with the event');
  r.unmount();
  const before = renders;
  await publishRange(server.url, stream, 2, 5);
  const meta = await (await fetch(`${server.url}/v1/streams/${stream}`)).json();
  await until(async () => (await (await fetch(`${server.url}/v1/streams/${stream}`)).json()).watchers === 0, 10_000, 'the server to see no watcher');
  assert.equal(renders, before);
  assert.equal(meta.events, 5);
});
