// React binding: `useJobStream(stream, options)`. react is a peer
// dependency; this module is imported only by React apps
// (`@jobcast/client/react`).

import React from 'react';
import { jobStreamStore } from './store.js';

/**
 * @typedef {Omit<import('./watch.js').WatchOptions, 'stream'> & {maxEvents?: number}} JobStreamOptions
 */

/** @type {import('./store.js').JobStreamSnapshot} */
const IDLE = Object.freeze({
  events: [],
  state: /** @type {import('./watch.js').ConnectionState} */ ({ status: 'closed', reason: 'closed' }),
  end: null,
  error: null,
  reset: null,
  reconnects: 0,
  dropped: 0,
});

/**
 * Watches `stream` while the component is mounted: returns the events so
 * far, the connection state, the end and the error (a new object on every
 * change). A falsy `stream` watches nothing. The watch restarts when
 * `stream`, `server`, `from` or `transport` change; other options (a token
 * function, handlers' closures) are read when it (re)starts.
 *
 * @param {string | null | undefined} stream
 * @param {JobStreamOptions} [options]
 * @returns {import('./store.js').JobStreamSnapshot}
 */
export function useJobStream(stream, options = {}) {
  const [snap, setSnap] = React.useState(IDLE);
  const latest = React.useRef(options);
  latest.current = options;
  const { server, from, transport } = options;
  React.useEffect(() => {
    if (!stream) {
      setSnap(IDLE);
      return undefined;
    }
    const { maxEvents, ...watchOptions } = latest.current;
    const store = jobStreamStore({ ...watchOptions, stream }, { maxEvents });
    const unsubscribe = store.subscribe(() => setSnap(store.getSnapshot()));
    setSnap(store.getSnapshot());
    return () => {
      unsubscribe();
      store.close();
    };
  }, [stream, server, from, transport]);
  return snap;
}
