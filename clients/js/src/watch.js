// The I/O shell of a watch: requests, reads, sleeps. Every rule (what a
// status means, dedupe, backoff, giving up) lives in the pure machine
// (machine.js); this file performs its decisions, picks the transport (SSE,
// or JSON long-poll when streaming keeps failing) and tells the application.

import { createParser } from 'eventsource-parser';
import { parseRetryAfter } from './backoff.js';
import { JobcastError, Machine, parseEventId } from './machine.js';

const STREAM_ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$/;
/** Most bytes of an error body read. */
const MAX_ERROR_BODY = 64 * 1024;

/**
 * The connection state of a watch, as the application sees it.
 * - `connecting`: a request is on its way (`attempt` failed attempts before it);
 * - `open`: receiving (`transport` says how);
 * - `reconnecting`: waiting `delayMs` before attempt number `attempt`, because of `error`;
 * - `closed`: finished for `reason` (`end`, `no_content` = 204, `error`, `gave_up`, `closed` by the application).
 * @typedef {{status: 'connecting', attempt: number, transport: Transport}
 *   | {status: 'open', transport: Transport}
 *   | {status: 'reconnecting', attempt: number, delayMs: number, error: import('./machine.js').JobcastError}
 *   | {status: 'closed', reason: import('./machine.js').CloseReason, error?: import('./machine.js').JobcastError}} ConnectionState
 */

/** @typedef {'sse' | 'poll'} Transport */

/**
 * @typedef {object} WatchOptions
 * @property {string} [server] base URL, e.g. `http://127.0.0.1:7700`; empty for the page's own origin (browser)
 * @property {string} stream the stream id
 * @property {import('./machine.js').From} [from] `start` (default), `live`, `tail:N` (the last N events, then live), or the id of the last event already had
 * @property {string | (() => string | null | undefined | Promise<string | null | undefined>) | null} [token] sent as `Authorization: Bearer`; a function is asked again on every connection (and after `token_expired`)
 * @property {Record<string, string>} [headers] extra request headers
 * @property {typeof fetch} [fetch] the fetch to use (default: the global one)
 * @property {'auto' | 'sse' | 'poll'} [transport] `auto` (default): SSE, falling back to long-poll when streaming keeps failing
 * @property {number} [fallbackAfter] SSE failures that look like a buffering proxy (no first byte in time, a 5xx, a 200 without a byte) before switching to long-poll; default 2
 * @property {number} [firstByteTimeoutMs] the server sends `retry:` at once: no byte within this is a failure; default 10 000
 * @property {number} [readTimeoutMs] no byte for this long (heartbeats come every 15 s) is a dead connection; default 45 000
 * @property {number} [pollWaitSeconds] `wait=` of long-poll requests; default 25
 * @property {number} [giveUpAfterMs] give up after this long without a healthy connection; default 300 000 (5 min)
 * @property {number} [healthyAfterMs] a connection open this long is healthy (resets the backoff); default 5 000
 * @property {number} [backoffBaseMs] default 1 000
 * @property {number} [backoffMaxMs] default 30 000
 * @property {() => number} [random] a sample of [0, 1) for the jitter (default Math.random)
 * @property {AbortSignal} [signal] aborting it closes the watch
 */

/**
 * @typedef {object} WatchHandlers
 * @property {(event: import('./machine.js').JobEvent) => void} [onEvent] each event once, in order
 * @property {(reset: import('./machine.js').ResetInfo) => void} [onReset] the server could not resume where asked (events may be lost, or the stream is a new one)
 * @property {(end: import('./machine.js').EndInfo) => void} [onEnd] the stream ended; nothing follows
 * @property {(error: import('./machine.js').JobcastError) => void} [onError] the watch stopped with this error; nothing follows
 * @property {(state: ConnectionState) => void} [onState] every change of the connection state
 */

/**
 * Watches a stream: every event exactly once, in order, across reconnects,
 * then the end. Follows the jobcast client rules (SPEC "Clients").
 *
 * @param {WatchOptions} options
 * @param {WatchHandlers} [handlers]
 * @returns {Watch}
 */
export function watch(options, handlers = {}) {
  return new Watch(options, handlers);
}

/** A running watch; see {@link watch}. */
export class Watch {
  /**
   * @param {WatchOptions} options
   * @param {WatchHandlers} handlers
   */
  constructor(options, handlers) {
    this.options = options;
    this.handlers = handlers;
    /** @type {typeof fetch} */
    this.fetch = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
    this.random = options.random ?? Math.random;
    const base = (options.server ?? '').replace(/\/+$/, '');
    this.eventsUrl = `${base}/v1/streams/${options.stream}/events`;
    this.metaUrl = `${base}/v1/streams/${options.stream}`;
    /** @type {Transport} */
    this.transport = options.transport === 'poll' ? 'poll' : 'sse';
    /** SSE failures in a row that look like a proxy breaking the stream. */
    this.sseTrouble = 0;
    /** How many times the watch reconnected. */
    this.reconnects = 0;
    /** @type {ConnectionState} */
    this.state = { status: 'connecting', attempt: 0, transport: this.transport };
    /** @type {AbortController | null} the request in flight */
    this.inflight = null;
    /** @type {(() => void) | null} ends the current backoff sleep early */
    this.wake = null;
    /** @type {import('./machine.js').Item[]} */
    this.out = [];
    /** @type {JobcastError | undefined} the error the watch stopped with */
    this.lastError = undefined;
    /** @type {Machine} */
    this.machine;
    try {
      this.machine = new Machine(
        options.from ?? 'start',
        {
          giveUpAfterMs: options.giveUpAfterMs ?? 300_000,
          healthyAfterMs: options.healthyAfterMs ?? 5_000,
          baseMs: options.backoffBaseMs ?? 1_000,
          maxMs: options.backoffMaxMs ?? 30_000,
          canRefresh: typeof options.token === 'function',
        },
        Date.now(),
      );
    } catch (e) {
      this.machine = new Machine('start', { giveUpAfterMs: 0, healthyAfterMs: 0, baseMs: 0, maxMs: 0 }, 0);
      this.machine.stop(/** @type {JobcastError} */ (e), this.out);
    }
    if (!STREAM_ID.test(String(options.stream))) {
      this.machine.stop(new JobcastError('invalid_stream_id', `not a stream id: ${JSON.stringify(options.stream)}`), this.out);
    }
    if (options.signal) {
      if (options.signal.aborted) this.machine.close('closed');
      else options.signal.addEventListener('abort', () => this.close(), { once: true });
    }
    /** Resolves with the final state when the watch is closed. */
    this.done = this.run();
  }

  /** The id of the last event delivered (to resume a later watch with `from`), or null. */
  get lastEventId() {
    const p = this.machine.position();
    return p.kind === 'after' ? p.id : null;
  }

  /** Stops the watch; `onState` reports `closed` with reason `closed`. */
  close() {
    if (this.machine.current() === 'closed') return;
    this.machine.close('closed');
    this.inflight?.abort();
    this.wake?.();
  }

  /** @returns {Promise<ConnectionState>} */
  async run() {
    // Let the caller keep the returned object before the first callback.
    await Promise.resolve();
    if (this.machine.current() !== 'closed') this.call(this.handlers.onState, this.state);
    for (;;) {
      this.flush();
      const m = this.machine;
      if (m.current() === 'closed') break;
      if (m.current() === 'reconnecting') {
        this.setState({ status: 'reconnecting', attempt: m.attempt, delayMs: m.delayMs, error: /** @type {JobcastError} */ (m.lastError) });
        await this.sleep(m.retryAt - Date.now());
        m.onTimer();
        if (m.current() === 'connecting') this.reconnects += 1;
        continue;
      }
      if (this.options.transport !== 'sse' && this.options.transport !== 'poll' && this.sseTrouble >= (this.options.fallbackAfter ?? 2)) {
        this.transport = 'poll';
      }
      if (m.current() === 'connecting') this.setState({ status: 'connecting', attempt: m.attempt, transport: this.transport });
      try {
        if (m.needsLivePosition()) await this.resolveLive();
        else if (this.transport === 'sse') await this.streamOnce();
        else await this.pollOnce();
      } catch (e) {
        // A bug or an unexpected value: stop with it rather than loop.
        if (m.current() !== 'closed') m.stop(new JobcastError('internal', String(e), { cause: e }), this.out);
      }
    }
    this.flush();
    /** @type {ConnectionState} */
    const final = { status: 'closed', reason: this.machine.reason ?? 'closed' };
    if (this.lastError) final.error = this.lastError;
    this.setState(final);
    return final;
  }

  /** Hands the machine's items to the application. */
  flush() {
    const items = this.out.splice(0);
    for (const item of items) {
      switch (item.kind) {
        case 'event':
          this.call(this.handlers.onEvent, item.event);
          break;
        case 'reset':
          this.call(this.handlers.onReset, item.reset);
          break;
        case 'end':
          this.call(this.handlers.onEnd, item.end);
          break;
        case 'error':
          this.lastError = item.error;
          this.call(this.handlers.onError, item.error);
          break;
      }
    }
  }

  /**
   * Calls an application handler; its exception is reported, not allowed to break the watch.
   * @template T
   * @param {((v: T) => void) | undefined} fn
   * @param {T} value
   */
  call(fn, value) {
    if (!fn) return;
    try {
      fn(value);
    } catch (e) {
      setTimeout(() => {
        throw e;
      });
    }
  }

  /** @param {ConnectionState} s */
  setState(s) {
    const prev = this.state;
    if (prev.status === 'closed') return;
    if (prev.status === 'open' && s.status === 'open' && prev.transport === s.transport) return;
    if (prev.status === 'connecting' && s.status === 'connecting' && prev.attempt === s.attempt && prev.transport === s.transport) return;
    this.state = s;
    this.call(this.handlers.onState, s);
  }

  /** @param {number} ms */
  sleep(ms) {
    return new Promise((resolve) => {
      const t = setTimeout(done, Math.max(0, ms));
      function done() {
        clearTimeout(t);
        resolve(undefined);
      }
      this.wake = done;
    }).finally(() => {
      this.wake = null;
    });
  }

  /** @returns {Promise<Record<string, string>>} */
  async requestHeaders() {
    /** @type {Record<string, string>} */
    const h = { ...(this.options.headers ?? {}) };
    const t = this.options.token;
    const token = typeof t === 'function' ? await t() : t;
    if (token) h.authorization = `Bearer ${token}`;
    return h;
  }

  /**
   * The headers of the next request; null when the watch was closed
   * meanwhile, or when the token function failed (then a retry is scheduled
   * like a network error).
   * @returns {Promise<Record<string, string> | null>}
   */
  async headersOrRetry() {
    const m = this.machine;
    const headers = await this.requestHeaders().catch(() => null);
    if (m.current() === 'closed') return null;
    if (headers === null) {
      m.onNetworkError(Date.now(), new JobcastError('token', 'the token function failed', { retryable: true }), this.random(), this.out);
    }
    return headers;
  }

  /**
   * A fetch with an abort controller the watch can cancel, and a timer that
   * aborts it; `timer.arm(ms)` re-arms it, `timer.fired` tells whether it did.
   * @param {string} url
   * @param {Record<string, string>} headers
   * @param {number} timeoutMs
   */
  async request(url, headers, timeoutMs) {
    const ac = new AbortController();
    this.inflight = ac;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    let t;
    const timer = {
      fired: false,
      /** @param {number} ms */
      arm(ms) {
        clearTimeout(t);
        t = setTimeout(() => {
          timer.fired = true;
          ac.abort();
        }, ms);
      },
      clear() {
        clearTimeout(t);
      },
    };
    timer.arm(timeoutMs);
    const res = await this.fetch(url, { headers, signal: ac.signal, cache: 'no-store' }).catch((e) => {
      timer.clear();
      throw e;
    });
    return { res, ac, timer };
  }

  /**
   * A failure with no response (or a cut body): to the machine as a network error.
   * @param {unknown} e
   * @param {boolean} timedOut
   * @param {string} url
   */
  networkError(e, timedOut, url) {
    return timedOut
      ? new JobcastError('timeout', `${url}: no answer in time`, { retryable: true, cause: e })
      : new JobcastError('network', `${url}: ${e instanceof Error ? e.message : String(e)}`, { retryable: true, cause: e });
  }

  /** One SSE connection: connect, read until it ends, hand everything to the machine. */
  async streamOnce() {
    const m = this.machine;
    const pos = m.position();
    const headers = await this.headersOrRetry();
    if (headers === null) return;
    headers.accept = 'text/event-stream';
    let url = this.eventsUrl;
    if (pos.kind === 'after') headers['last-event-id'] = pos.id;
    if (pos.kind === 'live') url += '?from=live';
    if (pos.kind === 'tail') url += `?from=tail:${pos.n}`;
    const firstByte = this.options.firstByteTimeoutMs ?? 10_000;
    /** @type {Awaited<ReturnType<Watch['request']>>} */
    let r;
    try {
      r = await this.request(url, headers, firstByte);
    } catch (e) {
      if (m.current() === 'closed') return;
      // A proxy that holds the response back shows up here as a timeout.
      const timedOut = this.inflight?.signal.aborted ?? false;
      if (timedOut) this.sseTrouble += 1;
      m.onNetworkError(Date.now(), this.networkError(e, timedOut, url), this.random(), this.out);
      return;
    }
    const { res, ac, timer } = r;
    const contentType = (res.headers.get('content-type') ?? '').trim().toLowerCase();
    if (res.status !== 200 || !contentType.startsWith('text/event-stream')) {
      if (res.status >= 500) this.sseTrouble += 1;
      const error =
        res.status === 200
          ? new JobcastError('protocol', `${url} answered 200 but not with text/event-stream`)
          : await errorOf(res);
      timer.clear();
      ac.abort();
      if (m.current() !== 'closed') m.onRefused(Date.now(), res.status, error, this.random(), this.out);
      return;
    }
    m.onOpen(Date.now());
    this.setState({ status: 'open', transport: 'sse' });
    const parser = connectionParser(m, this.out, this.random);
    const body = res.body;
    if (!body) {
      m.onClosed(Date.now(), null, this.random(), this.out);
      return;
    }
    const reader = body.getReader();
    let gotBytes = false;
    /** @type {JobcastError | null} */
    let error = null;
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        if (!gotBytes && value.length > 0) {
          gotBytes = true;
          this.sseTrouble = 0;
        }
        timer.arm(this.options.readTimeoutMs ?? 45_000);
        parser.feed(value);
        this.flush();
        if (m.current() !== 'open') break;
      }
    } catch (e) {
      // A stream past the parser's bounds is broken like a cut connection: reconnect.
      if (m.current() === 'open') error = e instanceof JobcastError ? e : this.networkError(e, timer.fired, url);
    } finally {
      timer.clear();
      ac.abort(); // releases the connection, also after the end or an error
    }
    if (m.current() !== 'open') return;
    // An incomplete final event is dropped with the parser (a new one per connection).
    if (!gotBytes) this.sseTrouble += 1;
    m.onClosed(Date.now(), error, this.random(), this.out);
  }

  /** One long-poll request for a JSON page. */
  async pollOnce() {
    const m = this.machine;
    const pos = m.position();
    const headers = await this.headersOrRetry();
    if (headers === null) return;
    headers.accept = 'application/json';
    const wait = this.options.pollWaitSeconds ?? 25;
    const params = new URLSearchParams({ wait: String(wait), limit: '100' });
    if (pos.kind === 'after') params.set('after', pos.id);
    if (pos.kind === 'tail') params.set('from', `tail:${pos.n}`);
    const url = `${this.eventsUrl}?${params}`;
    const timeout = wait * 1000 + (this.options.readTimeoutMs ?? 45_000);
    let body;
    /** @type {Response} */
    let res;
    /** @type {Awaited<ReturnType<Watch['request']>> | undefined} */
    let r;
    try {
      r = await this.request(url, headers, timeout);
      res = r.res;
      if (res.status !== 200) {
        const error = await errorOf(res);
        if (m.current() !== 'closed') m.onRefused(Date.now(), res.status, error, this.random(), this.out);
        return;
      }
      body = await res.json();
    } catch (e) {
      if (m.current() === 'closed') return;
      m.onNetworkError(Date.now(), this.networkError(e, r?.timer.fired ?? this.inflight?.signal.aborted ?? false, url), this.random(), this.out);
      return;
    } finally {
      r?.timer.clear();
    }
    if (m.current() === 'closed') return;
    m.onPage(Date.now(), body, this.out);
    if (m.current() === 'open') this.setState({ status: 'open', transport: 'poll' });
  }

  /** Looks up the stream's head for a `live` start. */
  async resolveLive() {
    const m = this.machine;
    const headers = await this.headersOrRetry();
    if (headers === null) return;
    headers.accept = 'application/json';
    /** @type {Awaited<ReturnType<Watch['request']>> | undefined} */
    let r;
    try {
      r = await this.request(this.metaUrl, headers, this.options.readTimeoutMs ?? 45_000);
      const res = r.res;
      if (res.status === 404) {
        m.resolveLive(null); // not created yet: everything it will hold is live
        await res.body?.cancel();
        return;
      }
      if (res.status !== 200) {
        const error = await errorOf(res);
        if (m.current() !== 'closed') m.onRefused(Date.now(), res.status, error, this.random(), this.out);
        return;
      }
      const info = await res.json();
      const last = parseEventId(info?.last_id);
      if (info?.state === 'open') {
        m.resolveLive(last ?? parseEventId(`${info.epoch}-0`));
      } else if (last) {
        // Ended: resume just before the end, so that the end itself arrives.
        m.resolveLive({ epoch: last.epoch, seq: last.seq > 0n ? last.seq - 1n : 0n });
      } else {
        m.stop(new JobcastError('protocol', 'stream metadata without a position'), this.out);
      }
    } catch (e) {
      if (m.current() === 'closed') return;
      m.onNetworkError(Date.now(), this.networkError(e, r?.timer.fired ?? false, this.metaUrl), this.random(), this.out);
    } finally {
      r?.timer.clear();
    }
  }
}

/** The most characters of one SSE line, and of one event, a connection may hold: 16 Mi. */
export const MAX_SSE_CHARS = 16 * 1024 * 1024;

/**
 * The bytes of one SSE connection to the machine: UTF-8 decoding (a leading
 * BOM stripped, characters split across chunks joined), the spec-exact
 * parser, and the last-event-id buffer, which WHATWG keeps across the events
 * of a connection. A new one per connection, so that an incomplete final
 * event never leaks into the next. Past [MAX_SSE_CHARS] in a line or an
 * event, `feed` throws a retryable `stream_too_large` JobcastError.
 * @param {Machine} m
 * @param {import('./machine.js').Item[]} out
 * @param {() => number} random
 * @returns {{feed: (bytes: Uint8Array) => void}}
 */
export function connectionParser(m, out, random) {
  /** @type {string | undefined} */
  let lastId;
  // Bounds (as the Rust decoder's): characters since the last line break and
  // since the last blank line. A proxy that lost line breaks must not grow
  // the parser's buffers without end.
  let line = 0;
  let event = 0;
  let lastWasLf = false;
  /** @param {string} t text with LF line ends */
  const account = (t) => {
    let i = 0;
    for (;;) {
      const j = t.indexOf('\n', i);
      if (j === -1) {
        if (t.length > i) {
          line += t.length - i;
          event += t.length - i;
          lastWasLf = false;
        }
        break;
      }
      if (j === i && lastWasLf) event = 0; // a blank line ends the event
      else event += j - i + 1;
      line = 0;
      lastWasLf = true;
      i = j + 1;
    }
    if (line > MAX_SSE_CHARS || event > MAX_SSE_CHARS) {
      throw new JobcastError(
        'stream_too_large',
        `an SSE ${line > MAX_SSE_CHARS ? 'line' : 'event'} is longer than ${MAX_SSE_CHARS} characters`,
        { retryable: true },
      );
    }
  };
  const decoder = new TextDecoder();
  const parser = createParser({
    onEvent: (ev) => {
      if (ev.id !== undefined) lastId = ev.id;
      m.onSseEvent(Date.now(), { id: lastId, event: ev.event, data: ev.data }, random(), out);
    },
    onRetry: (ms) => m.onRetry(ms),
  });
  // Line ends are normalized to LF here, as they arrive: the parser holds a
  // CR at the end of a chunk back (a LF may follow), which would delay an
  // event ended by CR until the next bytes, or lose it at the end of a body.
  let skipLf = false;
  return {
    feed(bytes) {
      let text = decoder.decode(bytes, { stream: true });
      if (text === '') return; // half a UTF-8 character so far
      if (skipLf && text.startsWith('\n')) text = text.slice(1);
      skipLf = false;
      if (text === '') return;
      skipLf = text.endsWith('\r');
      const normal = text.replace(/\r\n?/g, '\n');
      account(normal);
      parser.feed(normal);
    },
  };
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
    const text = (await res.text()).slice(0, MAX_ERROR_BODY);
    const body = JSON.parse(text);
    if (typeof body?.error?.code === 'string') code = body.error.code;
    if (typeof body?.error?.message === 'string') message = body.error.message;
  } catch {
    // Not a jobcast error body (a proxy's page): keep the status.
  }
  return new JobcastError(code, message, {
    status,
    retryable: status >= 500 || status === 408 || status === 429,
    retryAfterMs,
  });
}
