// @jobcast/client: watch a jobcast stream from a browser or Node 20+, and
// produce one (append, end, labels, cancel requests).
// The same file is served to browsers (the dashboard) and imported by Node:
// plain JavaScript with JSDoc types, no build step.

export { watch, Watch } from './watch.js';
export {
  Machine,
  JobcastError,
  parseEventId,
  formatEventId,
  verdict,
  retryableStatus,
  END_EVENT,
  ERROR_EVENT,
  RESET_EVENT,
  RESERVED_PREFIX,
} from './machine.js';
export { backoff, parseRetryAfter, parseHttpDate, BASE_MS, MAX_MS, MAX_FLOOR_MS } from './backoff.js';
export { jobStreamStore } from './store.js';
export { producer, Producer, requestCancel, CancelRequested } from './producer.js';

/** @typedef {import('./machine.js').JobEvent} JobEvent */
/** @typedef {import('./machine.js').EndInfo} EndInfo */
/** @typedef {import('./machine.js').ResetInfo} ResetInfo */
/** @typedef {import('./machine.js').From} From */
/** @typedef {import('./watch.js').ConnectionState} ConnectionState */
/** @typedef {import('./watch.js').WatchOptions} WatchOptions */
/** @typedef {import('./watch.js').WatchHandlers} WatchHandlers */
/** @typedef {import('./store.js').JobStreamSnapshot} JobStreamSnapshot */
/** @typedef {import('./producer.js').ProducerOptions} ProducerOptions */
/** @typedef {import('./producer.js').RetryOptions} RetryOptions */
/** @typedef {import('./producer.js').AppendResult} AppendResult */
/** @typedef {import('./producer.js').EventInput} EventInput */
/** @typedef {import('./producer.js').StreamMetadata} StreamMetadata */
