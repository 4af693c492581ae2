// The jobcast dashboard: a list of streams (polled from GET /v1/streams every
// second) and a stream page that watches GET /v1/streams/{id}/events with the
// same @jobcast/client module Node uses (mapped by the page's import map).
// Hash routing (#/streams/ID), so the server needs no route per stream.
// All text goes through textContent: no data ever becomes markup.

import { watch } from '@jobcast/client';

/** How often the list is refreshed (ms). */
const LIST_EVERY_MS = 1000;
/** Most event cards kept on a stream page; older ones are removed. */
const MAX_CARDS = 1000;

/** A token from the page URL (`?token=…`), sent as `Authorization: Bearer`; a `jobcast_token` cookie needs nothing (the browser sends it). */
const token = new URLSearchParams(location.search).get('token');

const app = /** @type {HTMLElement} */ (document.getElementById('app'));

/** @type {(() => void) | null} stops what the current page runs */
let stopPage = null;

/**
 * Builds an element with text content and attributes (never HTML).
 * @param {string} tag
 * @param {Record<string, string>} [attrs]
 * @param {(Node | string | null)[]} [children]
 * @returns {HTMLElement}
 */
function el(tag, attrs = {}, children = []) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  for (const c of children) if (c !== null) e.append(typeof c === 'string' ? document.createTextNode(c) : c);
  return e;
}

/** @returns {Record<string, string>} */
function authHeaders() {
  return token ? { authorization: `Bearer ${token}` } : {};
}

/**
 * "3 s ago", "5 min ago", or a date.
 * @param {string | null | undefined} iso
 * @param {number} now
 */
function ago(iso, now) {
  if (!iso) return '—';
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return iso;
  const s = Math.max(0, Math.round((now - t) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return new Date(t).toISOString().slice(0, 16).replace('T', ' ');
}

/** The link to a stream's page. @param {string} id */
const streamHref = (id) => `#/streams/${encodeURIComponent(id)}`;

function route() {
  stopPage?.();
  stopPage = null;
  const m = /^#\/streams\/(.+)$/.exec(location.hash);
  if (m) stopPage = streamPage(decodeURIComponent(m[1]));
  else stopPage = listPage();
}

/** The list of streams, refreshed every second. */
function listPage() {
  document.title = 'jobcast — streams';
  const status = el('span', { id: 'list-status' }, ['loading…']);
  const tbody = el('tbody');
  const table = el('table', { id: 'streams' }, [
    el('thead', {}, [el('tr', {}, ['Stream', 'State', 'Events', 'Watchers', 'Last activity'].map((h) => el('th', {}, [h])))]),
    tbody,
  ]);
  const empty = el('div', { class: 'empty', hidden: '' }, ['No streams yet. Publish one: ', el('code', {}, ['jobcast publish my-job hello'])]);
  app.replaceChildren(el('h1', {}, ['Streams']), el('div', { class: 'bar' }, [status]), table, empty);
  let stopped = false;
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let timer;
  const ac = new AbortController();
  async function refresh() {
    try {
      const res = await fetch('/v1/streams?limit=100', { headers: { accept: 'application/json', ...authHeaders() }, signal: ac.signal, cache: 'no-store' });
      const body = await res.json();
      if (!res.ok) throw new Error(body?.error?.message ?? `HTTP ${res.status}`);
      const now = Date.now();
      /** @type {any[]} */
      const streams = Array.isArray(body.streams) ? body.streams : [];
      tbody.replaceChildren(
        ...streams.map((s) =>
          el('tr', { 'data-stream': String(s.id) }, [
            el('td', { class: 'name', 'data-label': 'Stream' }, [el('a', { href: streamHref(String(s.id)) }, [String(s.id)])]),
            el('td', { 'data-label': 'State' }, [el('span', { class: `badge s-${s.state}` }, [String(s.state)])]),
            el('td', { class: 'num', 'data-label': 'Events' }, [String(s.events)]),
            el('td', { class: 'num', 'data-label': 'Watchers' }, [String(s.watchers)]),
            el('td', { 'data-label': 'Last activity', title: String(s.updated_at ?? '') }, [ago(s.updated_at, now)]),
          ]),
        ),
      );
      table.hidden = streams.length === 0;
      empty.hidden = streams.length !== 0;
      status.textContent = `${streams.length} stream${streams.length === 1 ? '' : 's'}${body.next ? ' (newest 100)' : ''} · updated ${new Date(now).toLocaleTimeString()}`;
    } catch (e) {
      if (stopped) return;
      status.textContent = `cannot load the list: ${e instanceof Error ? e.message : String(e)} (retrying)`;
    }
    if (!stopped) timer = setTimeout(refresh, LIST_EVERY_MS);
  }
  refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
    ac.abort();
  };
}

/**
 * One stream's events as they arrive.
 * @param {string} id
 */
function streamPage(id) {
  document.title = `jobcast — ${id}`;
  const conn = el('span', { id: 'conn-state', class: 'badge c-connecting' }, ['connecting']);
  const reconnects = el('strong', { id: 'reconnects' }, ['0']);
  const count = el('strong', { id: 'event-count' }, ['0']);
  const notices = el('div', { id: 'notices' });
  const list = el('ol', { class: 'events', id: 'events' });
  const hidden = el('p', { class: 'muted', hidden: '' });
  const waiting = el('div', { class: 'empty', id: 'no-events' }, ['No events yet. Waiting for the stream…']);
  app.replaceChildren(
    el('p', {}, [el('a', { href: '#/' }, ['← all streams'])]),
    el('h1', {}, [id]),
    el('div', { class: 'bar' }, [
      conn,
      el('span', {}, ['events ', count]),
      el('span', {}, ['reconnects ', reconnects]),
    ]),
    notices,
    hidden,
    waiting,
    list,
  );
  let n = 0;
  let removed = 0;
  const w = watch(
    { server: '', stream: id, token },
    {
      onEvent(e) {
        n += 1;
        count.textContent = String(n);
        waiting.hidden = true;
        list.append(eventCard(e));
        if (list.childElementCount > MAX_CARDS) {
          list.firstElementChild?.remove();
          removed += 1;
          hidden.hidden = false;
          hidden.textContent = `${removed} earlier event${removed === 1 ? '' : 's'} not shown (the page keeps the last ${MAX_CARDS}).`;
        }
      },
      onReset(r) {
        notices.append(
          el('div', { class: 'notice reset' }, [
            el('strong', {}, ['Reset: ']),
            `the server could not resume where asked (${r.reason}); continuing from ${r.resumed_from ?? 'the start'}. Events may be missing before this point.`,
          ]),
        );
      },
      onEnd(end) {
        waiting.hidden = true;
        const parts = [el('strong', {}, [`Stream ${end.state}`]), end.id ? ` at ${end.id}` : ''];
        if (end.error) parts.push(el('div', {}, [`error: ${end.error}`]));
        if (end.data !== undefined) parts.push(el('pre', {}, [pretty(end.data)]));
        notices.append(el('div', { class: `notice end-${end.state}`, id: 'end', 'data-state': end.state }, parts));
      },
      onError(err) {
        waiting.hidden = true;
        notices.append(el('div', { class: 'notice error', id: 'error' }, [el('strong', {}, ['Stopped: ']), `${err.code} — ${err.message}`]));
      },
      onState(s) {
        reconnects.textContent = String(w?.reconnects ?? 0);
        let text;
        let cls;
        switch (s.status) {
          case 'connecting':
            text = s.attempt ? `connecting (attempt ${s.attempt + 1})` : 'connecting';
            cls = 'c-connecting';
            break;
          case 'open':
            text = s.transport === 'poll' ? 'live (long-poll)' : 'live';
            cls = 'c-open';
            break;
          case 'reconnecting':
            text = `reconnecting in ${(s.delayMs / 1000).toFixed(1)} s (attempt ${s.attempt})`;
            cls = 'c-reconnecting';
            break;
          default:
            text = `closed: ${s.reason}`;
            cls = `c-closed-${s.reason}`;
        }
        conn.textContent = text;
        conn.className = `badge ${cls}`;
        conn.dataset.status = s.status;
      },
    },
  );
  return () => w.close();
}

/**
 * Data shown as pretty-printed JSON when it is JSON, else as text.
 * @param {unknown} data
 */
function pretty(data) {
  if (typeof data !== 'string') return JSON.stringify(data, null, 2);
  try {
    return JSON.stringify(JSON.parse(data), null, 2);
  } catch {
    return data;
  }
}

/** @param {import('@jobcast/client').JobEvent} e */
function eventCard(e) {
  const time = e.time ? el('time', { datetime: e.time }, [e.time]) : el('span', { title: 'SSE frames carry no time: this is when the page received it' }, [`received ${new Date().toISOString()}`]);
  return el('li', { class: 'event', 'data-seq': String(e.seq), 'data-id': e.id }, [
    el('div', { class: 'meta' }, [el('span', { class: 'type' }, [e.type]), el('span', { class: 'mono' }, [e.id]), time]),
    el('pre', {}, [pretty(e.data)]),
  ]);
}

window.addEventListener('hashchange', route);
route();
