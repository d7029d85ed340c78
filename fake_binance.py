"""Scriptable fake Binance market-data WebSocket server (bookTicker only) for tests, demos and benchmarks.

Binance is not reachable from the build and test machines, so everything that needs a live feed talks to this
fake instead. It mimics the parts of Binance's market-stream protocol that BBO Stream depends on, as Binance
documents them for spot, USD-M and COIN-M futures:

* paths ``/ws/<stream>[/<stream>...]`` (raw payloads), bare ``/ws`` (then live SUBSCRIBE) and
  ``/stream?streams=a@bookTicker/b@bookTicker`` (each payload wrapped as ``{"stream":..,"data":..}``);
  any prefix is accepted (``/public/ws/...``, as on USD-M futures since 2026-04);
* SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS / SET_PROPERTY / GET_PROPERTY with Binance-style acks and errors;
* the futures, spot and COIN-M bookTicker payload flavours, with the keys in Binance's order;
* at most 1024 streams per connection: more (in the URL or by SUBSCRIBE) closes the whole connection with 1008,
  as Binance does since 2026; server pings every 20 s (spot's interval; futures ping every 3 min);
* with ``limit_connection_rate=True``, Binance's 2026 per-IP limit of one new connection per second: a second
  handshake from the same client host within CONNECT_INTERVAL_S is refused with HTTP 429 and ``Retry-After: 1``
  (off by default: benchmarks and raw test clients open several connections at once);
* failure modes: silent stall, frozen connections (no pongs), abrupt TCP drop, clean close, refused handshakes
  (HTTP 503, or any status with a Retry-After, e.g. 429/418), serverShutdown, a `u` reset, error replies;
* on the same port, plain HTTP GETs of the REST API's ``serverTime`` (``/fapi/v1/time``, ``/api/v3/time``,
  ``/dapi/v1/time``) and ``exchangeInfo`` (``/fapi/v1/exchangeInfo``, ``/dapi/v1/exchangeInfo``, spot's
  ``/api/v3/exchangeInfo?symbol=X`` with Binance's -1121 "Invalid symbol." for an unlisted one), one request per
  connection; ``clock_skew_ms`` sets how far the exchange's clock runs ahead of this machine's (negative: behind),
  in serverTime and in the bookTickers' E and T alike.

Point the product at it through its base URL::

    python fake_binance.py --port 9443 --market futures --symbols btcusdt,ethusdt --rate 50
    WEBSOCKET_BASE_URL=ws://127.0.0.1:9443/ws python bbo_stream.py --symbol btcusdt --use-ssl false

In tests, use it as an async context manager on the test's own event loop::

    async with FakeBinance(market="futures") as fake:
        ...connect the product to fake.base_url...
        await fake.wait_for_subscribed("btcusdt")
        fake.send_bbo("btcusdt", "28750.10", "1.500", "28750.20", "0.250")

From synchronous code (Playwright's sync API, blocking clients, benchmarks), ``FakeBinanceThread`` runs it on an
event loop in a thread; ``free_port()`` picks a port for a server started as a subprocess.
"""
from __future__ import annotations

import argparse
import asyncio
import http
import json
import random
import re
import signal
import socket
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Coroutine, Literal, TypeVar

import websockets.http11
from websockets.asyncio.server import Server, ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

T = TypeVar("T")
Market = Literal["futures", "spot", "coinm"]
MARKETS: tuple[str, ...] = ("futures", "spot", "coinm")
BOOK_TICKER_SUFFIX = "@bookTicker"
SHUTDOWN_STREAM = "!serverShutdown"                 # combined-form stream name of the spot serverShutdown event
MAX_STREAMS_PER_CONNECTION = 1024                   # Binance limit on every market
CONNECT_INTERVAL_S = 1.0                            # Binance (2026): one new connection per second per IP
POLICY_VIOLATION = 1008                             # the close code Binance uses for the 1025th stream
MAX_SEND_RECORDS = 1_000_000                        # bound on sent_at so a long benchmark cannot exhaust memory
GENERATOR_TICK_S = 0.005                            # generator batches one tick's messages; 5 ms keeps bursts small
MAX_CATCHUP_S = 1.0                                 # a stalled event loop replays at most 1 s of backlog, not a flood
# Spot pings every 20 s and waits 1 min for the pong (futures: 3 min / 10 min); 20 s keeps tests from idling long.
PING_INTERVAL_S = 20.0
PING_TIMEOUT_S = 60.0
METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
# "<anything>/ws[/streams...]" or "<anything>/stream"; the non-greedy prefix picks the first /ws or /stream segment.
PATH_RE = re.compile(r"^(?P<prefix>.*?)/(?P<kind>ws|stream)(?:/(?P<rest>.*))?$")
# websockets refuses request lines over 8 KiB (HTTP 414); 1024 combined streams in the URL take ~25 KB, and the
# 1024-stream limit must be reachable through the URL. Read by websockets at parse time; process-wide.
MAX_REQUEST_LINE_BYTES = 64 * 1024
websockets.http11.MAX_LINE_LENGTH = max(websockets.http11.MAX_LINE_LENGTH, MAX_REQUEST_LINE_BYTES)
START_PRICES: dict[str, float] = {"btc": 30_000.0, "eth": 2_000.0, "bnb": 300.0, "sol": 100.0}
REST_PREFIXES: dict[str, str] = {"futures": "/fapi/v1", "spot": "/api/v3", "coinm": "/dapi/v1"}
# Symbols exchangeInfo lists as TRADING unless a test changes `listed`.
DEFAULT_LISTED: dict[str, tuple[str, ...]] = {
    "futures": ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT"),
    "spot": ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "DOGEUSDT", "ETHBTC"),
    "coinm": ("BTCUSD_PERP", "ETHUSD_PERP", "BNBUSD_PERP")}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))   # Binance sends compact JSON


def stream_of(symbol: str) -> str:
    """Binance stream names are lower case; the payload's "s" is upper case."""
    return symbol.lower() + BOOK_TICKER_SUFFIX


@dataclass(eq=False)
class FakeConnection:
    """One accepted client connection and what it is subscribed to."""
    ws: ServerConnection
    path: str                                        # request target incl. query, e.g. "/stream?streams=..."
    combined: bool                                   # wrap payloads as {"stream":..,"data":..}
    streams: dict[str, None] = field(default_factory=dict)   # insertion-ordered set, as LIST_SUBSCRIPTIONS shows it
    received: list[str] = field(default_factory=list)        # every text frame the client sent (control requests)
    opened_at: float = field(default_factory=time.perf_counter)


class FakeBinance:
    """Fake Binance market-stream server. Use ``async with FakeBinance(...) as fake``.

    ``refuse``: while True, every new handshake is answered with HTTP ``refuse_status`` (503 unless
    ``set_refuse`` chose another, with its ``Retry-After``); the TCP connect succeeds, the WebSocket upgrade
    fails, the client sees ``InvalidStatus``; open connections are not touched. ``handshakes`` records every
    attempt as (time.monotonic(), HTTP status answered, client host), so tests can check when a client retried.
    Stalling suppresses data frames only (bookTicker, send_raw); acks, pings/pongs and serverShutdown still flow.
    """

    def __init__(self, market: Market = "futures", host: str = "127.0.0.1", port: int = 0, seed: int = 0, *,
                 record_send_times: bool = False, compression: str | None = "deflate",
                 ping_interval: float | None = PING_INTERVAL_S, ping_timeout: float | None = PING_TIMEOUT_S,
                 limit_connection_rate: bool = False, clock_skew_ms: float = 0.0) -> None:
        if market not in MARKETS:
            raise ValueError(f"market must be one of {MARKETS}, not {market!r}")
        self.market: Market = market
        self.host, self.port, self.seed = host, port, seed
        self.record_send_times = record_send_times
        self.refuse = False
        self.refuse_status = http.HTTPStatus.SERVICE_UNAVAILABLE
        self.refuse_retry_after: str | None = None   # Retry-After header value sent with a refusal
        self.limit_connection_rate = limit_connection_rate
        self.clock_skew_ms = clock_skew_ms          # the exchange's clock minus this machine's (serverTime, E, T)
        self.listed: dict[str, str] = dict.fromkeys(DEFAULT_LISTED[market], "TRADING")  # exchangeInfo: symbol → status
        self.rest_requests: list[str] = []          # every REST request target, in order
        self.subscribe_error: tuple[int, str] | None = None   # answer every SUBSCRIBE with this error
        self.handshakes: list[tuple[float, int, str]] = []    # (monotonic time, status answered, client host)
        self._last_accepted: dict[str, float] = {}            # client host -> monotonic time of its last handshake
        self.stalled = False
        self.total_connections = 0                   # handshakes ever accepted
        self.refused_connections = 0                 # handshakes refused (refuse set, or over the connection rate)
        self.messages_sent = 0                       # bookTicker payloads delivered to at least one connection
        self.sent_at: dict[tuple[str, int], float] = {}   # (SYMBOL, u) -> perf_counter() just before the write
        self._sent_order: deque[tuple[str, int]] = deque()
        self._last_u: dict[str, int] = {}            # SYMBOL -> last u sent
        self._conns: dict[FakeConnection, None] = {}
        self._changed = asyncio.Event()              # replaced after every set, so waiters see each change
        self._server: Server | None = None
        self._generator: asyncio.Task[None] | None = None
        self._serve_kwargs = dict(compression=compression, ping_interval=ping_interval, ping_timeout=ping_timeout)

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> FakeBinance:
        self._server = await serve(self._handler, self.host, self.port, process_request=self._process_request,
                                   **self._serve_kwargs)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.stop_generator()
        self.thaw()                                  # a frozen connection could not read its closing handshake
        if self._server is not None:
            self._server.close()                     # closes open connections with 1001 (going away)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeBinance:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url_root(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host
        return f"ws://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url_root}/ws"

    @property
    def rest_url(self) -> str:
        """The REST base URL (EXCHANGE_REST_URL): the same port, plain HTTP."""
        return "http" + self.url_root[2:]

    def exchange_ms(self) -> int:
        """The exchange's clock in whole ms (cut down, as Binance's): this machine's plus clock_skew_ms."""
        return (time.time_ns() + round(self.clock_skew_ms * 1_000_000)) // 1_000_000

    # ---------------------------------------------------------------- connection handling
    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade") is None:   # plain HTTP: the REST API, not a stream
            return self._rest(ws, request)
        now = time.monotonic()
        host = ws.remote_address[0] if ws.remote_address else "?"
        response = self._refusal(ws, request, host, now)
        self.handshakes.append((now, response.status_code if response else 101, host))
        if response is None:
            self._last_accepted[host] = now
        elif response.status_code != http.HTTPStatus.NOT_FOUND:
            self.refused_connections += 1
        self._notify()
        return response

    def _refusal(self, ws: ServerConnection, request: Request, host: str, now: float) -> Response | None:
        if self.refuse:
            status = http.HTTPStatus(self.refuse_status)
            response = ws.respond(status, f"{status.phrase}\n")
            if self.refuse_retry_after is not None:
                response.headers["Retry-After"] = self.refuse_retry_after
            return response
        if self.limit_connection_rate and now - self._last_accepted.get(host, -CONNECT_INTERVAL_S) < CONNECT_INTERVAL_S:
            response = ws.respond(http.HTTPStatus.TOO_MANY_REQUESTS, "Too Many Requests\n")
            response.headers["Retry-After"] = str(int(CONNECT_INTERVAL_S))
            return response
        if PATH_RE.match(urllib.parse.urlsplit(request.path).path) is None:
            return ws.respond(http.HTTPStatus.NOT_FOUND, "Not Found\n")
        return None

    def _rest(self, ws: ServerConnection, request: Request) -> Response:
        """Answer a REST GET as Binance does: serverTime, exchangeInfo; 404 for anything else."""
        self.rest_requests.append(request.path)
        parts = urllib.parse.urlsplit(request.path)
        prefix = REST_PREFIXES[self.market]
        status, body = http.HTTPStatus.NOT_FOUND, {"code": -1, "msg": "Not found"}
        if parts.path == prefix + "/time":
            status, body = http.HTTPStatus.OK, {"serverTime": self.exchange_ms()}
        elif parts.path == prefix + "/exchangeInfo":
            symbols = self.listed
            wanted = urllib.parse.parse_qs(parts.query).get("symbol")
            if wanted:                                 # spot's one-symbol form; an unlisted one is an error
                symbols = {wanted[0]: self.listed[wanted[0]]} if wanted[0] in self.listed else {}
            if wanted and not symbols:
                status, body = http.HTTPStatus.BAD_REQUEST, {"code": -1121, "msg": "Invalid symbol."}
            else:
                status, body = http.HTTPStatus.OK, {
                    "timezone": "UTC", "serverTime": self.exchange_ms(),
                    "symbols": [{"symbol": sym, "status": state, "baseAsset": sym[:3], "quoteAsset": sym[3:]}
                                for sym, state in symbols.items()]}
        response = ws.respond(status, dumps(body))
        response.headers["Content-Type"] = "application/json"
        return response

    async def _handler(self, ws: ServerConnection) -> None:
        target = ws.request.path if ws.request else "/ws"
        parts = urllib.parse.urlsplit(target)
        m = PATH_RE.match(parts.path)
        assert m is not None                         # _process_request rejected anything else
        conn = FakeConnection(ws=ws, path=target, combined=m["kind"] == "stream")
        if conn.combined:
            names = "/".join(urllib.parse.parse_qs(parts.query).get("streams", [])).split("/")
        else:
            names = urllib.parse.unquote(m["rest"] or "").split("/")
        conn.streams.update(dict.fromkeys(n for n in names if n))
        self._conns[conn] = None
        self.total_connections += 1
        self._notify()
        try:
            if len(conn.streams) > MAX_STREAMS_PER_CONNECTION:
                await ws.close(POLICY_VIOLATION, f"too many streams (over {MAX_STREAMS_PER_CONNECTION})")
                return
            async for message in ws:
                text = message if isinstance(message, str) else message.decode(errors="replace")
                conn.received.append(text)
                answer = self._control(conn, text)
                if answer is None:                    # over the stream limit: the whole connection goes
                    await ws.close(POLICY_VIOLATION, f"too many streams (over {MAX_STREAMS_PER_CONNECTION})")
                    return
                await ws.send(dumps(answer))
        except ConnectionClosed:
            pass                                      # drops and aborts are expected here
        finally:
            del self._conns[conn]
            self._notify()

    def _control(self, conn: FakeConnection, text: str) -> dict[str, Any] | None:
        """Answer one live-subscribing request the way Binance does; None: close the connection (1008).

        Success is ``{"result": null, "id": <id>}`` (LIST_SUBSCRIPTIONS and GET_PROPERTY put their answer in
        ``result``); an error is ``{"code": n, "msg": "...", "id": <id>}`` with Binance's codes and wording:
        0 unknown property, 1 value of the wrong type, 2 invalid request (unknown method, bad id), 3 invalid
        JSON. A SUBSCRIBE past 1024 streams closes the connection with 1008 (Binance, 2026). While
        ``subscribe_error`` is set, every SUBSCRIBE is answered ``{"error": {"code", "msg"}, "id": <id>}``.
        A stream that does not exist is acknowledged like any other and then never sends anything, as on Binance.
        """
        try:
            req = json.loads(text)
        except json.JSONDecodeError as exc:
            return {"code": 3, "msg": f"Invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"}
        if not isinstance(req, dict):
            return {"code": 2, "msg": "Invalid request: expected a JSON object"}
        rid = req.get("id")
        if not (rid is None or isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool))):
            return {"code": 2, "msg": "Invalid request: request ID must be an unsigned integer"}
        method, params = req.get("method"), req.get("params", [])
        if method is None:
            return {"code": 2, "msg": "Invalid request: missing field `method`", "id": rid}
        if method not in METHODS:
            return {"code": 2, "msg": f"Invalid request: unknown variant `{method}`, expected one of "
                                      + ", ".join(f"`{m}`" for m in METHODS), "id": rid}
        if not isinstance(params, list):
            return {"code": 2, "msg": "Invalid request: invalid type: expected a sequence", "id": rid}
        result: Any = None
        if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
            if not all(isinstance(p, str) for p in params):
                return {"code": 2, "msg": "Invalid request: invalid type: expected a string", "id": rid}
            if method == "SUBSCRIBE":
                if self.subscribe_error is not None:
                    code, msg = self.subscribe_error
                    return {"error": {"code": code, "msg": msg}, "id": rid}
                if len(conn.streams.keys() | set(params)) > MAX_STREAMS_PER_CONNECTION:
                    return None
                conn.streams.update(dict.fromkeys(params))   # unknown or upper-case names: ACKed, then silence
            else:
                for p in params:
                    conn.streams.pop(p, None)
            self._notify()
        elif method == "LIST_SUBSCRIPTIONS":
            result = list(conn.streams)
        elif params[:1] != ["combined"]:
            return {"code": 0, "msg": "Unknown property", "id": rid}
        elif method == "SET_PROPERTY":
            if len(params) != 2 or not isinstance(params[1], bool):
                return {"code": 1, "msg": "Invalid value type: expected Boolean", "id": rid}
            conn.combined = params[1]
        else:
            result = conn.combined
        return {"result": result, "id": rid}

    # ---------------------------------------------------------------- waiting
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        async def wait() -> None:
            while not predicate():
                await self._changed.wait()
        try:
            await asyncio.wait_for(wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"fake Binance: timed out after {timeout} s waiting for {what}") from None

    @property
    def connections(self) -> list[FakeConnection]:
        """Currently open connections, oldest first."""
        return list(self._conns)

    async def wait_for_connections(self, n: int, timeout: float = 5.0) -> list[FakeConnection]:
        """Wait until exactly ``n`` connections are open (use 0 to wait for disconnects)."""
        await self._wait_until(lambda: len(self._conns) == n, timeout, f"{n} open connections")
        return self.connections

    def subscribers(self, symbol: str) -> list[FakeConnection]:
        stream = stream_of(symbol)
        return [c for c in self._conns if stream in c.streams]

    async def wait_for_subscribed(self, symbol: str, timeout: float = 5.0) -> list[FakeConnection]:
        """Wait until at least one open connection is subscribed to ``symbol``'s bookTicker stream."""
        await self._wait_until(lambda: bool(self.subscribers(symbol)), timeout, f"a subscription to {symbol}")
        return self.subscribers(symbol)

    # ---------------------------------------------------------------- sending
    def build_bbo(self, symbol: str, bid: str, bid_qty: str, ask: str, ask_qty: str, *,
                  u: int | None = None, E: int | None = None, T: int | None = None) -> dict[str, Any]:
        """Build the payload (key order as Binance sends it) and advance the symbol's u; sends nothing."""
        sym = symbol.upper()
        u = self._last_u.get(sym, 0) + 1 if u is None else u
        self._last_u[sym] = u                         # an explicit u lets a test script resets and duplicates
        if self.market == "spot":
            return {"u": u, "s": sym, "b": bid, "B": bid_qty, "a": ask, "A": ask_qty}
        E = self.exchange_ms() if E is None else E
        T = E if T is None else T
        head: dict[str, Any] = {"e": "bookTicker", "u": u, "s": sym}
        if self.market == "coinm":
            head["ps"] = sym.split("_")[0]            # BTCUSD_PERP -> pair BTCUSD
        return {**head, "b": bid, "B": bid_qty, "a": ask, "A": ask_qty, "T": T, "E": E}

    def send_bbo(self, symbol: str, bid: str, bid_qty: str, ask: str, ask_qty: str, *,
                 u: int | None = None, E: int | None = None, T: int | None = None) -> dict[str, Any]:
        """Send one bookTicker to every connection subscribed to ``symbol``; return the payload as sent.

        The frames are handed to the sockets before this returns (websockets' broadcast writes synchronously);
        await ``flush()`` to also wait for any backed-up write buffers. While stalled, nothing is sent.
        """
        payload = self.build_bbo(symbol, bid, bid_qty, ask, ask_qty, u=u, E=E, T=T)
        self._deliver(stream_of(symbol), dumps(payload), (payload["s"], payload["u"]))
        return payload

    async def send_bbo_and_flush(self, symbol: str, bid: str, bid_qty: str, ask: str, ask_qty: str,
                                 **kw: int | None) -> dict[str, Any]:
        payload = self.send_bbo(symbol, bid, bid_qty, ask, ask_qty, **kw)
        await self.flush()
        return payload

    async def flush(self) -> None:
        """Wait until every open connection's write buffer has drained below the high-water mark."""
        await asyncio.gather(*(c.ws.drain() for c in self.connections), return_exceptions=True)

    def _deliver(self, stream: str, raw: str, record: tuple[str, int] | None) -> None:
        if self.stalled:
            return
        subs = [c for c in self._conns if stream in c.streams]
        if not subs:
            return
        if record is not None:
            self.messages_sent += 1
            if self.record_send_times:
                self.sent_at[record] = time.perf_counter()
                self._sent_order.append(record)
                if len(self._sent_order) > MAX_SEND_RECORDS:
                    self.sent_at.pop(self._sent_order.popleft(), None)
        broadcast([c.ws for c in subs if not c.combined], raw)
        wrapped = [c.ws for c in subs if c.combined]
        if wrapped:
            broadcast(wrapped, f'{{"stream":{dumps(stream)},"data":{raw}}}')

    def send_raw(self, text: str, *, symbol: str | None = None) -> None:
        """Send ``text`` unchanged (never wrapped) to every connection, or to ``symbol``'s subscribers."""
        if self.stalled:
            return
        targets = self.connections if symbol is None else self.subscribers(symbol)
        broadcast([c.ws for c in targets], text)

    def send_server_shutdown(self) -> dict[str, Any]:
        """Send the serverShutdown event to every connection (Binance documents it for spot only)."""
        payload = {"e": "serverShutdown", "E": now_ms()}
        raw = dumps(payload)
        broadcast([c.ws for c in self._conns if not c.combined], raw)
        broadcast([c.ws for c in self._conns if c.combined], f'{{"stream":"{SHUTDOWN_STREAM}","data":{raw}}}')
        return payload

    # ---------------------------------------------------------------- failure modes
    def stall(self) -> None:
        """Silent stall: connections stay open and pings are answered, but no data frames go out."""
        self.stalled = True

    def resume(self) -> None:
        self.stalled = False

    def set_refuse(self, refuse: bool = True, status: int = 503, retry_after: str | int | None = None) -> None:
        """Refuse (or accept again) new handshakes with HTTP ``status`` and, if given, ``Retry-After``
        (seconds, or an HTTP date string), e.g. ``set_refuse(True, 429, 20)`` or ``set_refuse(True, 418, 120)``."""
        self.refuse = refuse
        self.refuse_status = http.HTTPStatus(status)
        self.refuse_retry_after = None if retry_after is None else str(retry_after)

    def reset_u(self, symbol: str, to: int = 0) -> None:
        """An exchange-side reset of ``symbol``'s update id: the next update has ``u`` = ``to`` + 1 (the
        generator continues from there too)."""
        self._last_u[symbol.upper()] = to

    def freeze(self) -> None:
        """Frozen connections: no data and no reading, so the client's pings get no pong (its keepalive times
        out); the TCP connections stay open. New connections are not frozen."""
        self.stalled = True
        for c in self._conns:
            c.ws.transport.pause_reading()

    def thaw(self) -> None:
        """Undo ``freeze``: read (and answer pings) again, send data again."""
        self.stalled = False
        for c in self._conns:
            c.ws.transport.resume_reading()

    async def drop_all(self) -> None:
        """Abort every TCP connection: no close frame, the client sees an abnormal closure (1006)."""
        conns = self.connections
        for c in conns:
            c.ws.transport.abort()
        await asyncio.gather(*(c.ws.wait_closed() for c in conns))

    async def close_all(self, code: int = 1001, reason: str = "") -> None:
        """Close every connection cleanly with a close frame."""
        await asyncio.gather(*(c.ws.close(code, reason) for c in self.connections))

    # ---------------------------------------------------------------- generator
    def start_generator(self, symbols: list[str] | str, rate_per_s: float, *,
                        decimals: tuple[int, int] = (2, 3), tick_s: float = GENERATOR_TICK_S) -> None:
        """Send a random walk of bookTickers at ``rate_per_s`` messages per second for EACH symbol.

        Prices have ``decimals[0]`` and quantities ``decimals[1]`` fixed decimals; bid < ask always; u is strictly
        increasing with random gaps (as on Binance, where the book also changes below the top); E = T = now.
        Values come from a per-symbol RNG seeded from ``seed``, so a run's sequence does not depend on timing.
        """
        self.stop_generator()
        if isinstance(symbols, str):
            symbols = [s for s in symbols.split(",") if s]
        self._generator = asyncio.get_running_loop().create_task(
            self._generate([s.strip() for s in symbols], rate_per_s, decimals, tick_s))

    def stop_generator(self) -> None:
        if self._generator is not None:
            self._generator.cancel()                 # it is parked in sleep, so no further frame is sent
            self._generator = None

    async def _generate(self, symbols: list[str], rate: float, decimals: tuple[int, int], tick_s: float) -> None:
        pdec, qdec = decimals
        pscale, qscale = 10 ** pdec, 10 ** qdec

        def fmt(units: int, dec: int) -> str:       # integer units -> exact fixed-decimal string, no float noise
            whole, frac = divmod(units, 10 ** dec)
            return f"{whole}.{frac:0{dec}d}" if dec else str(whole)

        rngs = {s: random.Random(f"{self.seed}:{s.lower()}") for s in symbols}
        # mid price in ticks, per symbol; well-known bases start near their real price for realistic strings
        bid_ticks = {s: int(START_PRICES.get(s.lower()[:3], 100.0) * pscale) for s in symbols}
        start = time.perf_counter()
        sent = 0                                      # per symbol (all symbols share the same schedule)
        next_tick = start
        while True:
            now = time.perf_counter()
            target = int((now - start) * rate)
            sent = max(sent, target - max(1, int(rate * MAX_CATCHUP_S)))   # drop backlog beyond the cap
            for _ in range(target - sent):
                for s in symbols:
                    rng = rngs[s]
                    bid = max(1, bid_ticks[s] + rng.randint(-2, 2))
                    bid_ticks[s] = bid
                    ask = bid + rng.randint(1, 3)     # strictly above the bid, never crossed
                    sym = s.upper()
                    u = self._last_u.get(sym, 0) + rng.randint(1, 5)
                    self.send_bbo(s, fmt(bid, pdec), fmt(rng.randint(1, 50 * qscale), qdec),
                                  fmt(ask, pdec), fmt(rng.randint(1, 50 * qscale), qdec), u=u)
            sent = target
            next_tick += tick_s
            delay = next_tick - time.perf_counter()
            if delay < 0:                             # fell behind: do not try to replay missed ticks
                next_tick, delay = time.perf_counter(), 0
            await asyncio.sleep(delay)


# -------------------------------------------------------------------- helpers for synchronous callers
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that the kernel just handed out as free (bind to port 0, read it, close).

    For a server in a subprocess or a config file, which needs the number before it starts. Another
    process may take the port in between, so a server that can bind port 0 itself should do that.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class FakeBinanceThread:
    """A :class:`FakeBinance` on an event loop of its own, in a daemon thread, for synchronous code:
    Playwright's sync API refuses to run while an asyncio loop runs in its thread, and blocking
    tests and benchmarks would otherwise have to hand-build the loop, the thread and the shutdown.

    The fake is not thread-safe: touch it only through ``run`` (await a coroutine on its loop, e.g.
    ``feed.run(feed.fake.wait_for_subscribed("btcusdt"))``) and ``call`` (run a plain function there,
    e.g. ``feed.call(feed.fake.send_bbo, "btcusdt", "1.00", "1", "1.10", "1")``). Both wait for the
    result for at most ``timeout`` seconds and re-raise the function's exception in the caller.
    Reading ``feed.fake.base_url`` or ``port`` from any thread is fine. Keyword arguments other than
    ``name`` and ``timeout`` go to ``FakeBinance``. Use it as a context manager, or call ``close()``.
    """

    def __init__(self, *, name: str = "fake-binance", timeout: float = 10.0, **options: Any) -> None:
        self.timeout = timeout
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()
        try:
            self.fake: FakeBinance = self.run(FakeBinance(**options).start())
        except BaseException:
            self._stop_loop()
            raise

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the fake's loop and return its result (``timeout``: default the instance's)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout if timeout is None else timeout)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call ``fn(*args, **kwargs)`` on the fake's loop (where tasks may be created) and return its result."""
        async def on_loop() -> T:
            return fn(*args, **kwargs)
        return self.run(on_loop())

    def close(self) -> None:
        """Stop the fake (its connections close with 1001), then the loop and the thread. Idempotent."""
        if self.loop.is_closed():
            return
        try:
            self.run(self.fake.stop())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(self.timeout)
        if not self.thread.is_alive():
            self.loop.close()

    def __enter__(self) -> FakeBinanceThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -------------------------------------------------------------------- CLI
async def _main(args: argparse.Namespace) -> None:
    decimals = tuple(int(x) for x in args.decimals.split(","))
    async with FakeBinance(market=args.market, host=args.host, port=args.port, seed=args.seed,
                           compression=None if args.no_compression else "deflate",
                           limit_connection_rate=args.limit_connection_rate, clock_skew_ms=args.clock_skew_ms) as fake:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.symbols and args.rate > 0:
            fake.start_generator(args.symbols.split(","), args.rate, decimals=(decimals[0], decimals[1]))
        print(f"WEBSOCKET_BASE_URL={fake.base_url} EXCHANGE_REST_URL={fake.rest_url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Fake Binance bookTicker WebSocket server (no internet needed).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9443, help="0 picks a free port")
    p.add_argument("--market", choices=MARKETS, default="futures")
    p.add_argument("--symbols", default="btcusdt", help="comma-separated, e.g. btcusdt,ethusdt")
    p.add_argument("--rate", type=float, default=10.0, help="messages per second per symbol (0: no generator)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decimals", default="2,3", help="price,quantity decimals")
    p.add_argument("--no-compression", action="store_true", help="refuse permessage-deflate")
    p.add_argument("--clock-skew-ms", type=float, default=0.0,
                   help="the exchange's clock runs this many ms ahead of this machine's (negative: behind)")
    p.add_argument("--limit-connection-rate", action="store_true",
                   help="refuse a second connection from one host within 1 s with HTTP 429 (Binance's 2026 limit)")
    asyncio.run(_main(p.parse_args(argv)))


if __name__ == "__main__":
    main()
