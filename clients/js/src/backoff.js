// Reconnect delays: exponential backoff with full jitter, and the
// `Retry-After` header. Pure functions: no clock and no random source of their
// own (both are arguments), so the schedule is tested deterministically.
// Mirrors crates/jobcast-client/src/backoff.rs.

/** The ceiling of the first retry (attempt 0), in ms. */
export const BASE_MS = 1000;
/** The largest ceiling, in ms. */
export const MAX_MS = 30_000;
/**
 * The longest floor honoured (a `retry:`, `retry_after_ms` or `Retry-After`
 * beyond it is taken as this), so a bogus value cannot park a client forever.
 */
export const MAX_FLOOR_MS = 3_600_000;

/**
 * The delay before retry number `attempt` (0 for the first retry): full
 * jitter, `random × min(max, base × 2^attempt)`, then at least `floorMs`.
 *
 * @param {number} attempt failed attempts since the last healthy connection
 * @param {number} floorMs the least delay (from `retry:`, `retry_after_ms`, `Retry-After`)
 * @param {number} random a sample of [0, 1) (clamped; NaN counts as 0)
 * @param {number} [baseMs] the first ceiling
 * @param {number} [maxMs] the largest ceiling
 * @returns {number} whole milliseconds
 */
export function backoff(attempt, floorMs, random, baseMs = BASE_MS, maxMs = MAX_MS) {
  const a = Math.max(0, Math.floor(attempt) || 0);
  // 2^a overflows to Infinity for large a; min() then takes the maximum.
  const ceiling = a >= 1024 ? maxMs : Math.min(maxMs, baseMs * 2 ** a);
  const r = Number.isNaN(random) ? 0 : Math.min(1, Math.max(0, random));
  const jitter = Math.min(ceiling, Math.floor(ceiling * r));
  const floor = Math.min(Math.max(0, floorMs || 0), MAX_FLOOR_MS);
  return Math.max(jitter, floor);
}

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

/**
 * Parses a `Retry-After` header value: delay-seconds, or an HTTP-date
 * (IMF-fixdate, RFC 850 or asctime, as RFC 9110 asks recipients to accept),
 * relative to `nowMs`. A date in the past means no delay.
 *
 * @param {string | null | undefined} value the header value
 * @param {number} nowMs the current time (ms since the Unix epoch)
 * @returns {number | null} a delay in ms, at most MAX_FLOOR_MS; null when unparseable
 */
export function parseRetryAfter(value, nowMs) {
  if (value == null) return null;
  const v = value.trim();
  if (/^[0-9]+$/.test(v)) return Math.min(Number(v) * 1000, MAX_FLOOR_MS);
  const at = parseHttpDate(v);
  if (at === null) return null;
  return Math.min(Math.max(0, at - nowMs), MAX_FLOOR_MS);
}

/**
 * Milliseconds since the Unix epoch of an HTTP-date, or null.
 *
 * @param {string} s
 * @returns {number | null}
 */
export function parseHttpDate(s) {
  /** @type {RegExpMatchArray | null} */
  let m;
  let day, mon, year, time;
  if ((m = s.match(/^[A-Za-z]{3}, (\d{2}) ([A-Za-z]{3}) (\d{4}) (\d{2}:\d{2}:\d{2}) GMT$/))) {
    [, day, mon, year, time] = m; // IMF-fixdate
  } else if ((m = s.match(/^[A-Za-z]+, (\d{2})-([A-Za-z]{3})-(\d{2}) (\d{2}:\d{2}:\d{2}) GMT$/))) {
    [, day, mon, year, time] = m; // RFC 850: two-digit years pivot at 70
    year = String(Number(year) < 70 ? 2000 + Number(year) : 1900 + Number(year));
  } else if ((m = s.match(/^[A-Za-z]{3} ([A-Za-z]{3}) +(\d{1,2}) (\d{2}:\d{2}:\d{2}) (\d{4})$/))) {
    [, mon, day, time, year] = m; // asctime
  } else {
    return null;
  }
  const month = MONTHS.indexOf(mon);
  const [h, mi, sec] = time.split(':').map(Number);
  const d = Number(day);
  if (month < 0 || d < 1 || d > 31 || h > 23 || mi > 59 || sec > 60) return null;
  return Date.UTC(Number(year), month, d, h, mi, sec);
}
