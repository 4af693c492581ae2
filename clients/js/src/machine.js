// The watch's rules as a pure state machine: inputs are what happened (a
// response status, a parsed SSE event, a JSON page, the end of a connection,
// a timer) with the time and a random sample; outputs are items for the
// application, the next state and when to reconnect. The I/O shell
// (watch.js) only performs what the machine decides, so every rule is tested
// without sockets or a clock. Mirrors crates/jobcast-client/src/machine.rs.

import { backoff, MAX_FLOOR_MS } from './backoff.js';

/** The control event that ends a stream. */
export const END_EVENT = 'jobcast.end';
/** The control event that reports a problem. */
export const ERROR_EVENT = 'jobcast.error';
/** The control event that says the resume point could not be honoured. */
export const RESET_EVENT = 'jobcast.reset';
/** Event types with this prefix are the server's control events. */
export const RESERVED_PREFIX = 'jobcast.';

const MAX_SEQ = 2n ** 64n - 1n;

/**
 * An event id `{epoch}-{seq}`.
 * @typedef {{epoch: string, seq: bigint}} EventId
 */

/**
 * Parses an event id; null when it is not `^[a-z0-9]{1,16}-(0|[1-9][0-9]*)$` with seq ≤ 2^64−1.
 *
 * @param {string | null | undefined} s
 * @returns {EventId | null}
 */
export function parseEventId(s) {
  if (typeof s !== 'string') return null;
  const m = /^([a-z0-9]{1,16})-(0|[1-9][0-9]*)$/.exec(s);
  if (!m) return null;
  const seq = BigInt(m[2]);
  return seq > MAX_SEQ ? null : { epoch: m[1], seq };
}

/**
 * @param {EventId} id
 * @returns {string}
 */
export function formatEventId(id) {
  return `${id.epoch}-${id.seq}`;
}

/**
 * An error of a watch. `code` is stable: the server's error code
 * (`stream_not_found`, `unauthorized`, `stream_deleted`, …), `http_{status}`
 * when the body had none, or one of `network`, `timeout`, `protocol`,
 * `gave_up`.
 */
export class JobcastError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{status?: number, retryable?: boolean, retryAfterMs?: number | null, refresh?: boolean, cause?: unknown, last?: JobcastError}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message, extra.cause === undefined ? undefined : { cause: extra.cause });
    this.name = 'JobcastError';
    /** @type {string} */
    this.code = code;
    /** @type {number | undefined} the HTTP status, for a refused request */
    this.status = extra.status;
    /** @type {boolean} whether a retry may succeed */
    this.retryable = extra.retryable ?? false;
    /** @type {number | null} a floor for the next attempt */
    this.retryAfterMs = extra.retryAfterMs ?? null;
    /** @type {boolean} a fresh token may fix it (`token_expired`) */
    this.refresh = extra.refresh ?? false;
    /** @type {JobcastError | undefined} for `gave_up`: the last failure */
    this.last = extra.last;
  }
}

/**
 * Statuses that are retried: 5xx, 408 Request Timeout and 429 Too Many Requests.
 * @param {number} status
 */
export function retryableStatus(status) {
  return (status >= 500 && status <= 599) || status === 408 || status === 429;
}

/**
 * What a response status means for a watch.
 * @param {number} status
 * @param {boolean} eventStream the Content-Type is text/event-stream
 * @returns {'open' | 'finish' | 'retry' | 'stop'}
 */
export function verdict(status, eventStream) {
  if (status === 200 && eventStream) return 'open';
  if (status === 204) return 'finish';
  if (retryableStatus(status)) return 'retry';
  return 'stop';
}

/**
 * An event of a stream's log, delivered once, in seq order.
 * @typedef {object} JobEvent
 * @property {string} id `{epoch}-{seq}`
 * @property {number} seq its position (1, 2, 3 …; exact up to 2^53, dedupe uses the exact value)
 * @property {string} type `message` by default
 * @property {string} data the data text (lines joined by `\n`)
 * @property {string} [time] RFC 3339 (only on the long-poll transport, which has it)
 */

/**
 * `jobcast.reset`: the server could not resume where asked.
 * @typedef {{reason: string, requested: string | null, resumed_from: string | null}} ResetInfo
 */

/**
 * The end of a stream (`jobcast.end`).
 * @typedef {{id: string | null, state: 'completed' | 'failed', error?: string, data?: unknown}} EndInfo
 */

/**
 * What the machine hands to the application, in order.
 * @typedef {{kind: 'event', event: JobEvent} | {kind: 'reset', reset: ResetInfo} | {kind: 'end', end: EndInfo} | {kind: 'error', error: JobcastError}} Item
 */

/**
 * Timing settings.
 * @typedef {object} Settings
 * @property {number} giveUpAfterMs give up after this long without a healthy connection
 * @property {number} healthyAfterMs a connection open this long counts as healthy
 * @property {number} baseMs backoff base
 * @property {number} maxMs backoff maximum
 * @property {boolean} [canRefresh] the token can be renewed: `token_expired` with `refresh` reconnects
 */

/** @typedef {'connecting' | 'open' | 'reconnecting' | 'closed'} Status */

/** @typedef {'end' | 'no_content' | 'error' | 'gave_up' | 'closed'} CloseReason */

/**
 * Where a watch starts: `start` (the whole log), `live` (`?from=live`),
 * `tail:N` (the last N events, then live; N up to 1 000 000), or an event id.
 * @typedef {'start' | 'live' | `tail:${number}` | string} From
 */

/** The reconnect state machine of one watch. */
export class Machine {
  /**
   * @param {From} from
   * @param {Settings} settings
   * @param {number} now ms
   */
  constructor(from, settings, now) {
    /** @type {Status} */
    this.status = 'connecting';
    /** @type {CloseReason | null} */
    this.reason = null;
    this.settings = settings;
    /** Started with `live` and not yet resolved to a position. */
    this.live = from === 'live';
    /** @type {EventId | null} the last event delivered: sent as Last-Event-ID */
    this.last = null;
    /** @type {number | null} `tail:N`: asked for until an event is delivered */
    this.tail = null;
    const tail = /^tail:([0-9]{1,7})$/.exec(from);
    if (tail) {
      this.tail = Number(tail[1]);
    } else if (from.startsWith('tail:')) {
      throw new JobcastError('invalid_from', `tail:N takes a whole number of events: ${JSON.stringify(from)}`);
    } else if (from !== 'start' && from !== 'live') {
      this.last = parseEventId(from);
      if (!this.last) throw new JobcastError('invalid_event_id', `not an event id: ${JSON.stringify(from)}`);
    }
    /** failed attempts since the last healthy connection (the backoff exponent) */
    this.attempt = 0;
    this.unhealthySince = now;
    /** the floor set by the stream's `retry:`; kept across connections */
    this.retryFloorMs = 0;
    this.connectedAt = now;
    this.delivered = false;
    this.retryAt = now;
    /** the delay chosen for the current wait */
    this.delayMs = 0;
    /** @type {JobcastError | null} what made the current wait necessary */
    this.lastError = null;
  }

  /**
   * The current status (a method, so that type narrowing does not outlive an await).
   * @returns {Status}
   */
  current() {
    return this.status;
  }

  /** Whether the shell must look up the stream's head before connecting. */
  needsLivePosition() {
    return this.live && this.last === null;
  }

  /**
   * The live start resolved: the head of an open stream, or null for a
   * stream that does not exist yet (everything it will have is live).
   * @param {EventId | null} head
   */
  resolveLive(head) {
    this.live = false;
    this.last = head;
  }

  /**
   * Where the next connection starts.
   * @returns {{kind: 'start'} | {kind: 'live'} | {kind: 'tail', n: number} | {kind: 'after', id: string}}
   */
  position() {
    if (this.last) return { kind: 'after', id: formatEventId(this.last) };
    if (this.tail !== null) return { kind: 'tail', n: this.tail };
    return this.live ? { kind: 'live' } : { kind: 'start' };
  }

  /**
   * The response was `200 text/event-stream`.
   * @param {number} now
   */
  onOpen(now) {
    this.status = 'open';
    this.connectedAt = now;
    this.delivered = false;
  }

  /**
   * The response was anything else.
   * @param {number} now
   * @param {number} status
   * @param {JobcastError} error its `retryAfterMs` (Retry-After) is a floor for the next attempt
   * @param {number} random
   * @param {Item[]} out
   */
  onRefused(now, status, error, random, out) {
    switch (verdict(status, false)) {
      case 'finish':
        this.close('no_content');
        break;
      case 'retry':
        this.fail(now, error, error.retryAfterMs ?? 0, false, random, out);
        break;
      default:
        this.stop(error, out);
    }
  }

  /**
   * The request got no response (refused, reset, timed out).
   * @param {number} now
   * @param {JobcastError} error
   * @param {number} random
   * @param {Item[]} out
   */
  onNetworkError(now, error, random, out) {
    this.fail(now, error, 0, false, random, out);
  }

  /**
   * The stream's `retry:` field (digits only; the parser checked).
   * @param {number} ms
   */
  onRetry(ms) {
    this.retryFloorMs = Math.min(ms, MAX_FLOOR_MS);
  }

  /**
   * One event of the open stream, as the parser dispatched it.
   * @param {number} now
   * @param {{id: string | undefined, event: string | undefined, data: string}} ev `id`: the last-event-id buffer at dispatch
   * @param {number} random
   * @param {Item[]} out
   */
  onSseEvent(now, ev, random, out) {
    if (this.status !== 'open') return; // after the end or an error, the rest is ignored
    const type = ev.event || 'message';
    if (type === END_EVENT) {
      const payload = parseJson(ev.data);
      if (!isObject(payload) || (payload.state !== 'completed' && payload.state !== 'failed')) {
        return this.protocol(`bad ${END_EVENT} data ${JSON.stringify(ev.data)}`, out);
      }
      const id = parseEventId(ev.id);
      if (id) this.last = id;
      out.push({ kind: 'end', end: endInfo(id ? formatEventId(id) : null, payload) });
      this.close('end');
    } else if (type === ERROR_EVENT) {
      const p = parseJson(ev.data);
      if (!isObject(p) || typeof p.code !== 'string' || typeof p.retryable !== 'boolean') {
        return this.protocol(`bad ${ERROR_EVENT} data ${JSON.stringify(ev.data)}`, out);
      }
      const retryAfterMs = typeof p.retry_after_ms === 'number' ? p.retry_after_ms : null;
      const err = new JobcastError(p.code, String(p.message ?? p.code), {
        retryable: p.retryable,
        retryAfterMs,
        refresh: p.refresh === true,
      });
      if (p.retryable) {
        // The server itself reported a problem: only delivered events make
        // this connection count as healthy.
        this.fail(now, err, retryAfterMs ?? 0, this.delivered, random, out);
      } else if (err.refresh && this.settings.canRefresh) {
        // A fresh token will be asked for on the next attempt.
        this.fail(now, err, 0, this.delivered, random, out);
      } else {
        this.stop(err, out);
      }
    } else if (type === RESET_EVENT) {
      const p = parseJson(ev.data);
      if (!isObject(p) || typeof p.reason !== 'string') {
        return this.protocol(`bad ${RESET_EVENT} data ${JSON.stringify(ev.data)}`, out);
      }
      this.applyReset(/** @type {ResetInfo} */ (p), out);
    } else if (type.startsWith(RESERVED_PREFIX)) {
      // An unknown control event (a newer server): ignored.
    } else {
      const id = parseEventId(ev.id);
      if (!id) {
        return this.protocol(
          `an event without a valid id (got ${JSON.stringify(ev.id ?? null)}); cannot deliver it exactly once`,
          out,
        );
      }
      this.deliver(id, type, ev.data, undefined, out);
    }
  }

  /**
   * A JSON page of the long-poll transport: `{events, next, state, reset?}`.
   * @param {number} now
   * @param {any} page
   * @param {Item[]} out
   */
  onPage(now, page, out) {
    if (!isObject(page) || !Array.isArray(page.events)) {
      return this.protocol('a JSON page without events', out);
    }
    // Any page is a healthy exchange with the server.
    this.status = 'open';
    this.attempt = 0;
    this.unhealthySince = now;
    this.connectedAt = now;
    if (isObject(page.reset)) this.applyReset(/** @type {ResetInfo} */ (page.reset), out);
    for (const e of page.events) {
      if (this.status !== 'open') return;
      if (!isObject(e)) return this.protocol('a page event that is not an object', out);
      const id = parseEventId(e.id);
      const type = typeof e.type === 'string' ? e.type : 'message';
      const data = typeof e.data === 'string' ? e.data : JSON.stringify(e.data);
      if (!id) return this.protocol(`a page event without a valid id: ${JSON.stringify(e.id)}`, out);
      if (type === END_EVENT) {
        const payload = parseJson(data);
        if (!isObject(payload)) return this.protocol(`bad ${END_EVENT} data`, out);
        this.last = id;
        out.push({ kind: 'end', end: endInfo(formatEventId(id), payload) });
        this.close('end');
        return;
      }
      if (type.startsWith(RESERVED_PREFIX)) continue;
      this.deliver(id, type, data, typeof e.time === 'string' ? e.time : undefined, out);
    }
    if (this.status !== 'open') return;
    if (page.next === null) {
      // The server says the end was returned; we did not see it (a stream
      // ended before this client's position): nothing more will come.
      this.close('end');
    } else if (this.last === null) {
      // An empty stream: `next` is `{epoch}-0`, the position to poll from.
      const next = parseEventId(page.next);
      if (next) this.last = next;
    }
  }

  /**
   * The open stream ended (closed by the server, cut, or timed out).
   * @param {number} now
   * @param {JobcastError | null} error
   * @param {number} random
   * @param {Item[]} out
   */
  onClosed(now, error, random, out) {
    if (this.status !== 'open') return;
    const healthy = this.delivered || now - this.connectedAt >= this.settings.healthyAfterMs;
    this.fail(
      now,
      error ?? new JobcastError('disconnected', 'the connection closed before the end of the stream', { retryable: true }),
      0,
      healthy,
      random,
      out,
    );
  }

  /** The reconnect delay is over. */
  onTimer() {
    if (this.status === 'reconnecting') this.status = 'connecting';
  }

  /**
   * Stops with `error` as the last item.
   * @param {JobcastError} error
   * @param {Item[]} out
   */
  stop(error, out) {
    out.push({ kind: 'error', error });
    this.close(error.code === 'gave_up' ? 'gave_up' : 'error');
  }

  /** @param {CloseReason} reason */
  close(reason) {
    if (this.status === 'closed') return;
    this.status = 'closed';
    this.reason = reason;
  }

  /**
   * @param {ResetInfo} p
   * @param {Item[]} out
   */
  applyReset(p, out) {
    // From now on the server's position is the reference (its epoch may differ).
    this.last = parseEventId(p.resumed_from);
    this.live = false;
    this.delivered = true;
    out.push({
      kind: 'reset',
      reset: { reason: p.reason, requested: p.requested ?? null, resumed_from: p.resumed_from ?? null },
    });
  }

  /**
   * Delivers an event unless it was delivered already (dedupe by seq).
   * @param {EventId} id
   * @param {string} type
   * @param {string} data
   * @param {string | undefined} time
   * @param {Item[]} out
   */
  deliver(id, type, data, time, out) {
    const last = this.last;
    if (last && last.epoch === id.epoch && id.seq <= last.seq) return;
    this.last = id;
    this.live = false;
    this.delivered = true;
    /** @type {JobEvent} */
    const event = { id: formatEventId(id), seq: Number(id.seq), type, data };
    if (time !== undefined) event.time = time;
    out.push({ kind: 'event', event });
  }

  /**
   * @param {string} detail
   * @param {Item[]} out
   */
  protocol(detail, out) {
    this.stop(new JobcastError('protocol', detail), out);
  }

  /**
   * A connection attempt failed or a connection ended: wait and reconnect,
   * or give up after `giveUpAfterMs` without a healthy connection.
   * @param {number} now
   * @param {JobcastError} error
   * @param {number} onceFloorMs
   * @param {boolean} healthy
   * @param {number} random
   * @param {Item[]} out
   */
  fail(now, error, onceFloorMs, healthy, random, out) {
    if (this.status === 'closed') return;
    if (healthy) {
      this.attempt = 0;
      this.unhealthySince = now;
    }
    const elapsed = now - this.unhealthySince;
    if (elapsed >= this.settings.giveUpAfterMs) {
      const gaveUp = new JobcastError(
        'gave_up',
        `gave up after ${this.attempt + 1} attempts in ${elapsed} ms: ${error.message}`,
        { last: error, cause: error },
      );
      this.stop(gaveUp, out);
      return;
    }
    const floor = Math.max(this.retryFloorMs, onceFloorMs);
    this.delayMs = backoff(this.attempt, floor, random, this.settings.baseMs, this.settings.maxMs);
    this.attempt += 1;
    this.retryAt = now + this.delayMs;
    this.lastError = error;
    this.status = 'reconnecting';
  }
}

/**
 * @param {string | null} id
 * @param {Record<string, unknown>} payload
 * @returns {EndInfo}
 */
function endInfo(id, payload) {
  /** @type {EndInfo} */
  const end = { id, state: payload.state === 'failed' ? 'failed' : 'completed' };
  if (typeof payload.error === 'string') end.error = payload.error;
  if ('data' in payload) end.data = payload.data;
  return end;
}

/**
 * @param {string} s
 * @returns {unknown}
 */
function parseJson(s) {
  try {
    return JSON.parse(s);
  } catch {
    return undefined;
  }
}

/**
 * @param {unknown} v
 * @returns {v is Record<string, any>}
 */
function isObject(v) {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
