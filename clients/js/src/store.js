// A small observable snapshot of one watch (events so far, state, end,
// error), for UI code: the React hook is a thin wrapper around it, and other
// frameworks can subscribe to it the same way. Snapshots are immutable: a
// change makes a new object, so `===` tells whether anything changed.

import { watch } from './watch.js';

/**
 * @typedef {object} JobStreamSnapshot
 * @property {import('./machine.js').JobEvent[]} events the events so far, in order (the last `maxEvents`)
 * @property {import('./watch.js').ConnectionState} state the connection state
 * @property {import('./machine.js').EndInfo | null} end the end, once the stream ended
 * @property {import('./machine.js').JobcastError | null} error the error the watch stopped with
 * @property {import('./machine.js').ResetInfo | null} reset the last `jobcast.reset`, if any
 * @property {number} reconnects how many times the watch reconnected
 * @property {number} dropped events dropped from the front of `events` to keep it at `maxEvents`
 */

/**
 * Starts a watch and keeps a snapshot of it.
 *
 * @param {import('./watch.js').WatchOptions} options
 * @param {{maxEvents?: number}} [limits] keep at most this many events (default 10 000; the oldest go first)
 */
export function jobStreamStore(options, limits = {}) {
  const maxEvents = Math.max(1, limits.maxEvents ?? 10_000);
  /** @type {Set<() => void>} */
  const listeners = new Set();
  /** @type {JobStreamSnapshot} */
  let snap = {
    events: [],
    state: { status: 'connecting', attempt: 0, transport: options.transport === 'poll' ? 'poll' : 'sse' },
    end: null,
    error: null,
    reset: null,
    reconnects: 0,
    dropped: 0,
  };
  /** @param {Partial<JobStreamSnapshot>} patch */
  const update = (patch) => {
    snap = { ...snap, ...patch, reconnects: w.reconnects };
    for (const l of listeners) l();
  };
  const w = watch(options, {
    onEvent: (e) => {
      let events = snap.events.concat([e]);
      let dropped = snap.dropped;
      if (events.length > maxEvents) {
        dropped += events.length - maxEvents;
        events = events.slice(events.length - maxEvents);
      }
      update({ events, dropped });
    },
    onReset: (reset) => update({ reset }),
    onEnd: (end) => update({ end }),
    onError: (error) => update({ error }),
    onState: (state) => update({ state }),
  });
  return {
    /** @returns {JobStreamSnapshot} */
    getSnapshot: () => snap,
    /**
     * @param {() => void} listener called after every change
     * @returns {() => void} unsubscribes
     */
    subscribe(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
    /** Stops the watch. */
    close: () => w.close(),
    /** The watch itself. */
    watch: w,
  };
}
