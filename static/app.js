/* ===========================================================================
 * BBO Stream dashboard — static/app.js
 *
 * One file of plain modern JavaScript: no framework, no chart library, no build
 * step, nothing loaded from a CDN. Served by bbo_stream.py next to index.html and
 * style.css.
 *
 * Map: areas in the order data flows; each opens with a banner saying what it owns.
 *   §1  Helpers      DOM writes that skip no-ops, formatting, exact decimal arithmetic
 *   §2  Connection   all talk with the server: the Engine.IO v4 / Socket.IO v5 client (WebSocket,
 *                    long-polling fallback, reconnect with backoff + jitter, heartbeat, acks,
 *                    other namespaces multiplexed on the same connection: /replay),
 *                    the access token (AUTH_TOKEN), the dashboard's socket and its events,
 *                    round trip + clock offset, REST fetches
 *   §3  State        the per-symbol store (BBO, live points, sessions), feed status, statistics,
 *                    what each server event changes in it, its copy in localStorage; the replay's
 *                    store, apart from the live one
 *   §4  Rendering    the frame scheduler (what repaints when), prices, symbol tabs, status
 *   §5  Chart        canvas drawing (decimation, axes, outages, series, crosshair), the view
 *                    (timeframes, zoom, pan, pointer / key input), backfill from the server
 *   §6  History      the historical data panel (REST: latency stats, paged updates, CSV)
 *   §7  Controls and bootstrap   symbol selection, replay controls, timers, boot, test hooks
 *
 * Rendering: messages only update state and set dirty flags; a requestAnimationFrame callback
 * applies them. Price texts and the chart repaint together at most every 50 ms (20 per second),
 * zoom / pan in the next frame. No frame is requested between repaints: a timer waits until
 * something is due (the following view slides 1 px, or a throttled repaint may run). Chart
 * times are server times (serverTimestamp = the server's receive time, the time base of
 * /api/history/series and of the REST range filters); the clock offset to the server is
 * estimated from the `ping` acks.
 *
 * Page URL parameters
 *   ?transport=polling     force HTTP long-polling (no WebSocket attempt)
 *   ?transport=websocket   WebSocket only (no fallback)
 *   ?symbol=ETHUSDT        initial symbol
 *   ?tf=1h                 initial timeframe (a key of TIMEFRAMES)
 *   ?store=0               do not restore / save recent points in localStorage
 *
 * Stable element ids (for browser tests)
 *   Status     #conn-status[data-state=connecting|connected|reconnecting|offline] (#conn-text)
 *              #transport ("WebSocket" | "Polling" | "—")
 *              #feed-state[data-state=unknown|connecting|live|stale|backoff|failed|stopped, or the
 *              selected symbol's suspect|quiet|waiting while the feed is live]
 *              (#feed-state-text: the state word, plus a countdown while backing off;
 *              #feed-state-label: "Feed", or the symbol whose state it shows)
 *              #feed-banner (shown whenever prices are not live: #feed-banner-text why,
 *              #feed-banner-count how long no data has come), #sr-status (polite live region)
 *              #tz-toggle (#tz-text "UTC" | "Local"), .tz-name (the zone beside times)
 *   BBO        #symbol-select, #symbol-tabs (buttons [data-symbol]), #bbo-card[data-live=true|false]
 *              #bid-price #bid-qty #ask-price #ask-qty  (exact strings from the last bbo_update)
 *              #spread #spread-bps #mid-price #spread-indicator #bbo-age #bbo-time #bbo-update-id
 *              #micro-price #micro-lean #sym-rate (the symbol's updates per second)
 *              latency legs: #lat-exchange #bbo-latency (exchange -> server) #lat-server #lat-browser
 *   Chart      #chart (main canvas), #chart-overlay (crosshair), #chart-tooltip, #chart-empty, #chart-info
 *              #tf-<tf> for each key of TIMEFRAMES: #tf-1m … #tf-1d (aria-pressed), #zoom-reset, #show-mid
 *   Stats      #rtt #backend-latency #backend-latency-avg (data-level=good|warn|bad|none)
 *              #msg-count #msg-rate #conn-duration #stats-transport #conn-reconnects
 *              #conn-recovery (how the last reconnect went; its row #conn-recovery-row is shown only when
 *              the server offers connection state recovery)
 *              #fd-state #fd-market #fd-since #fd-age #fd-next #fd-messages #fd-reconnects
 *              #fd-duplicates #fd-crossed #fd-parse #fd-reason #clock-offset #clock-warning
 *   Feed edit  #feed-edit (shown when the welcome says feedEdit) #feed-symbols ([data-remove=SYM] buttons)
 *              #feed-add-form #feed-add-symbol #feed-add-btn #feed-edit-error
 *   Token      #auth-dialog (a modal <dialog>, open while a token is asked for) #auth-form #auth-token
 *              #auth-message (why it asks: none given, or the last one was refused)
 *   History    #hist-symbol #hist-range #hist-start #hist-end #hist-limit #hist-load #hist-csv
 *              #hist-stats (stat tiles [data-stat=count|rate|avail|min|mean|p50|p90|p99|max|tier];
 *              #hist-legs: a row per latency leg, tr[data-leg]) #hist-error
 *              #hist-table (tbody rows newest first, tr[data-update-id]) #hist-older #hist-newer #hist-page
 *              #hist-note (where the rows come from, when the table cannot say it)
 *   Replay     #replay-speed #replay-clock #replay-start (in the history form: its From / To are the range)
 *              #replay-error (the server's refusal), #replay-bar[data-phase] (shown while replaying:
 *              #replay-state #replay-position #replay-speed-text #replay-range #replay-progress (click:
 *              seek) #replay-fill #replay-marks (.replay-mark per outage) #replay-toggle #replay-stop
 *              #replay-outages), #chart-replay (the chart's REPLAY badge), #bbo-card[data-replay];
 *              while replaying #feed-state[data-state=replay] (#feed-state-label "REPLAY") and the
 *              title begins with "REPLAY"
 *
 * Test hook: window.bboDebug
 *   state                        the live state object (§3)
 *   transport()                  "websocket" | "polling" | null (current Engine.IO transport)
 *   connection()                 {state, transport, sid (Engine.IO), socketId (Socket.IO), recovered (the last
 *                                connect took the session back), pid, offset, reconnects, attempts, reconnectAt}
 *   chart.pointCount()           live points held for the current symbol
 *   chart.lastDrawMs()           duration of the last chart redraw (ms)
 *   chart.timeframe()            "1m" … "1d"
 *   chart.viewRange()            [startMs, endMs] of the visible range (server clock)
 *   chart.redraw()               redraw now (synchronously); returns the redraw time in ms
 *   chart.setTimeframe(tf)       same as clicking #tf-<tf>
 *   chart.zoom(factor)           zoom about the centre (factor < 1 zooms in)
 *   chart.backfill()             the current backfill series (or null)
 *   chart.liveSince()            server ms from which the live buffer holds every update of the current symbol
 *   chart.gaps()                 the shaded spans of the last draw: [{start, end, kind, reason}]
 *   chart.axisLabels()           the axis labels of the last draw: {x: [{x, w}], y: [{y, w}]} (device px)
 *   chart.geometry()             the last draw's plot: {pw, ph, padT, priceH, spreadTop, spreadH, dpr} (device px)
 *   loadSyntheticPoints(n)       replace the current symbol's live buffer with n synthetic points
 *                                spread over the visible range, redraw, return the redraw time (ms):
 *                                median of 5 redraws, each including a forced rasterisation
 *   socket                       the Socket.IO client (emit(event, ...args, ackFn))
 *   replay()                     {on, phase, position, speed, from, to, symbols, rows, outages}
 *   checkHealth()                read /healthz now (it is read every HEALTH_CHECK_MS)
 * ======================================================================== */
'use strict';

(() => {

// ###########################################################################
// §1 Helpers: DOM writes that skip no-ops, formatting, exact decimal arithmetic
// ###########################################################################

const $ = (id) => document.getElementById(id);
const clamp = (x, lo, hi) => (x < lo ? lo : x > hi ? hi : x);
const params = new URLSearchParams(location.search);
const reducedMotion = window.matchMedia && matchMedia('(prefers-reduced-motion: reduce)').matches;

function setText(el, text) {
  if (!el) return;
  const n = el.firstChild;
  if (n && n.nodeType === 3 && !n.nextSibling) {
    // one text node: update it in place (no node replaced, no childList mutation)
    if (n.nodeValue !== text) n.nodeValue = text;
  } else if (el.textContent !== text) {
    el.textContent = text;
  }
}
/** Meter fill as a fraction 0…1, drawn with transform: scaleX() (compositor, no layout); the
 *  style is written only when the value moves by at least 0.2 %, so the transition is not
 *  restarted by every repaint. */
function setScaleX(node, f) {
  if (!node) return;
  const v = `scaleX(${(Math.round(clamp(f, 0, 1) * 500) / 500).toFixed(3)})`;
  if (node.bboScaleX !== v) { node.bboScaleX = v; node.style.transform = v; }
}
function setAttr(el, name, value) {
  if (el && el.getAttribute(name) !== value) el.setAttribute(name, value);
}
const pad2 = (n) => String(n).padStart(2, '0');
const pad3 = (n) => String(n).padStart(3, '0');
const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

/* Times are shown in one zone everywhere, UTC or the browser's local zone (the header's toggle,
 * #tz-toggle, kept in localStorage): clocks, the chart's axis and crosshair, the history table
 * and its From / To fields all read the zone through timeParts() and tzName(). */
const tz = { utc: (() => { try { return localStorage.getItem('bbo.tz') !== 'local'; } catch { return true; } })() };
/** {Y, M (0-11), D, h, m, s, ms} of epoch ms in the zone shown. */
function timeParts(ms) {
  const d = new Date(ms);
  return tz.utc
    ? { Y: d.getUTCFullYear(), M: d.getUTCMonth(), D: d.getUTCDate(), h: d.getUTCHours(), m: d.getUTCMinutes(), s: d.getUTCSeconds(), ms: d.getUTCMilliseconds() }
    : { Y: d.getFullYear(), M: d.getMonth(), D: d.getDate(), h: d.getHours(), m: d.getMinutes(), s: d.getSeconds(), ms: d.getMilliseconds() };
}
/** Offset of the zone shown from UTC at `ms` (ms; local = UTC + offset). */
const tzOffsetMs = (ms) => (tz.utc ? 0 : -new Date(ms).getTimezoneOffset() * 60e3);
/** The zone's label: "UTC", or "local UTC+01:00". */
function tzName(ms = Date.now()) {
  if (tz.utc) return 'UTC';
  const off = tzOffsetMs(ms) / 60e3, a = Math.abs(off);
  return `local UTC${off < 0 ? '-' : '+'}${pad2(Math.floor(a / 60))}:${pad2(a % 60)}`;
}
function fmtClock(ms, withMs = false) {
  const p = timeParts(ms);
  return `${pad2(p.h)}:${pad2(p.m)}:${pad2(p.s)}` + (withMs ? '.' + pad3(p.ms) : '');
}
function fmtDay(ms) {
  const p = timeParts(ms);
  return `${p.D} ${MONTHS[p.M]}`;
}
function fmtDateTime(ms, withMs = false) {
  const p = timeParts(ms);
  return `${p.Y}-${pad2(p.M + 1)}-${pad2(p.D)} ${fmtClock(ms, withMs)}`;
}
/** "YYYY-MM-DD HH:MM[:SS]" (24-hour, in the zone shown; a "T" may join date and time) -> epoch ms,
 *  or NaN when it is not such a time. */
function parseDateTime(text) {
  const m = /^\s*(\d{4})-(\d{1,2})-(\d{1,2})[ T](\d{1,2}):(\d{2})(?::(\d{2}))?\s*$/.exec(text || '');
  if (!m) return NaN;
  const [Y, M, D, h, mi, se] = m.slice(1).map((x) => Number(x || 0));
  if (M < 1 || M > 12 || D < 1 || D > 31 || h > 23 || mi > 59 || se > 59) return NaN;
  const ms = tz.utc ? Date.UTC(Y, M - 1, D, h, mi, se) : new Date(Y, M - 1, D, h, mi, se).getTime();
  return timeParts(ms).D === D ? ms : NaN;      // 31 Feb is no date
}
function fmtDuration(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60), h = Math.floor(m / 60), d = Math.floor(h / 24);
  if (d > 0) return `${d}d ${pad2(h % 24)}h ${pad2(m % 60)}m`;
  if (h > 0) return `${h}h ${pad2(m % 60)}m ${pad2(s % 60)}s`;
  return `${m}m ${pad2(s % 60)}s`;
}
function fmtAge(ms) {
  if (ms < 1000) return `${Math.max(0, ms) | 0} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 1 : 0)} s`;
  return fmtDuration(ms);
}
/** A span of time in words: "1 min", "1 h 30 min", "2 days". */
function fmtSpan(ms) {
  const m = Math.round(ms / 60e3);
  if (ms < 60e3) return `${Math.round(ms / 1000)} s`;
  if (m < 60) return `${m} min`;
  const h = Math.floor(m / 60), d = Math.floor(h / 24);
  if (d >= 1 && h % 24 === 0) return `${d} ${d === 1 ? 'day' : 'days'}`;
  return m % 60 ? `${h} h ${m % 60} min` : `${h} h`;
}
function fmtCountdown(ms) {
  const s = Math.max(0, Math.ceil(ms / 1000));
  return s < 60 ? `${s} s` : `${Math.floor(s / 60)} m ${pad2(s % 60)} s`;
}
function fmtCountdownShort(ms) {
  const s = Math.max(0, Math.ceil(ms / 1000));
  return s < 60 ? `${s}s` : `${Math.floor(s / 60)}m${pad2(s % 60)}s`;
}
function fmtMs(ms) {
  if (ms == null || !Number.isFinite(ms)) return '—';
  if (ms < 0 && ms > -0.05) ms = 0;   // ("-0.0 ms": a clock-corrected latency a hair below zero)
  return ms < 10 ? `${ms.toFixed(1)} ms` : `${Math.round(ms)} ms`;
}
const intFmt = new Intl.NumberFormat('en-US');
const fmtInt = (n) => intFmt.format(n);

/** Latency colour level: good / warn / bad (thresholds in ms). */
function level(ms, good, warn) {
  if (ms == null || !Number.isFinite(ms)) return 'none';
  return ms <= good ? 'good' : ms <= warn ? 'warn' : 'bad';
}
const RTT_LEVELS = [80, 250];
const HEALTH_CHECK_MS = 15000;   // how often /healthz is read for the persistence warning
const LATENCY_LEVELS = [100, 300];

/* Exact decimal arithmetic on the exchange's own digits ("104523.40"), so the
 * spread and mid never show binary floating-point noise. */
function decParse(s) {
  if (typeof s !== 'string' || !/^-?\d+(\.\d+)?$/.test(s)) return null;
  const i = s.indexOf('.');
  return { m: BigInt(i < 0 ? s : s.slice(0, i) + s.slice(i + 1)), d: i < 0 ? 0 : s.length - i - 1 };
}
function decFormat(m, d) {
  const neg = m < 0n;
  let s = (neg ? -m : m).toString();
  if (d > 0) {
    s = s.padStart(d + 1, '0');
    s = s.slice(0, -d) + '.' + s.slice(-d);
  }
  return (neg ? '-' : '') + s;
}
/** {spread, mid, bps, crossed, decimals} from bid/ask price strings, or null. */
function spreadMid(bidStr, askStr) {
  const b = decParse(bidStr), a = decParse(askStr);
  if (!b || !a) return null;
  const d = Math.max(a.d, b.d);
  const bm = b.m * 10n ** BigInt(d - b.d), am = a.m * 10n ** BigInt(d - a.d);
  const sum = am + bm;
  const mid = sum % 2n === 0n ? decFormat(sum / 2n, d) : decFormat(sum * 5n, d + 1);
  const bidF = Number(bidStr), askF = Number(askStr), midF = (bidF + askF) / 2;
  return { spread: decFormat(am - bm, d), mid, bps: midF > 0 ? ((askF - bidF) / midF) * 1e4 : NaN,
           crossed: am < bm, decimals: d };
}
function decimalsOf(s) {
  if (typeof s !== 'string') return 2;
  const i = s.indexOf('.');
  return i < 0 ? 0 : s.length - i - 1;
}
function fmtBps(bps) {
  if (!Number.isFinite(bps)) return '— bps';
  return `${bps < 0.1 ? bps.toFixed(3) : bps < 10 ? bps.toFixed(2) : bps.toFixed(1)} bps`;
}
/** A signed bps figure: "+0.012 bps", "−1.25 bps". */
function fmtSignedBps(bps) {
  if (!Number.isFinite(bps)) return '— bps';
  const a = Math.abs(bps);
  return `${bps > 0 ? '+' : bps < 0 ? '−' : '±'}${fmtBps(a)}`;
}
/** Microprice (Pa·Qb + Pb·Qa) / (Qa + Qb) from the exchange's strings, in exact decimals rounded
 *  half up to `digits` decimals (one more than the prices have: a computed value, shown with "≈"),
 *  and its lean from the mid in bps (a float: a small number). null without a two-sided quote. */
function microprice(bidStr, bidQtyStr, askStr, askQtyStr) {
  const b = decParse(bidStr), a = decParse(askStr), qb = decParse(bidQtyStr), qa = decParse(askQtyStr);
  if (!b || !a || !qb || !qa) return null;
  const dp = Math.max(a.d, b.d), dq = Math.max(qa.d, qb.d), digits = dp + 1;
  const up = (x, from, to) => x.m * 10n ** BigInt(to - from);
  const pa = up(a, a.d, dp), pb = up(b, b.d, dp), Qa = up(qa, qa.d, dq), Qb = up(qb, qb.d, dq);
  const den = Qa + Qb;
  if (den <= 0n) return null;
  // (pa·Qb + pb·Qa) / den is the price scaled by 10^dp; times 10 for `digits`, rounded half up
  const num = (pa * Qb + pb * Qa) * 10n;
  const r = (2n * num + den) / (2n * den);
  const value = decFormat(r, digits);
  const mid = (Number(bidStr) + Number(askStr)) / 2;
  return { value, leanBps: mid > 0 ? (Number(value) - mid) / mid * 1e4 : NaN };
}

// ###########################################################################
// §2 Connection: the Socket.IO client and its transports, the dashboard's socket, REST fetches
// ###########################################################################
// Engine.IO packets: 0 open, 1 close, 2 ping, 3 pong, 4 message, 5 upgrade, 6 noop;
// a polling payload joins packets with \x1e. Socket.IO packets ride in "4":
// <type>[<namespace>,][<ack id>][<JSON>], types 0 CONNECT, 1 DISCONNECT, 2 EVENT,
// 3 ACK, 4 CONNECT_ERROR (5/6 binary: unused by this server).
// Transport: WebSocket first (/socket.io/?EIO=4&transport=websocket); when it cannot
// open, long-polling (transport=polling). The server drives the heartbeat: it sends
// "2" every pingInterval and we answer "3"; after pingInterval + pingTimeout without
// any packet the connection is considered dead and we reconnect.
// Other namespaces (join) ride the same Engine.IO connection, as socket.io-client multiplexes
// them: "40/replay,{auth}" … "42/replay,[…]"; each has its own connected state and handlers,
// and is connected again (with its auth read anew) whenever the connection reopens.
// Connection state recovery (when the server offers it: a `pid` in the CONNECT answer of "/"):
// every event on "/" carries an offset as its last argument; the client keeps the pid and the
// last offset across a lost connection and sends them in the next CONNECT's auth, as
// socket.io-client does. The server then gives the same sid back (recovered) and first, before
// its CONNECT answer, the events missed meanwhile; they are held until the answer says whether
// the session was recovered, so the app learns that before it handles them.

/** Events on "/" held before its CONNECT answer: the server sends a recovered session at most
 *  256 KiB of missed updates there, so far fewer than this; more is a broken server. */
const SIO_EARLY_EVENTS_MAX = 50000;

class SocketIoClient {
  constructor({ path = '/socket.io/', mode = 'auto', onEvent, onState, onConnect, onDisconnect, auth, onUnauthorized }) {
    this.path = path;
    this.mode = mode;                 // auto | polling | websocket
    this.onEvent = onEvent || (() => {});
    this.onState = onState || (() => {});
    this.onConnect = onConnect || (() => {});
    this.onDisconnect = onDisconnect || (() => {});
    this.auth = auth || (() => null);  // the CONNECT packet's `auth` object (null: none is sent)
    // CONNECT_ERROR "unauthorized": (the auth object sent) -> a promise resolved when it is worth
    // trying again (a token was entered); meanwhile no reconnect is scheduled.
    this.onUnauthorized = onUnauthorized || null;
    this.waitingAuth = false;         // refused for its token: waiting for onUnauthorized
    this._sentAuth = null;            // the auth object of the last CONNECT
    this.state = 'idle';              // connecting | connected | reconnecting | offline
    this.transport = null;            // websocket | polling (while an Engine.IO session is open)
    this.sid = null;                  // Engine.IO session id
    this.socketId = null;             // Socket.IO socket id
    this.pid = null;                  // recovery: private session id of "/" (null: the server offers none)
    this.offset = null;               // recovery: offset of the last event received on "/" (a string)
    this.recovered = false;           // the last CONNECT of "/" took the session back (same sid)
    this.recoveredEvents = 0;         // events it got before the CONNECT answer (what was missed)
    this._early = [];                 // [name, args, ack, offset] on "/" before its CONNECT answer
    this.pingInterval = 25000;        // heartbeat timing (ms), as the server's open packet sets it
    this.pingTimeout = 20000;
    this.lastRx = 0;                  // client ms of the last packet received (0: no session)
    this.attempts = 0;                // failed attempts since the last successful connect
    this.reconnects = 0;              // successful reconnects after the first connect
    this.reconnectAt = null;          // ms of the next attempt while reconnecting
    this.connectedAt = null;          // client ms of the current connect (null while not connected)
    this.everConnected = false;       // a later connect is a reconnect
    this.wsFallbacks = 0;             // times the WebSocket could not open and polling took over
    this.lastReason = null;           // why the last connection was lost
    this.minDelay = 500;              // reconnect backoff (ms): minDelay * 2^attempts, capped, ±jitter
    this.maxDelay = 20000;
    this.jitter = 0.5;
    this._gen = 0;                    // invalidates callbacks of abandoned transports
    this._engine = null;              // the open transport: {name, send(packets), close(polite)}
    this._acks = new Map();           // ack id -> {cb, timer} of emits waiting for their ack
    this._ackId = 0;                  // last ack id used
    this._retryTimer = 0;
    this._connectTimer = 0;           // Socket.IO CONNECT must be answered within 10 s
    this._stopped = false;            // close() was called: a lost connection is not retried
    this._spaces = new Map();         // namespace -> {handlers, connected} of join()ed namespaces other than "/"
    this._watchdog = setInterval(() => this._checkHeartbeat(), 1000);
  }

  url(transport) {
    const proto = transport === 'websocket' ? (location.protocol === 'https:' ? 'wss:' : 'ws:') : location.protocol;
    return `${proto}//${location.host}${this.path}?EIO=4&transport=${transport}`;
  }

  connect() {
    this._stopped = false;
    this._open();
  }

  /** Reconnect at once (e.g. the browser came back online). */
  retryNow() {
    if (this.state === 'reconnecting' || this.state === 'offline') {
      clearTimeout(this._retryTimer);
      this._open();
    }
  }

  close() {
    this._stopped = true;
    this.pid = this.offset = null;    // a socket closed on purpose is not taken back
    clearTimeout(this._retryTimer);
    const e = this._engine;
    this._engine = null;
    this._gen++;
    if (e) e.close(true);
  }

  /** emit(event, ...args[, ack]) — an ack function gets (err, ...args). */
  emit(event, ...args) {
    return this.emitTo('/', event, ...args);
  }

  /** emit() in the namespace `nsp` ("/" or one join()ed and connected). */
  emitTo(nsp, event, ...args) {
    const cb = typeof args[args.length - 1] === 'function' ? args.pop() : null;
    const space = this._spaces.get(nsp);
    if (nsp === '/' ? this.state !== 'connected' : !(space && space.connected)) {
      if (cb) cb(new Error('not connected'));
      return false;
    }
    let id = '';
    if (cb) {
      const n = ++this._ackId;
      id = String(n);
      const timer = setTimeout(() => {
        if (this._acks.delete(n)) cb(new Error('ack timeout'));
      }, 10000);
      this._acks.set(n, { cb, timer });
    }
    this._send('42' + (nsp === '/' ? '' : nsp + ',') + id + JSON.stringify([event, ...args]));
    return true;
  }

  /** Connect the namespace `nsp` too, now or when the connection opens (and again on each reopen).
   *  Handlers: auth() -> the CONNECT's auth object; onConnect(data); onEvent(name, args);
   *  onConnectError(message) (refused: it is left); onDisconnect(reason) (the server left it: it
   *  is left; the connection was lost: it stays joined and connects again with the connection). */
  join(nsp, handlers) {
    this.leave(nsp);
    this._spaces.set(nsp, { ...handlers, connected: false });
    if (this._engine && this.sid) this._connectSpace(nsp);
  }

  /** Leave a namespace join()ed (its handlers get nothing more). */
  leave(nsp) {
    const space = this._spaces.get(nsp);
    if (!space) return;
    this._spaces.delete(nsp);
    if (this._engine && this.sid) this._send(`41${nsp},`);
  }

  _connectSpace(nsp) {
    const a = this._spaces.get(nsp).auth();
    this._send(`40${nsp},` + (a ? JSON.stringify(a) : ''));
  }

  _setState(s) {
    if (this.state === s) return;
    this.state = s;
    this.onState(s);
  }

  _send(packet) {
    if (this._engine) this._engine.send([packet]);
  }

  _open() {
    clearTimeout(this._retryTimer);
    this.reconnectAt = null;
    this._setState(this.everConnected ? 'reconnecting' : 'connecting');
    if (this.mode === 'polling' || typeof WebSocket !== 'function') this._openPolling();
    else this._openWebSocket(this.mode !== 'websocket');
  }

  _openWebSocket(allowFallback) {
    const gen = ++this._gen;
    let opened = false;
    let ws;
    const fail = (why) => {
      if (gen !== this._gen) return;
      clearTimeout(openTimer);
      detach();
      if (!opened && allowFallback) {   // the WebSocket cannot open: fall back to long-polling now
        this.wsFallbacks++;
        this._openPolling();
      } else {
        this._lost(why);
      }
    };
    const detach = () => {
      if (!ws) return;
      ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
      try { ws.close(); } catch { /* already closed */ }
    };
    const openTimer = setTimeout(() => fail('websocket open timeout'), 6000);
    try {
      ws = new WebSocket(this.url('websocket'));
    } catch {
      fail('websocket refused');
      return;
    }
    this._engine = {
      name: 'websocket',
      send: (packets) => { if (ws.readyState === 1) for (const p of packets) ws.send(p); },
      close: (polite) => {
        clearTimeout(openTimer);
        if (polite && ws.readyState === 1) { try { ws.send('1'); } catch { /* ignore */ } }
        detach();
      },
    };
    ws.onmessage = (ev) => {
      if (gen !== this._gen || typeof ev.data !== 'string') return;
      if (!opened && ev.data[0] === '0') {
        opened = true;
        clearTimeout(openTimer);
        this.transport = 'websocket';
      }
      this._onPacket(ev.data);
    };
    ws.onerror = () => fail('websocket error');
    ws.onclose = () => fail('websocket closed');
  }

  _openPolling() {
    const gen = ++this._gen;
    const ctl = new AbortController();
    const base = this.url('polling');
    let sid = null;
    let closed = false;
    let queue = [];
    let posting = false;
    const fail = (why) => {
      if (closed || gen !== this._gen) return;
      closed = true;
      ctl.abort();
      this._lost(why);
    };
    const flush = async () => {
      if (posting || closed || !sid || !queue.length) return;
      posting = true;
      const body = queue.join('\x1e');
      queue = [];
      try {
        const r = await fetch(`${base}&sid=${encodeURIComponent(sid)}`, {
          method: 'POST', body, cache: 'no-store', signal: ctl.signal,
          headers: { 'Content-Type': 'text/plain;charset=UTF-8' },
        });
        await r.text();
        if (!r.ok) throw new Error(`POST ${r.status}`);
      } catch {
        posting = false;
        fail('polling POST failed');
        return;
      }
      posting = false;
      flush();
    };
    this._engine = {
      name: 'polling',
      send: (packets) => { queue.push(...packets); flush(); },
      close: (polite) => {
        if (polite && sid && !closed) {
          // Tell the server we are leaving; keepalive lets it outlive the page.
          fetch(`${base}&sid=${encodeURIComponent(sid)}`, { method: 'POST', body: '1', keepalive: true,
            headers: { 'Content-Type': 'text/plain;charset=UTF-8' } }).catch(() => {});
        }
        closed = true;
        ctl.abort();
      },
    };
    const poll = async () => {
      while (!closed && gen === this._gen) {
        let text;
        try {
          const r = await fetch(sid ? `${base}&sid=${encodeURIComponent(sid)}` : base,
                                { cache: 'no-store', signal: ctl.signal });
          text = await r.text();
          if (!r.ok) throw new Error(`GET ${r.status}`);
        } catch {
          fail(sid ? 'polling GET failed' : 'polling handshake failed');
          return;
        }
        if (closed || gen !== this._gen) return;
        for (const p of text.split('\x1e')) {
          if (!p) continue;
          if (!sid && p[0] === '0') {
            try { sid = JSON.parse(p.slice(1)).sid; } catch { /* handled below */ }
            this.transport = 'polling';
          }
          this._onPacket(p);
          if (closed || gen !== this._gen) return;
        }
        if (!sid) { fail('bad handshake'); return; }
        flush();
      }
    };
    poll();
  }

  _checkHeartbeat() {
    if (this._engine && this.sid && this.lastRx &&
        Date.now() - this.lastRx > this.pingInterval + this.pingTimeout) {
      this._lost('heartbeat timeout');
    }
  }

  _onPacket(p) {
    this.lastRx = Date.now();
    switch (p[0]) {
      case '0': {
        let o = {};
        try { o = JSON.parse(p.slice(1)); } catch { /* keep defaults */ }
        this.sid = o.sid || null;
        if (o.pingInterval > 0) this.pingInterval = o.pingInterval;
        if (o.pingTimeout > 0) this.pingTimeout = o.pingTimeout;
        this._sentAuth = this.auth();
        if (this.pid && this.offset != null) this._sentAuth = { ...this._sentAuth, pid: this.pid, offset: this.offset };
        this._early = [];
        this._send('40' + (this._sentAuth ? JSON.stringify(this._sentAuth) : ''));   // Socket.IO CONNECT to "/"
        for (const nsp of this._spaces.keys()) this._connectSpace(nsp);
        clearTimeout(this._connectTimer);
        this._connectTimer = setTimeout(() => this._lost('connect timeout'), 10000);
        break;
      }
      case '2': this._send('3' + p.slice(1)); break;   // heartbeat: answer ping with pong
      case '1': this._lost('server closed the session'); break;
      case '4': this._onSio(p.slice(1)); break;
      default: break;                                 // 3 pong, 6 noop
    }
  }

  _onSio(s) {
    const type = s[0];
    if (type === '5' || type === '6') return;      // binary packets: not used by this server
    let i = 1;
    let nsp = '/';
    if (s[i] === '/') {
      const j = s.indexOf(',', i);
      nsp = s.slice(i, j < 0 ? s.length : j);
      i = j < 0 ? s.length : j + 1;
    }
    let id = null;
    let j = i;
    while (j < s.length && s.charCodeAt(j) >= 48 && s.charCodeAt(j) <= 57) j++;
    if (j > i) { id = Number(s.slice(i, j)); i = j; }
    let data;
    if (i < s.length) {
      try { data = JSON.parse(s.slice(i)); } catch { return; }
    }
    if (nsp !== '/' && type !== '3') { this._onSpacePacket(nsp, type, data); return; }
    switch (type) {
      case '0': {
        clearTimeout(this._connectTimer);
        const sid = data && data.sid;
        const pid = data && typeof data.pid === 'string' ? data.pid : null;
        const sentPid = this._sentAuth && this._sentAuth.pid;
        this.recovered = !!sentPid && pid === sentPid && sid === this.socketId;
        this.socketId = sid;
        this.pid = pid;
        if (!pid) this.offset = null;
        const early = this._early;
        this._early = [];
        this.recoveredEvents = this.recovered ? early.length : 0;
        if (this.everConnected) this.reconnects++;
        this.everConnected = true;
        this.attempts = 0;
        this.connectedAt = Date.now();
        this._setState('connected');
        // The app hears first whether it was recovered (then it keeps its live state), then the
        // missed events, in their order.
        this.onConnect(this.recovered);
        for (const [name, args, ack, offset] of early) this._deliver(name, args, ack, offset);
        break;
      }
      case '1': this._lost('server disconnected the socket'); break;
      case '2':
        if (Array.isArray(data) && typeof data[0] === 'string') {
          const ack = id == null ? null : (...args) => this._send('43' + id + JSON.stringify(args));
          const args = data.slice(1);
          // recovery on: the last argument is the offset, not the event's (it stays with us)
          const offset = this.pid && typeof args[args.length - 1] === 'string' ? args.pop() : null;
          if (this.state === 'connected') this._deliver(data[0], args, ack, offset);
          else if (this._early.length < SIO_EARLY_EVENTS_MAX) this._early.push([data[0], args, ack, offset]);
          else this._lost('too many events before the CONNECT answer');
        }
        break;
      case '3': {
        const a = this._acks.get(id);
        if (a) {
          this._acks.delete(id);
          clearTimeout(a.timer);
          a.cb(null, ...(Array.isArray(data) ? data : [data]));
        }
        break;
      }
      case '4': {
        const message = (data && data.message) || 'refused';
        this._lost(`connect error: ${message}`);
        if (message === 'unauthorized' && this.onUnauthorized) {
          // The same token would be refused again: no backoff retry, but one at once when a token is entered.
          clearTimeout(this._retryTimer);
          this.reconnectAt = null;
          this.waitingAuth = true;
          this.onUnauthorized(this._sentAuth).then(() => {
            this.waitingAuth = false;
            this.retryNow();
          });
        }
        break;
      }
      default: break;
    }
  }

  /** An event on "/" to the app; its offset counts as seen only now (held ones lost with the
   *  connection are asked for again). */
  _deliver(name, args, ack, offset) {
    if (offset != null) this.offset = offset;
    this.onEvent(name, args, ack);
  }

  /** A packet of a join()ed namespace (acks are shared: their ids are unique across namespaces). */
  _onSpacePacket(nsp, type, data) {
    const space = this._spaces.get(nsp);
    if (!space) return;                             // left: what was already on its way is dropped
    switch (type) {
      case '0': space.connected = true; space.onConnect(data); break;
      case '1': this._spaces.delete(nsp); space.onDisconnect('the server ended it'); break;
      case '2':
        if (Array.isArray(data) && typeof data[0] === 'string') space.onEvent(data[0], data.slice(1));
        break;
      case '4': this._spaces.delete(nsp); space.onConnectError((data && data.message) || 'refused'); break;
      default: break;
    }
  }

  _lost(reason) {
    if (this._stopped) return;
    for (const space of this._spaces.values()) {
      if (space.connected) { space.connected = false; space.onDisconnect(reason); }
    }
    const e = this._engine;
    this._engine = null;
    this._gen++;
    if (e) e.close(false);
    clearTimeout(this._connectTimer);
    for (const a of this._acks.values()) { clearTimeout(a.timer); a.cb(new Error('disconnected')); }
    this._acks.clear();
    const wasConnected = this.state === 'connected';
    this.transport = null;
    this.sid = null;
    this.lastRx = 0;
    this.connectedAt = null;
    this.lastReason = reason;
    if (wasConnected) this.onDisconnect(reason);
    // Exponential backoff with jitter: minDelay * 2^attempts, capped, ±jitter.
    const base = Math.min(this.maxDelay, this.minDelay * 2 ** Math.min(this.attempts, 16));
    const delay = Math.round(base * (1 - this.jitter + Math.random() * 2 * this.jitter));
    this.attempts++;
    this.reconnectAt = Date.now() + delay;
    this._setState(navigator.onLine === false ? 'offline' : 'reconnecting');
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => this._open(), delay);
  }
}

// --- the access token: asked for once, kept for the tab, sent with every request --------------
// A server started with AUTH_TOKEN refuses the Socket.IO CONNECT ("unauthorized") and answers
// the REST API 401. Either makes the page ask (a form, #auth-dialog); the token lives in
// sessionStorage (this tab only, gone when it closes) and goes in the CONNECT's `auth` and in
// `Authorization: Bearer` on every REST fetch, never in a URL (URLs reach logs and history).

const AUTH_STORAGE_KEY = 'bbo.token';
const auth = {
  token: '',            // '' : none known (the server may not need one)
  asking: false,        // the dialog is open
  waiters: [],          // resolve functions of what waits for a token (refused fetches, the socket)
};
try { auth.token = sessionStorage.getItem(AUTH_STORAGE_KEY) || ''; } catch { /* storage blocked: ask each load */ }

const authHeaders = () => (auth.token ? { Authorization: `Bearer ${auth.token}` } : {});

/** The server refused `sent` ('' : no token was sent). Resolves once a token worth trying is known:
 *  at once if another was entered since `sent` went out, else when the user enters one. */
function needToken(sent) {
  if (auth.token && auth.token !== sent) return Promise.resolve();
  if (auth.token) {                         // the token kept is wrong: forget it
    auth.token = '';
    try { sessionStorage.removeItem(AUTH_STORAGE_KEY); } catch { /* ignore */ }
  }
  if (!auth.asking) askToken(sent ? 'The server did not accept that token. Enter it again.'
                                  : 'This server needs an access token to show its data.');
  return new Promise((resolve) => auth.waiters.push(resolve));
}

function askToken(message) {
  auth.asking = true;
  setText($('auth-message'), message);
  const dialog = $('auth-dialog');
  $('auth-token').value = '';
  if (!dialog.open) dialog.showModal();
  $('auth-token').focus();
  dirty.status = true;
  requestFrame();
}

function initAuth() {
  // Escape would close the dialog and leave the page waiting for ever: the token is the way on.
  $('auth-dialog').addEventListener('cancel', (e) => e.preventDefault());
  $('auth-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const token = $('auth-token').value.trim();
    if (!token) return;
    auth.token = token;
    try { sessionStorage.setItem(AUTH_STORAGE_KEY, token); } catch { /* kept in memory only */ }
    auth.asking = false;
    $('auth-dialog').close();
    const waiters = auth.waiters;
    auth.waiters = [];
    for (const resolve of waiters) resolve();
  });
}

/** fetch() of a REST URL with the token; a 401 asks for one, then tries again with it. */
async function apiFetch(url, opts = {}) {
  for (;;) {
    const sent = auth.token;
    const r = await fetch(url, { cache: 'no-store', ...opts, headers: { ...(opts.headers || {}), ...authHeaders() } });
    if (r.status !== 401) return r;
    await r.body?.cancel();
    await needToken(sent);
  }
}

async function fetchJson(url, opts = {}) {
  const r = await apiFetch(url, opts);
  let body = null;
  try { body = await r.json(); } catch { /* not JSON */ }
  if (!r.ok) {
    const err = new Error((body && body.error) || `HTTP ${r.status}`);
    err.status = r.status;
    throw err;
  }
  return body;
}

// --- the dashboard's socket: server events go to the store (§3) ----------------------------

const socket = new SocketIoClient({
  mode: ['polling', 'websocket'].includes(params.get('transport')) ? params.get('transport') : 'auto',
  // Only `token` is ours in the auth object; a server without AUTH_TOKEN ignores it.
  auth: () => (auth.token ? { token: auth.token } : null),
  onUnauthorized: (sent) => needToken((sent && sent.token) || ''),
  onState: (s) => { state.conn.state = s; state.conn.transport = socket.transport; dirty.status = dirty.tabs = dirty.feedEdit = true; requestFrame(); },
  onConnect: (recovered) => { state.conn.transport = socket.transport; onConnect(recovered); },
  onDisconnect,
  onEvent: (name, args) => {
    state.stats.messages++;
    const a = args[0];
    switch (name) {
      case 'bbo_update': onBboUpdate(a); break;
      case 'feed_status': onFeedStatus(a); break;
      case 'welcome': onWelcome(a); break;
      case 'gap': onGap(a); break;
      case 'pong': break;                    // the RTT comes from the ping ack
      default: break;
    }
  },
});

let rttInFlight = false;
function measureRtt() {
  if (rttInFlight || socket.state !== 'connected') return;
  rttInFlight = true;
  const t0 = Date.now(), p0 = performance.now();
  socket.emit('ping', (err, res) => {
    rttInFlight = false;
    if (err) return;
    const rtt = performance.now() - p0;
    const c = state.conn;
    c.rtt = rtt;
    c.rttAvg = c.rttAvg == null ? rtt : c.rttAvg * 0.8 + rtt * 0.2;
    if (res && Number.isFinite(res.time)) {
      const offset = res.time - (t0 + rtt / 2);
      // keep the estimate from the fastest round trips (least queueing)
      if (!c.clockSynced || rtt <= (c.bestRtt ?? Infinity) * 1.5) {
        c.clockOffset = c.clockSynced ? c.clockOffset * 0.7 + offset * 0.3 : offset;
        c.bestRtt = Math.min(c.bestRtt ?? Infinity, rtt);
        c.clockSynced = true;
      }
    }
    dirty.status = true;
    requestFrame();
  });
}

// ###########################################################################
// §3 State: the per-symbol store, what each server event changes in it, its localStorage copy
// ###########################################################################

const MAX_POINTS = 1_000_000;

/** Live points of one symbol: time (server ms), bid, ask in growing typed arrays.
 *  Sorted by time; when full, the oldest 10 % are dropped. */
class PointBuffer {
  constructor() {
    this.cap = 4096;
    this.n = 0;
    this.t = new Float64Array(this.cap);
    this.bid = new Float64Array(this.cap);
    this.ask = new Float64Array(this.cap);
    this.gaps = [];            // client-side gaps [{start, end, kind, reason}] (disconnects, reloads)
  }
  _grow(min) {
    if (this.cap >= MAX_POINTS) {  // full: drop the oldest tenth
      const drop = Math.ceil(this.n / 10);
      this.t.copyWithin(0, drop, this.n);
      this.bid.copyWithin(0, drop, this.n);
      this.ask.copyWithin(0, drop, this.n);
      this.n -= drop;
      return;
    }
    const cap = Math.min(MAX_POINTS, Math.max(min, this.cap * 2));
    for (const k of ['t', 'bid', 'ask']) {
      const a = new Float64Array(cap);
      a.set(this[k].subarray(0, this.n));
      this[k] = a;
    }
    this.cap = cap;
  }
  /** Append a point; returns false when it is older than the newest one (ignored). */
  push(t, bid, ask) {
    if (this.n && t < this.t[this.n - 1]) return false;
    if (this.n === this.cap) this._grow(this.n + 1);
    this.t[this.n] = t;
    this.bid[this.n] = bid;
    this.ask[this.n] = ask;
    this.n++;
    return true;
  }
  clear() { this.n = 0; this.gaps = []; }
  /** Drop the points at or after `t`. */
  truncate(t) { this.n = this.lowerBound(t); }
  first() { return this.n ? this.t[0] : NaN; }
  last() { return this.n ? this.t[this.n - 1] : NaN; }
  /** First index with t >= x. */
  lowerBound(x) {
    let lo = 0, hi = this.n;
    const t = this.t;
    while (lo < hi) { const m = (lo + hi) >>> 1; if (t[m] < x) lo = m + 1; else hi = m; }
    return lo;
  }
}

const state = {
  symbols: [],                         // known symbols (sorted)
  current: null,                       // selected symbol
  bbo: Object.create(null),            // symbol -> last bbo_update payload (exact strings)
  feed: null,                          // last feed_status object
  persistence: null,                   // /healthz's persistence object: is the history being saved?
  feedAt: 0,                           // client ms when it arrived
  feedOutages: [],                     // [{start, end|null, reason}] seen live from feed_status (server ms)
  welcome: null,                       // the server's welcome payload ({message, feedEdit, maxFeedSymbols, recoverySeconds})
  clock: null,                         // the server's clock check ({offsetMs, uncertaintyMs, source, measuredAt, warning})
  lastRecv: Object.create(null),       // symbol -> client ms of the last bbo_update received live
  symRate: Object.create(null),        // symbol -> {counts: updates per second over the last 10 s (ring), rate}
  browserLeg: Object.create(null),     // symbol -> server -> browser ms of its last update (server clock)
  conn: {
    state: 'connecting',               // connecting | connected | reconnecting | offline (the socket's)
    transport: null,                   // websocket | polling while connected
    connectedAt: null,                 // client ms of the last connect
    disconnectedAt: null,              // server ms the connection was lost: the chart shades from there
    lostAt: null,                      // server ms the last connection was lost (kept after the reconnect)
    reconnect: null,                   // how the last reconnect went: {recovered, missed, skipped} (null: none yet)
    rtt: null,                         // last ping round trip (ms)
    rttAvg: null,                      // smoothed round trip (ms)
    clockOffset: 0,                    // server clock minus client clock (ms), from the ping acks
    clockSynced: false,                // clockOffset holds a first estimate
    bestRtt: null,                     // fastest round trip seen: much slower ones (queued) do not move the offset
  },
  stats: {
    messages: 0,                       // Socket.IO events received
    bboMessages: 0,                    // of them bbo_update
    rate: 0,                           // events per second (smoothed)
    lastLatency: null,                 // backendLatency of the last bbo_update (ms)
    latSum: new Float64Array(10),      // backendLatency sums / counts per second, last 10 s (ring)
    latCount: new Uint32Array(10),
    latSecond: 0,                      // seconds since load: latSecond % 10 is the ring's current slot
  },
  points: Object.create(null),         // symbol -> PointBuffer
  session: Object.create(null),        // symbol -> live session (sessionFor)
};

/** The server's clock, estimated from ping acks (chart times are server times). */
const serverNow = () => Date.now() + state.conn.clockOffset;

function pointsFor(sym) {
  return state.points[sym] || (state.points[sym] = new PointBuffer());
}

function addSymbol(sym) {
  if (!sym || state.symbols.includes(sym)) return false;
  state.symbols.push(sym);
  state.symbols.sort();
  return true;
}

function feedState() {
  return state.feed ? state.feed.state : 'unknown';
}

/** True when the price of `sym` is live: server connected, feed live, symbol live, data present. */
function isLive(sym) {
  if (state.conn.state !== 'connected' || !state.feed || state.feed.state !== 'live') return false;
  const st = symbolState(sym);
  if (st && st !== 'live') return false;
  return !!state.bbo[sym];
}

/** Server ms of the last update of `sym` known here (received, or as the feed status says), or null. */
function lastUpdateAt(sym) {
  const p = state.bbo[sym];
  const s = state.feed && state.feed.symbols && state.feed.symbols[sym];
  const a = p ? (p.serverTimestamp ?? p.timestamp) : null, b = s && Number.isFinite(s.lastMessage) ? s.lastMessage : null;
  return a == null ? b : b == null ? a : Math.max(a, b);
}

/** The state of `sym` as the server judges it ("waiting" | "live" | "suspect" | "quiet"; null: not
 *  said), brought up to date between two feed statuses: an update received after the status proves
 *  the symbol is flowing again, and a live symbol silent for longer than its suspectAfterMs is
 *  suspect now (the server's next status will say so). */
function symbolState(sym) {
  const s = state.feed && state.feed.symbols && state.feed.symbols[sym];
  if (!s || !s.state) return null;
  let st = s.state;
  if (st !== 'live' && state.lastRecv[sym] > state.feedAt) st = 'live';
  if (st === 'live' && s.suspectAfterMs > 0) {
    const last = lastUpdateAt(sym);
    if (last != null && serverNow() - last > s.suspectAfterMs) st = 'suspect';
  }
  return st;
}

function sessionFor(sym) {
  return state.session[sym] || (state.session[sym] = {
    start: null,       // first live point since the (re)connect: from here the live buffer is complete
    startBeforeLoss: null,  // start when the connection was lost: a recovered session keeps it
    gapFrom: null,     // while not live: where the missing data begins, marked as a gap once it resumes
    gapReason: null,   // why it is missing (the chart's tooltip)
  });
}

/** From when the live buffer holds every update of `sym` (Infinity: not live). */
function liveSince(sym) {
  const sess = state.session[sym];
  return sess && sess.start != null ? sess.start : Infinity;
}

let rateLast = { t: performance.now(), n: 0 };
/** Once a second: the smoothed message rate, and the 10 s latency ring moves on by one second. */
function tickStats() {
  const st = state.stats;
  const nowP = performance.now();
  const dt = (nowP - rateLast.t) / 1000;
  if (dt > 0) {
    const inst = (st.messages - rateLast.n) / dt;
    st.rate = st.rate ? st.rate * 0.6 + inst * 0.4 : inst;
    rateLast = { t: nowP, n: st.messages };
  }
  // per symbol: the last 10 whole seconds (fewer just after load)
  const secs = Math.min(10, st.latSecond + 1);
  for (const r of Object.values(state.symRate)) {
    let n = 0;
    for (let i = 0; i < 10; i++) n += r.counts[i];
    r.rate = n / secs;
  }
  st.latSecond++;
  st.latSum[st.latSecond % 10] = 0;
  st.latCount[st.latSecond % 10] = 0;
  for (const r of Object.values(state.symRate)) r.counts[st.latSecond % 10] = 0;
}

// --- server events: each updates the store, marks what must repaint and asks for a frame ------

function onBboUpdate(p) {
  if (!p || typeof p !== 'object' || typeof p.symbol !== 'string') return;
  const sym = p.symbol;
  state.stats.bboMessages++;
  if (addSymbol(sym)) {
    dirty.symbols = true;
    if (!state.current) selectSymbol(sym);
  }
  const prev = state.bbo[sym];
  const t = p.serverTimestamp ?? p.timestamp;
  if (prev && (prev.serverTimestamp ?? prev.timestamp) > t) return;   // older than what we show
  state.bbo[sym] = p;
  if (p.backendLatency != null) {
    const st = state.stats;
    st.lastLatency = p.backendLatency;
    const i = st.latSecond % 10;
    st.latSum[i] += p.backendLatency;
    st.latCount[i]++;
  }
  state.lastRecv[sym] = Date.now();
  const sr = state.symRate[sym] || (state.symRate[sym] = { counts: new Uint32Array(10), rate: 0 });
  sr.counts[state.stats.latSecond % 10]++;
  // server -> browser: received now (on the server's clock, as estimated from round trips) minus
  // emitted; the estimate of the clock can be off by half the fastest round trip either way
  state.browserLeg[sym] = Number.isFinite(p.emitTimestamp) && state.conn.clockSynced
    ? { ms: serverNow() - p.emitTimestamp, uncertainty: state.conn.bestRtt / 2 } : null;
  const pb = pointsFor(sym);
  const sess = sessionFor(sym);
  const bid = Number(p.bidPrice), ask = Number(p.askPrice);
  if (pb.push(t, bid, ask)) {
    if (sess.start == null) {
      sess.start = t;
      if (sess.gapFrom != null && t > sess.gapFrom) pb.gaps.push({ start: sess.gapFrom, end: t, kind: 'client', reason: sess.gapReason || 'no data' });
      sess.gapFrom = null;
      if (sym === state.current) scheduleBackfill(100);
    }
    if (sym === state.current && (chart.view.follow || t <= chart.view.end)) chart.dirty = true;
  }
  if (sym === state.current) dirty.bbo = true;
  dirty.tabs = true;
  requestFrame();
}

function onFeedStatus(f) {
  if (!f || typeof f !== 'object' || !f.state) return;
  const prev = state.feed ? state.feed.state : null;
  state.feed = f;
  state.feedAt = Date.now();
  if (f.clock) state.clock = f.clock;
  dirty.feedEdit = true;
  // remember feed outages seen live so the chart shades them before the server's history has them
  // (the outage starts at the last data message: `since` is the start of the shard state, which for a
  // stale feed is still the time it went live)
  const open = state.feedOutages.find((o) => o.end == null);
  if (f.state !== 'live' && f.state !== 'connecting' && !open && state.stats.bboMessages > 0) {
    const start = f.lastMessageAge != null ? serverNow() - f.lastMessageAge : (f.since || serverNow());
    state.feedOutages.push({ start, end: null, reason: f.reason || f.state });
  } else if (f.state === 'live' && open) {
    open.end = Math.max(open.start, Math.min(serverNow(), f.since > open.start ? f.since : serverNow()));
  }
  if (prev !== f.state) chart.dirty = true;
  dirty.status = dirty.bbo = dirty.tabs = true;
  requestFrame();
}

function onWelcome(w) {
  state.welcome = w && typeof w === 'object' ? w : null;
  dirty.feedEdit = dirty.status = true;
  requestFrame();
}

/** `recovered`: the server took the session back and sends every update missed meanwhile
 *  (right after this), so the live buffers stay complete across the loss: nothing restarts. */
function onConnect(recovered) {
  state.conn.connectedAt = Date.now();
  state.conn.disconnectedAt = null;
  if (socket.reconnects) state.conn.reconnect = { recovered, missed: socket.recoveredEvents, skipped: 0 };
  for (const s of Object.values(state.session)) {
    s.start = recovered ? s.startBeforeLoss : null;
    if (recovered) s.gapFrom = null;
  }
  socket.emit('ready');
  if (!recovered) socket.emit('request_initial_data');   // recovered: the latest updates would come twice
  measureRtt();
  chart.dirty = true;
  dirty.status = true;
  requestFrame();
}

function onDisconnect(reason) {
  const now = serverNow();
  state.conn.disconnectedAt = state.conn.lostAt = now;
  for (const sym of Object.keys(state.session)) {
    const s = state.session[sym];
    const pb = state.points[sym];
    s.startBeforeLoss = s.start;
    s.start = null;
    s.gapFrom = pb && pb.n ? Math.max(pb.last(), now - 1) : now;
    s.gapReason = `server connection lost (${reason})`;
  }
  // the feed state is unknown while we are disconnected
  chart.dirty = true;
  dirty.status = dirty.bbo = dirty.tabs = true;
  requestFrame();
}

/** A recovered session missed more updates than the server sends back: it sends the newest of
 *  each symbol (right after this) and counts the others. The live buffers miss them, so from the
 *  loss on they are incomplete, as after a new session: a gap up to each symbol's next update. */
function onGap(g) {
  const skipped = g && Number.isFinite(g.skipped) ? g.skipped : 0;
  if (state.conn.reconnect) state.conn.reconnect.skipped += skipped;
  const lostAt = state.conn.lostAt ?? serverNow();
  for (const [sym, s] of Object.entries(state.session)) {
    const pb = state.points[sym];
    s.start = null;
    s.gapFrom = pb && pb.n ? Math.max(pb.last(), lostAt - 1) : lostAt;
    s.gapReason = `${fmtInt(skipped)} updates skipped while disconnected`;
  }
  chart.dirty = true;
  dirty.status = true;
  requestFrame();
}

// --- replay: a recorded range played back through /replay, kept apart from the live store -----
// While replay.on, the prices, tabs, chart, pill and title show this store, never the live one;
// live events keep updating the live store meanwhile, so stopping the replay shows it intact.

const REPLAY_NAMESPACE = '/replay';
const replay = {
  on: false,                           // the page shows the replay (from the click on Replay until Stop)
  phase: 'idle',                       // connecting | playing | paused | done | interrupted (connection lost)
  symbols: [],                         // what it plays (merged in time order by the server)
  from: 0, to: 0,                      // the range (ms on the replay's clock), inclusive
  speed: 10,                           // replay ms per wall ms; 0: as fast as the page reads
  clock: 'server',                     // "server" (serverTimestamp) | "exchange" (T, else E)
  position: null,                      // the last replay_status's position (ms), null before the first
  statusAt: 0,                         // client ms it arrived: a playing replay moves on from there
  lastRowAt: -Infinity,                // time of the newest row received (ms on the replay's clock)
  bbo: Object.create(null),            // symbol -> last replayed bbo_update (exact strings)
  points: Object.create(null),         // symbol -> PointBuffer of replayed points
  outages: [],                         // [{symbol, start, end, reason}] announced by the replay
  skipped: [],                         // [{start, end}] jumped over by a seek forward: no line across them
  pauseOnReconnect: false,             // it was paused when the connection was lost: pause it again
  rows: 0,                             // bbo_update events received in this replay
  savedView: null,                     // the chart's view before the replay (given back at Stop)
};

/** A replayed row's time on the replay's clock (the one its range and positions are on). */
function replayTime(p) {
  return replay.clock === 'exchange' ? (p.transactionTime ?? p.timestamp) : (p.serverTimestamp ?? p.timestamp);
}

/** Where the replay is now (ms): the last status's position moved on at its speed while playing,
 *  never behind the rows already received, within the range. */
function replayPosition() {
  if (replay.position == null) return replay.from;
  let pos = replay.position;
  if (replay.phase === 'playing' && replay.speed > 0) pos += (Date.now() - replay.statusAt) * replay.speed;
  return clamp(Math.max(pos, replay.lastRowAt), replay.from, replay.to);
}

/** The price shown for `sym`: the replayed one during a replay, else the live one. */
const shownBbo = (sym) => (replay.on ? replay.bbo[sym] : state.bbo[sym]);

/** Forget what was replayed (a new replay). */
function clearReplayed() {
  replay.bbo = Object.create(null);
  replay.points = Object.create(null);
  replay.skipped = [];
  replay.lastRowAt = -Infinity;
}

/** A seek to `time`: the rows come again from there. The chart keeps what was replayed before it
 *  (a jump forward leaves a gap: the rows skipped were never drawn); the prices wait for the next
 *  row, since the last one received is not the price at `time`. */
function replaySeeked(time, from) {
  if (time > from) replay.skipped.push({ start: from, end: time });
  else replay.skipped = replay.skipped.filter((g) => g.end < time);
  for (const pb of Object.values(replay.points)) pb.truncate(time);
  replay.bbo = Object.create(null);
  replay.lastRowAt = -Infinity;
}

function onReplayUpdate(p) {
  if (!replay.on || !p || typeof p !== 'object' || typeof p.symbol !== 'string' || p.replay !== true) return;
  const sym = p.symbol;
  const t = replayTime(p);
  replay.rows++;
  replay.bbo[sym] = p;
  if (t > replay.lastRowAt) replay.lastRowAt = t;
  const pb = replay.points[sym] || (replay.points[sym] = new PointBuffer());
  pb.push(t, Number(p.bidPrice), Number(p.askPrice));
  if (sym === state.current) { dirty.bbo = true; chart.dirty = true; }
  dirty.tabs = dirty.replay = true;
  requestFrame();
}

function onReplayOutage(o) {
  if (!replay.on || !o || typeof o !== 'object' || !Number.isFinite(o.start)) return;
  if (replay.outages.some((x) => x.symbol === o.symbol && x.start === o.start)) return;   // again after a seek
  replay.outages.push({ symbol: o.symbol, start: o.start, end: Number.isFinite(o.end) ? o.end : null, reason: o.reason || 'outage' });
  replay.outages.sort((a, b) => a.start - b.start);
  chart.dirty = true;
  dirty.replay = true;
  requestFrame();
}

function onReplayStatus(st) {
  if (!replay.on || !st || typeof st !== 'object' || !['playing', 'paused', 'done'].includes(st.state)) return;
  replay.phase = st.state;
  if (Number.isFinite(st.position)) replay.position = st.position;
  if (Number.isFinite(st.speed)) replay.speed = st.speed;
  replay.statusAt = Date.now();
  chart.dirty = true;
  dirty.replay = dirty.status = dirty.bbo = dirty.tabs = true;
  requestFrame();
}

// --- recent points in localStorage: a reload shows the last hour at once -------------------

const STORE_KEY = 'bbo.points.v1';
const STORE_MAX_POINTS = 2000;      // per symbol
const STORE_MAX_AGE = 3600e3;
const useStore = params.get('store') !== '0';

function savePoints() {
  if (!useStore) return;
  try {
    const out = { v: 1, savedAt: Date.now(), symbols: {} };
    const cut = serverNow() - STORE_MAX_AGE;
    for (const sym of state.symbols.slice(0, 12)) {
      const pb = state.points[sym];
      if (!pb || !pb.n) continue;
      const a = Math.max(pb.lowerBound(cut), pb.n - STORE_MAX_POINTS);
      if (a >= pb.n) continue;
      const t0 = pb.t[a];
      const dt = [], b = [], k = [];
      let prev = t0;
      for (let i = a; i < pb.n; i++) { dt.push(pb.t[i] - prev); prev = pb.t[i]; b.push(pb.bid[i]); k.push(pb.ask[i]); }
      out.symbols[sym] = { t0, dt, bid: b, ask: k };
    }
    localStorage.setItem(STORE_KEY, JSON.stringify(out));
  } catch { /* quota or private mode: the store is optional */ }
}

function restorePoints() {
  if (!useStore) return;
  try {
    const raw = localStorage.getItem(STORE_KEY);
    if (!raw) return;
    const s = JSON.parse(raw);
    if (!s || s.v !== 1 || Date.now() - s.savedAt > STORE_MAX_AGE) return;
    for (const [sym, d] of Object.entries(s.symbols || {})) {
      if (!Array.isArray(d.dt) || d.dt.length !== d.bid.length || d.dt.length !== d.ask.length) continue;
      const pb = pointsFor(sym);
      let t = d.t0;
      for (let i = 0; i < d.dt.length; i++) { t += d.dt[i]; pb.push(t, d.bid[i], d.ask[i]); }
      const sess = sessionFor(sym);
      sess.gapFrom = pb.last();        // until the first live point: the page was closed
      sess.gapReason = 'page was closed';
      addSymbol(sym);
    }
  } catch { /* a corrupt store is ignored */ }
}

// ###########################################################################
// §4 Rendering: the frame scheduler, prices, symbol tabs and status (pills, banner, statistics)
// ###########################################################################

// Which views are out of date: set by whatever changes what they show, cleared when they repaint.
const dirty = { bbo: true, tabs: true, status: true, symbols: true, feedEdit: true, replay: true };
let frameRequested = false;
let wakeTimer = 0, wakeAt = Infinity;

// Data-driven repaints (price texts, tabs and the chart, together in one frame so they always
// agree) happen at most every PAINT_INTERVAL ms: 20 per second is smooth to the eye and keeps the
// main thread free under a fast feed. Zoom / pan redraw the chart in the very next frame.
// There is no free-running requestAnimationFrame loop: a frame is requested only when something
// is due (dirty and allowed by the throttle, or the following view has moved >= 1 px); until then
// one setTimeout waits for the earliest due time. Between repaints the page asks for no frames.
const PAINT_INTERVAL = 50;
let lastPaint = 0;

/** A million-point chart throttles itself: draws at least 4x its draw time apart (at most 250 ms). */
function drawThrottle() {
  return Math.min(250, chart.lastDrawMs * 4);
}
/** Wall time per CSS pixel of the view: a following view needs a draw whenever it slides one (a
 *  replay slides at its speed, and not at all while it stands still). */
function followMsPerPx() {
  const perPx = chart.view.span / Math.max(1, chart.cssW - chart.axisW);
  if (!replay.on) return perPx;
  return replay.phase === 'playing' && replay.speed > 0 ? perPx / replay.speed : Infinity;
}

/** Milliseconds until the next frame has work to do (<= 0: now; Infinity: nothing pending). */
function frameDueIn(t) {
  if (dirty.symbols || dirty.status || dirty.feedEdit) return 0;
  const heavy = drawThrottle();
  let due = Infinity;
  if (chart.interactive && chart.dirty) due = chart.lastDrawAt + heavy - t;
  const paintAt = lastPaint + Math.max(PAINT_INTERVAL, heavy);
  if (dirty.bbo || dirty.tabs || dirty.replay || chart.dirty) due = Math.min(due, paintAt - t);
  if (chart.view.follow) {
    due = Math.min(due, Math.max(paintAt, chart.lastDrawAt + followMsPerPx()) - t);
  }
  return due;
}

/** Something changed: get a frame as soon as the throttle allows (cheap to call per message). */
function requestFrame() {
  if (frameRequested) return;
  const t = performance.now();
  const wait = frameDueIn(t);
  if (wait <= 0) {
    if (wakeTimer) { clearTimeout(wakeTimer); wakeTimer = 0; wakeAt = Infinity; }
    frameRequested = true;
    requestAnimationFrame(frame);
  } else if (wait < Infinity && t + wait < wakeAt - 1) {
    if (wakeTimer) clearTimeout(wakeTimer);
    wakeAt = t + wait;
    wakeTimer = setTimeout(onWake, Math.max(1, Math.ceil(wait)));
  }
}
function onWake() {
  wakeTimer = 0; wakeAt = Infinity;
  requestFrame();
}

/** One animation frame: apply everything that changed since the last one. */
function frame() {
  frameRequested = false;
  const t = performance.now();
  if (dirty.symbols) { dirty.symbols = false; renderSymbols(); }
  if (dirty.status) { dirty.status = false; renderStatus(); }
  if (dirty.feedEdit) { dirty.feedEdit = false; renderFeedEdit(); }
  const heavy = drawThrottle();
  // the view moved >= 1 px (1 ms of slack: timers and frames do not land on the exact ms)
  const slid = chart.view.follow && t - chart.lastDrawAt >= followMsPerPx() - 1;
  if (chart.interactive && chart.dirty && t - chart.lastDrawAt >= heavy) {
    drawChart();
  } else if (t - lastPaint >= Math.max(PAINT_INTERVAL, heavy) - 1 &&
             (dirty.bbo || dirty.tabs || dirty.replay || chart.dirty || slid)) {
    lastPaint = t;
    if (dirty.bbo) { dirty.bbo = false; renderBbo(); }
    if (dirty.tabs) { dirty.tabs = false; renderTabs(); }
    if (dirty.replay || (replay.on && slid)) { dirty.replay = false; renderReplay(); }
    if (chart.dirty || slid) drawChart();
  }
  chart.interactive = false;
  // schedule the next one: a frame now if due, else a timer for when it will be
  requestFrame();
}

const el = {};   // id -> element, looked up once at boot for the views repainted many times a second
function cacheElements() {
  for (const id of ['bid-price', 'ask-price', 'bid-qty', 'ask-qty', 'spread', 'spread-bps', 'spread-fill',
    'spread-indicator', 'mid-price', 'imbalance-bid', 'imbalance-bid-pct', 'imbalance-ask-pct', 'bbo-symbol',
    'bbo-market', 'bbo-age', 'bbo-time', 'bbo-update-id', 'bbo-latency', 'bbo-card', 'symbol-select',
    'symbol-tabs', 'feed-state', 'feed-state-text', 'conn-status', 'conn-text', 'transport', 'feed-banner',
    'feed-banner-text', 'feed-banner-count', 'sr-status', 'rtt', 'backend-latency', 'backend-latency-avg',
    'msg-count', 'msg-rate', 'conn-duration', 'stats-transport', 'conn-reconnects', 'conn-recovery',
    'conn-recovery-row', 'fd-state', 'fd-market',
    'fd-since', 'fd-age', 'fd-next', 'fd-messages', 'fd-reconnects', 'fd-duplicates', 'fd-crossed', 'fd-parse',
    'fd-reason', 'foot-clock', 'persist-banner', 'persist-banner-text', 'micro-price', 'micro-lean', 'sym-rate',
    'lat-exchange', 'lat-server', 'lat-browser', 'tz-text', 'clock-offset', 'clock-warning', 'feed-state-label',
    'replay-bar', 'replay-state', 'replay-position', 'replay-speed-text', 'replay-range', 'replay-progress',
    'replay-fill', 'replay-marks', 'replay-toggle', 'replay-outages', 'chart-replay']) {
    el[id] = $(id);
  }
  el['spread-main'] = document.querySelector('.spread-main');
}

function renderSymbols() {
  const sel = el['symbol-select'];
  const want = state.symbols.join(',');
  if (sel.dataset.list !== want) {
    sel.dataset.list = want;
    sel.replaceChildren(...state.symbols.map((s) => new Option(s, s)));
    const tabs = el['symbol-tabs'];
    tabs.replaceChildren(...state.symbols.map((s) => {
      const b = document.createElement('button');
      b.type = 'button';
      b.className = 'sym-tab';
      b.dataset.symbol = s;
      b.setAttribute('role', 'tab');
      b.setAttribute('aria-controls', 'bbo-card');
      b.innerHTML = `<span class="sym-name"></span><span class="sym-px"><span class="sym-px-k">mid </span><span>—</span></span>`;
      b.firstChild.textContent = s;
      return b;
    }));
    tabs.hidden = state.symbols.length < 2;
    renderHistSymbols();
    dirty.tabs = true;
  }
  if (state.current && sel.value !== state.current) sel.value = state.current;
  for (const b of el['symbol-tabs'].children) {
    const on = b.dataset.symbol === state.current;
    setAttr(b, 'aria-selected', String(on));
    b.tabIndex = on ? 0 : -1;
  }
}

function renderTabs() {
  for (const b of el['symbol-tabs'].children) {
    const p = shownBbo(b.dataset.symbol);
    const sm = p && spreadMid(p.bidPrice, p.askPrice);
    setText(b.lastChild.lastChild, !p ? '—' : sm ? sm.mid : p.bidPrice);
    setAttr(b, 'data-live', String(!replay.on && isLive(b.dataset.symbol)));
  }
}

const shown = {
  sym: null, bid: NaN, ask: NaN,   // the prices on screen: a change from these flashes
  anims: {},                       // element id -> its flash animation (left to finish, not restarted)
};
function flash(node, up) {
  if (reducedMotion || !node.animate) return;
  const key = node.id;
  const prev = shown.anims[key];
  // a flash still running on this price is left to finish: restarting it on every 20 Hz repaint
  // under a fast feed would keep the element animating (and its style recalculating) non-stop
  if (prev && prev.playState === 'running') return;
  const colour = up ? 'rgba(23,199,132,0.30)' : 'rgba(246,70,93,0.30)';
  if (node.bboFlash !== colour) { node.bboFlash = colour; node.style.setProperty('--flash', colour); }
  shown.anims[key] = node.animate([{ opacity: 1 }, { opacity: 0 }],
    { duration: 600, easing: 'ease-out', pseudoElement: '::before' });
}

function renderBbo() {
  const sym = state.current;
  const p = sym && shownBbo(sym);
  setText(el['bbo-symbol'], sym ? `${sym} best bid and offer${replay.on ? ' (replay)' : ''}` : 'Best bid and offer');
  if (!p) {
    for (const id of ['bid-price', 'ask-price', 'bid-qty', 'ask-qty', 'spread', 'mid-price', 'bbo-time', 'bbo-update-id',
      'bbo-latency', 'micro-price', 'micro-lean', 'lat-exchange', 'lat-server', 'lat-browser', 'sym-rate']) setText(el[id], '—');
    setText(el['spread-bps'], '— bps');
    setScaleX(el['spread-fill'], 0);
    shown.sym = sym; shown.bid = NaN; shown.ask = NaN;
    return;
  }
  const bid = Number(p.bidPrice), ask = Number(p.askPrice);
  if (shown.sym === sym && !replay.on && isLive(sym)) {
    if (bid !== shown.bid && Number.isFinite(shown.bid)) flash(el['bid-price'], bid > shown.bid);
    if (ask !== shown.ask && Number.isFinite(shown.ask)) flash(el['ask-price'], ask > shown.ask);
  }
  shown.sym = sym; shown.bid = bid; shown.ask = ask;
  setText(el['bid-price'], p.bidPrice);
  setText(el['ask-price'], p.askPrice);
  setText(el['bid-qty'], p.bidQty);
  setText(el['ask-qty'], p.askQty);
  const sm = spreadMid(p.bidPrice, p.askPrice);
  if (sm) {
    setText(el.spread, sm.spread);
    setText(el['spread-bps'], fmtBps(sm.bps));
    setText(el['mid-price'], sm.mid);
    setAttr(el['spread-main'], 'data-crossed', String(sm.crossed));
    // log scale 0.01 … 100 bps
    const pos = Number.isFinite(sm.bps) && sm.bps > 0 ? clamp((Math.log10(sm.bps) + 2) / 4, 0.015, 1) : 0;
    setScaleX(el['spread-fill'], pos);
    setAttr(el['spread-fill'], 'data-level', sm.bps <= 5 ? 'good' : sm.bps <= 25 ? 'warn' : 'bad');
    setAttr(el['spread-indicator'], 'aria-label', `Spread ${sm.spread} (${fmtBps(sm.bps)})`);
  }
  const bq = Number(p.bidQty), aq = Number(p.askQty);
  if (bq + aq > 0) {
    const f = bq / (bq + aq);
    setScaleX(el['imbalance-bid'], f);
    setText(el['imbalance-bid-pct'], `${Math.round(f * 100)}%`);
    setText(el['imbalance-ask-pct'], `${100 - Math.round(f * 100)}%`);
  }
  const mp = microprice(p.bidPrice, p.bidQty, p.askPrice, p.askQty);
  setText(el['micro-price'], mp ? `≈ ${mp.value}` : '—');
  setText(el['micro-lean'], mp ? `${fmtSignedBps(mp.leanBps)} vs mid` : '—');
  setText(el['bbo-time'], fmtClock(p.timestamp, true));
  setText(el['bbo-update-id'], String(p.updateId ?? '—'));
  const sr = !replay.on && state.symRate[sym];   // (a replay's rate is its speed's, not the market's)
  setText(el['sym-rate'], sr ? `${fmtRate(sr.rate)} /s` : '—');
  renderLatencyLegs(p, replay.on ? null : state.browserLeg[sym]);
}

const fmtRate = (r) => (r < 10 ? r.toFixed(1) : fmtInt(Math.round(r)));

/** Exchange -> server latency without the clock offset the server measured (receive time and E
 *  come from two clocks: a clock 350 ms ahead read as 350 ms of latency); as is when not measured. */
function corrected(ms) {
  const off = state.clock && state.clock.offsetMs;
  return ms == null || !Number.isFinite(off) ? ms : ms - off;
}

/** The tooltip of a corrected latency: the raw figure and the offset taken off it. */
function latencyNote(raw) {
  const off = state.clock && state.clock.offsetMs;
  return raw == null || !Number.isFinite(off) ? 'receive time minus the exchange\'s event time (two clocks; offset not measured)'
    : `${fmtMs(raw)} measured, less the clock offset of ${fmtMs(off)}`;
}

/** The last update's latency in legs, each where the payload has what it needs ('n/a' otherwise). */
function renderLatencyLegs(p, browserLeg) {
  const leg = (id, ms, text = null) => {
    setText(el[id], ms == null || !Number.isFinite(ms) ? 'n/a' : text || fmtMs(ms));
    setAttr(el[id], 'data-level', level(ms, ...LATENCY_LEVELS));
  };
  leg('lat-exchange', p.transactionTime != null && p.timestamp != null ? p.timestamp - p.transactionTime : null);
  leg('bbo-latency', corrected(p.backendLatency));
  setAttr(el['bbo-latency'], 'title', latencyNote(p.backendLatency));
  leg('lat-server', p.emitTimestamp != null && p.serverTimestamp != null ? p.emitTimestamp - p.serverTimestamp : null);
  // measured across two clocks: never below 0, and shown with how far off the clock estimate may be
  const b = browserLeg && Math.max(0, browserLeg.ms);
  leg('lat-browser', b, browserLeg && `≈${fmtMs(b)} ± ${fmtMs(browserLeg.uncertainty)}`);
}

/** When the current feed state began (server ms). A stale feed is derived from the age of the
 *  last message, and its `since` is still the time the connection went live. */
function feedStateStart(f) {
  if (f.state === 'stale' && f.lastMessageAge != null) return state.feedAt + state.conn.clockOffset - f.lastMessageAge;
  return f.since || serverNow();
}

const FEED_WORDS = { live: 'live', stale: 'stale', backoff: 'backing off', failed: 'failed',
                     connecting: 'connecting', stopped: 'stopped', unknown: 'unknown',
                     suspect: 'suspect', quiet: 'quiet', waiting: 'waiting' };
let lastAnnounce = '';

/** Status pills, banner, liveness of the prices, statistics. Runs on changes and every second. */
function renderStatus() {
  const s = statusSnapshot();
  renderConnectionPill(s);
  renderFeedPill(s);
  renderPriceAge(s);
  renderBanner(s);
  renderConnectionStats(s);
  renderFeedDetails(s);
  renderClockCheck(state.clock);
  renderReplay();
  setText(el['tz-text'], tz.utc ? 'UTC' : 'Local');
  setText(el['foot-clock'], `${fmtDateTime(s.now)} ${tzName(s.now)}`);
}

/** The server's clock against the exchange's (offsetMs > 0: the server's is ahead), with the
 *  uncertainty of the measurement and how it was measured, and the server's warning when it is off. */
function renderClockCheck(ck) {
  const ok = ck && Number.isFinite(ck.offsetMs);
  setText(el['clock-offset'], !ok ? (ck && ck.error ? 'not measured' : '—')
    : `${ck.offsetMs >= 0 ? 'ahead' : 'behind'} ${fmtMs(Math.abs(ck.offsetMs))}` +
      (Number.isFinite(ck.uncertaintyMs) ? ` ± ${fmtMs(ck.uncertaintyMs)}` : '') + (ck.source ? ` · ${ck.source}` : ''));
  setAttr(el['clock-offset'], 'data-level', !ok ? 'none' : ck.warning ? 'bad' : 'good');
  el['clock-offset'].title = ok && ck.measuredAt ? `Against the exchange's clock; measured ${fmtDateTime(ck.measuredAt)} ${tzName(ck.measuredAt)}`
    : ck && ck.error ? `Not measured: ${ck.error}` : '';
  el['clock-warning'].hidden = !(ck && ck.warning);
  if (ck && ck.warning) setText(el['clock-warning'], `Server clock: ${ck.warning}`);
}

/** What the status views read, taken once so that they all agree. */
function statusSnapshot() {
  const sym = state.current;
  return {
    c: state.conn,
    connected: state.conn.state === 'connected',
    now: Date.now(),                   // client clock: the socket's timers
    sNow: serverNow(),                 // server clock: the feed's times
    f: state.feed,
    fstate: feedState(),
    sym,
    live: !replay.on && isLive(sym),
    p: sym && shownBbo(sym),
  };
}

function renderConnectionPill({ c, now }) {
  let connText;
  if (c.state === 'connected') connText = 'Connected';
  else if (c.state === 'connecting') connText = 'Connecting…';
  else if (c.state === 'offline') connText = 'Offline';
  else if (socket.waitingAuth) connText = 'Token needed';
  else connText = socket.reconnectAt && socket.reconnectAt > now ? `Reconnecting in ${Math.ceil((socket.reconnectAt - now) / 1000)} s` : 'Reconnecting…';
  setAttr(el['conn-status'], 'data-state', c.state);
  setText(el['conn-text'], connText);
  const tname = socket.transport === 'websocket' ? 'WebSocket' : socket.transport === 'polling' ? 'Polling' : '—';
  setText(el.transport, tname);
  setText(el['stats-transport'], tname + (socket.wsFallbacks && socket.transport === 'polling' ? ' (fallback)' : ''));
}

function renderFeedPill({ f, fstate, connected, sNow, sym }) {
  if (replay.on) return;                        // the pill says REPLAY (renderReplay)
  let shown = connected ? fstate : 'unknown';   // without the server we cannot know: never show a stale "live"
  // a live feed whose selected symbol is not (suspect, quiet, waiting) must not read "live"
  const sst = connected && fstate === 'live' && sym ? symbolState(sym) : null;
  if (sst && sst !== 'live') shown = sst;
  let fword = FEED_WORDS[shown] || shown;
  if (f && connected && (fstate === 'backoff' || fstate === 'failed') && f.nextAttempt) {
    const left = f.nextAttempt - sNow;
    if (left > 0) fword += ` ${fmtCountdownShort(left)}`;
  }
  setAttr(el['feed-state'], 'data-state', shown);
  setText(el['feed-state-label'], sst && sst !== 'live' ? sym : 'Feed');   // whose state the pill shows
  setText(el['feed-state-text'], fword);
  el['feed-state'].title = !f ? 'Exchange feed state not known yet'
    : sst && sst !== 'live' ? `Exchange feed live, but ${sym} is ${sst}: no update for ${fmtDuration(sNow - (lastUpdateAt(sym) ?? sNow))}`
    : `Exchange feed: ${connected ? fstate : `unknown; last known: ${fstate}`}${f.reason ? ' — ' + f.reason : ''}`;
}

/** Whether the prices shown are live, and how old they are. */
function renderPriceAge({ f, connected, sNow, live, p }) {
  setAttr(el['bbo-card'], 'data-live', String(live));
  setAttr(el['bbo-card'], 'data-replay', String(replay.on));
  setText(el['bbo-market'], f && f.market ? f.market : '—');
  if (replay.on) return;                        // the age says REPLAY and the replayed time (renderReplay)
  if (p) {
    const age = sNow - (p.serverTimestamp ?? p.timestamp);
    setText(el['bbo-age'], live ? `updated ${fmtAge(age)} ago` : `frozen · last update ${fmtAge(age)} ago`);
    setAttr(el['bbo-age'], 'data-level', !live ? 'bad' : age > 60000 ? 'bad' : age > 10000 ? 'warn' : 'ok');
  } else setText(el['bbo-age'], connected ? 'no data yet' : 'not connected');
}

/** The frozen-price warning, and the polite announcement of connection / feed changes. */
function renderBanner(s) {
  const { msg, count, lvl } = bannerMessage(s);
  const banner = el['feed-banner'];
  banner.hidden = !msg;
  setAttr(banner, 'data-level', lvl);
  setText(el['feed-banner-text'], msg);
  setText(el['feed-banner-count'], count);
  const announce = replay.on ? `Replay ${REPLAY_WORDS[replay.phase]}` :
    !s.connected ? (s.c.state === 'connecting' ? '' : 'Server connection lost') :
    s.fstate === 'live' ? (lastAnnounce ? 'Feed live' : '') : `Feed ${FEED_WORDS[s.fstate] || s.fstate}`;
  if (announce !== lastAnnounce) { lastAnnounce = announce; setText(el['sr-status'], announce); }
}

/** {msg, count, lvl} of the banner: why the prices are not live ('' when they are). One sentence
 *  says why, one what the prices on screen are; the count says how long no data has come (from the
 *  last update, so it does not restart with each retry) and when the next attempt is. */
function bannerMessage({ c, connected, now, sNow, f, fstate, sym, live, p }) {
  let msg = '', lvl = 'warn';
  const counts = [];
  if (replay.on) return { msg, count: '', lvl };   // the replay bar says what the prices are
  const shown = p ? `The ${sym} prices shown are the last received, not live.` : 'No prices received yet.';
  const noData = (lastMs, nowMs) => { if (lastMs != null && nowMs > lastMs) counts.push(`No data for ${fmtDuration(nowMs - lastMs)}`); };
  if (!connected) {
    lvl = c.state === 'offline' ? 'error' : 'warn';
    msg = c.state === 'connecting' ? 'Connecting to the BBO Stream server…'
      : c.state === 'offline' ? 'You are offline.'
      : `${socket.everConnected ? 'Connection to the server lost' : 'Cannot reach the BBO Stream server'}` +
        `${socket.lastReason ? `: ${socket.lastReason}` : ''}.`;
    if (c.state !== 'connecting' || p) msg += ` ${shown}`;
    if (sym && state.lastRecv[sym]) noData(state.lastRecv[sym], now);
    if (socket.reconnectAt && socket.reconnectAt > now) counts.push(`Retrying in ${fmtCountdown(socket.reconnectAt - now)}`);
  } else if (f && fstate !== 'live') {
    const why = f.reason ? `: ${f.reason}` : '';
    // (not the server's reason: "no data for 2 s" is the threshold it waited, not how long; the count says that)
    if (fstate === 'stale') msg = 'Exchange feed is stale: the exchange has stopped sending data.';
    else if (fstate === 'backoff') msg = `Exchange feed disconnected${why}.`;
    else if (fstate === 'failed') { msg = `Exchange feed failed${why}.`; lvl = 'error'; }
    else if (fstate === 'stopped') { msg = `Exchange feed stopped${why}.`; lvl = 'error'; }
    else if (fstate === 'connecting') msg = 'Connecting to the exchange feed…';
    else msg = `Exchange feed ${fstate}${why}.`;
    msg += ` ${shown}`;
    const feedLast = f.lastMessageAge != null ? state.feedAt + state.conn.clockOffset - f.lastMessageAge : null;
    const symLast = sym ? lastUpdateAt(sym) : null;
    noData(feedLast == null ? symLast : symLast == null ? feedLast : Math.max(feedLast, symLast), sNow);
    if (f.nextAttempt && f.nextAttempt > sNow) counts.push(`Next attempt in ${fmtCountdown(f.nextAttempt - sNow)}`);
  } else if (f && sym && !live && symbolState(sym) && symbolState(sym) !== 'live') {
    const st = symbolState(sym);
    msg = st === 'waiting' ? `${sym}: no update received yet since the feed connected.`
      : st === 'suspect' ? `${sym} is suspect: no update for longer than this symbol usually goes without one. ${shown}`
      : `${sym} is ${st}: no recent updates. ${shown}`;
    noData(lastUpdateAt(sym), sNow);
  }
  return { msg, count: counts.join(' · '), lvl };
}

function renderConnectionStats({ c, connected, now }) {
  setText(el.rtt, !connected ? '—' : fmtMs(c.rtt) + (c.rttAvg != null && c.rtt != null ? ` · avg ${fmtMs(c.rttAvg)}` : ''));
  setAttr(el.rtt, 'data-level', connected ? level(c.rttAvg ?? c.rtt, ...RTT_LEVELS) : 'none');
  const st = state.stats;
  const last = corrected(st.lastLatency);
  setText(el['backend-latency'], last == null ? '—' : fmtMs(last));
  setAttr(el['backend-latency'], 'data-level', level(last, ...LATENCY_LEVELS));
  setAttr(el['backend-latency'], 'title', latencyNote(st.lastLatency));
  let lsum = 0, lcount = 0;
  for (let i = 0; i < 10; i++) { lsum += st.latSum[i]; lcount += st.latCount[i]; }
  const avg = lcount ? corrected(lsum / lcount) : null;
  setText(el['backend-latency-avg'], fmtMs(avg));
  setAttr(el['backend-latency-avg'], 'data-level', level(avg, ...LATENCY_LEVELS));
  setText(el['msg-count'], fmtInt(st.messages));
  setText(el['msg-rate'], `${st.rate < 10 ? st.rate.toFixed(1) : Math.round(st.rate)} /s`);
  setText(el['conn-duration'], socket.connectedAt ? fmtDuration(now - socket.connectedAt) : '—');
  setText(el['conn-reconnects'], String(socket.reconnects));
  // only when the server offers connection state recovery
  const recoveryS = state.welcome && state.welcome.recoverySeconds;
  const hideRecovery = !(recoveryS > 0);
  if (el['conn-recovery-row'].hidden !== hideRecovery) el['conn-recovery-row'].hidden = hideRecovery;
  setText(el['conn-recovery'], reconnectText(c.reconnect, recoveryS));
}

/** How the last reconnect went, in words (the connection panel's row when recovery is on). */
function reconnectText(r, recoveryS) {
  if (!r) return `recovers within ${recoveryS} s`;
  if (!r.recovered) return 'not recovered: new session';
  if (r.skipped) return `recovered; ${fmtInt(r.skipped)} updates skipped while disconnected`;
  return `recovered; ${fmtInt(r.missed)} missed events received`;
}

function renderFeedDetails({ connected, now, sNow, f, fstate, live, p }) {
  setAttr(el['fd-state'], 'data-state', connected ? fstate : 'unknown');
  setText(el['fd-state'], !f ? '—' : connected ? (FEED_WORDS[fstate] || fstate) : `${FEED_WORDS[fstate] || fstate}, last known`);
  setText(el['fd-market'], f && f.market ? f.market : '—');
  setText(el['fd-since'], f && f.since ? fmtDuration(sNow - feedStateStart(f)) : '—');
  const lma = f && f.lastMessageAge != null ? f.lastMessageAge + (now - state.feedAt) : null;
  const lastMsgAge = p && live ? Math.min(lma ?? Infinity, sNow - (p.serverTimestamp ?? p.timestamp)) : lma;
  setText(el['fd-age'], lastMsgAge == null || !Number.isFinite(lastMsgAge) ? '—' : `${fmtAge(lastMsgAge)} ago`);
  setText(el['fd-next'], f && f.nextAttempt ? (f.nextAttempt > sNow ? `in ${fmtCountdown(f.nextAttempt - sNow)}` : 'now') : '—');
  setText(el['fd-messages'], f && f.messages != null ? fmtInt(f.messages) : '—');
  setText(el['fd-reconnects'], f && f.reconnects != null ? fmtInt(f.reconnects) : '—');
  setText(el['fd-duplicates'], f && f.duplicates != null ? fmtInt(f.duplicates) : '—');
  setText(el['fd-crossed'], f && f.crossed != null ? fmtInt(f.crossed) : '—');
  setText(el['fd-parse'], f && f.parseErrors != null ? fmtInt(f.parseErrors) : '—');
  el['fd-reason'].hidden = !(f && f.reason);
  if (f && f.reason) setText(el['fd-reason'], f.reason);
}

/** A small warning while the server cannot save the history ("failing" disk, or "off": an unusable
 *  CACHE_DIR); nothing when it saves, or when saving was turned off on purpose ("disabled"). */
function renderPersistence(pers) {
  const failing = !!pers && (pers.state === 'failing' || pers.state === 'off');
  el['persist-banner'].hidden = !failing;
  if (failing) {
    setText(el['persist-banner-text'], `History is not being saved to disk${pers.reason ? `: ${pers.reason}` : ''}. ` +
      'Live prices are unaffected; what arrives meanwhile is lost if the server stops.');
  }
}

/** The tab title carries the price, so a background tab still shows it (refreshed every second). */
function renderTitle() {
  const sym = state.current;
  const p = sym && shownBbo(sym);
  const prices = p ? `${p.bidPrice} / ${p.askPrice} ${sym}` : '';
  if (replay.on) {
    const pos = replayPosition();
    document.title = `REPLAY ${fmtClock(pos)} ${tzName(pos)} ${fmtSpeed(replay.speed)}${prices ? ` · ${prices}` : ''} · BBO Stream`;
  } else {
    document.title = p ? `${prices}${isLive(sym) ? '' : ' (not live)'} · BBO Stream` : 'BBO Stream';
  }
}

const REPLAY_WORDS = { idle: 'idle', connecting: 'connecting…', playing: 'playing', paused: 'paused', done: 'done',
                       interrupted: 'interrupted: reconnecting…' };
/** A replay speed: "10×", "1,000×", "0.5×"; 0 is "max" (as fast as the page reads). */
const fmtSpeed = (x) => (x > 0 ? `${x >= 1000 ? fmtInt(x) : Number(x.toPrecision(4))}×` : 'max');

/** Everything that says REPLAY while the page shows one: the replay bar (position, range, progress,
 *  outages), the feed pill, the price panel's age line and the chart's badge; they say the replayed
 *  time and the speed, so no recorded price can pass for a live one. */
function renderReplay() {
  document.documentElement.dataset.replay = String(replay.on);
  el['replay-bar'].hidden = !replay.on;
  el['chart-replay'].hidden = !replay.on;
  if (!replay.on) return;
  const pos = replayPosition();
  const zone = tzName(pos);
  const speed = fmtSpeed(replay.speed);
  const word = REPLAY_WORDS[replay.phase];
  setAttr(el['replay-bar'], 'data-phase', replay.phase);
  setText(el['replay-state'], word);
  setText(el['replay-position'], `${fmtDateTime(pos)} ${zone}`);
  setText(el['replay-speed-text'], speed);
  setText(el['replay-range'], `${fmtDateTime(replay.from)} – ${fmtDateTime(replay.to)} ${tzName(replay.from)}`);
  const span = replay.to - replay.from;
  const f = span > 0 ? (pos - replay.from) / span : 1;
  setScaleX(el['replay-fill'], f);
  setAttr(el['replay-progress'], 'aria-valuenow', String(Math.round(f * 100)));
  setAttr(el['replay-progress'], 'aria-valuetext', `${fmtDateTime(pos)} ${zone}, ${word}`);
  const toggle = el['replay-toggle'];
  setText(toggle, replay.phase === 'playing' ? 'Pause' : replay.phase === 'done' ? 'Play again' : 'Play');
  toggle.disabled = replay.phase === 'connecting' || replay.phase === 'interrupted';
  // the pill, the price panel and the chart: REPLAY, the replayed time and the speed
  const doing = replay.phase === 'playing' ? speed : `${word} · ${speed}`;
  setAttr(el['feed-state'], 'data-state', 'replay');
  setText(el['feed-state-label'], 'REPLAY');
  setText(el['feed-state-text'], `${fmtClock(pos)} · ${doing}`);
  el['feed-state'].title = `Replay of recorded data (not live), at ${fmtDateTime(pos)} ${zone}, ${word}, speed ${speed}`;
  setText(el['bbo-age'], `REPLAY · ${fmtClock(pos, true)} ${zone} · ${doing}`);
  setAttr(el['bbo-age'], 'data-level', 'replay');
  setText(el['chart-replay'], `REPLAY · ${fmtClock(pos)} ${zone} · ${doing}`);
  renderTitle();                                // the replayed time moves faster than the second tick
  renderReplayOutages(span);
}

/** The outages the replay has passed: a mark on the progress bar each, and a line saying them. */
function renderReplayOutages(span) {
  const marks = el['replay-marks'];
  const out = replay.outages;
  if (marks.childElementCount !== out.length || marks.dataset.zone !== tzName()) {
    marks.dataset.zone = tzName();
    marks.replaceChildren(...out.map((o) => {
      const m = document.createElement('span');
      m.className = 'replay-mark';
      const a = span > 0 ? clamp((o.start - replay.from) / span, 0, 1) : 0;
      const b = span > 0 ? clamp(((o.end ?? replay.to) - replay.from) / span, 0, 1) : 1;
      m.style.left = `${(a * 100).toFixed(2)}%`;
      m.style.width = `max(3px, ${((b - a) * 100).toFixed(2)}%)`;
      m.title = `${o.symbol} outage ${fmtDateTime(o.start)}${o.end != null ? ` – ${fmtClock(o.end)}` : ''} ${tzName(o.start)}: ${o.reason}`;
      return m;
    }));
    const box = el['replay-outages'];
    box.hidden = !out.length;
    const last = out[out.length - 1];
    setText(box, !last ? '' : `Outage${out.length > 1 ? `s: ${out.length}, the last` : ''}: ${last.symbol} ` +
      `${fmtDateTime(last.start)}${last.end != null ? ` – ${fmtClock(last.end)}` : ''} ${tzName(last.start)}: ${last.reason}`);
  }
}

// ###########################################################################
// §5 Chart: drawing, crosshair, the view (timeframes, zoom, pan, input), backfill from the server
// ###########################################################################

// The one list of timeframes: a button each (key = label, in this order); the first is the default.
const TIMEFRAMES = { '1m': 60e3, '5m': 300e3, '15m': 900e3, '1h': 3600e3, '12h': 43200e3, '1d': 86400e3 };
/** Whether `tf` names a timeframe (an own key: "toString" from a URL is not one). */
const isTimeframe = (tf) => typeof tf === 'string' && Object.hasOwn(TIMEFRAMES, tf);
const MIN_SPAN = 2000;
const MAX_SPAN = 7 * 86400e3;
const COLORS = {
  bid: '#17c784', ask: '#f6465d', grid: 'rgba(138,148,163,0.10)', axis: '#8a94a3', axisLine: '#252d38',
  outage: 'rgba(240,185,11,0.10)', outageHatch: 'rgba(240,185,11,0.22)', outageEdge: 'rgba(240,185,11,0.55)',
  clientGap: 'rgba(138,148,163,0.08)', clientHatch: 'rgba(138,148,163,0.16)',
  cross: 'rgba(181,189,200,0.55)', tagText: '#0b0e11', labelBg: '#2a323e', labelText: '#e7eaee',
  mid: '#c9a3ff', spread: '#4c8dff', plotBg: '#0f1318',   // plotBg: the chart's background (--bg-2)
};
const X_STEPS = [1e3, 2e3, 5e3, 10e3, 15e3, 30e3, 60e3, 120e3, 300e3, 600e3, 900e3, 1800e3,
                 3600e3, 7200e3, 10800e3, 21600e3, 43200e3, 86400e3, 172800e3];

const DEFAULT_TF = Object.keys(TIMEFRAMES)[0];
const TAG_H = 16;   // CSS px: height of a price tag, and of the crosshair's labels on the axes

const chart = {
  canvas: null, ctx: null,              // the main canvas: grid, outages, series, axes
  overlay: null, octx: null,            // the crosshair canvas above it: hovering never redraws the series
  cssW: 0, cssH: 0, dpr: 1,             // canvas size (CSS px) and the device pixel ratio it was sized for
  axisW: 64,                            // right axis width (CSS px), adapts to label widths
  tf: DEFAULT_TF,                       // the selected timeframe (a key of TIMEFRAMES)
  showMid: false,                       // draw the mid price too (#show-mid, kept in localStorage)
  view: { span: TIMEFRAMES[DEFAULT_TF], end: 0, follow: true },   // span (ms), right edge (server ms) unless following now
  backfill: Object.create(null),        // symbol -> series from /api/history/series
  bfPending: null,                      // the backfill request in flight: {ctl, key, sym}
  bfError: null,                        // why the last backfill failed (shown on an empty chart)
  dirty: true,                          // the data or the view changed: draw at the next paint
  interactive: false,                   // a zoom / pan is waiting: draw in the next frame, not at the next paint
  lastDrawMs: 0,                        // duration of the last draw (a slow chart throttles itself)
  lastDrawAt: 0,                        // performance.now() of the last draw
  drawCount: 0,                         // draws so far (test hook)
  ncols: 0,                             // columns in `cols`
  cols: null,                           // per-column decimation buffers (allocCols), one column per CSS px
  geo: null,                            // geometry of the last draw, for the crosshair and pointer input
  hover: null,                          // {x, y} CSS px inside the canvas, or null
  drag: null,                           // a pan {x, moved, pointerType} or a pinch {pinch, mid, moved}, or null
  pointers: new Map(),                  // pointerId -> {x, y} of the pointers down on the canvas
};

function viewRange() {
  const v = chart.view;
  const end = v.follow ? (replay.on ? replayPosition() : serverNow()) : v.end;
  return [end - v.span, end];
}

function allocCols(n) {
  if (chart.cols && chart.ncols === n) return chart.cols;
  chart.ncols = n;
  chart.cols = {
    has: new Uint8Array(n),
    bMin: new Float64Array(n), bMax: new Float64Array(n), bFirst: new Float64Array(n), bLast: new Float64Array(n),
    aMin: new Float64Array(n), aMax: new Float64Array(n), aFirst: new Float64Array(n), aLast: new Float64Array(n),
    sMin: new Float64Array(n), sMax: new Float64Array(n), sLast: new Float64Array(n),   // spread in bps
    mMin: new Float64Array(n), mMax: new Float64Array(n), mLast: new Float64Array(n),   // mid (midColumns)
    tFirst: new Float64Array(n), tLast: new Float64Array(n),
  };
  return chart.cols;
}

/** Spread in bps of one quote: (ask − bid) / mid. */
const spreadBps = (b, a) => ((a - b) * 2e4) / (a + b);

/** Per-pixel-column min/max/first/last of bid and ask (and min/max/last of the spread in bps) over
 *  points [a, b) of typed arrays. */
function decimateInto(C, T, B, A, a, b, t0, k, ncols) {
  let i = a;
  const { has, bMin, bMax, bFirst, bLast, aMin, aMax, aFirst, aLast, sMin, sMax, sLast, tFirst, tLast } = C;
  while (i < b) {
    const c = Math.floor((T[i] - t0) * k);
    if (c < 0) { i++; continue; }
    if (c >= ncols) break;
    const tEnd = t0 + (c + 1) / k;
    let bl = B[i], al = A[i];
    const bf = bl, af = al, tf = T[i];
    let bmin = bl, bmax = bl, amin = al, amax = al;
    let sl = spreadBps(bl, al), smin = sl, smax = sl;
    let tl = tf;
    i++;
    while (i < b) {
      const t = T[i];
      if (t >= tEnd) break;
      bl = B[i]; al = A[i]; tl = t;
      if (bl < bmin) bmin = bl; else if (bl > bmax) bmax = bl;
      if (al < amin) amin = al; else if (al > amax) amax = al;
      sl = spreadBps(bl, al);
      if (sl < smin) smin = sl; else if (sl > smax) smax = sl;
      i++;
    }
    if (has[c]) {
      if (bmin < bMin[c]) bMin[c] = bmin;
      if (bmax > bMax[c]) bMax[c] = bmax;
      if (amin < aMin[c]) aMin[c] = amin;
      if (amax > aMax[c]) aMax[c] = amax;
      if (smin < sMin[c]) sMin[c] = smin;
      if (smax > sMax[c]) sMax[c] = smax;
    } else {
      has[c] = 1;
      bMin[c] = bmin; bMax[c] = bmax; aMin[c] = amin; aMax[c] = amax; sMin[c] = smin; sMax[c] = smax;
      bFirst[c] = bf; aFirst[c] = af; tFirst[c] = tf;
    }
    bLast[c] = bl; aLast[c] = al; sLast[c] = sl; tLast[c] = tl;
  }
}

/** Same for server buckets (already decimated: first/min/max/last per bucket). A bucket's spread
 *  range is not known: its first and last quotes' spreads stand for it. */
function decimateBuckets(C, bf, j0, j1, t0, k, ncols) {
  const { has, bMin, bMax, bFirst, bLast, aMin, aMax, aFirst, aLast, sMin, sMax, sLast, tFirst, tLast } = C;
  const T = bf.time;
  for (let j = j0; j < j1; j++) {
    const c = Math.floor((T[j] - t0) * k);
    if (c < 0) continue;
    if (c >= ncols) break;
    const s0 = spreadBps(bf.bidFirst[j], bf.askFirst[j]), s1 = spreadBps(bf.bidLast[j], bf.askLast[j]);
    const slo = s0 < s1 ? s0 : s1, shi = s0 < s1 ? s1 : s0;
    if (has[c]) {
      if (bf.bidMin[j] < bMin[c]) bMin[c] = bf.bidMin[j];
      if (bf.bidMax[j] > bMax[c]) bMax[c] = bf.bidMax[j];
      if (bf.askMin[j] < aMin[c]) aMin[c] = bf.askMin[j];
      if (bf.askMax[j] > aMax[c]) aMax[c] = bf.askMax[j];
      if (slo < sMin[c]) sMin[c] = slo;
      if (shi > sMax[c]) sMax[c] = shi;
    } else {
      has[c] = 1;
      bMin[c] = bf.bidMin[j]; bMax[c] = bf.bidMax[j]; aMin[c] = bf.askMin[j]; aMax[c] = bf.askMax[j];
      sMin[c] = slo; sMax[c] = shi;
      bFirst[c] = bf.bidFirst[j]; aFirst[c] = bf.askFirst[j]; tFirst[c] = T[j];
    }
    bLast[c] = bf.bidLast[j]; aLast[c] = bf.askLast[j]; sLast[c] = s1; tLast[c] = T[j];
  }
}

/** The mid per column, for its optional line: exact at each column's last quote; its range is
 *  bounded by the bid's and ask's ranges (mid of the minima .. mid of the maxima). */
function midColumns(C, ncols) {
  const { has, bMin, bMax, bLast, aMin, aMax, aLast, mMin, mMax, mLast } = C;
  for (let c = 0; c < ncols; c++) {
    if (!has[c]) continue;
    mMin[c] = (bMin[c] + aMin[c]) / 2; mMax[c] = (bMax[c] + aMax[c]) / 2; mLast[c] = (bLast[c] + aLast[c]) / 2;
  }
}

function lowerBoundArr(T, n, x) {
  let lo = 0, hi = n;
  while (lo < hi) { const m = (lo + hi) >>> 1; if (T[m] < x) lo = m + 1; else hi = m; }
  return lo;
}

/** Gaps (outages, client disconnects) overlapping [t0, t1], merged, sorted. */
function gapsInView(sym, t0, t1, bfFrom, bfTo) {
  if (replay.on) return replayGapsInView(sym, t0, t1);
  const raw = [];
  const now = serverNow();
  const bf = chart.backfill[sym];
  if (bf) for (const o of bf.outages) raw.push({ start: o.start, end: o.end == null ? now : o.end, kind: 'outage', reason: o.reason });
  for (const o of state.feedOutages) raw.push({ start: o.start, end: o.end == null ? now : o.end, kind: 'outage', reason: o.reason });
  const pb = state.points[sym];
  if (pb) {
    for (const g of pb.gaps) {
      let start = g.start;
      const end = g.end == null ? now : g.end;
      // the part the server's history covers is not a gap: only the remainder is
      if (start >= bfFrom && start < bfTo) start = bfTo;
      if (end > start) raw.push({ start, end, kind: 'client', reason: g.reason });
    }
  }
  if (state.conn.state !== 'connected' && state.conn.disconnectedAt != null) {
    raw.push({ start: state.conn.disconnectedAt, end: now, kind: 'client', reason: 'server connection lost' });
  }
  const st = state.conn.state === 'connected' && state.feed && state.feed.state === 'live' ? symbolState(sym) : null;
  const lastAt = lastUpdateAt(sym);
  if ((st === 'suspect' || st === 'quiet') && lastAt != null) {
    raw.push({ start: lastAt, end: now, kind: 'client', reason: `${sym} is ${st}: no update since ${fmtClock(lastAt)} ${tzName(lastAt)}` });
  }
  return mergeGaps(raw, t0, t1);
}

/** A replay's gaps: the outages of `sym` it has announced (one still open holds to where it is). */
function replayGapsInView(sym, t0, t1) {
  const pos = replayPosition();
  return mergeGaps(replay.outages.filter((o) => o.symbol === sym)
    .map((o) => ({ start: o.start, end: Math.min(o.end ?? pos, pos), kind: 'outage', reason: o.reason }))
    .concat(replay.skipped.map((g) => ({ ...g, kind: 'client', reason: 'skipped by a seek' }))), t0, t1);
}

/** The gaps overlapping [t0, t1], sorted, overlapping ones merged (an outage wins over a client gap). */
function mergeGaps(raw, t0, t1) {
  const inView = raw.filter((g) => g.end >= t0 && g.start <= t1 && g.end > g.start).sort((a, b) => a.start - b.start);
  const out = [];
  for (const g of inView) {
    const last = out[out.length - 1];
    if (last && g.start <= last.end) {
      if (g.end > last.end) last.end = g.end;
      if (g.kind === 'outage') { last.kind = 'outage'; last.reason = last.reason || g.reason; }
    } else out.push({ ...g });
  }
  return out;
}

function niceStep(raw) {
  const p = 10 ** Math.floor(Math.log10(raw));
  const f = raw / p;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * p;
}
function stepDecimals(step) {
  let d = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  if (Math.abs(step * 10 ** d - Math.round(step * 10 ** d)) > 1e-6) d++;
  return Math.min(d, 10);
}

function timeLabel(t, step) {
  const p = timeParts(t);
  if (step >= 86400e3 || (step >= 3600e3 && p.h === 0 && p.m === 0)) return fmtDay(t);
  if (step < 60e3) return fmtClock(t);
  return `${pad2(p.h)}:${pad2(p.m)}`;
}

function chartLayout() {
  const wrap = chart.canvas.parentElement;
  const r = wrap.getBoundingClientRect();
  const dpr = Math.max(1, Math.min(3, window.devicePixelRatio || 1));
  const w = Math.max(1, Math.round(r.width)), h = Math.max(1, Math.round(r.height));
  if (w === chart.cssW && h === chart.cssH && dpr === chart.dpr) return;
  chart.cssW = w; chart.cssH = h; chart.dpr = dpr;
  for (const c of [chart.canvas, chart.overlay]) {
    c.width = Math.round(w * dpr);
    c.height = Math.round(h * dpr);
  }
  chart.dirty = true;
  scheduleBackfill(0);
}

// --- drawing: drawChart() is the sequence of steps below, each on this draw's plot geometry ---

/** Redraw the chart now. Returns the time it took (ms). */
function drawChart() {
  const started = performance.now();
  chart.dirty = false;
  const { ctx } = chart;
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, chart.canvas.width, chart.canvas.height);
  chart.geo = null;
  const plot = plotArea();
  if (!plot) { finishDraw(started, 0, false); return chart.lastDrawMs; }
  const src = decimateSources(plot);
  const edges = seriesEdges(plot, src);
  const scale = priceScale(plot, src.C, edges.lead);
  const sScale = spreadScale(plot, src.C, edges.lead);
  const ticks = axisTicks(plot, scale, sScale);
  drawGrid(plot, scale, sScale, ticks);
  drawGaps(plot, edges.gaps);
  const { C } = src, lead = edges.lead;
  if (chart.showMid) {
    midColumns(C, plot.ncols);
    drawSeries(plot, scale.yOf, edges, C.mMin, C.mMax, C.mLast, lead && (lead.bid + lead.ask) / 2, COLORS.mid);
  }
  const lastAsk = drawSeries(plot, scale.yOf, edges, C.aMin, C.aMax, C.aLast, lead && lead.ask, COLORS.ask);
  const lastBid = drawSeries(plot, scale.yOf, edges, C.bMin, C.bMax, C.bLast, lead && lead.bid, COLORS.bid);
  drawSeries(plot, sScale.yOf, edges, C.sMin, C.sMax, C.sLast, lead && spreadBps(lead.bid, lead.ask), COLORS.spread);
  const tags = priceTags(plot, scale, lastAsk, lastBid);
  const labels = drawAxes(plot, scale, sScale, ticks, tags);
  const dec = priceDecimals(plot.sym, ticks.yDec);
  fitAxisWidth(Math.max(ticks.maxLabelW, drawPriceTags(plot, tags, dec)));
  const { v0, v1, k, colW, ncols, pw, ph, priceH, spreadTop, spreadH, padT, dpr, sym } = plot;
  const { lo, hi, ys } = scale;
  chart.geo = { v0, v1, k, colW, ncols, pw, ph, priceH, spreadTop, spreadH, padT, lo, hi, ys, sScale, dpr,
                gaps: edges.gaps, lead: edges.lead, dec, labels,
                xStep: ticks.xStep, livePts: src.livePts, bf: src.bf, sym, tailT: edges.tailT };
  finishDraw(started, src.livePts, scale.hasData);
  return chart.lastDrawMs;
}

/** This draw's plot in device pixels, the price axis right of it and the time axis below; one
 *  decimation column per CSS pixel (colW device pixels wide): sharp, and half the path at 2x.
 *  null when there is nothing to draw into. */
function plotArea() {
  const { dpr } = chart;
  const sym = state.current;
  const [v0, v1] = viewRange();
  const axisR = Math.round(chart.axisW * dpr), axisB = Math.round(22 * dpr), padT = Math.round(12 * dpr);
  const pw = chart.canvas.width - axisR, ph = chart.canvas.height - axisB - padT;
  if (!sym || pw < 20 || ph < 20) return null;
  const colW = dpr;
  const ncols = Math.max(1, Math.floor(pw / colW));
  const k = ncols / (v1 - v0);              // columns per ms
  // the spread panel under the prices: about a fifth of the plot, never under 40 CSS px
  const spreadH = Math.round(clamp(ph * 0.22, Math.min(40 * dpr, ph * 0.3), 110 * dpr));
  const gapH = Math.round(8 * dpr);
  const priceH = ph - spreadH - gapH;
  return {
    sym, v0, v1, dpr, axisR, padT, pw, ph, colW, ncols, k,
    priceH, spreadTop: padT + priceH + gapH, spreadH,   // price panel padT .. padT + priceH, spread panel below
    labelX: pw + 6 * dpr,                   // where the price labels start
    xOf: (t) => (t - v0) * k * colW,        // device px
  };
}

/** Per-column min / max / first / last over the view: the server's backfill (bf) for [bfFrom, bfTo),
 *  the live buffer before and after it (the live session is exact; the backfill covers the rest). */
function decimateSources({ sym, v0, v1, k, ncols }) {
  const C = allocCols(ncols);
  C.has.fill(0);
  // a replay draws only what it replayed: no live points, no backfill of the server's history
  const pb = replay.on ? replay.points[sym] : state.points[sym];
  const bf = replay.on ? null : chart.backfill[sym];
  const liveFrom = replay.on ? Infinity : liveSince(sym);
  let bfFrom = Infinity, bfTo = Infinity, j0 = 0, j1 = 0;
  if (bf) {
    bfFrom = bf.start;
    bfTo = Math.max(bfFrom, Math.min(bf.end + 1, liveFrom));
    j0 = lowerBoundArr(bf.time, bf.n, Math.max(v0 - bf.bucket_ms, bfFrom));
    j1 = lowerBoundArr(bf.time, bf.n, Math.min(v1 + 1, bfTo));
  }
  let livePts = 0;
  if (pb && pb.n) {
    // live points before the backfill window
    const a = pb.lowerBound(v0), b1 = pb.lowerBound(Math.min(v1 + 1, bfFrom));
    if (b1 > a) { decimateInto(C, pb.t, pb.bid, pb.ask, a, b1, v0, k, ncols); livePts += b1 - a; }
  }
  if (bf && j1 > j0) decimateBuckets(C, bf, j0, j1, v0, k, ncols);
  if (pb && pb.n) {
    const a = pb.lowerBound(Math.max(v0, bfTo)), b2 = pb.lowerBound(v1 + 1);
    if (b2 > a) { decimateInto(C, pb.t, pb.bid, pb.ask, a, b2, v0, k, ncols); livePts += b2 - a; }
  }
  return { C, pb, bf, bfFrom, bfTo, livePts };
}

/** Where the step lines begin and end: the value holding at the left edge (a price holds until it
 *  changes), the gaps they never cross, and the time the last value holds to (tailT). */
function seriesEdges({ sym, v0, v1 }, { pb, bf, bfFrom, bfTo }) {
  let lead = null;
  if (bf && v0 >= bfFrom && v0 < bfTo) {
    const j = lowerBoundArr(bf.time, bf.n, v0) - 1;
    if (j >= 0) lead = { t: bf.time[j], bid: bf.bidLast[j], ask: bf.askLast[j] };
  } else if (pb && pb.n) {
    const i = pb.lowerBound(v0) - 1;
    if (i >= 0) lead = { t: pb.t[i], bid: pb.bid[i], ask: pb.ask[i] };
  }
  // is there data after the right edge? (then the last value holds to the edge)
  const moreAfter = (pb && pb.n && pb.t[pb.n - 1] > v1) || (bf && bf.n && bf.time[bf.n - 1] > v1 && v1 < bfTo);
  let liveEdge = state.conn.state === 'connected' ? serverNow()
    : (state.conn.disconnectedAt != null ? state.conn.disconnectedAt : serverNow());
  // a price that is not live holds only to its last update: a flat line on to "now" would read as a
  // calm market when nothing is known
  const lastAt = lastUpdateAt(sym);
  if (replay.on) liveEdge = replayPosition();   // a replayed price holds to where the replay is
  else if (!isLive(sym) && lastAt != null) liveEdge = Math.min(liveEdge, Math.max(lastAt, pb && pb.n ? pb.last() : lastAt));
  const gaps = gapsInView(sym, v0, v1, bfFrom, bfTo);
  const crosses = (ta, tb) => {   // does a gap lie between times ta and tb?
    for (const g of gaps) if (g.start < tb && g.end > ta) return true;
    return false;
  };
  if (lead && crosses(lead.t, v0)) lead = null;
  return { lead, gaps, crosses, tailT: moreAfter ? v1 : Math.min(v1, liveEdge) };
}

/** The price scale: the visible range plus 8 % on each side; a flat range is widened a little so
 *  that a constant price is a line in the middle, not on an edge. */
function priceScale({ ncols, priceH: ph, padT }, C, lead) {
  let lo = Infinity, hi = -Infinity;
  for (let c = 0; c < ncols; c++) {
    if (!C.has[c]) continue;
    const l = C.bMin[c] < C.aMin[c] ? C.bMin[c] : C.aMin[c];
    const h = C.bMax[c] > C.aMax[c] ? C.bMax[c] : C.aMax[c];
    if (l < lo) lo = l;
    if (h > hi) hi = h;
  }
  if (lead) { lo = Math.min(lo, lead.bid, lead.ask); hi = Math.max(hi, lead.bid, lead.ask); }
  const hasData = Number.isFinite(lo) && Number.isFinite(hi);
  if (!hasData) { lo = 0; hi = 1; }
  if (hi - lo < Math.abs(hi) * 1e-7 || hi === lo) {
    const pad = Math.max(Math.abs(hi) * 5e-5, 1e-8);
    lo -= pad; hi += pad;
  }
  const padY = (hi - lo) * 0.08;
  lo -= padY; hi += padY;
  const ys = ph / (hi - lo);
  return { lo, hi, ys, hasData, yOf: (p) => padT + (hi - p) * ys };
}

/** The spread panel's scale: 0 bps at its foot up to the widest spread in view plus 10 %. */
function spreadScale({ ncols, spreadTop, spreadH }, C, lead) {
  let hi = lead ? spreadBps(lead.bid, lead.ask) : 0;
  for (let c = 0; c < ncols; c++) if (C.has[c] && C.sMax[c] > hi) hi = C.sMax[c];
  hi = Number.isFinite(hi) && hi > 0 ? hi * 1.1 : 1;
  const ys = spreadH / hi;
  return { lo: 0, hi, ys, yOf: (v) => spreadTop + (hi - v) * ys };
}

/** Ticks of the axes: prices at a round step about 44 CSS px apart; spread at one round step (two or
 *  three labels); times on multiples in the zone shown, one label's width + 14 px apart at least.
 *  Sets the label font here, where widths are measured: the labels and tags drawn later use it. */
function axisTicks({ v0, v1, k, colW, priceH: ph, spreadH, dpr }, { lo, hi }, sScale) {
  const { ctx } = chart;
  const fontPx = Math.round(11 * dpr);
  ctx.font = `${fontPx}px ui-monospace, "SF Mono", "JetBrains Mono", "Cascadia Mono", "Roboto Mono", "DejaVu Sans Mono", Menlo, Consolas, monospace`;
  ctx.textBaseline = 'middle';
  const yStep = niceStep((hi - lo) / Math.max(2, ph / (44 * dpr)));
  const yDec = stepDecimals(yStep);
  const yTicks = [];
  for (let p = Math.ceil(lo / yStep) * yStep; p <= hi; p += yStep) yTicks.push(p);
  let maxLabelW = 0;
  const yLabels = yTicks.map((p) => { const s = p.toFixed(yDec); maxLabelW = Math.max(maxLabelW, ctx.measureText(s).width); return s; });
  const sStep = niceStep(sScale.hi / Math.max(1.5, spreadH / (22 * dpr)));
  const sDec = stepDecimals(sStep);
  const sTicks = [];
  for (let v = sStep; v <= sScale.hi; v += sStep) sTicks.push(v);
  const sLabels = sTicks.map((v) => { const s = v.toFixed(sDec); maxLabelW = Math.max(maxLabelW, ctx.measureText(s).width); return s; });
  // the step: the smallest whose labels (their width depends on it: 12:30:15, 12:30, 4 Dec) fit
  let xStep = X_STEPS[X_STEPS.length - 1];
  for (const s of X_STEPS) {
    const w = ctx.measureText(s < 60e3 ? '00:00:00' : s < 86400e3 ? '00:00' : '30 Dec').width;
    if (s * k * colW >= w + 14 * dpr) { xStep = s; break; }
  }
  const off = tzOffsetMs(v0);   // zone shown = UTC + off: ticks on multiples in that zone
  const xTicks = [];
  for (let t = Math.ceil((v0 + off) / xStep) * xStep - off; t <= v1; t += xStep) xTicks.push(t);
  return { yTicks, yLabels, yDec, maxLabelW, xTicks, xStep, sTicks, sLabels };
}

function drawGrid({ pw, ph, padT, spreadTop, spreadH, xOf }, { yOf }, sScale, { yTicks, xTicks, sTicks }) {
  const { ctx } = chart;
  ctx.lineWidth = 1;
  ctx.strokeStyle = COLORS.grid;
  ctx.beginPath();
  for (const p of yTicks) { const y = Math.round(yOf(p)) + 0.5; ctx.moveTo(0, y); ctx.lineTo(pw, y); }
  for (const v of sTicks) { const y = Math.round(sScale.yOf(v)) + 0.5; ctx.moveTo(0, y); ctx.lineTo(pw, y); }
  for (const t of xTicks) { const x = Math.round(xOf(t)) + 0.5; ctx.moveTo(x, padT); ctx.lineTo(x, padT + ph); }
  ctx.stroke();
  ctx.fillStyle = COLORS.axisLine;   // the spread panel's frame: its top edge and its zero line
  ctx.fillRect(0, spreadTop, pw, 1);
  ctx.fillRect(0, spreadTop + spreadH, pw, 1);
}

/** Gaps as shaded, hatched bands (feed outages amber with edges, client gaps grey): no price is
 *  drawn through a time we have no data for. */
function drawGaps({ pw, ph, padT, dpr, xOf }, gaps) {
  const { ctx } = chart;
  for (const g of gaps) {
    const xa = Math.max(0, Math.floor(xOf(g.start))), xb = Math.min(pw, Math.ceil(xOf(g.end)));
    const w = Math.max(1, xb - xa);
    const outage = g.kind === 'outage';
    ctx.fillStyle = outage ? COLORS.outage : COLORS.clientGap;
    ctx.fillRect(xa, padT, w, ph);
    ctx.save();
    ctx.beginPath();
    ctx.rect(xa, padT, w, ph);
    ctx.clip();
    ctx.strokeStyle = outage ? COLORS.outageHatch : COLORS.clientHatch;
    ctx.lineWidth = dpr;
    ctx.beginPath();
    const stepH = 7 * dpr;
    for (let x = xa - ph; x < xa + w; x += stepH) { ctx.moveTo(x, padT + ph); ctx.lineTo(x + ph, padT); }
    ctx.stroke();
    ctx.restore();
    if (outage) {
      ctx.fillStyle = COLORS.outageEdge;
      if (xOf(g.start) >= 0) ctx.fillRect(xa, padT, Math.max(1, dpr), ph);
      if (xOf(g.end) <= pw) ctx.fillRect(Math.max(xa, xb - dpr), padT, Math.max(1, dpr), ph);
    }
  }
}

/** One line (bid, ask, mid or spread: per column its min, max and last value, and the value holding
 *  at the left edge, leadV): a step line with a min..max bar per column, never across a gap.
 *  A BBO price is a step function: every segment is horizontal or vertical, so it is drawn with
 *  axis-aligned fillRect calls (no path stroking: cheap to rasterise at any density).
 *  Returns the last value drawn (for its tag), or null. */
function drawSeries({ pw, colW, ncols, dpr, xOf }, yOf, { gaps, crosses, tailT, lead }, minA, maxA, lastA, leadV, color) {
  const { ctx } = chart;
  const C = chart.cols;
  if (leadV == null || !Number.isFinite(leadV)) leadV = null;
  const lw = Math.max(1.5, dpr);
  const h = lw / 2;
  ctx.fillStyle = color;
  let prevV = 0, prevT = 0, pen = false, px = 0, py = 0;
  if (leadV != null) { prevV = leadV; prevT = lead.t; pen = true; px = 0; py = yOf(leadV); }
  for (let c = 0; c < ncols; c++) {
    if (!C.has[c]) continue;
    const x = (c + 0.5) * colW;
    let yTop = yOf(maxA[c]), yBot = yOf(minA[c]);
    if (pen && !crosses(prevT, C.tFirst[c])) {
      ctx.fillRect(px - h, py - h, x - px + lw, lw);          // hold the previous price
      if (py < yTop) yTop = py;
      if (py > yBot) yBot = py;
    }
    ctx.fillRect(x - h, yTop - h, lw, yBot - yTop + lw);      // the column's range
    prevV = lastA[c]; prevT = C.tLast[c]; pen = true;
    px = x; py = yOf(prevV);
  }
  if (pen) {
    // hold the last value to the right edge / the live edge, stopping at a gap
    let endT = tailT;
    for (const g of gaps) if (g.end > prevT && g.start < endT) { endT = Math.max(prevT, g.start); break; }
    const xEnd = Math.min(pw, xOf(endT));
    if (xEnd > px) ctx.fillRect(px - h, py - h, xEnd - px + h, lw);
  }
  return pen ? prevV : null;
}

/** Where the tags of the last visible ask and bid go on the price axis: at their price, ask above
 *  bid, pushed apart so they never overlap. Placed before the tick labels, which make way for them. */
function priceTags({ padT, priceH: ph, dpr }, { yOf }, lastAsk, lastBid) {
  const tagH = TAG_H * dpr;
  const tags = [];
  if (lastAsk != null) tags.push({ v: lastAsk, color: COLORS.ask, y: 0 });
  if (lastBid != null) tags.push({ v: lastBid, color: COLORS.bid, y: 0 });
  let prevY = -Infinity;
  for (const tg of tags) {   // ask above bid
    let y = clamp(yOf(tg.v), padT + tagH / 2, padT + ph - tagH / 2);
    if (y - prevY < tagH + 1) y = prevY + tagH + 1;
    prevY = tg.y = y;
  }
  return tags;
}

/** Axis lines and tick labels; a price label that a tag would cover is left out. Returns where the
 *  labels went ({x: [{x, w}], y: [{y, w}]}, device px: centre x of a time label, centre y of a price
 *  or spread label) so the crosshair's own labels can hide those they would half cover. */
function drawAxes({ pw, ph, padT, priceH, spreadTop, spreadH, dpr, labelX, xOf }, { yOf }, sScale,
                  { yTicks, yLabels, xTicks, xStep, sTicks, sLabels }, tags) {
  const { ctx } = chart;
  const labels = { x: [], y: [] };
  ctx.fillStyle = COLORS.axisLine;
  ctx.fillRect(pw, padT, Math.max(1, Math.round(dpr)), ph);
  ctx.fillRect(0, padT + ph, pw, Math.max(1, Math.round(dpr)));
  const tagH = TAG_H * dpr;
  ctx.fillStyle = COLORS.axis;
  ctx.textAlign = 'left';
  yTicks.forEach((p, i) => {
    const y = yOf(p);
    if (y < padT + 6 * dpr || y > padT + priceH - 4 * dpr) return;
    if (tags.some((tg) => Math.abs(tg.y - y) < tagH * 0.5 + 7 * dpr)) return;
    ctx.fillText(yLabels[i], labelX, y);
    labels.y.push({ y, w: ctx.measureText(yLabels[i]).width });
  });
  sTicks.forEach((v, i) => {
    const y = sScale.yOf(v);
    if (y < spreadTop + 5 * dpr) return;
    ctx.fillText(sLabels[i], labelX, y);
    labels.y.push({ y, w: ctx.measureText(sLabels[i]).width });
  });
  ctx.fillStyle = COLORS.spread;
  ctx.textBaseline = 'top';
  ctx.fillText('spread bps', 4 * dpr, spreadTop + 3 * dpr);
  ctx.fillStyle = COLORS.axis;
  ctx.textAlign = 'center';
  const ly = padT + ph + 5 * dpr;
  for (const t of xTicks) {
    const x = xOf(t);
    const text = timeLabel(t, xStep);
    const w = ctx.measureText(text).width;
    if (x - w / 2 < 2 * dpr || x + w / 2 > pw - 2 * dpr) continue;   // a label is shown whole or not at all
    ctx.fillText(text, x, ly);
    labels.x.push({ x, w });
  }
  return labels;
}

/** The price tags, on their line's colour. Returns the width of the widest. */
function drawPriceTags({ pw, axisR, dpr, labelX }, tags, dec) {
  const { ctx } = chart;
  const tagH = TAG_H * dpr;
  let widest = 0;
  ctx.textBaseline = 'middle';
  ctx.textAlign = 'left';
  for (const tg of tags) {
    const y = tg.y;
    const s = tg.v.toFixed(dec);
    widest = Math.max(widest, ctx.measureText(s).width);
    ctx.fillStyle = tg.color;
    ctx.fillRect(pw + 1, Math.round(y - tagH / 2), axisR - 1, tagH);
    ctx.fillStyle = COLORS.tagText;
    ctx.fillText(s, labelX, y + 0.5 * dpr);
  }
  return widest;
}

/** Decimals for prices on tags and the crosshair: as many as the exchange writes (the tick step's
 *  before the first update). */
function priceDecimals(sym, fallback) {
  const p = state.bbo[sym];
  return p ? Math.max(decimalsOf(p.bidPrice), decimalsOf(p.askPrice)) : fallback;
}

/** Fit the price axis to its widest label for the next draw (a 3 px dead band: it does not flicker). */
function fitAxisWidth(labelW) {
  const wantAxis = Math.ceil(labelW / chart.dpr + 12);
  if (Math.abs(wantAxis - chart.axisW) > 3) { chart.axisW = clamp(wantAxis, 44, 120); chart.dirty = true; }
}

function finishDraw(started, livePts, hasData) {
  chart.lastDrawMs = performance.now() - started;
  chart.lastDrawAt = performance.now();
  chart.drawCount++;
  const empty = $('chart-empty');
  const loading = chart.bfPending != null;
  if (!hasData) {
    empty.hidden = false;
    setText(empty, replay.on ? (replay.phase === 'connecting' ? 'Starting the replay…' : 'No replayed data in this time range') :
      chart.bfError ? `History unavailable: ${chart.bfError}` :
      loading ? 'Loading history…' : state.current ? 'No data in this time range' : 'Waiting for data…');
  } else empty.hidden = true;
  const g = chart.geo;
  if (g) {
    // plain words: what is shown, whether it follows the market, where the data comes from
    const src = g.bf && g.bf.n ? `; earlier: the server's stored ${g.bf.tier === 'bars' ? 'per-second summaries' : 'updates'}` : '';
    const updates = `${fmtInt(livePts)} ${livePts === 1 ? 'update' : 'updates'}`;
    setText($('chart-info'), replay.on
      ? `REPLAY · ${g.sym} · ${fmtSpan(g.v1 - g.v0)} ${chart.view.follow ? 'to the replayed time' : 'paused view'} · ${updates} replayed · times ${tzName(g.v1)}`
      : `${g.sym} · ${fmtSpan(g.v1 - g.v0)} ${chart.view.follow ? 'to now, following live' : 'in the past, paused'} · ` +
        `${updates} received live${src} · times ${tzName(g.v1)}`);
  }
  if (chart.hover) drawOverlay();
}

// --- crosshair: drawOverlay() on its own canvas, from the geometry of the last draw -----------

/** Crosshair + tooltip on the overlay canvas (the main chart is not redrawn for it). */
function drawOverlay() {
  const { octx, dpr } = chart;
  octx.setTransform(1, 0, 0, 1, 0, 0);
  octx.clearRect(0, 0, chart.overlay.width, chart.overlay.height);
  const tip = $('chart-tooltip');
  const g = chart.geo;
  if (!chart.hover || !g) { tip.hidden = true; return; }
  const x = chart.hover.x * dpr, y = chart.hover.y * dpr;
  if (x < 0 || x >= g.pw || y < g.padT || y > g.padT + g.ph) { tip.hidden = true; return; }
  const col = Math.min(g.ncols - 1, Math.floor(x / g.colW));
  const t = g.v0 + (col + 0.5) / g.k;
  const at = valueAt(g, col, t);
  const half = Math.round(dpr) % 2 ? 0.5 : 0;   // an odd-width line is sharp only on a half pixel
  const cx = Math.round((col + 0.5) * g.colW) + half, cy = Math.round(y) + half;
  drawCrosshair(g, cx, cy, at);
  drawCrosshairLabels(g, cx, cy, y, t);
  showTooltip(tip, g, t, at);
}

/** {bid, ask, gap} at time t in column col: the column's last value, else the previous one that
 *  still holds there (not across a gap, not beyond the live edge); the gap when t is in one. */
function valueAt(g, col, t) {
  const C = chart.cols;
  let vb = null, va = null, gapHit = null;
  for (const gp of g.gaps) if (t >= gp.start && t <= gp.end) { gapHit = gp; break; }
  if (!gapHit) {
    for (let c = col; c >= 0; c--) {
      if (C.has[c]) {
        let blocked = false;
        for (const gp of g.gaps) if (gp.start < t && gp.end > C.tLast[c]) { blocked = true; break; }
        if (!blocked && (c === col || t <= g.tailT || C.tLast[c] >= g.tailT)) { vb = C.bLast[c]; va = C.aLast[c]; }
        break;
      }
      if (c === 0 && g.lead) { vb = g.lead.bid; va = g.lead.ask; }
    }
    if (t > g.tailT + 1 / g.k) { vb = null; va = null; }
  }
  return { bid: vb, ask: va, gap: gapHit };
}

/** Dashed crosshair lines and a dot on each price at the cursor's time. */
function drawCrosshair(g, cx, cy, at) {
  const { octx, dpr } = chart;
  octx.strokeStyle = COLORS.cross;
  octx.lineWidth = Math.max(1, Math.round(dpr));
  octx.setLineDash([4 * dpr, 4 * dpr]);
  octx.beginPath();
  octx.moveTo(cx, g.padT); octx.lineTo(cx, g.padT + g.ph);
  octx.moveTo(0, cy); octx.lineTo(g.pw, cy);
  octx.stroke();
  octx.setLineDash([]);
  const yOf = (p) => g.padT + (g.hi - p) * g.ys;
  for (const [v, color] of [[at.bid, COLORS.bid], [at.ask, COLORS.ask]]) {
    if (v == null) continue;
    octx.fillStyle = color;
    octx.beginPath();
    octx.arc(cx, yOf(v), 3.5 * dpr, 0, Math.PI * 2);
    octx.fill();
  }
}

/** The cursor's price (or spread, in the spread panel) on the axis and its time on the time axis.
 *  An axis label that a crosshair label would cover in part is painted over whole first: a label is
 *  read whole or not at all. */
function drawCrosshairLabels(g, cx, cy, y, t) {
  const { octx, dpr } = chart;
  const W = chart.overlay.width;
  octx.font = `${Math.round(11 * dpr)}px ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace`;
  octx.textBaseline = 'middle';
  const inSpread = y >= g.spreadTop;
  const ps = inSpread ? `${Math.max(0, g.sScale.hi - (y - g.spreadTop) / g.sScale.ys).toFixed(3)}`
    : (g.hi - (y - g.padT) / g.ys).toFixed(g.dec);
  const lh = TAG_H * dpr;
  const span = g.v1 - g.v0;
  const ts = span > 86400e3 ? `${fmtDay(t)} ${fmtClock(t)}` : fmtClock(t, span <= 5 * 60e3);
  const tw = octx.measureText(ts).width + 12 * dpr;
  const tx = clamp(cx - tw / 2, 0, g.pw - tw);
  // hide whole the axis labels these two boxes would overlap (glyphs are about lh tall, centred)
  octx.fillStyle = COLORS.plotBg;
  for (const l of g.labels.y) {
    if (Math.abs(l.y - cy) < lh) octx.fillRect(g.pw + 2, l.y - lh / 2, W - g.pw - 2, lh);
  }
  for (const l of g.labels.x) {
    if (l.x + l.w / 2 + 2 * dpr > tx && l.x - l.w / 2 - 2 * dpr < tx + tw) {
      octx.fillRect(l.x - l.w / 2 - 2 * dpr, g.padT + g.ph + 2, l.w + 4 * dpr, lh + 2 * dpr);
    }
  }
  octx.fillStyle = COLORS.labelBg;
  octx.fillRect(g.pw + 1, cy - lh / 2, W - g.pw - 1, lh);
  octx.fillStyle = COLORS.labelText;
  octx.textAlign = 'left';
  octx.fillText(ps, g.pw + 6 * dpr, cy);
  octx.fillStyle = COLORS.labelBg;
  octx.fillRect(tx, g.padT + g.ph + 1, tw, lh + 2 * dpr);
  octx.fillStyle = COLORS.labelText;
  octx.textAlign = 'center';
  octx.fillText(ts, tx + tw / 2, g.padT + g.ph + 1 + (lh + 2 * dpr) / 2);
}

/** The tooltip beside the cursor (left of it near the right edge): the time, then bid, ask and
 *  spread there, or what the gap is. */
function showTooltip(tip, g, t, at) {
  const { dpr } = chart;
  const span = g.v1 - g.v0;
  const timeStr = span > 86400e3 ? fmtDateTime(t) : span > 3600e3 ? `${fmtDay(t)} ${fmtClock(t)}` : fmtClock(t, span <= 5 * 60e3);
  let html = `<div class="tt-time">${timeStr}</div>`;
  if (at.gap) {
    html += `<div class="tt-gap">${at.gap.kind === 'outage' ? 'Feed outage' : 'No data'}${at.gap.reason ? ': ' + escapeHtml(at.gap.reason) : ''}</div>`;
  } else if (at.bid != null && at.ask != null) {
    const vb = at.bid, va = at.ask;
    const sp = va - vb;
    const mid = (va + vb) / 2;
    html += `<div class="tt-bid"><span class="tt-k">Bid</span>${vb.toFixed(g.dec)}</div>` +
            `<div class="tt-ask"><span class="tt-k">Ask</span>${va.toFixed(g.dec)}</div>` +
            `<div><span class="tt-k">Spread</span>${sp.toFixed(g.dec)} <span class="muted">(${fmtBps(mid > 0 ? sp / mid * 1e4 : NaN)})</span></div>`;
  } else {
    html += '<div class="muted">no data</div>';
  }
  if (tip.innerHTML !== html) tip.innerHTML = html;
  tip.hidden = false;
  const cssX = chart.hover.x, cssY = chart.hover.y;
  const tw2 = tip.offsetWidth, th2 = tip.offsetHeight;
  const plotW = g.pw / dpr;
  let left = cssX + 14;
  if (left + tw2 > plotW - 4) left = cssX - tw2 - 14;
  left = clamp(left, 4, Math.max(4, plotW - tw2 - 4));
  const top = clamp(cssY - th2 - 12, 4, chart.cssH - th2 - 26);
  tip.style.transform = `translate(${Math.round(left)}px, ${Math.round(top)}px)`;
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
}

// --- the view: timeframes, zoom, pan, and the input that changes it ---------------------------

/** The canvases, and the timeframe: ?tf=, else the last one used, else the default. */
function initChart() {
  chart.canvas = $('chart');
  chart.overlay = $('chart-overlay');
  chart.ctx = chart.canvas.getContext('2d', { alpha: true });
  chart.octx = chart.overlay.getContext('2d');
  const tf = params.get('tf') || (() => { try { return localStorage.getItem('bbo.tf'); } catch { return null; } })();
  chart.tf = isTimeframe(tf) ? tf : DEFAULT_TF;
  chart.view = { span: TIMEFRAMES[chart.tf], end: 0, follow: true };
  buildTimeframeButtons();
  try { chart.showMid = localStorage.getItem('bbo.mid') === '1'; } catch { /* private mode */ }
  const mid = $('show-mid');
  setAttr(mid, 'aria-pressed', String(chart.showMid));
  mid.addEventListener('click', () => {
    chart.showMid = !chart.showMid;
    setAttr(mid, 'aria-pressed', String(chart.showMid));
    try { localStorage.setItem('bbo.mid', chart.showMid ? '1' : '0'); } catch { /* private mode */ }
    chart.dirty = true;
    requestFrame();
  });
}

/** One button #tf-<tf> per TIMEFRAMES key, in its order, before the Reset button. */
function buildTimeframeButtons() {
  $('zoom-reset').before(...Object.keys(TIMEFRAMES).map((tf) => {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'tf';
    b.id = `tf-${tf}`;
    b.dataset.tf = tf;
    b.textContent = tf;
    b.addEventListener('click', () => setTimeframe(tf));
    return b;
  }));
  markTimeframe(chart.tf);
}

function markTimeframe(tf) {
  for (const b of document.querySelectorAll('.tf')) setAttr(b, 'aria-pressed', String(b.dataset.tf === tf));
}

function setTimeframe(tf) {
  if (!isTimeframe(tf)) return;
  chart.tf = tf;
  chart.view = { span: TIMEFRAMES[tf], end: serverNow(), follow: true };
  markTimeframe(tf);
  try { localStorage.setItem('bbo.tf', tf); } catch { /* private mode */ }
  chart.dirty = true;
  scheduleBackfill(0);
  requestFrame();
}

function resetZoom() {
  setTimeframe(chart.tf);
}

/** Zoom by `factor` (< 1 zooms in) keeping time `anchor` under the same pixel. */
function zoomAt(factor, anchor) {
  const [v0, v1] = viewRange();
  if (chart.view.follow) anchor = v1;        // following live data: keep the right edge on "now"
  if (anchor == null) anchor = (v0 + v1) / 2;
  const span = clamp((v1 - v0) * factor, MIN_SPAN, MAX_SPAN);
  const f = span / (v1 - v0);
  let end = anchor + (v1 - anchor) * f;
  const now = serverNow();
  const follow = chart.view.follow && anchor >= now - (v1 - v0) * 0.02 || end >= now;
  if (end > now) end = now;
  chart.view = { span, end, follow: follow && end >= now - 1 };
  if (chart.view.follow) chart.view.end = now;
  // a zoomed view is no timeframe any more: no button stays pressed (Reset or a button brings one back)
  markTimeframe(span === TIMEFRAMES[chart.tf] ? chart.tf : null);
  chart.dirty = chart.interactive = true;
  scheduleBackfill(250);
  requestFrame();
}

function panBy(ms) {
  const [, v1] = viewRange();
  const now = serverNow();
  let end = v1 + ms;
  const follow = end >= now;
  if (follow) end = now;
  chart.view = { span: chart.view.span, end, follow };
  chart.dirty = chart.interactive = true;
  scheduleBackfill(250);
  requestFrame();
}

function initChartInput() {
  const cv = chart.canvas;
  $('zoom-reset').addEventListener('click', resetZoom);
  window.addEventListener('resize', () => { chartLayout(); requestFrame(); });
  if (window.ResizeObserver) new ResizeObserver(() => { chartLayout(); requestFrame(); }).observe(cv.parentElement);
  cv.addEventListener('wheel', onChartWheel, { passive: false });
  cv.addEventListener('pointerdown', onChartPointerDown);
  cv.addEventListener('pointermove', onChartPointerMove);
  cv.addEventListener('pointerup', onChartPointerEnd);
  cv.addEventListener('pointercancel', onChartPointerEnd);
  cv.addEventListener('pointerleave', (e) => {
    if (e.pointerType === 'mouse' && !chart.drag) { chart.hover = null; drawOverlay(); }
  });
  cv.addEventListener('dblclick', () => resetZoom());
  cv.addEventListener('keydown', onChartKey);
  cv.addEventListener('blur', () => { if (!chart.hover) drawOverlay(); });
}

/** Pointer position in CSS px inside the chart canvas. */
function canvasPoint(e) {
  const r = chart.canvas.getBoundingClientRect();
  return { x: e.clientX - r.left, y: e.clientY - r.top };
}
/** Plot width in CSS px: the last draw's, else the canvas less the axis. */
function plotCssWidth() {
  const g = chart.geo;
  return g ? g.pw / g.dpr : chart.cssW - chart.axisW;
}
function timeAtCssX(x) {
  const [v0, v1] = viewRange();
  return v0 + (x / plotCssWidth()) * (v1 - v0);
}
function msPerCssPx() {
  const [v0, v1] = viewRange();
  return (v1 - v0) / Math.max(1, plotCssWidth());
}

/** Vertical wheel zooms about the time under the cursor, horizontal wheel pans. */
function onChartWheel(e) {
  e.preventDefault();
  const unit = e.deltaMode === 1 ? 16 : e.deltaMode === 2 ? 400 : 1;
  const dy = (Math.abs(e.deltaY) >= Math.abs(e.deltaX) ? e.deltaY : 0) * unit;
  const dx = (Math.abs(e.deltaX) > Math.abs(e.deltaY) ? e.deltaX : 0) * unit;
  if (dx) { panBy(dx * msPerCssPx()); return; }
  if (!dy) return;
  const p = canvasPoint(e);
  zoomAt(Math.exp(clamp(dy, -300, 300) * 0.0015), timeAtCssX(p.x));
}

/** One pointer starts a drag (a touch also shows the crosshair), a second one a pinch. */
function onChartPointerDown(e) {
  if (e.button !== 0 && e.pointerType === 'mouse') return;
  try { chart.canvas.setPointerCapture(e.pointerId); } catch { /* synthetic or already released pointer */ }
  const p = canvasPoint(e);
  chart.pointers.set(e.pointerId, p);
  if (chart.pointers.size === 1) {
    chart.drag = { x: p.x, moved: false, pointerType: e.pointerType };
    if (e.pointerType !== 'mouse') { chart.hover = p; drawOverlay(); }
  } else if (chart.pointers.size === 2) {
    const [a, b] = [...chart.pointers.values()];
    chart.drag = { pinch: Math.abs(a.x - b.x) || 1, mid: (a.x + b.x) / 2, moved: true };
    chart.hover = null; drawOverlay();
  }
}

/** Pinch: zoom and pan with the two pointers. Drag: pan once it moved 3 px (less is a click).
 *  A mouse that is not dragging moves the crosshair. */
function onChartPointerMove(e) {
  const p = canvasPoint(e);
  if (chart.pointers.has(e.pointerId)) chart.pointers.set(e.pointerId, p);
  const d = chart.drag;
  if (d && d.pinch != null && chart.pointers.size >= 2) {
    const [a, b] = [...chart.pointers.values()];
    const dist = Math.abs(a.x - b.x) || 1;
    const mid = (a.x + b.x) / 2;
    const ms = msPerCssPx();
    if (mid !== d.mid) panBy(-(mid - d.mid) * ms);
    zoomAt(d.pinch / dist, timeAtCssX(mid));
    d.pinch = dist; d.mid = mid;
    return;
  }
  if (d && d.x != null && chart.pointers.size === 1) {
    const dx = p.x - d.x;
    if (!d.moved && Math.abs(dx) < 3) { if (e.pointerType === 'mouse') { chart.hover = p; drawOverlay(); } return; }
    d.moved = true;
    chart.canvas.classList.add('dragging');
    panBy(-dx * msPerCssPx());
    d.x = p.x;
    chart.hover = e.pointerType === 'mouse' ? p : null;
    return;
  }
  if (e.pointerType === 'mouse') { chart.hover = p; drawOverlay(); }
}

/** Pointer up / cancel: the last one ends the drag (a touch drag also hides the crosshair); of a
 *  pinch, the pointer left goes on dragging. */
function onChartPointerEnd(e) {
  chart.pointers.delete(e.pointerId);
  chart.canvas.classList.remove('dragging');
  if (chart.pointers.size === 0) {
    const d = chart.drag;
    chart.drag = null;
    if (e.pointerType !== 'mouse' && d && d.moved) { chart.hover = null; drawOverlay(); }
  } else if (chart.pointers.size === 1) {
    const [p] = [...chart.pointers.values()];
    chart.drag = { x: p.x, moved: true };
  }
}

/** Arrow keys pan, + / - zoom, 0 (Home, Escape) resets, End jumps back to live data. */
function onChartKey(e) {
  const [v0, v1] = viewRange();
  const span = v1 - v0;
  let handled = true;
  switch (e.key) {
    case 'ArrowLeft': panBy(-span * 0.1); break;
    case 'ArrowRight': panBy(span * 0.1); break;
    case '+': case '=': case 'ArrowUp': zoomAt(0.8); break;
    case '-': case '_': case 'ArrowDown': zoomAt(1.25); break;
    case '0': case 'Home': case 'Escape': resetZoom(); break;
    case 'End': panBy(serverNow()); break;
    default: handled = false;
  }
  if (handled) e.preventDefault();
}

/** Another symbol is shown: its own backfill, no crosshair left over from the previous one. */
function chartSymbolChanged() {
  chart.dirty = true;
  chart.hover = null;
  if (chart.bfPending) { chart.bfPending.ctl.abort(); chart.bfPending = null; }
  scheduleBackfill(0);
}

// --- backfill from /api/history/series -----------------------------------------

let bfTimer = 0;
function scheduleBackfill(delay) {
  clearTimeout(bfTimer);
  bfTimer = setTimeout(ensureBackfill, delay);
}

/** Fetch a decimated series for the view when the live buffer does not cover it. */
function ensureBackfill(force = false) {
  const sym = state.current;
  if (!sym || !chart.cssW || replay.on) return;
  const [v0, v1raw] = viewRange();
  const now = serverNow();
  const v1 = Math.min(v1raw, now);
  const liveFrom = liveSince(sym);
  if (v0 >= liveFrom && !force) return;                 // the live session covers the whole view
  const plotW = Math.max(50, chart.cssW - chart.axisW);
  const msPerPx = (v1raw - v0) / plotW;
  const bf = chart.backfill[sym];
  const needTo = Math.min(v1, liveFrom);
  if (!force && bf) {
    const coversStart = bf.start <= v0 + msPerPx;
    const coversEnd = bf.end >= needTo - Math.max(needTo === liveFrom ? 0 : 3000, msPerPx * 3);
    const fineEnough = bf.bucket_ms <= Math.max(msPerPx * 2.5, bf.tier === 'bars' ? 1000 : 0) ||
                       bf.start >= v0 - (v1raw - v0) * 0.05 && bf.bucket_ms <= msPerPx * 4;
    if (coversStart && coversEnd && fineEnough) return;
  }
  const start = Math.floor(v0), end = Math.ceil(v1);
  if (end <= start) return;
  // one bucket per CSS pixel, capped at 1000: the chart min/max-decimates per pixel column anyway,
  // and 1000 buckets keep a 1-day series under ~100 kB of JSON even on a 2560-px screen
  const buckets = clamp(Math.round(plotW), 50, 1000);
  const key = `${sym}|${start}|${end}|${buckets}`;
  if (chart.bfPending) {
    if (chart.bfPending.key === key) return;
    chart.bfPending.ctl.abort();
  }
  const ctl = new AbortController();
  chart.bfPending = { ctl, key, sym };
  const url = `/api/history/series?symbol=${encodeURIComponent(sym)}&start_time=${start}&end_time=${end}&buckets=${buckets}`;
  fetchJson(url, { signal: ctl.signal }).then((r) => {
    if (chart.bfPending && chart.bfPending.ctl === ctl) chart.bfPending = null;
    const n = r.time.length;
    const f64 = (a) => Float64Array.from(a, (v) => (v == null ? NaN : v));
    chart.backfill[sym] = {
      sym, n, start: r.start_time, end: r.end_time, bucket_ms: r.bucket_ms, tier: r.tier,
      time: f64(r.time), bidFirst: f64(r.bidFirst), bidMin: f64(r.bidMin), bidMax: f64(r.bidMax), bidLast: f64(r.bidLast),
      askFirst: f64(r.askFirst), askMin: f64(r.askMin), askMax: f64(r.askMax), askLast: f64(r.askLast),
      outages: Array.isArray(r.outages) ? r.outages : [], fetchedAt: Date.now(),
    };
    chart.bfError = null;
    chart.dirty = true;
    requestFrame();
  }).catch((err) => {
    if (err.name === 'AbortError') return;
    if (chart.bfPending && chart.bfPending.ctl === ctl) chart.bfPending = null;
    chart.bfError = err.message;
    chart.dirty = true;
    requestFrame();
  });
}

// ###########################################################################
// §6 History: the historical data panel (latency statistics, paged updates, CSV link)
// ###########################################################################

const hist = {
  symbol: null,         // the range loaded: symbol, start and end (server ms, inclusive)
  start: 0,
  end: 0,
  limit: 50,            // rows per page
  pages: [],            // stack of {end, exclude:Set<updateId>} — the page shown is the last one
  rows: [],             // rows of the page shown (chronological, as the API returns them)
  kind: 'updates',      // updates | bars
  hasOlder: false,      // the page was full: there may be older rows
  note: '',             // where the rows come from, when the table cannot say it ('' : nothing to say)
  seq: 0,               // load generation: answers to an earlier load are dropped
  stats: null,          // [latency statistics, quote figures] shown (repainted when the time zone changes)
};

/** The panel's symbol list follows the known symbols; the symbol chosen stays while it exists. */
function renderHistSymbols() {
  const hs = $('hist-symbol');
  const prev = hs.value;
  hs.replaceChildren(...state.symbols.map((s) => new Option(s, s)));
  hs.value = state.symbols.includes(prev) ? prev : state.current || state.symbols[0] || '';
}

function histRangeFromForm() {
  const range = $('hist-range').value;
  if (range !== 'custom') {
    const end = serverNow();
    const start = end - Number(range);
    $('hist-start').value = fmtDateTime(start);
    $('hist-end').value = fmtDateTime(end);
    return [Math.floor(start), Math.ceil(end)];
  }
  const start = parseDateTime($('hist-start').value);
  const end = parseDateTime($('hist-end').value) + 999;   // the fields have 1 s resolution: include the whole second
  return [start, end];
}

function showHistError(msg) {
  const box = $('hist-error');
  box.hidden = !msg;
  setText(box, msg || '');
}

async function histLoad() {
  const sym = $('hist-symbol').value;
  const [start, end] = histRangeFromForm();
  if (!sym) { showHistError('Choose a symbol.'); return; }
  if (!Number.isFinite(start) || !Number.isFinite(end)) {
    showHistError(`Enter the start and end as YYYY-MM-DD HH:MM:SS (24-hour, ${tzName()}).`);
    return;
  }
  if (start > end) { showHistError('The start time must be before the end time.'); return; }
  showHistError('');
  Object.assign(hist, { symbol: sym, start, end, limit: Number($('hist-limit').value) || 50, pages: [] });
  const csv = $('hist-csv');
  // Fetched with the token header on click (histDownloadCsv): the link itself never leads to the API.
  csv.dataset.url = `/api/history/updates?symbol=${encodeURIComponent(sym)}&start_time=${start}&end_time=${end}&limit=10000&format=csv`;
  csv.setAttribute('download', `${sym}-${start}-${end}.csv`);
  csv.setAttribute('aria-disabled', 'false');
  csv.title = 'Download the newest 10,000 updates of the range as CSV';
  const seq = ++hist.seq;
  $('hist-load').disabled = true;
  const statsBox = $('hist-stats');
  statsBox.setAttribute('aria-busy', 'true');
  const q = `symbol=${encodeURIComponent(sym)}&start_time=${start}&end_time=${end}`;
  const statsP = Promise.all([
    fetchJson(`/api/history/latency?${q}`),
    histQuoteFigures(sym, start, end).catch(() => null),   // the latency figures stand without these
  ]).then(([s, quotes]) => { if (seq === hist.seq) { hist.stats = [s, quotes]; renderHistStats(s, quotes); } })
    .catch((err) => { if (seq === hist.seq) { showHistError(`Latency statistics: ${err.message}`); statsBox.replaceChildren(); } });
  const pageP = histFetchPage({ end, exclude: new Set() }, seq);
  await Promise.allSettled([statsP, pageP]);
  if (seq === hist.seq) { $('hist-load').disabled = false; statsBox.removeAttribute('aria-busy'); }
}

async function histFetchPage(page, seq) {
  const extra = page.exclude.size;
  const url = `/api/history/updates?symbol=${encodeURIComponent(hist.symbol)}&start_time=${hist.start}` +
              `&end_time=${page.end}&limit=${Math.min(10000, hist.limit + extra)}`;
  $('hist-older').disabled = true;
  $('hist-newer').disabled = true;
  try {
    const r = await fetchJson(url);
    if (seq !== hist.seq) return;
    let rows, kind;
    if ((!r.updates || !r.updates.length) && Array.isArray(r.bars) && r.bars.length) {
      kind = 'bars';
      rows = r.bars.filter((b) => !page.exclude.has(`t${b.time}`));
    } else {
      kind = 'updates';
      rows = (r.updates || []).filter((u) => !page.exclude.has(String(u.updateId)));
    }
    if (rows.length > hist.limit) rows = rows.slice(rows.length - hist.limit);
    hist.pages.push(page);
    hist.rows = rows;
    hist.kind = kind;
    hist.hasOlder = rows.length >= hist.limit;
    hist.note = histNote(r, kind);
    renderHistTable();
  } catch (err) {
    if (seq !== hist.seq) return;
    showHistError(`Updates: ${err.message}`);
    hist.rows = [];
    hist.note = '';
    renderHistTable();
  }
}

/** The range's quote figures: updates per second, and the share of the time a two-sided quote was
 *  live — from the symbol's first quote (none before it: asked as the newest update up to the start)
 *  to the end of the range or now, less the feed outages the server recorded for the symbol. */
async function histQuoteFigures(sym, start, end) {
  const q = `symbol=${encodeURIComponent(sym)}`;
  const [series, before] = await Promise.all([
    fetchJson(`/api/history/series?${q}&start_time=${start}&end_time=${end}&buckets=1000`),
    fetchJson(`/api/history/updates?${q}&end_time=${start}&limit=1`),
  ]);
  const to = Math.min(end, serverNow());
  if (to <= start) return null;
  const updates = (series.count || []).reduce((a, b) => a + b, 0);
  const quotedBefore = (before.updates && before.updates.length) || (before.bars && before.bars.length);
  const from = quotedBefore ? start : series.time && series.time.length ? Math.max(start, series.time[0]) : to;
  const spans = (series.outages || []).map((o) => [Math.max(o.start, from), Math.min(o.end ?? to, to)])
    .filter(([a, b]) => b > a).sort((a, b) => a[0] - b[0]);
  let down = 0, reach = from;
  for (const [a, b] of spans) {        // merged: overlapping outages count once
    if (b <= reach) continue;
    down += b - Math.max(a, reach);
    reach = b;
  }
  return { rate: updates / ((to - start) / 1000), availability: Math.max(0, to - from - down) / (to - start),
           firstQuote: quotedBefore ? null : from < to ? from : null, outageMs: down };
}

/** What the rows cannot say themselves: raw updates older than rawFrom are gone (so the range is
 *  incomplete and older ranges come as 1 s bars), or the rows are 1-second bars. */
function histNote(r, kind) {
  if (kind === 'bars') return 'Raw updates of this range are no longer kept: the rows are 1-second bars (last bid and ask, mean latency).';
  if (r.complete === false && r.rawFrom) return `Raw updates are kept from ${fmtDateTime(r.rawFrom)}; older ranges show 1 s bars.`;
  return '';
}

const rowTime = (r) => (r.serverTimestamp ?? r.time);
const rowKey = (r) => (r.updateId != null ? String(r.updateId) : `t${r.time}`);

// A blob: URL handed to a download must outlive the click that starts it (revoking at once can
// cancel the download); a minute is far longer than saving 10,000 rows (~1 MB) takes.
const BLOB_URL_LIFETIME_MS = 60_000;

/** The CSV: fetched with `Authorization` (a token must never go in a URL), saved from a blob: URL. */
async function histDownloadCsv(e) {
  e.preventDefault();
  const link = $('hist-csv');
  if (link.getAttribute('aria-disabled') === 'true' || !link.dataset.url || link.getAttribute('aria-busy') === 'true') return;
  link.setAttribute('aria-busy', 'true');
  try {
    const r = await apiFetch(link.dataset.url);
    if (!r.ok) {
      let msg = `HTTP ${r.status}`;
      try { msg = (await r.json()).error || msg; } catch { /* not JSON */ }
      throw new Error(msg);
    }
    const href = URL.createObjectURL(await r.blob());
    const a = document.createElement('a');
    a.href = href;
    a.download = link.getAttribute('download');
    a.hidden = true;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(href), BLOB_URL_LIFETIME_MS);
  } catch (err) {
    showHistError(`CSV: ${err.message}`);
  } finally {
    link.removeAttribute('aria-busy');
  }
}

function histOlder() {
  if (!hist.rows.length) return;
  const oldest = rowTime(hist.rows[0]);
  // The API pages by time only (newest `limit` rows up to end_time): ask again up to the
  // oldest time shown, and drop the rows of that same millisecond that are already shown.
  // When every row shown sits in that millisecond (a burst bigger than a page), the boundary
  // does not move: carry the previous page's exclude set forward so its rows stay excluded too.
  const cur = hist.pages[hist.pages.length - 1];
  const exclude = new Set(hist.rows.filter((r) => rowTime(r) === oldest).map(rowKey));
  if (cur && cur.end === oldest) for (const k of cur.exclude) exclude.add(k);
  histFetchPage({ end: oldest, exclude }, hist.seq);
}

function histNewer() {
  if (hist.pages.length < 2) return;
  hist.pages.pop();
  const page = hist.pages.pop();
  histFetchPage(page, hist.seq);
}

function renderHistStats(s, quotes) {
  const box = $('hist-stats');
  const items = [['count', 'Updates', s.count == null ? '—' : fmtInt(s.count), null]];
  if (quotes) {
    items.push(['rate', 'Updates / s', fmtRate(quotes.rate), null]);
    const pct = quotes.availability * 100;
    items.push(['avail', 'Quote live', `${pct >= 99.95 && pct < 100 ? pct.toFixed(2) : pct.toFixed(1)} %`,
                pct >= 99.9 ? 'good' : pct >= 99 ? 'warn' : 'bad']);
  }
  const why = !quotes ? {} : {
    avail: `Share of the range with a live two-sided quote: none ${quotes.firstQuote != null
      ? `before the first one, at ${fmtDateTime(quotes.firstQuote)} ${tzName(quotes.firstQuote)}` : 'missing at the start'}` +
      `; feed outages ${fmtDuration(quotes.outageMs)}.`,
    rate: 'Quote updates per second, averaged over the whole range.',
  };
  for (const [k, label] of [['min', 'Min'], ['mean', 'Mean'], ['p50', 'p50'], ['p90', 'p90'], ['p99', 'p99'], ['max', 'Max']]) {
    items.push([k, label, fmtMs(s[k]), level(s[k], ...LATENCY_LEVELS)]);
  }
  items.push(['tier', 'Source', s.tier === 'bars' ? '1 s bars' : s.tier === 'raw' ? 'raw' : (s.tier || '—'), null]);
  const cap = document.createElement('p');
  cap.className = 'stats-caption';
  cap.textContent = `${hist.symbol} · ${fmtDateTime(s.start_time ?? hist.start)} – ${fmtDateTime(Math.min(s.end_time ?? hist.end, hist.end))} ${tzName()} · ` +
    'updates, share of time with a live two-sided quote, and latency exchange → server';
  box.replaceChildren(cap, ...items.map(([k, label, v, lvl]) => {
    const d = document.createElement('div');
    d.className = 'stat';
    d.dataset.stat = k;
    const kk = document.createElement('span');
    kk.className = 'k';
    kk.textContent = label;
    const vv = document.createElement('span');
    vv.className = 'v';
    vv.textContent = v;
    if (lvl) vv.dataset.level = lvl;
    if (why[k]) d.title = why[k];
    d.append(kk, vv);
    return d;
  }));
  if (s.approximate) box.title = 'Percentiles from 1-second bars are approximate';
  if (s.legs) box.append(histLegsTable(s.legs, s.legsComplete));
}

// The legs of /api/history/latency, in the order an update travels.
const LEG_ROWS = [
  ['exchangeInternal', 'Exchange: event − transaction time'],
  ['exchangeToServer', 'Exchange → server'],
  ['exchangeToServerCorrected', 'Exchange → server, clock offset removed'],
  ['serverInternal', 'Server: emit − receive'],
];

/** The range's latency legs: a row each (p50, p90, p99, max, count). */
function histLegsTable(legs, complete) {
  const t = document.createElement('table');
  t.className = 'legs-table';
  t.id = 'hist-legs';
  const cap = t.createCaption();
  cap.textContent = `Latency by leg${complete === false ? ' (raw updates of part of the range are no longer kept)' : ''}`;
  const head = t.createTHead().insertRow();
  for (const h of ['Leg', 'p50', 'p90', 'p99', 'Max', 'Updates']) {
    const th = document.createElement('th');
    th.scope = 'col';
    th.textContent = h;
    head.append(th);
  }
  const body = t.createTBody();
  for (const [key, label] of LEG_ROWS) {
    const leg = legs[key];
    if (!leg) continue;
    const tr = body.insertRow();
    tr.dataset.leg = key;
    const th = document.createElement('th');
    th.scope = 'row';
    th.textContent = label;
    tr.append(th);
    for (const k of ['p50', 'p90', 'p99', 'max']) tr.insertCell().textContent = fmtMs(leg[k]);
    tr.insertCell().textContent = fmtInt(leg.count || 0);
  }
  return t;
}

/** The spread in bps for a table cell (the column head says "bps"). */
const bpsCell = (sm) => (sm && Number.isFinite(sm.bps) ? fmtBps(sm.bps).slice(0, -4) : '—');

function renderHistTable() {
  const tbody = $('hist-table').tBodies[0];
  const rows = hist.rows.slice().reverse();   // newest first
  const frag = document.createDocumentFragment();
  const td = (text, cls) => { const c = document.createElement('td'); if (cls) c.className = cls; c.textContent = text; return c; };
  if (!rows.length) {
    const tr = document.createElement('tr');
    const c = td('No updates in this range.', 'empty');
    c.colSpan = 9;
    tr.append(c);
    frag.append(tr);
  }
  const withMs = hist.end - hist.start <= 2 * 86400e3;
  for (const r of rows) {
    const tr = document.createElement('tr');
    if (hist.kind === 'bars') {
      tr.dataset.time = r.time;
      // Bars carry floats: written with the symbol's decimals ("30000.00"), the spread in exact decimals.
      const d = priceDecimals(hist.symbol, null);
      const price = (v) => (v == null ? null : d == null ? String(v) : v.toFixed(d));
      const bid = price(r.bidLast), ask = price(r.askLast);
      const lat = r.latencyMean;
      const sp = bid != null && ask != null ? spreadMid(bid, ask) : null;
      const tc = document.createElement('td');
      const dpart = document.createElement('span');
      dpart.className = 'date';
      dpart.textContent = fmtDateTime(r.time).slice(0, 11);
      tc.append(dpart, fmtClock(r.time));
      tr.append(tc, td(bid ?? '—', 'r bid'), td('—', 'r opt'),
        td(ask ?? '—', 'r ask'), td('—', 'r opt'), td(sp ? sp.spread : '—', 'r opt3'), td(bpsCell(sp), 'r bps'),
        td(fmtMs(lat), 'r'), td(`1 s bar · ${r.count}`, 'r opt2'));
    } else {
      tr.dataset.updateId = r.updateId;
      const sm = spreadMid(r.bidPrice, r.askPrice);
      const t = r.timestamp ?? r.serverTimestamp;
      const tc = document.createElement('td');
      const dpart = document.createElement('span');
      dpart.className = 'date';
      dpart.textContent = fmtDateTime(t).slice(0, 11);
      tc.append(dpart, fmtClock(t, withMs));
      tc.title = `exchange ${fmtDateTime(t, true)} · server ${fmtDateTime(r.serverTimestamp, true)}`;
      const lat = td(r.backendLatency == null ? 'n/a' : fmtMs(r.backendLatency), 'r lat');
      lat.dataset.level = level(r.backendLatency, ...LATENCY_LEVELS);
      tr.append(tc, td(r.bidPrice, 'r bid'), td(r.bidQty, 'r opt'), td(r.askPrice, 'r ask'), td(r.askQty, 'r opt'),
        td(sm ? sm.spread : '—', 'r opt3'), td(bpsCell(sm), 'r bps'), lat, td(String(r.updateId ?? '—'), 'r opt2'));
    }
    frag.append(tr);
  }
  tbody.replaceChildren(frag);
  const pageNo = hist.pages.length;
  let label = `Page ${pageNo}`;
  if (rows.length) {
    const a = rowTime(rows[rows.length - 1]), b = rowTime(rows[0]);
    label += ` · ${rows.length} ${hist.kind === 'bars' ? 'bars' : 'rows'} · ${fmtClock(a)} – ${fmtClock(b)} ${tzName(b)}`;
  }
  setText($('hist-page'), label);
  $('hist-newer').disabled = pageNo < 2;
  $('hist-older').disabled = !hist.hasOlder;
  const note = $('hist-note');
  note.hidden = !hist.note;
  setText(note, hist.note);
}

/** The history panel follows the symbol selected above; a panel loaded once reloads for it. */
function histFollow(sym) {
  const hs = $('hist-symbol');
  if (!sym || hs.value === sym || ![...hs.options].some((o) => o.value === sym)) return;
  hs.value = sym;
  if (hist.symbol) histLoad();
}

function initHistory() {
  const form = $('hist-form');
  // the panel's own list selects the symbol above too (one symbol on the whole page), and loads
  $('hist-symbol').addEventListener('change', () => { selectSymbol($('hist-symbol').value); histLoad(); });
  form.addEventListener('submit', (e) => { e.preventDefault(); histLoad(); });
  $('hist-range').addEventListener('change', () => {
    if ($('hist-range').value !== 'custom') histRangeFromForm();
  });
  for (const id of ['hist-start', 'hist-end']) {
    $(id).addEventListener('input', () => { $('hist-range').value = 'custom'; });
  }
  $('hist-older').addEventListener('click', histOlder);
  $('hist-newer').addEventListener('click', histNewer);
  $('hist-csv').addEventListener('click', histDownloadCsv);
  histRangeFromForm();
}

// ###########################################################################
// §7 Controls and bootstrap: symbol selection, timers, boot, test hooks
// ###########################################################################

function selectSymbol(sym, focusTab = false) {
  if (!sym || sym === state.current) return;
  state.current = sym;
  try { localStorage.setItem('bbo.symbol', sym); } catch { /* ignore */ }
  dirty.symbols = dirty.bbo = dirty.status = dirty.tabs = true;
  chartSymbolChanged();
  histFollow(sym);
  if (focusTab) {
    const b = el['symbol-tabs'].querySelector(`[data-symbol="${CSS.escape(sym)}"]`);
    if (b) b.focus();
  }
  requestFrame();
}

function initSymbolInput() {
  el['symbol-select'].addEventListener('change', (e) => selectSymbol(e.target.value));
  el['symbol-tabs'].addEventListener('click', (e) => {
    const b = e.target.closest('.sym-tab');
    if (b) selectSymbol(b.dataset.symbol);
  });
  el['symbol-tabs'].addEventListener('keydown', (e) => {
    const i = state.symbols.indexOf(state.current);
    let j = -1;
    if (e.key === 'ArrowRight') j = (i + 1) % state.symbols.length;
    else if (e.key === 'ArrowLeft') j = (i - 1 + state.symbols.length) % state.symbols.length;
    else if (e.key === 'Home') j = 0;
    else if (e.key === 'End') j = state.symbols.length - 1;
    if (j >= 0) { e.preventDefault(); selectSymbol(state.symbols[j], true); }
  });
}

/** Show every time in UTC or in local time: the clocks, chart, history table and its From / To
 *  fields (which keep the same instants, written in the new zone). */
function setTimeZone(utc) {
  if (tz.utc === utc) return;
  const range = $('hist-range').value === 'custom' ? histRangeFromForm() : null;
  tz.utc = utc;
  try { localStorage.setItem('bbo.tz', utc ? 'utc' : 'local'); } catch { /* private mode */ }
  renderTimeZone();
  if (range) {
    if (Number.isFinite(range[0])) $('hist-start').value = fmtDateTime(range[0]);
    if (Number.isFinite(range[1])) $('hist-end').value = fmtDateTime(range[1] - 999);
  } else histRangeFromForm();
  if (hist.symbol) renderHistTable();
  if (hist.stats) renderHistStats(...hist.stats);
  chart.dirty = true;
  dirty.status = dirty.bbo = true;
  requestFrame();
}
function renderTimeZone() {
  for (const n of document.querySelectorAll('.tz-name')) setText(n, tz.utc ? 'UTC' : 'local');
  setText($('tz-text'), tz.utc ? 'UTC' : 'Local');
  setAttr($('tz-toggle'), 'aria-label', `Times shown in ${tzName()}; switch to ${tz.utc ? 'local time' : 'UTC'}`);
}

// --- the feed's symbols, edited from the page (only when the server's welcome says feedEdit) ---

const feedEdit = { symbols: null, busy: false };   // symbols: the feed's list from the last ack (null: from feed_status)

/** The feed's symbols: the last add / remove ack's list, else feed_status's. */
function feedSymbols() {
  if (feedEdit.symbols) return feedEdit.symbols;
  return state.feed && state.feed.symbols ? Object.keys(state.feed.symbols).sort() : [];
}

function renderFeedEdit() {
  const w = state.welcome;
  const on = !!(w && w.feedEdit) && state.conn.state === 'connected';
  $('feed-edit').hidden = !on;
  if (!on) return;
  const syms = feedSymbols();
  const list = $('feed-symbols');
  if (list.dataset.list !== syms.join(',')) {
    list.dataset.list = syms.join(',');
    list.replaceChildren(...syms.map((sym) => {
      const li = document.createElement('li');
      const name = document.createElement('span');
      name.textContent = sym;
      const b = document.createElement('button');
      b.type = 'button';
      b.className = 'btn btn-ghost feed-remove';
      b.dataset.remove = sym;
      b.textContent = 'Remove';
      b.setAttribute('aria-label', `Remove ${sym} from the feed`);
      b.disabled = syms.length < 2;     // the feed keeps at least one symbol
      li.append(name, b);
      return li;
    }));
  }
  const full = w.maxFeedSymbols > 0 && syms.length >= w.maxFeedSymbols;
  $('feed-add-btn').disabled = feedEdit.busy || full;
  $('feed-add-symbol').disabled = full;
  $('feed-add-symbol').placeholder = full ? `at most ${w.maxFeedSymbols} symbols` : 'e.g. SOLUSDT';
}

function showFeedEditError(msg) {
  const box = $('feed-edit-error');
  box.hidden = !msg;
  setText(box, msg || '');
}

/** feed_add_symbol / feed_remove_symbol; the ack is {ok, symbols} or {error}. */
function editFeed(event, symbol) {
  feedEdit.busy = true;
  showFeedEditError('');
  renderFeedEdit();
  socket.emit(event, { symbol }, (err, res) => {
    feedEdit.busy = false;
    if (err || !res || res.error || !Array.isArray(res.symbols)) {
      showFeedEditError(`${event === 'feed_add_symbol' ? 'Adding' : 'Removing'} ${symbol}: ${err ? err.message : (res && res.error) || 'no answer'}`);
    } else {
      feedEdit.symbols = res.symbols.slice().sort();
      if (event === 'feed_add_symbol') {
        $('feed-add-symbol').value = '';
        if (addSymbol(symbol)) dirty.symbols = true;
      } else {
        state.symbols = state.symbols.filter((s) => s !== symbol);
        dirty.symbols = true;
        if (state.current === symbol) selectSymbol(state.symbols[0]);
      }
    }
    renderFeedEdit();
    requestFrame();
  });
}

function initFeedEdit() {
  $('feed-add-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const sym = $('feed-add-symbol').value.trim().toUpperCase();
    if (!/^[A-Z0-9]{2,20}$/.test(sym)) { showFeedEditError('A symbol is 2 to 20 letters and digits, e.g. SOLUSDT.'); return; }
    editFeed('feed_add_symbol', sym);
  });
  $('feed-symbols').addEventListener('click', (e) => {
    const b = e.target.closest('[data-remove]');
    if (b) editFeed('feed_remove_symbol', b.dataset.remove);
  });
}

// --- replay: the history panel's range played back through /replay (state and events: §3) -----

const REPLAY_SPEED_KEY = 'bbo.replaySpeed';

function showReplayError(msg) {
  const box = $('replay-error');
  box.hidden = !msg;
  setText(box, msg || '');
}

/** Entering or leaving a replay: the pill, prices, tabs and title change at once, in this task
 *  (none of them may go on showing the other mode's data until a later frame); the chart follows. */
function replayChanged() {
  chart.dirty = true;
  chart.hover = null;
  dirty.replay = dirty.status = dirty.bbo = dirty.tabs = false;
  renderStatus();
  renderBbo();
  renderTabs();
  renderTitle();
  requestFrame();
}

/** Replay the history panel's range (From / To, in the zone shown) at the speed chosen: every
 *  symbol with recorded data, merged in time order by the server. */
async function startReplay() {
  const [from, to] = histRangeFromForm();
  if (!Number.isFinite(from) || !Number.isFinite(to)) {
    showReplayError(`Enter the start and end as YYYY-MM-DD HH:MM:SS (24-hour, ${tzName()}).`);
    return;
  }
  showReplayError('');
  let symbols;
  try {
    symbols = (await fetchJson('/api/history/symbols')).symbols;
  } catch (err) {
    showReplayError(`Replay: cannot list the recorded symbols: ${err.message}`);
    return;
  }
  if (!Array.isArray(symbols) || !symbols.length) { showReplayError('Replay: nothing is recorded yet.'); return; }
  if (replay.on) socket.leave(REPLAY_NAMESPACE);
  else replay.savedView = { ...chart.view };
  Object.assign(replay, {
    on: true, phase: 'connecting', symbols: symbols.slice(0, 100), from, to, speed: Number($('replay-speed').value),
    clock: $('replay-clock').value, position: null, statusAt: Date.now(), outages: [], rows: 0, pauseOnReconnect: false,
  });
  clearReplayed();
  // the chart follows the replayed time, over the timeframe or the whole range when it is shorter
  Object.assign(chart.view, { follow: true, span: clamp(to - from, MIN_SPAN, TIMEFRAMES[chart.tf]) });
  socket.join(REPLAY_NAMESPACE, {
    // After a lost connection it starts again where it was (the rows from there on).
    auth: () => ({ symbols: replay.symbols, from: replay.position == null ? replay.from : replayPosition(), to: replay.to,
                   speed: replay.speed, clock: replay.clock, ...(auth.token ? { token: auth.token } : {}) }),
    onConnect: () => {                // (its replay_status follows at once)
      if (replay.pauseOnReconnect) { replay.pauseOnReconnect = false; replayControl('pause'); }
    },
    onEvent: (name, args) => {
      if (name === 'bbo_update') onReplayUpdate(args[0]);
      else if (name === 'replay_status') onReplayStatus(args[0]);
      else if (name === 'outage') onReplayOutage(args[0]);
    },
    onConnectError: (message) => {
      stopReplay();
      showReplayError(`The server refused the replay: ${message}`);
    },
    onDisconnect: (reason) => {
      if (!replay.on) return;
      if (reason === 'the server ended it') { stopReplay(); showReplayError('The server ended the replay.'); return; }
      replay.position = replayPosition();
      replay.pauseOnReconnect = replay.phase === 'paused' || (replay.phase === 'interrupted' && replay.pauseOnReconnect);
      replay.phase = 'interrupted';
      replayChanged();
    },
  });
  replayChanged();
  window.scrollTo({ top: 0, behavior: reducedMotion ? 'auto' : 'smooth' });   // the replay bar and the prices
}

/** Back to live: the live store was kept up to date all along, the chart's view is given back. */
function stopReplay() {
  socket.leave(REPLAY_NAMESPACE);
  if (!replay.on) return;
  replay.on = false;
  replay.phase = 'idle';
  clearReplayed();
  replay.outages = [];
  if (replay.savedView) Object.assign(chart.view, replay.savedView);
  replay.savedView = null;
  replayChanged();
  scheduleBackfill(0);
}

/** A control event (pause, resume, seek, speed): its ack is the replay_status, or {error}. */
function replayControl(event, arg, after) {
  const done = (err, res) => {
    if (err || !res || res.error) { showReplayError(`Replay ${event}: ${err ? err.message : (res && res.error) || 'no answer'}`); return; }
    showReplayError('');
    if (after) after();
    onReplayStatus(res);
  };
  if (arg === undefined) socket.emitTo(REPLAY_NAMESPACE, event, done);
  else socket.emitTo(REPLAY_NAMESPACE, event, arg, done);
}

function toggleReplay() {
  if (replay.phase === 'playing') replayControl('pause');
  else if (replay.phase === 'paused') replayControl('resume');
  else if (replay.phase === 'done') seekReplay(replay.from);
}

/** Play from `time` (ms): what was replayed is dropped, the rows come again from there. */
function seekReplay(time) {
  if (!replay.on || replay.phase === 'connecting' || replay.phase === 'interrupted') return;
  const at = Math.round(clamp(time, replay.from, replay.to));
  const was = replayPosition();
  replayControl('seek', { time: at }, () => replaySeeked(at, was));
}

function initReplay() {
  const speed = $('replay-speed');
  try {
    const kept = localStorage.getItem(REPLAY_SPEED_KEY);
    if (kept && [...speed.options].some((o) => o.value === kept)) speed.value = kept;
  } catch { /* private mode */ }
  speed.addEventListener('change', () => {
    try { localStorage.setItem(REPLAY_SPEED_KEY, speed.value); } catch { /* private mode */ }
    if (replay.on && replay.phase !== 'connecting') replayControl('speed', { speed: Number(speed.value) });
  });
  $('replay-start').addEventListener('click', startReplay);
  $('replay-stop').addEventListener('click', stopReplay);
  $('replay-toggle').addEventListener('click', toggleReplay);
  const bar = $('replay-progress');
  bar.addEventListener('click', (e) => {
    const r = bar.getBoundingClientRect();
    seekReplay(replay.from + clamp((e.clientX - r.left) / r.width, 0, 1) * (replay.to - replay.from));
  });
  bar.addEventListener('keydown', (e) => {
    const step = (replay.to - replay.from) / 20;
    const to = { ArrowLeft: -step, ArrowRight: step, Home: -Infinity, End: Infinity }[e.key];
    if (to === undefined) return;
    e.preventDefault();
    seekReplay(replayPosition() + to);
  });
}

function secondTick() {
  tickStats();
  dirty.status = dirty.tabs = dirty.bbo = true;   // ages, rates, a symbol turning suspect
  if (state.current && !isLive(state.current)) chart.dirty = true;
  // keep backfill fresh: long views slide, and after an outage the server's history fills holes
  if (!chart.bfPending) ensureBackfill();
  renderTitle();
  requestFrame();
}

async function boot() {
  cacheElements();
  initAuth();
  initChart();
  initChartInput();
  initSymbolInput();
  initHistory();
  initFeedEdit();
  initReplay();
  renderTimeZone();
  $('tz-toggle').addEventListener('click', () => setTimeZone(!tz.utc));
  restorePoints();
  chartLayout();

  let preferred = params.get('symbol');
  if (!preferred) { try { preferred = localStorage.getItem('bbo.symbol'); } catch { /* ignore */ } }
  if (preferred) preferred = preferred.toUpperCase();

  socket.connect();

  const [syms, bbo, health] = await Promise.allSettled([
    fetchJson('/api/history/symbols'), fetchJson('/api/bbo'), fetchJson('/healthz')]);
  if (syms.status === 'fulfilled' && Array.isArray(syms.value.symbols)) for (const s of syms.value.symbols) addSymbol(s);
  if (bbo.status === 'fulfilled' && bbo.value && bbo.value.symbols) {
    for (const [s, p] of Object.entries(bbo.value.symbols)) {
      addSymbol(s);
      if (!state.bbo[s]) state.bbo[s] = p;
    }
  }
  if (health.status === 'fulfilled' && health.value && health.value.feed && !state.feed) onFeedStatus(health.value.feed);
  if (health.status === 'fulfilled') onHealth(health.value);
  if (!state.current) {
    state.current = state.symbols.includes(preferred) ? preferred : state.symbols[0] || null;
  } else if (preferred && state.symbols.includes(preferred) && state.current !== preferred && state.stats.bboMessages < 50) {
    state.current = preferred;
  }
  dirty.symbols = dirty.bbo = dirty.status = dirty.tabs = true;
  chart.dirty = true;
  scheduleBackfill(0);
  requestFrame();
  if (state.current) {
    renderSymbols();
    $('hist-symbol').value = state.current;
    histLoad();
  }
}

/** /healthz again: the one place that says whether the history is being saved. */
function checkHealth() {
  fetchJson('/healthz').then(onHealth, () => { /* the socket's state already says the server is gone */ });
}
function onHealth(health) {
  state.persistence = health && health.persistence ? health.persistence : null;
  const ck = health && (health.clock || (health.feed && health.feed.clock));
  if (ck) { state.clock = ck; dirty.status = true; requestFrame(); }
  renderPersistence(state.persistence);
}

setInterval(secondTick, 1000);
setInterval(checkHealth, HEALTH_CHECK_MS);
setInterval(measureRtt, 5000);
setInterval(savePoints, 15000);
window.addEventListener('pagehide', () => { savePoints(); });
window.addEventListener('online', () => socket.retryNow());
window.addEventListener('offline', () => { dirty.status = true; requestFrame(); });

// --- test hooks (window.bboDebug, see the top of the file) -----------------------------------

let probeCtx = null;
/** Force the chart canvas to rasterise now (copy one pixel into a 1x1 read-back canvas). */
function flushCanvas() {
  if (!probeCtx) {
    const c = document.createElement('canvas');
    c.width = c.height = 1;
    probeCtx = c.getContext('2d', { willReadFrequently: true });
  }
  probeCtx.drawImage(chart.canvas, 0, 0, 1, 1, 0, 0, 1, 1);
  return probeCtx.getImageData(0, 0, 1, 1).data[3];
}

function loadSyntheticPoints(n) {
  n = Math.max(0, Math.min(MAX_POINTS, Math.floor(n)));
  const sym = state.current || 'SYNTHETIC';
  if (!state.current) { addSymbol(sym); state.current = sym; dirty.symbols = true; }
  const pb = pointsFor(sym);
  pb.clear();
  if (pb.cap < n) {
    pb.cap = n;
    pb.t = new Float64Array(n); pb.bid = new Float64Array(n); pb.ask = new Float64Array(n);
  }
  const [v0, v1] = viewRange();
  const p = state.bbo[sym];
  let mid = p ? (Number(p.bidPrice) + Number(p.askPrice)) / 2 : 100000;
  const tick = mid * 1e-6;
  const dt = (v1 - v0) / Math.max(1, n);
  for (let i = 0; i < n; i++) {
    mid += (Math.random() - 0.5) * tick * 4;
    const half = tick * (1 + ((Math.random() * 3) | 0)) / 2;
    pb.t[i] = v0 + i * dt;
    pb.bid[i] = mid - half;
    pb.ask[i] = mid + half;
  }
  pb.n = n;
  const sess = sessionFor(sym);
  sess.start = n ? v0 : null;        // the live buffer covers the view: no backfill
  drawChart();                       // warm-up
  const times = [];
  for (let i = 0; i < 5; i++) {
    const t0 = performance.now();
    drawChart();
    flushCanvas();                    // include the rasterisation of the recorded commands
    times.push(performance.now() - t0);
  }
  times.sort((a, b) => a - b);
  return times[2];                   // median of 5 full redraws (ms)
}

window.bboDebug = {
  state,
  socket,
  transport: () => socket.transport,
  connection: () => ({ state: socket.state, transport: socket.transport, sid: socket.sid, reconnects: socket.reconnects,
                       socketId: socket.socketId, recovered: socket.recovered, pid: socket.pid, offset: socket.offset,
                       attempts: socket.attempts, reconnectAt: socket.reconnectAt, wsFallbacks: socket.wsFallbacks }),
  chart: {
    pointCount: () => (state.current && state.points[state.current] ? state.points[state.current].n : 0),
    lastDrawMs: () => chart.lastDrawMs,
    timeframe: () => chart.tf,
    viewRange: () => viewRange(),
    redraw: () => drawChart(),
    setTimeframe,
    zoom: (f) => zoomAt(f),
    backfill: () => chart.backfill[state.current] || null,
    liveSince: () => (state.current ? liveSince(state.current) : Infinity),
    drawCount: () => chart.drawCount,
    axisLabels: () => (chart.geo ? chart.geo.labels : null),
    gaps: () => (chart.geo ? chart.geo.gaps : null),
    geometry: () => (chart.geo ? { pw: chart.geo.pw, ph: chart.geo.ph, padT: chart.geo.padT, priceH: chart.geo.priceH,
                                   spreadTop: chart.geo.spreadTop, spreadH: chart.geo.spreadH, dpr: chart.geo.dpr } : null),
  },
  loadSyntheticPoints,
  checkHealth,
  replay: () => ({ on: replay.on, phase: replay.phase, position: replay.on ? replayPosition() : null, speed: replay.speed,
                   from: replay.from, to: replay.to, symbols: replay.symbols, rows: replay.rows,
                   outages: replay.outages.map((o) => ({ ...o })) }),
};

if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', boot);
else boot();

})();
