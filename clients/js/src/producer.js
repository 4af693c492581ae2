// A producer: appends events to one stream, ends it, sets its labels, and
// learns of cancel requests (every answer of the server after a
// `POST /v1/streams/{id}/cancel` carries `"cancel_requested": true`), which it
// exposes as an AbortSignal. Writes are retried with the same
// Idempotency-Key, so a retry after a lost answer appends nothing twice.
// No dependency (not even eventsource-parser): usable in Node, browsers,
// workers.

import { backoff, parseRetryAfter } from './backoff.js';
import { JobcastError, retryableStatus } from './machine.js';

const STREAM_ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$/;
/** Most characters of an error body read. */
const MAX_ERROR_BODY = 64 * 1024;

/**
 * A stream's metadata (`GET /v1/streams/{id}`, and the answer of `PUT`,
 * `complete`, `fail` and `cancel`).
 * @typedef {object} StreamMetadata
 * @property {string} id
 * @property {string} epoch
 * @property {'open' | 'completed' | 'failed'} state
 * @property {string} created_at RFC 3339 UTC with milliseconds
 * @property {string} updated_at
 * @property {string | null} last_id null for an empty stream
 * @property {number} events how many events the log holds (`jobcast.end` included)
 * @property {number} watchers SSE watchers on the answering node
 * @property {Record<string, string>} labels
 * @property {boolean} cancel_requested a cancel was requested (`POST /v1/streams/{id}/cancel`)
 */

/**
 * The answer of an append (`201`).
 * @typedef {object} AppendResult
 * @property {string} first_id the id of the first event appended
 * @property {string} last_id the id of the last event appended
 * @property {number} count how many events were appended
 * @property {true} [cancel_requested] present once a cancel of the stream was requested
 * @property {boolean} replayed the server answered a retry from its idempotency record (`Idempotent-Replayed: true`): nothing was appended by it
 */

/**
 * One event of a batch.
 * @typedef {{type?: string, data: unknown}} EventInput
 */

/**
 * How failed requests are retried (network errors, timeouts, 5xx, 408, 429):
 * after `random × min(maxMs, baseMs × 2^attempt)`, at least the answer's
 * `Retry-After` (at most 1 h), at most `retries` times; then the last error is thrown.
 * @typedef {object} RetryOptions
 * @property {number} [retries] retries after the first attempt; default 6
 * @property {number} [baseMs] the first ceiling; default 250
 * @property {number} [maxMs] the largest ceiling; default 10 000
 * @property {() => number} [random] a sample of [0, 1) for the jitter (default Math.random)
 * @property {(retry: {attempt: number, delayMs: number, error: JobcastError}) => void} [onRetry] called before each wait (for logs)
 */

/**
 * @typedef {object} ProducerOptions
 * @property {string} [server] base URL, e.g. `http://127.0.0.1:7700`; empty for the page's own origin (browser)
 * @property {string} stream the stream id
 * @property {string | (() => string | null | undefined | Promise<string | null | undefined>) | null} [token] sent as `Authorization: Bearer`; a function is asked before every request
 * @property {typeof fetch} [fetch] the fetch to use (default: the global one)
 * @property {RetryOptions | false} [retry] `false`: no retries
 * @property {number} [timeoutMs] one attempt without an answer for this long fails (code `timeout`, retried); default 30 000
 */

/** The reason of a producer's `signal`: a cancel of the stream was requested. */
export class CancelRequested extends Error {
  /** @param {string} stream */
  constructor(stream) {
    super(`a cancel of stream ${stream} was requested`);
    this.name = 'CancelRequested';
    /** @type {string} */
    this.stream = stream;
  }
}

/**
 * A producer of one stream. Its `signal` aborts (reason: a `CancelRequested`
 * error) the first time an answer carries `"cancel_requested": true`; hand it
 * to the work that produces the events (the upstream `fetch`) so it stops too.
 *
 * @param {ProducerOptions} options
 * @returns {Producer}
 */
export function producer(options) {
  return new Producer(options);
}

/** See {@link producer}. */
export class Producer {
  /** @param {ProducerOptions} options */
  constructor(options) {
    /** @type {Client} */
    this.client = new Client(options);
    /** @type {string} */
    this.stream = options.stream;
    /** @type {AbortController} */
    this.controller = new AbortController();
  }

  /** Aborts, with a `CancelRequested` reason, once a cancel of the stream was requested. */
  get signal() {
    return this.controller.signal;
  }

  /** Whether an answer said that a cancel of the stream was requested. */
  get cancelRequested() {
    return this.controller.signal.aborted;
  }

  /**
   * Appends one event (`data`: any JSON value; a string is stored as is).
   * @param {unknown} data
   * @param {{type?: string, key?: string}} [opts] `key`: the Idempotency-Key (default: a random one for this call, kept across its retries)
   * @returns {Promise<AppendResult>}
   */
  append(data, opts = {}) {
    /** @type {EventInput} */
    const event = opts.type === undefined ? { data } : { type: opts.type, data };
    return this.appendBody(event, opts.key);
  }

  /**
   * Appends 1..1000 events at once (all or nothing).
   * @param {EventInput[]} events
   * @param {{key?: string}} [opts] `key`: the Idempotency-Key (default: a random one for this call)
   * @returns {Promise<AppendResult>}
   */
  appendBatch(events, opts = {}) {
    return this.appendBody(events, opts.key);
  }

  /**
   * @param {EventInput | EventInput[]} body
   * @param {string | undefined} key
   * @returns {Promise<AppendResult>}
   */
  async appendBody(body, key) {
    const r = await this.client.send('POST', '/events', body, key ?? randomKey());
    this.observe(r.body);
    return { ...r.body, replayed: r.replayed };
  }

  /**
   * Completes the stream (`jobcast.end` with state `completed` and `data` when given).
   * @param {unknown} [data]
   * @returns {Promise<StreamMetadata>}
   */
  async complete(data) {
    const r = await this.client.send('POST', '/complete', data === undefined ? undefined : { data }, randomKey());
    this.observe(r.body);
    return r.body;
  }

  /**
   * Fails the stream (`jobcast.end` with state `failed` and this error).
   * @param {string} error
   * @returns {Promise<StreamMetadata>}
   */
  async fail(error) {
    const r = await this.client.send('POST', '/fail', { error }, randomKey());
    this.observe(r.body);
    return r.body;
  }

  /**
   * Replaces the stream's labels (`{}` clears them), creating the stream if needed.
   * @param {Record<string, string>} labels
   * @returns {Promise<StreamMetadata>}
   */
  async setLabels(labels) {
    const r = await this.client.send('PUT', '', { labels }, undefined);
    this.observe(r.body);
    return r.body;
  }

  /** @param {unknown} body */
  observe(body) {
    if (!this.controller.signal.aborted && isObject(body) && body.cancel_requested === true) {
      this.controller.abort(new CancelRequested(this.stream));
    }
  }
}

/**
 * Requests a cancel of a stream: the server appends `jobcast.cancel_requested`
 * once (a repeated request appends nothing) and the producer's next answers
 * carry `"cancel_requested": true`. The stream stays open until its producer
 * ends it. Throws a `JobcastError`: `stream_ended` (409) once it ended,
 * `stream_not_found` (404). Retried like a producer's requests.
 *
 * @param {ProducerOptions} options `server`, `stream`, `token`, `fetch`, `retry`, `timeoutMs` as for a producer
 * @returns {Promise<StreamMetadata>}
 */
export async function requestCancel(options) {
  const r = await new Client(options).send('POST', '/cancel', undefined, undefined);
  return r.body;
}

/** Requests of one stream, with retries. */
class Client {
  /** @param {ProducerOptions} options */
  constructor(options) {
    if (!STREAM_ID.test(String(options.stream))) {
      throw new JobcastError('invalid_stream_id', `not a stream id: ${JSON.stringify(options.stream)}`);
    }
    this.options = options;
    /** @type {typeof fetch} */
    this.fetch = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
    const base = (options.server ?? '').replace(/\/+$/, '');
    this.url = `${base}/v1/streams/${options.stream}`;
    const retry = options.retry === false ? { retries: 0 } : (options.retry ?? {});
    this.retry = retry;
  }

  /**
   * One request, retried with the same body and Idempotency-Key while the
   * failure is retryable.
   * @param {'POST' | 'PUT'} method
   * @param {string} path after `/v1/streams/{id}`
   * @param {unknown} body JSON; undefined for none
   * @param {string | undefined} key the Idempotency-Key
   * @returns {Promise<{body: any, replayed: boolean}>}
   */
  async send(method, path, body, key) {
    const retries = Math.max(0, this.retry.retries ?? 6);
    const random = this.retry.random ?? Math.random;
    const text = body === undefined ? undefined : JSON.stringify(body);
    for (let attempt = 0; ; attempt++) {
      /** @type {JobcastError} */
      let error;
      try {
        return await this.once(method, this.url + path, text, key);
      } catch (e) {
        if (!(e instanceof JobcastError)) throw e;
        error = e;
      }
      if (!error.retryable || attempt >= retries) throw error;
      const delayMs = backoff(attempt, error.retryAfterMs ?? 0, random(), this.retry.baseMs ?? 250, this.retry.maxMs ?? 10_000);
      this.retry.onRetry?.({ attempt, delayMs, error });
      await new Promise((r) => setTimeout(r, delayMs));
    }
  }

  /**
   * One attempt. Throws a `JobcastError` (retryable for network errors,
   * timeouts, 5xx, 408, 429).
   * @param {string} method
   * @param {string} url
   * @param {string | undefined} text
   * @param {string | undefined} key
   * @returns {Promise<{body: any, replayed: boolean}>}
   */
  async once(method, url, text, key) {
    /** @type {Record<string, string>} */
    const headers = { accept: 'application/json' };
    if (text !== undefined) headers['content-type'] = 'application/json';
    if (key !== undefined) headers['idempotency-key'] = key;
    const t = this.options.token;
    let token;
    try {
      token = typeof t === 'function' ? await t() : t;
    } catch (e) {
      throw new JobcastError('token', 'the token function failed', { retryable: true, cause: e });
    }
    if (token) headers.authorization = `Bearer ${token}`;
    const ac = new AbortController();
    const timeoutMs = this.options.timeoutMs ?? 30_000;
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      ac.abort();
    }, timeoutMs);
    try {
      const res = await this.fetch(url, { method, headers, body: text, signal: ac.signal, cache: 'no-store' });
      if (!res.ok) throw await errorOf(res);
      const replayed = res.headers.get('idempotent-replayed') === 'true';
      const answer = await res.text();
      let parsed;
      try {
        parsed = JSON.parse(answer);
      } catch (e) {
        throw new JobcastError('protocol', `${method} ${url}: ${res.status} without a JSON body`, { status: res.status, cause: e });
      }
      return { body: parsed, replayed };
    } catch (e) {
      if (e instanceof JobcastError) throw e;
      // No answer, or an answer cut before its end: the request may or may
      // not have been applied; the retry's Idempotency-Key settles it.
      throw timedOut
        ? new JobcastError('timeout', `${method} ${url}: no answer in ${timeoutMs} ms`, { retryable: true, cause: e })
        : new JobcastError('network', `${method} ${url}: ${e instanceof Error ? e.message : String(e)}`, { retryable: true, cause: e });
    } finally {
      clearTimeout(timer);
    }
  }
}

/**
 * The error of a refused request: the JSON error body's code and message
 * (at most 64 KiB read), the `Retry-After` header as a floor.
 * @param {Response} res
 * @returns {Promise<JobcastError>}
 */
async function errorOf(res) {
  const status = res.status;
  const retryAfterMs = parseRetryAfter(res.headers.get('retry-after'), Date.now());
  let code = `http_${status}`;
  let message = `HTTP ${status}`;
  try {
    const body = JSON.parse((await res.text()).slice(0, MAX_ERROR_BODY));
    if (typeof body?.error?.code === 'string') code = body.error.code;
    if (typeof body?.error?.message === 'string') message = body.error.message;
  } catch {
    // Not a jobcast error body (a proxy's page): keep the status.
  }
  return new JobcastError(code, message, { status, retryable: retryableStatus(status), retryAfterMs });
}

/** A random Idempotency-Key: 32 hex digits (crypto.getRandomValues, also outside secure contexts). */
function randomKey() {
  const bytes = new Uint8Array(16);
  globalThis.crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/**
 * @param {unknown} v
 * @returns {v is Record<string, unknown>}
 */
function isObject(v) {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
