// 401 stops; a token (string or async function) goes out as
// `Authorization: Bearer`, against `jobcast serve --jwt-secret`.
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { watch } from '../src/index.js';
import { BIN, record, startServer } from './support.js';

const SECRET = 'test-secret-for-jobcast-js-0123456789';
/** @param {unknown} v */
const b64url = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

/**
 * An HS256 JWT with jobcast claims, signed with node:crypto.
 * @param {string} secret
 * @param {{publish?: string[], subscribe?: string[]}} [grants]
 */
export function jwt(secret, grants = { publish: ['*'], subscribe: ['*'] }) {
  const head = b64url({ alg: 'HS256', typ: 'JWT' });
  const body = b64url({ exp: Math.floor(Date.now() / 1000) + 3600, jobcast: grants });
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

describe('auth', () => {
  /** @type {Awaited<ReturnType<typeof startServer>>} */
  let server;
  before(async () => {
    server = await startServer({ args: ['--jwt-secret', SECRET] });
  });
  after(async () => {
    await server?.dispose();
  });

  test('401 stops at once: no token, a token signed with another secret', async () => {
    for (const token of [undefined, jwt('another-secret')]) {
      /** @type {string[]} */
      const calls = [];
      const r = record(watch, {
        server: server.url,
        stream: 'auth-1',
        token,
        backoffBaseMs: 50,
        fetch: (input, init) => {
          calls.push(String(input));
          return fetch(input, init);
        },
      });
      const final = await r.w.done;
      assert.equal(final.status === 'closed' && final.reason, 'error');
      assert.equal(r.result.error?.status, 401);
      assert.equal(calls.length, 1, 'no retry after 401');
    }
  });

  test('a valid token (from an async function) reads the stream', async () => {
    const token = jwt(SECRET);
    const auth = { authorization: `Bearer ${token}`, 'content-type': 'application/json' };
    const res = await fetch(`${server.url}/v1/streams/auth-2/events`, { method: 'POST', headers: auth, body: '[{"data":1},{"data":2}]' });
    assert.equal(res.status, 201);
    const c = await fetch(`${server.url}/v1/streams/auth-2/complete`, { method: 'POST', headers: auth, body: '{}' });
    assert.equal(c.status, 200);
    const r = record(watch, { server: server.url, stream: 'auth-2', token: async () => token });
    await r.w.done;
    assert.deepEqual(r.events.map((e) => e.seq), [1, 2]);
    assert.equal(r.result.end?.state, 'completed');
  });
});
