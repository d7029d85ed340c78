#!/usr/bin/env python3
"""BBO Stream: Binance best bid/offer (bookTicker) in real time, with history.

One asyncio module.  Runtime dependencies: ``websockets`` and ``numpy``.

Data flow, which the sections below follow (pure core first, then the I/O shells)::

    Binance bookTicker (websockets client, one connection per shard of symbols)   §11 feed
        │  parse_feed_message() → Bbo                                              §4, pure
        ▼
    BboHistory: dedupe by `u`, numpy rings + 1 s bars                              §5, pure
        │  └─ CachePersistence: JSON-lines journals → segments in CACHE_DIR        §12
        ▼
    Hub.publish(bbo): encoded once (packet text + WebSocket frame)                 §13
        ▼
    BboApp (subscribe, maxRate, initial data) on SioServer (namespaces, acks)      §14, §15
        ▼
    EioServer → EioConnection → outbox (EioSession, pure §10)                      §16
        ▼
    transports: WebSocket (WsLink, §17) or a parked long-polling GET (EioPolling, §16)
        ▼
    HttpServer: TLS and plain HTTP on one port; the route table (§7) sends each    §18
    request to REST, /healthz, /readyz, /metrics, the dashboard or Engine.IO

Run::

    python bbo_stream.py --symbol btcusdt                 # futures, https+http on :5000
    SYMBOL=btcusdt,ethusdt MARKET=spot python bbo_stream.py
    python bbo_stream.py --help                           # every setting, env var and flag

Sections (tests in test_bbo_stream.py follow the same order)::

    §1  imports, version, limits          ── I/O below this line ──
    §2  errors                            §11 Binance feed
    §3  configuration                     §12 cache persistence (disk)
    §4  BBO model and feed parsing        §13 fan-out hub
    §5  history cache (numpy rings)       §14 the BBO application (Socket.IO handlers)
    §6  HTTP/1.1 and WebSocket frames     §15 Socket.IO server
    §7  REST routes and the route table   §16 Engine.IO server (sessions, long-polling)
    §8  Engine.IO v4 codec                §17 WebSocket transport
    §9  Socket.IO v5 codec                §18 HTTP connection handler
    §10 sessions (Engine.IO, Socket.IO)   §19 app lifecycle
                                          §20 CLI

Engine.IO server API. ``eio = EioServer(ping_interval_ms=25000, ping_timeout_ms=20000,
max_payload_bytes=1_000_000, max_clients=10_000)`` (or ``EioServer.from_config(cfg)``). The
layer above sets ``eio.handler`` to an object with three plain (non-async, non-blocking)
methods: ``on_open(conn)``, ``on_message(conn, data)`` where ``data`` is ``str`` for a text
message and ``bytes`` for a binary one, and ``on_close(conn, reason)``. The HTTP layer calls
``await eio.handle_request(req, body, reader, writer)`` for every request under ``/socket.io/``.
An ``EioConnection`` offers ``send(text)``, ``send_binary(raw)``, ``close(reason)``,
``transport`` ("polling" or "websocket"), ``sid``, ``peer`` and a free slot ``upper`` for the
layer above; for updates that a newer one supersedes (``EioUpdate``, delivered by ``deliver``)
it has a filter by key with a rate per key (``set_filter(keys, max_rate)``, ``filter_keys``,
``max_rate``, ``wants(key)``) and ``counters`` (sent, superseded). ``await eio.close_all()``
closes every session (shutdown).

Socket.IO server API. ``sio = SioServer(eio)`` installs itself as ``eio.handler``. Handlers are
plain functions, run on the event loop, that must not block::

    @sio.on("echo")                    # namespace="/" by default; any other name creates it
    def echo(sock, *args):             # sock: SioSocket; args: the event's JSON arguments
        return args                    # the return value is the ack: None -> [], tuple -> its items,
                                       # anything else -> [value]; sent only if the client asked;
                                       # a coroutine runs as a task and its result is the ack
    @sio.on_connect()                  # handler(sock, auth); raise SioConnectRefused(msg, data)
    @sio.on_disconnect()               # handler(sock, reason)

``sock.emit(event, *args, callback=None)`` sends an event (``callback(*ack_args)`` runs when the
client acknowledges), ``sock.disconnect()`` leaves the namespace (sends DISCONNECT),
``sock.conn`` is its EioConnection, ``sock.data`` is a dict for the application.  Connection state
recovery is the connect handler's to offer: it sets ``sock.pid`` (sent in the CONNECT answer),
``sock.offset`` (a callable: each event's extra last argument), and for a client back in time
``sock.sid``, ``sock.recovered`` and ``sock.send_first(packets)`` (sent before the CONNECT answer).

Checked against the reference. node socket.io 4.8.4 / engine.io 6.6.11 (npm, a dev dependency) ran
with the same handlers, and raw sockets plus websockets' client compared what each side
puts on the wire: handshake, errors, POST/GET bodies and headers, duplicate GET, aborted GET,
ping timeout, upgrade, second WebSocket, oversized payloads, malformed packets, namespaces,
acks. A comment "(ref: ...)" records what the reference did at the branch it justifies;
test_bbo_stream.py replays the same cases against this code. Deliberate differences say so.

Glossary: BBO = best bid and offer (top of book); ``u`` = Binance order-book update id;
E = exchange event time (ms); T = matching-engine transaction time (ms); EIO = Engine.IO
(transport protocol v4); SIO = Socket.IO (protocol v5); sid = session id.

References: RFC 9112 (HTTP/1.1), RFC 6455 (WebSocket), Engine.IO protocol v4, Socket.IO
protocol v5, Binance "WebSocket Market Streams" (spot, USD-M and COIN-M futures).
"""

from __future__ import annotations

# ###########################################################################
# §1 Imports, version, limits
# ###########################################################################
# Owns: every tunable number, with its unit and the reason for its value.

import argparse
import asyncio
import asyncio.sslproto  # SSLProtocol.max_size: the read buffer of each TLS connection (TLS_READ_BUFFER_BYTES)
import atexit
import base64
import binascii
import collections
import contextlib
import dataclasses
import email.utils
import functools
import enum
import errno
import fcntl
import gc
import hashlib
import hmac
import io
import ipaddress
import itertools
import json
import logging
import logging.handlers
import math
import mimetypes
import os
import queue
import random
import re
import resource
import secrets
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import zipfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request as WsRequest
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol

__version__ = "1.0.0"

log = logging.getLogger("bbo_stream")

# --- Binance feed -----------------------------------------------------------
FEED_BACKOFF_CAP_S = 60.0            # exponential backoff is capped at one minute...
FEED_EXTENDED_BACKOFF_CAP_S = 300.0  # ...and at five minutes after EXTENDED_BACKOFF_THRESHOLD failures
FEED_FAILED_RETRY_S = 60.0           # a `failed` feed still retries, every minute: a network that is back is seen soon
FEED_MIN_RECONNECT_S = 1.0           # floor between attempts of one shard: full jitter can draw ~0 s
FEED_HEALTHY_AFTER_S = 60.0          # a connection that delivered data this long resets the failure count
FEED_OPEN_TIMEOUT_S = 10.0           # TCP+TLS+WS handshake; Binance answers in well under a second
FEED_ROTATE_OVERLAP_S = 10.0         # make-before-break: wait this long for the new connection's first data
FEED_ROTATE_RETRY_S = 60.0           # a failed rotation attempt is retried after this, the old one stays up
FEED_MAX_MESSAGE_BYTES = 64 * 1024   # a bookTicker frame is ~180 B; acks and errors are small too
FEED_WATCHDOG_TICK_S = 1.0           # how often silence is checked: 1 s granularity on FEED_STALE_SECONDS
U_RESET_MIN_ADVANCE_MS = 1_000       # `u` going back while E moved on by this much is an exchange reset
U_RESET_MAX_KEPT_FRACTION = 0.5     # `u` below half the last one is a reset at once: a replay from overlapping
                                     # connections repeats seconds of updates, never half the id's range...
U_RESET_MIN_FALL = 1_000             # ...and by at least this many ids: among small ids (a new listing) a replay of a
                                     # few updates can reach below half
FEED_MAX_STREAMS_PER_CONNECTION = 1024  # Binance: the 1025th stream closes the whole connection (1008)
FEED_CONNECT_SPACING_S = 1.1         # Binance (2026): one new connection per second per IP, across shards;
                                     # +0.1 s so that jitter in handshake arrival cannot make two look closer
FEED_RETRY_AFTER_MAX_S = 86_400.0    # a Retry-After further out than a day is taken as a day (bad header)
FEED_PING_INTERVAL_S = 20.0          # our own WebSocket pings: a dead TCP path is noticed within ~40 s
FEED_PING_TIMEOUT_S = 20.0           # ...by a pong missing this long (Binance answers pings at once)
FEED_CLOSE_TIMEOUT_S = 2.0           # closing handshake with the exchange; a reconnect must not wait on it
FEED_MAX_QUEUE_MESSAGES = 256        # frames websockets buffers before it stops reading the socket
FEED_READ_CHUNK_BYTES = 64 * 1024    # one read of an exchange socket by its reader thread (~350 bookTickers)
FEED_READ_AHEAD_BYTES = 1 << 20      # read by the reader thread but not yet parsed by the loop: beyond, it waits
MAX_SYMBOLS = 5_000                  # above Binance's 1024 streams/connection × a few shards; bounds maps
MAX_SYMBOL_CHARS = 32                # Binance's longest symbols have under 20; bounds names on disk and per client
SUSPECT_FLOOR_MS = 1_000             # a symbol is `suspect` after at least this much silence...
SUSPECT_GAP_FACTOR = 5               # ...or this many times its median gap between updates, if longer
SUSPECT_WINDOW_MS = 60_000           # the median gap is taken over the minute before the symbol's last update
SUSPECT_RECOMPUTE_MS = 10_000        # a symbol's rate changes slowly: its median gap is recomputed at most this often

# --- Exchange REST (clock offset, symbol validation) ------------------------
CLOCK_SAMPLES_PER_ROUND = 5          # serverTime requests per check; the shortest round trip is kept (NTP's rule)
CLOCK_RETRY_S = 30.0                 # a failed check is tried again after this, not after the whole interval
CLOCK_TRUNCATION_MS = 1.0            # exchange times are whole ms, cut down: each reads up to 1 ms early
CLOCK_FLOOR_WINDOW_MS = 300_000      # the floor of recv - E is the minimum over the last five minutes...
CLOCK_FLOOR_BUCKET_MS = 10_000       # ...kept as one minimum per 10 s (30 numbers, whatever the rate)
CLOCK_HISTORY_MAX = 10_000           # REST estimates kept to correct older rows (one per 5 min: 35 days)
REST_TIMEOUT_S = 10.0                # one REST request: connect, TLS, answer (exchangeInfo is a few MB)
REST_MAX_HEAD_BYTES = 64 * 1024      # a response head; Binance's are ~1 KB
REST_MAX_BODY_BYTES = 32 * 1024 * 1024  # futures exchangeInfo (every symbol with its filters) is a few MB
EXCHANGE_INFO_TTL_S = 300.0          # listings change rarely: exchangeInfo is fetched again after five minutes
FEED_REQUEST_SPACING_S = 0.25        # SUBSCRIBE/UNSUBSCRIBE at most 4 a second: Binance answers only part of a
                                     # burst (requests ≥ 200 ms apart are all answered)

# --- History cache ----------------------------------------------------------
RING_INITIAL_ROWS = 64               # rings grow lazily: 500 symbols must not reserve 32 GB up front
PENDING_FLUSH_ROWS = 2_048           # appends are batched into numpy (fixed numpy costs amortised);
                                     # a read, the 1 s persistence tick or this many rows flushes
MAX_HISTORY_LIMIT = 10_000           # rows of one /api/history/updates answer: ~2.2 MB of JSON (220 B a row)
DEFAULT_HISTORY_LIMIT = 100
MAX_SERIES_BUCKETS = 2_000           # a wide screen is < 2,000 CSS px: more buckets than pixels is waste
DEFAULT_SERIES_BUCKETS = 500
MAX_OUTAGES_PER_SYMBOL = 10_000      # one outage a minute for a week; older ones are dropped first
MAX_DIGITS = 17                      # digits of a price/qty: mantissa·32+decimals stays below 2**63
                                     # (Binance sends ≤ 16: "1234567.12345678")
INT32_NULL = -(2**31)                # sentinel for a missing latency / transaction time in int32 columns
INT64_MAX = 2**63 - 1                # update ids and times live in int64 columns
MAX_SKEW_MS = 2**31 - 1              # |recv - E| and |E - T| fit the int32 columns (24.8 days)
INT16_NULL = -(2**15)                # sentinel for a missing emit time in its int16 column (2 bytes a row:
MAX_EMIT_DELAY_MS = 2**15 - 1        # the 64 B/update goal); a pass 32.767 s or more after receipt is stored as that

# --- Persistence ------------------------------------------------------------
SEGMENT_ROWS = 8_192                 # one compaction json.dumps of 8 k rows holds the GIL ~15 ms (< 50 ms goal)
CACHE_SCHEMA_VERSION = 2             # bumped when the on-disk column layout changes (older ones are migrated)
CACHE_MAX_FILE_BYTES = 8 * 1024 * 1024  # the largest file written, a segment of SEGMENT_ROWS bars, is ~1.8 MB
PERSIST_ERROR_LOG_INTERVAL_S = 60.0  # a full disk is logged once a minute, not once per flush

# --- HTTP server --------------------------------------------------------------
MAX_HEAD_BYTES = 16 * 1024           # h11's default; node allows 16 KiB of headers too  → 431
CONN_RECV_BYTES = 16 * 1024          # one recv on a plain connection: asyncio's 256 KiB let each sender park
                                     # 256 KiB in its stream before reading paused (50 MB over 200 senders)
MAX_TARGET_BYTES = 8 * 1024          # aiohttp's and nginx's request-line size             → 414
MAX_HEADERS = 100                    # websockets and aiohttp allow 128; browsers send ~20  → 431
MAX_QUERY_FIELDS = 100               # our endpoints take ≤ 6 parameters; bounds parse_qs work → 400
LISTEN_BACKLOG = 1024                # accept queue: a reconnect storm of many clients must not be refused
ACCEPT_RETRY_S = 0.1                 # after EMFILE and friends: back off instead of spinning
ACCEPTS_PER_TURN = 16                # connections accepted before the event loop gets a turn: accepting a storm
                                     # of 1,000 at once in one turn held the fan-out for tens of ms
HEAD_TIMEOUT_S = 10.0                # slowloris guard: a request head must arrive within this
BODY_TIMEOUT_S = 10.0                # a declared body must arrive within this
KEEPALIVE_IDLE_S = 30.0              # idle keep-alive connections are closed after this
TLS_HANDSHAKE_TIMEOUT_S = 10.0       # a stalled ClientHello must not hold a connection slot
WRITE_TIMEOUT_S = 10.0               # a response that cannot be written in this time closes the socket
STATIC_MAX_BYTES = 8 * 1024 * 1024   # static files are read into memory; the dashboard is ~100 KB
STREAM_CHUNK_ROWS = 4_096            # rows rendered per chunk of a streamed export (format=binance/ndjson): ~1 MB,
                                     # ~10 ms of the loop, then the client must take it before the next is made
SERVER_NAME = f"bbo-stream/{__version__}"

# --- Engine.IO / Socket.IO and fan-out -------------------------------------------
EIO_PATH = "/socket.io/"         # socket.io's default path; /socket.io (no slash) is taken too, /socket.iox is not
EIO_PROTOCOL = "4"               # the only revision served; v3 clients get error 5, as from the reference
EIO_CACHE_BUSTER = "t"           # engine.io clients' `timestampParam`: a new value in every polling request
EIO_SID_BYTES = 15               # 15 random bytes -> 20 URL-safe characters, the length of engine.io's base64id
EIO_UPGRADE_TIMEOUT_S = 10.0     # engine.io `upgradeTimeout`: a probe not finished by `5` in this time is dropped
EIO_POLL_CLOSE_TIMEOUT_S = 30.0  # engine.io polling `closeTimeout`: a closing session waits this for the last GET
SIO_CONNECT_TIMEOUT_S = 45.0     # socket.io `connectTimeout`: a client that joins no namespace by then is closed
SIO_MAX_ATTACHMENTS = 10         # socket.io-parser `maxAttachments`: binary attachments per packet
SIO_ATTACHMENT_TIMEOUT_S = 10.0  # a binary packet's attachments must all arrive within this, or the client is cut
EIO_INBOUND_BURST_S = 2.0        # a client may send MAX_CLIENT_MESSAGES_PER_S × this at once (a page's start)
NEW_SESSION_BURST_S = 5.0        # an address may open MAX_NEW_SESSIONS_PER_ADDRESS_PER_S × this at once (an office's
                                 # browsers reconnecting together after a restart)
ADDRESS_RATE_PRUNE_AT = 4096     # addresses tracked before those whose bucket is full again are forgotten
WS_MESSAGES_PER_YIELD = 64       # the read loop lets other tasks run after this many messages of one client
SIO_MAX_ACK_ID_DIGITS = 15       # ids below 10**15 stay exact in a JS Number (2**53 ~ 9.007e15); longer: refused
SIO_MAX_NAMESPACE_CHARS = 256    # the reference has no cap; this bounds what a CONNECT_ERROR echoes back
SIO_MAX_PENDING_ACKS = 256       # server->client acks awaiting an answer, per socket; the oldest is dropped beyond
OUTBOX_MAX_CONTROL_BYTES = 512 * 1024  # non-update packets queued for a client that does not read; beyond: cut off
OUTBOX_MAX_UPDATE_BYTES = 64 * 1024    # pending updates (~250) before compaction to the newest per symbol
WS_HIGH_WATER_BYTES = 64 * 1024  # unsent bytes at which a WebSocket client is backed up (asyncio's default mark)
WS_WRITE_TIMEOUT_S = 10.0        # a backed-up client whose socket does not drain in this time is disconnected
WS_READ_CHUNK_BYTES = 4 * 1024   # one read from a WebSocket peer: at most 682 frames (websockets parses one in
                                 # ~4 µs) before the message budget is checked and other clients get a turn
WS_MAX_UNSENT_BYTES = 1024 * 1024  # answers (pongs, acks) queued for a peer that sends but does not read:
                                   # beyond this it is not read again until it takes them (or is cut)
WS_CLOSE_TIMEOUT_S = 10.0        # the peer's time to finish the closing handshake (websockets' close_timeout)
WS_SNDBUF_BYTES = 128 * 1024     # a WebSocket client's kernel send buffer (Linux doubles it); left to autotune, it
                                 # grows to MiBs that hide a client that stopped reading for 30 s before
                                 # WS_WRITE_TIMEOUT_S starts counting; 256 KiB still carries 1 MB/s at 250 ms RTT
HELD_BYTES_LIMIT = 16 * 1024 * 1024  # unfinished client messages (partial frames, waiting attachments, POST bodies
                                     # being read) held at once across all clients, beyond each one's free share:
                                     # MAX_PAYLOAD bounds one message, this bounds what many half-sent ones pin
                                     # (each held MiB costs 3-4 MiB of RSS in copies on the way); clients of
                                     # this server send small events, so 16 messages of 1 MB at once is plenty
HELD_FREE_BYTES = 16 * 1024      # what one holder may hold without the shared budget: events, acks and polling
                                 # batches are far smaller, so only large messages ever wait on it
FANOUT_PARALLEL_MIN_LINKS = 128  # fewer WebSocket clients than this: a thread hand-off (~50 µs) costs more than it saves
FANOUT_SLICE_CLIENTS = 1024      # a write pass gives the loop a turn (the exchange feed is read) after this many
                                 # clients; smaller slices (256) raised the median at 1,000 clients (17 vs 7 ms)
FANOUT_AUTO_MAX_THREADS = 3      # FANOUT_THREADS=auto uses CPUs - 1 up to this; beyond, the GIL-held part of each write dominates
BBO_MAX_RATE_PER_S = 1000.0      # highest `maxRate` a client may ask for (updates per second per symbol)
BBO_MAX_SUBSCRIBE_SYMBOLS = 1000  # symbols in one subscription; bounds per-client state
REPLAY_NAMESPACE = "/replay"     # recorded ranges played back through the same events as live updates
REPLAY_MAX_SYMBOLS = 100         # symbols merged in one replay: each costs a cursor and a chunk per step
REPLAY_MAX_SPEED = 1_000_000.0   # a day in under a tenth of a second: beyond that, speed 0 (as fast as read)
REPLAY_CHUNK_ROWS = 1_024        # rows rendered per step (~250 KB): under OUTBOX_MAX_CONTROL_BYTES for a polling
                                 # client, and a few ms of the loop, so live clients are not held up
REPLAY_HIGH_WATER_BYTES = 64 * 1024  # queued for a replay client beyond this, the next step waits until it drains
REPLAY_POLLING_ROWS = 12         # rows per step to a long-polling client, sent once its queue is empty: one GET
                                 # then carries at most ~16 packets, all python-engineio's client decodes in one
REPLAY_EXCHANGE_SLACK_MS = 60_000  # clock "exchange" selects by T/E but the rings are sorted by receive time:
                                   # rows are looked for this far outside the range (receipt lags E by ms)
RECOVERY_LOG_UPDATES = 1 << 21   # offsets a reconnecting client may come back with (2 bytes each, 4 MiB): over
                                 # half an hour at 1,000 updates/s; an older offset gets a new session
RECOVERY_MAX_BYTES = 256 * 1024  # missed updates sent one by one at most (half of OUTBOX_MAX_CONTROL_BYTES, where
                                 # they queue); beyond, the newest per symbol and a `gap` event
RECOVERY_MAX_SESSIONS = 10_000   # disconnected sessions kept for recovery (one per MAX_CLIENTS' default); the
                                 # oldest is forgotten beyond

# --- Authentication (AUTH_TOKEN) ------------------------------------------------
AUTH_TOKEN_MAX_CHARS = 512           # a 256-bit random token is 43 base64url characters; 512 leaves room for any
                                     # generator and stays far below MAX_HEAD_BYTES (it travels in a header)
AUTH_SCHEME = "Bearer"               # RFC 6750: `Authorization: Bearer <token>`, and the challenge of a 401
AUTH_REFUSED = "unauthorized"        # the CONNECT_ERROR message, as socket.io's `next(new Error("unauthorized"))`

# --- Garbage collection ---------------------------------------------------------
GC_GEN0_THRESHOLD = 10_000          # CPython's 700 runs a young collection every few hundred deliveries
                                    # at 100,000 deliveries/s; the fan-out allocates little that cycles

# --- Shutdown, TLS, logs ---------------------------------------------------------
SHUTDOWN_GRACE_S = 5.0               # SIGTERM → exit 0 within a few seconds (Docker waits 10 s)
CANCEL_RETRY_S = 0.1                 # at shutdown, a task still running this long after cancel() is cancelled again
CONNECTION_CLOSE_WAIT_S = 1.0        # a closing socket's last bytes; a vanished peer must not hold the task
SELF_SIGNED_CERT_DAYS = 825          # Apple platforms refuse TLS server certificates valid any longer
OPENSSL_TIMEOUT_S = 60.0             # generating an RSA-2048 key takes well under a second
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024  # LOG_TO_FILE: one file's size before it rotates...
LOG_FILE_BACKUPS = 5                 # ...and the rotated files kept (60 MiB of logs at most)
TLS_READ_BUFFER_BYTES = 16 * 1024    # asyncio gives every TLS connection a 256 KiB read buffer (SSLProtocol.max_size),
                                     # most of a TLS client's memory; one TLS record carries at most 16 KiB
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # TLS 1.2: forward secrecy and AEAD only (no CBC: Lucky13 and
                                     # kin); TLS 1.3 suites, all AEAD, are set apart by OpenSSL and unaffected

# ###########################################################################
# §2 Errors
# ###########################################################################
# Owns: the exception tree.  Every error carries what its catcher needs to answer.
#
#   BboStreamError
#   ├── ConfigError          invalid setting: one line on stderr, exit 2
#   ├── FeedMessageError     malformed exchange message (kind, detail): counted, logged once per kind
#   ├── HttpError            status + message: rendered as {"error": message}
#   ├── EioProtocolError     invalid Engine.IO packet: closes that session
#   └── SioProtocolError     invalid Socket.IO packet: closes that connection


class BboStreamError(Exception):
    """Root of this module's errors."""


class ConfigError(BboStreamError):
    """A setting has an invalid value."""


class FeedMessageError(BboStreamError):
    """An exchange message could not be used.  ``kind`` groups errors for log-once."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class HttpError(BboStreamError):
    """An HTTP request must be answered with ``status`` and a JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


class EioProtocolError(BboStreamError, ValueError):
    """An invalid Engine.IO packet or request; the session is closed."""


class HeldBytesRefused(BboStreamError):
    """A client's unfinished message does not fit in the server's HELD_BYTES_LIMIT."""


class SioProtocolError(BboStreamError, ValueError):
    """An invalid Socket.IO packet; the connection is closed."""


def describe_error(exc: BaseException, url: str | None = None) -> str:
    """A short reason for a log line or a status object: what a network failure means, not its type.

    ``url`` is the address being connected to: DNS and connect errors name its host (and port).
    """
    if isinstance(exc, websockets.exceptions.InvalidStatus):
        return handshake_reason(exc.response.status_code)
    if isinstance(exc, websockets.exceptions.ConnectionClosed):
        rcvd, sent = exc.rcvd, exc.sent
        # We closed first (oversized message, missing pong): the exchange's echo, if any, is
        # not the reason, and no close frame received does not mean the line was lost.
        if sent is not None and (rcvd is None or exc.rcvd_then_sent is False):
            return _our_close_reason(sent.code, sent.reason)
        return f"closed by exchange: {rcvd.code} {rcvd.reason}".rstrip() if rcvd else "connection lost (no close frame)"
    where = None
    if url is not None:
        parts = urllib.parse.urlsplit(url)
        with contextlib.suppress(ValueError):
            where = (parts.hostname or "?", parts.port or (443 if parts.scheme == "wss" else 80))
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"timed out connecting to {where[0]}:{where[1]}" if where else "timed out"
    if isinstance(exc, OSError):
        if isinstance(exc, socket.gaierror):  # its errno is resolver-specific: strerror is the text
            text = exc.strerror or str(exc)
            return f"cannot resolve {where[0]}: {text}" if where else text
        # asyncio's strerror is "Connect call failed (addr)"; the errno says what happened
        text = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc) or type(exc).__name__)
        return f"cannot connect to {where[0]}:{where[1]}: {text}" if where else text
    return f"{type(exc).__name__}: {exc}"[:200]


def _our_close_reason(code: int, reason: str) -> str:
    """Why we closed the exchange connection, from the close frame websockets sent."""
    if code == CloseCode.MESSAGE_TOO_BIG:
        return f"message too big (over {FEED_MAX_MESSAGE_BYTES} bytes, close {code})"
    if code == CloseCode.INTERNAL_ERROR and "keepalive" in reason:  # websockets' "keepalive ping timeout"
        return f"no pong from the exchange within {FEED_PING_TIMEOUT_S:g} s (close {code})"
    return f"closed by us: {code} {reason}".rstrip()

# ###########################################################################
# §3 Configuration
# ###########################################################################
# Owns: the settings table (environment variable ↔ CLI flag ↔ Config field), their
# validation, and the SSL contexts.  Pure except make_server_ssl_context (reads files).

MARKET_DEFAULT_URLS = {
    # USD-M: bookTicker lives on the routed /public endpoint; the legacy unrouted
    # wss://fstream.binance.com/ws was retired on 2026-04-23 (Binance's WebSocket change notice).
    "futures": "wss://fstream.binance.com/public/ws",
    "spot": "wss://stream.binance.com:9443/ws",
    "coinm": "wss://dstream.binance.com/ws",
}

# REST: serverTime (clock offset) and exchangeInfo (symbol checks) on each market's own host.
MARKET_REST_URLS = {"futures": "https://fapi.binance.com", "spot": "https://api.binance.com",
                    "coinm": "https://dapi.binance.com"}
MARKET_REST_PREFIXES = {"futures": "/fapi/v1", "spot": "/api/v3", "coinm": "/dapi/v1"}

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})
# Binance symbols are letters, digits and `_` (COIN-M "BTCUSD_PERP"); spot allows UTF-8
# letters in symbol names since 2025-12, so \w is Unicode-aware on purpose.
_SYMBOL_RE = re.compile(rf"\w{{1,{MAX_SYMBOL_CHARS}}}\Z")  # match(): whole string; \Z, unlike $, refuses a trailing newline


def _parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ValueError("expected true or false")


def _number_in(convert: Callable[[str], Any], lo: float, hi: float) -> Callable[[str], Any]:
    """A parser of ``int`` or ``float`` settings within [lo, hi] (NaN fails the range check)."""
    noun = "an integer" if convert is int else "a number"
    bounds = f"{lo} to {hi}" if convert is int else f"{lo:g} to {hi:g}"

    def parse(text: str) -> Any:
        try:
            value = convert(text.strip())
        except ValueError:
            raise ValueError(f"expected {noun}") from None
        if not lo <= value <= hi:
            raise ValueError(f"expected {noun} from {bounds}")
        return value
    return parse


def _int_in(lo: int, hi: int) -> Callable[[str], int]:
    return _number_in(int, lo, hi)


def _float_in(lo: float, hi: float) -> Callable[[str], float]:
    return _number_in(float, lo, hi)


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(choices))
        return value
    return parse


def _parse_thread_count(text: str) -> int | None:
    """``"auto"`` → None (decided from the CPUs at start), else a count from 0 to 64."""
    if text.strip().lower() == "auto":
        return None
    try:
        return _int_in(0, 64)(text)
    except ValueError:
        raise ValueError("expected auto or a whole number from 0 to 64") from None


def _parse_symbols(text: str) -> tuple[str, ...]:
    """``"btcusdt, ETHUSDT"`` → ``("BTCUSDT", "ETHUSDT")``: upper case, unique, in order."""
    symbols: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not _SYMBOL_RE.match(part):
            raise ValueError(f"{part!r} is not a symbol (letters, digits, _)")
        upper = part.upper()
        if upper not in symbols:
            symbols.append(upper)
    if not symbols:
        raise ValueError("expected at least one symbol")
    if len(symbols) > MAX_SYMBOLS:
        raise ValueError(f"at most {MAX_SYMBOLS} symbols")
    return tuple(symbols)


def _parse_ws_url(text: str) -> str:
    value = text.strip()
    if not value:
        return ""  # empty: the MARKET's default
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError("expected a ws:// or wss:// URL")
    if not parts.path.rstrip("/").endswith("/ws"):
        raise ValueError("expected a URL ending in /ws (a stream path is appended to it)")
    return value.rstrip("/")


def _parse_http_url(text: str) -> str:
    value = text.strip()
    if not value:
        return ""  # empty: the MARKET's default
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError("expected an http:// or https:// URL without a query")
    return value.rstrip("/")


def _parse_origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    if not origins:
        raise ValueError("expected * or a comma-separated list of origins")
    return origins


def _parse_proxies(text: str) -> tuple[str, ...]:
    nets = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                nets.append(str(ipaddress.ip_network(part, strict=False)))
            except ValueError:
                raise ValueError(f"{part!r} is not an IP address or network") from None
    return tuple(nets)


def _parse_text(text: str) -> str:
    return text.strip()


# RFC 6750 §2.1 b64token: what `Authorization: Bearer` can carry unquoted, in any client.
_BEARER_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*\Z")


def _parse_token(text: str) -> str:
    """AUTH_TOKEN: empty (authentication off), or a Bearer token.  The error never repeats the value."""
    value = text.strip()
    if not value:
        return ""
    if len(value) > AUTH_TOKEN_MAX_CHARS or not _BEARER_TOKEN_RE.match(value):
        raise ValueError(f"expected up to {AUTH_TOKEN_MAX_CHARS} characters of A-Z a-z 0-9 - . _ ~ + / "
                         "(then = padding), as a Bearer token allows")
    return value


class Setting(NamedTuple):
    """One row of the settings table: env var NAME, CLI flag --name, Config field name."""
    name: str
    default: str
    parse: Callable[[str], Any]
    help: str
    unit: str = ""  # appended to the Config field when the name lacks it: PING_INTERVAL → ping_interval_ms
    secret: bool = False  # its value is never echoed (errors name the setting only; Config's repr leaves it out)

    @property
    def field(self) -> str:
        return self.name.lower() + (f"_{self.unit}" if self.unit else "")

    @property
    def flag(self) -> str:
        return "--" + self.name.lower().replace("_", "-")


# The one settings table: README, --help and Config all come from it.
SETTINGS: tuple[Setting, ...] = (
    Setting("SYMBOL", "btcusdt", _parse_symbols, "Trading pair(s) to stream, comma-separated; --symbol may repeat"),
    Setting("MARKET", "futures", _one_of("futures", "spot", "coinm"), "futures (USD-M), spot or coinm (COIN-M)"),
    Setting("WEBSOCKET_BASE_URL", "", _parse_ws_url, "Stream base URL ending in /ws; empty = the MARKET's default "
            "(futures wss://fstream.binance.com/public/ws, spot wss://stream.binance.com:9443/ws, "
            "coinm wss://dstream.binance.com/ws)"),
    Setting("AUTO_RECONNECT", "true", _parse_bool, "Reconnect to Binance after a failure"),
    Setting("MAX_RETRIES", "10", _int_in(0, 1_000_000), "Consecutive failures before the feed is marked failed "
            "(then it retries every 60 s, or after a Retry-After); 0 = no limit"),
    Setting("INITIAL_BACKOFF", "1", _float_in(0.1, 300), "First reconnect backoff in seconds (doubles, full jitter, cap 60 s)",
            "s"),
    Setting("EXTENDED_BACKOFF_THRESHOLD", "3", _int_in(1, 1_000_000), "Consecutive failures after which the backoff cap becomes 300 s"),
    Setting("FEED_STALE_SECONDS", "60", _float_in(1, 86_400), "A connection silent this long is reconnected; a symbol silent "
            "this long after subscribing is reported"),
    Setting("FEED_ROTATE_HOURS", "23.5", _float_in(0.0003, 23.9), "Reconnect proactively (make-before-break) before Binance's 24 h cut"),
    Setting("FEED_STREAMS_PER_CONNECTION", "200", _int_in(1, FEED_MAX_STREAMS_PER_CONNECTION), "Symbols per Binance connection; more symbols use more connections"),
    Setting("FEED_EDIT_ALLOWED", "false", _parse_bool, "Let every dashboard add and remove feed symbols (Socket.IO "
            "feed_add_symbol / feed_remove_symbol); with AUTH_TOKEN set, authenticated clients may anyway"),
    Setting("FEED_MAX_SYMBOLS", "50", _int_in(1, MAX_SYMBOLS), "Symbols the feed may have once clients add some "
            "(the SYMBOL list itself may be longer)"),
    Setting("EXCHANGE_REST_URL", "", _parse_http_url, "Binance REST base URL, for serverTime (clock offset) and "
            "exchangeInfo (symbols added from the dashboard); empty = the MARKET's default (futures "
            "https://fapi.binance.com, spot https://api.binance.com, coinm https://dapi.binance.com)"),
    Setting("CLOCK_CHECK_MINUTES", "5", _float_in(0, 1440), "Minutes between measurements of the local clock against "
            "the exchange's (REST serverTime); 0 = never (then only the floor of recv - E estimates it)"),
    Setting("CLOCK_MAX_OFFSET_MS", "100", _float_in(0, 86_400_000), "Warn (log, /healthz, dashboard) when the local "
            "clock is off the exchange's by more than this many ms beyond the estimate's uncertainty"),
    Setting("DEBUG", "false", _parse_bool, "Debug logging"),
    Setting("LOG_TO_FILE", "false", _parse_bool, "Also log to rotating files in LOG_DIR"),
    Setting("LOG_DIR", "logs", _parse_text, "Directory for log files"),
    Setting("LOG_FORMAT", "text", _one_of("text", "json"), "text, or json for one JSON object per line"),
    Setting("WEB_ENABLED", "true", _parse_bool, "Serve HTTP (dashboard, REST, Socket.IO); false = record only"),
    Setting("WEB_HOST", "0.0.0.0", _parse_text, "Address to listen on"),
    Setting("WEB_PORT", "5000", _int_in(0, 65535), "Port to listen on; 0 = any free port (logged)"),
    Setting("USE_SSL", "true", _parse_bool, "Serve HTTPS (plain HTTP still works on the same port)"),
    Setting("SSL_CERT_PATH", "certs/cert.pem", _parse_text, "TLS certificate (PEM); generated self-signed if missing"),
    Setting("SSL_KEY_PATH", "certs/key.pem", _parse_text, "TLS private key (PEM); generated if missing"),
    Setting("CACHE_ENABLED", "true", _parse_bool, "Keep a history of updates in memory"),
    Setting("CACHE_MAX_ITEMS", "1000000", _int_in(1, 100_000_000), "Raw updates kept per symbol (ring buffer)"),
    Setting("CACHE_PERSIST", "true", _parse_bool, "Persist the history to CACHE_DIR and restore it at start"),
    Setting("CACHE_DIR", "cache_data", _parse_text, "Directory for persisted history"),
    Setting("CACHE_CLEANUP_HOURS", "6", _float_in(0.0003, 10_000), "Hours between cache cleanups (compaction, limits)"),
    Setting("CACHE_FLUSH_SECONDS", "1", _float_in(0.05, 3600), "Seconds between journal flushes (what a crash can lose)"),
    Setting("CACHE_BARS_DAYS", "7", _float_in(0, 3650), "Days of 1-second bars kept per symbol (for long charts)"),
    Setting("PING_INTERVAL", "25000", _int_in(1, 3_600_000), "Engine.IO ping interval in ms", "ms"),
    Setting("PING_TIMEOUT", "20000", _int_in(1, 3_600_000), "Engine.IO ping timeout in ms", "ms"),
    Setting("MAX_PAYLOAD", "1000000", _int_in(1024, 100_000_000), "Engine.IO max payload in bytes (HTTP body and "
            "WebSocket message)", "bytes"),
    Setting("MAX_CLIENTS", "10000", _int_in(1, 1_000_000), "Concurrent Socket.IO clients; more get HTTP 503"),
    Setting("MAX_CLIENT_MESSAGES_PER_S", "100", _float_in(1, 1_000_000), "Socket.IO packets a client may send per "
            "second (a burst of 2 s); beyond, it is disconnected and logged. The dashboard sends a few a minute"),
    Setting("MAX_SESSIONS_PER_ADDRESS", "256", _int_in(1, 1_000_000), "Socket.IO sessions one client address may "
            "hold (an office behind one NAT shares one); more get HTTP 429. Behind a proxy, set TRUSTED_PROXIES"),
    Setting("MAX_NEW_SESSIONS_PER_ADDRESS_PER_S", "20", _float_in(0.1, 1_000_000), "Socket.IO sessions one client "
            f"address may open per second (a burst of {NEW_SESSION_BURST_S:g} s worth); more get HTTP 429 with "
            "Retry-After. Behind a proxy, set TRUSTED_PROXIES"),
    Setting("FANOUT_THREADS", "auto", _parse_thread_count, "Threads that help write each update to many WebSocket clients "
            f"(from {FANOUT_PARALLEL_MIN_LINKS}); auto = usable CPUs (cpuset, cgroup quota) - 1, at most {FANOUT_AUTO_MAX_THREADS}; "
            "0 = the event loop alone"),
    Setting("CORS_ORIGINS", "*", _parse_origins, "Allowed browser origins for the REST API and Socket.IO, comma-separated, or *"),
    Setting("TRUSTED_PROXIES", "", _parse_proxies, "Proxies (IPs or CIDRs) whose X-Forwarded-For is trusted: the "
            "client is its nearest hop that is not one of them (logs, per-address limits)"),
    Setting("AUTH_TOKEN", "", _parse_token, "Token that REST (Authorization: Bearer) and Socket.IO (auth.token) "
            "require; empty = no authentication. Never logged", secret=True),
    Setting("RECOVERY_SECONDS", "0", _float_in(0, 86_400), "Socket.IO connection state recovery: a client that "
            "reconnects within this many seconds keeps its sid and subscription and gets what it missed; 0 = off "
            "(then events carry no offset)"),
    Setting("RECOVERY_MAX_UPDATES", "10000", _int_in(1, RECOVERY_LOG_UPDATES), "Missed updates a recovering client "
            "gets one by one; beyond, the newest per symbol and a `gap` event with how many were skipped"),
    Setting("METRICS_PUBLIC", "true", _parse_bool, "/metrics without the token; false = it needs AUTH_TOKEN like the REST API"),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated settings.  Field names are the env var names in lower case, with the unit
    appended where the name has none (PING_INTERVAL → ping_interval_ms)."""
    symbol: tuple[str, ...] = ("BTCUSDT",)
    market: str = "futures"
    websocket_base_url: str = ""
    auto_reconnect: bool = True
    max_retries: int = 10
    initial_backoff_s: float = 1.0
    extended_backoff_threshold: int = 3
    feed_stale_seconds: float = 60.0
    feed_rotate_hours: float = 23.5
    feed_streams_per_connection: int = 200
    feed_edit_allowed: bool = False
    feed_max_symbols: int = 50
    exchange_rest_url: str = ""
    clock_check_minutes: float = 5.0
    clock_max_offset_ms: float = 100.0
    debug: bool = False
    log_to_file: bool = False
    log_dir: str = "logs"
    log_format: str = "text"
    web_enabled: bool = True
    web_host: str = "0.0.0.0"
    web_port: int = 5000
    use_ssl: bool = True
    ssl_cert_path: str = "certs/cert.pem"
    ssl_key_path: str = "certs/key.pem"
    cache_enabled: bool = True
    cache_max_items: int = 1_000_000
    cache_persist: bool = True
    cache_dir: str = "cache_data"
    cache_cleanup_hours: float = 6.0
    cache_flush_seconds: float = 1.0
    cache_bars_days: float = 7.0
    ping_interval_ms: int = 25_000
    ping_timeout_ms: int = 20_000
    max_payload_bytes: int = 1_000_000
    max_clients: int = 10_000
    max_client_messages_per_s: float = 100.0
    max_sessions_per_address: int = 256
    max_new_sessions_per_address_per_s: float = 20.0
    fanout_threads: int | None = None  # None = auto (see fanout_helper_threads)
    cors_origins: tuple[str, ...] = ("*",)
    trusted_proxies: tuple[str, ...] = ()
    auth_token: str = dataclasses.field(default="", repr=False)  # a secret: never in a repr, a log or an error
    recovery_seconds: float = 0.0
    recovery_max_updates: int = 10_000
    metrics_public: bool = True

    @property
    def symbols(self) -> tuple[str, ...]:
        return self.symbol

    @property
    def feed_base_url(self) -> str:
        return self.websocket_base_url or MARKET_DEFAULT_URLS[self.market]

    @property
    def rest_base_url(self) -> str:
        return self.exchange_rest_url or MARKET_REST_URLS[self.market]

    @property
    def bars_capacity(self) -> int:
        return int(self.cache_bars_days * 86_400)

    def fanout_helper_threads(self, cpus: int) -> int:
        """Writer threads beside the event loop's own: FANOUT_THREADS, or for auto one per spare CPU."""
        if self.fanout_threads is not None:
            return self.fanout_threads
        return max(0, min(FANOUT_AUTO_MAX_THREADS, cpus - 1))

    @classmethod
    def from_sources(cls, argv: Sequence[str] | None = None,
                     environ: dict[str, str] | None = None) -> "Config":
        """Defaults, overridden by the environment, overridden by CLI flags.

        Raises:
            ConfigError: with one line naming the setting, the value and what was expected.
        """
        environ = os.environ if environ is None else environ
        args = build_arg_parser().parse_args(list(argv or []))
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            raw = getattr(args, setting.field)
            source = setting.flag
            if isinstance(raw, list):  # --symbol may repeat
                raw = ",".join(raw)
            if raw is None:
                raw, source = environ.get(setting.name), setting.name
            if raw is None:
                raw, source = setting.default, "default"
            try:
                values[setting.field] = setting.parse(raw)
            except ValueError as exc:
                shown = "(hidden)" if setting.secret else repr(raw)
                raise ConfigError(f"invalid {setting.name} ({source}) = {shown}: {exc}") from None
        return cls(**values)


def cpus_allowed(affinity: int, cpu_max: str | None) -> int:
    """CPUs to plan threads for: the affinity set, capped by a cgroup CPU quota.

    `cpu_max` is cgroup v2's ``cpu.max`` ("200000 100000" = 2 CPUs, "max 100000" = no quota),
    or None; a container limited with ``--cpus`` shows its limit only there.
    """
    fields = (cpu_max or "").split()
    if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit() and int(fields[1]) > 0:
        return max(1, min(affinity, math.ceil(int(fields[0]) / int(fields[1]))))
    return max(1, affinity)


def build_arg_parser() -> argparse.ArgumentParser:
    """The CLI: one flag per setting (``WEB_PORT`` → ``--web-port``); a flag wins over the env.
    A boolean flag alone means true (``--debug``); ``--debug false`` works too."""
    parser = argparse.ArgumentParser(
        prog="bbo_stream.py", usage="%(prog)s [--version] [--SETTING VALUE ...]",
        description="Stream Binance best bid/offer (bookTicker) to browsers, Socket.IO clients and a REST API.",
        epilog="Every flag is also an environment variable, named as shown (--web-port is WEB_PORT); "
               "a flag wins over the environment.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for setting in SETTINGS:
        extra: dict[str, Any] = {}
        if setting.name == "SYMBOL":
            extra = {"action": "append"}
        elif setting.parse is _parse_bool:
            extra = {"nargs": "?", "const": "true"}
        parser.add_argument(setting.flag, dest=setting.field, metavar=setting.name, default=None,
                            help=f"{setting.help} (env {setting.name}, default {setting.default!r})", **extra)
    return parser


def make_server_ssl_context(cert_path: str, key_path: str) -> ssl.SSLContext:
    """TLS 1.2+ server context from PEM files, AEAD suites only.  Raises OSError/ssl.SSLError if unusable."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.load_cert_chain(cert_path, key_path)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx

# ###########################################################################
# §4 BBO model and feed parsing
# ###########################################################################
# Owns: the Bbo record, Binance message parsing, stream URLs and shards, the reconnect
# policy and the per-connection health state.  Pure: text and `now` in, values out.


class Bbo(NamedTuple):
    """One bookTicker update.  A tuple (not a dataclass): ~10× cheaper to build per message."""
    symbol: str                 # "BTCUSDT"
    bid_price: str              # exact strings as the exchange sent them
    bid_qty: str
    ask_price: str
    ask_qty: str
    event_ms: int               # "timestamp": exchange E, or recv_ms where the market sends none (spot)
    recv_ms: int                # "serverTimestamp": when BBO Stream received it
    latency_ms: int | None      # "backendLatency" = recv_ms - E; None where there is no E
    transaction_ms: int | None  # "transactionTime" = T; None where there is no T
    update_id: int              # "updateId" = u
    emit_ms: int | None = None  # "emitTimestamp": when the fan-out wrote it to clients; None until then


# Public field names, in payload order: REST rows, Socket.IO bbo_update, CSV and disk use these.
BBO_KEYS = ("symbol", "bidPrice", "bidQty", "askPrice", "askQty", "timestamp",
            "serverTimestamp", "backendLatency", "updateId", "transactionTime", "emitTimestamp")


def _json_int(value: int | None) -> str:
    return "null" if value is None else str(value)


def bbo_json_head(bbo: Bbo) -> str:
    """bbo_json up to its last key: the fan-out encodes this once per update at publish and
    appends the emit time, the same for the whole write pass, when it writes (emit_suffix)."""
    return (f'{{"symbol":"{bbo.symbol}","bidPrice":"{bbo.bid_price}","bidQty":"{bbo.bid_qty}",'
            f'"askPrice":"{bbo.ask_price}","askQty":"{bbo.ask_qty}","timestamp":{bbo.event_ms},'
            f'"serverTimestamp":{bbo.recv_ms},"backendLatency":{_json_int(bbo.latency_ms)},'
            f'"updateId":{bbo.update_id},"transactionTime":{_json_int(bbo.transaction_ms)}')


def emit_suffix(emit_ms: int | None) -> str:
    """The rest of bbo_json after bbo_json_head: the emit time and the closing brace."""
    return f',"emitTimestamp":{_json_int(emit_ms)}}}'


def bbo_json(bbo: Bbo) -> str:
    """Compact JSON object of an update with the public keys (encoded once, sent to all)."""
    return bbo_json_head(bbo) + emit_suffix(bbo.emit_ms)


class FeedAck(NamedTuple):
    """A reply to SUBSCRIBE/UNSUBSCRIBE/LIST_SUBSCRIPTIONS: ``{"result": ..., "id": n}``."""
    request_id: Any
    result: Any


class FeedError(NamedTuple):
    """An error reply, ``{"error": {"code": n, "msg": "..."}, "id": n}`` (or the flat
    ``{"code": n, "msg": "...", "id": n}`` of the market-stream docs): the exchange refused a request."""
    request_id: Any
    code: Any
    msg: str


class ServerShutdown(NamedTuple):
    """Spot's ``serverShutdown`` event: this connection is about to be closed; rotate now."""
    event_ms: int


# A price or quantity exactly as Binance writes it: no sign, no exponent, no leading zeros
# (so that the string can be rebuilt digit for digit from an int64 mantissa and a scale),
# at most MAX_DIGITS digits.
_DECIMAL_RE = re.compile(r"(?!\d{18})(?:0|[1-9]\d*)(?:\.\d+)?", re.ASCII)


# Validated decimal strings → mantissa·32 + decimals, one int: the batch conversion to numpy
# is then one lookup per value.  Prices repeat from one update to the next, so most lookups
# hit; bounded by clearing (a cleared entry is just validated again).
_DECIMAL_CACHE: dict[str, int] = {}
DECIMAL_CACHE_MAX = 100_000          # ~10 MB at most; a day of BTCUSDT has far fewer distinct prices
_SYMBOL_CACHE: dict[str, str] = {}   # validated exchange symbol → upper case (bounded by MAX_SYMBOLS)


def _mantissa(text: str) -> tuple[int, int]:
    """``"28750.10"`` → ``(2875010, 2)`` for a string _DECIMAL_RE accepted."""
    dot = text.find(".")
    if dot < 0:
        return int(text), 0
    return int(text[:dot] + text[dot + 1:]), len(text) - dot - 1


def decimal_code(value: Any, key: str = "value") -> int:
    """Validate a price/quantity string; return its mantissa·32 + number of decimals.

    Raises:
        FeedMessageError: not a plain decimal string of at most MAX_DIGITS digits.
    """
    code = _DECIMAL_CACHE.get(value) if type(value) is str else None
    if code is None:
        if type(value) is not str or len(value) > MAX_DIGITS + 1 or not _DECIMAL_RE.fullmatch(value):
            raise FeedMessageError(f"bad field {key}", f"{key}={value!r} is not a decimal string")
        if len(_DECIMAL_CACHE) >= DECIMAL_CACHE_MAX:
            _DECIMAL_CACHE.clear()
        mantissa, decimals = _mantissa(value)
        code = _DECIMAL_CACHE[value] = mantissa << 5 | decimals
    return code


_new_bbo = tuple.__new__  # Bbo(...) without NamedTuple's Python-level __new__


def _bad_int(payload: dict, key: str) -> FeedMessageError:
    return FeedMessageError(f"bad field {key}", f"{key}={payload.get(key)!r} is not an integer from 0 to 2**63-1")


def parse_book_ticker(payload: dict, recv_ms: int) -> Bbo:
    """A bookTicker payload (spot, USD-M or COIN-M flavour) → Bbo.

    Spot sends no ``E``/``T``: ``timestamp`` is then the receive time and latency is None.
    COIN-M's extra ``ps`` (pair) is ignored.  A crossed book is *not* an error here (it is
    kept and counted by the history).  This is the ingest hot path: checks are inlined.

    Raises:
        FeedMessageError: a field is missing or malformed.
    """
    get = payload.get
    raw_symbol = get("s")
    symbol = _SYMBOL_CACHE.get(raw_symbol) if type(raw_symbol) is str else None
    if symbol is None:
        if type(raw_symbol) is not str or not _SYMBOL_RE.match(raw_symbol):
            raise FeedMessageError("bad field s", f"s={raw_symbol!r} is not a symbol")
        symbol = raw_symbol.upper()
        if len(_SYMBOL_CACHE) < MAX_SYMBOLS:
            _SYMBOL_CACHE[raw_symbol] = symbol
    update_id, event_ms, transaction_ms = get("u"), get("E"), get("T")
    if type(update_id) is not int or not 0 <= update_id <= INT64_MAX:
        raise _bad_int(payload, "u")
    bid, bid_qty, ask, ask_qty = get("b"), get("B"), get("a"), get("A")
    cache = _DECIMAL_CACHE
    if not (bid in cache and bid_qty in cache and ask in cache and ask_qty in cache):
        decimal_code(bid, "b"), decimal_code(bid_qty, "B"), decimal_code(ask, "a"), decimal_code(ask_qty, "A")
    if event_ms is None:
        if transaction_ms is not None:
            raise FeedMessageError("bad field E", "T without E")
        return _new_bbo(Bbo, (symbol, bid, bid_qty, ask, ask_qty, recv_ms, recv_ms, None, None, update_id, None))
    if type(event_ms) is not int or not 0 <= event_ms <= INT64_MAX:
        raise _bad_int(payload, "E")
    if transaction_ms is not None and (type(transaction_ms) is not int or not 0 <= transaction_ms <= INT64_MAX):
        raise _bad_int(payload, "T")
    latency = recv_ms - event_ms
    if latency > MAX_SKEW_MS or latency < -MAX_SKEW_MS or (
            transaction_ms is not None and abs(event_ms - transaction_ms) > MAX_SKEW_MS):
        raise FeedMessageError("bad field E", f"E={event_ms} T={transaction_ms} are over 24 days from the local clock")
    return _new_bbo(Bbo, (symbol, bid, bid_qty, ask, ask_qty, event_ms, recv_ms, latency, transaction_ms, update_id,
                          None))


_json_scan = json.JSONDecoder().scan_once  # the C scanner json.loads uses


def parse_feed_message(text: str | bytes, recv_ms: int) -> Bbo | FeedAck | FeedError | ServerShutdown:
    """One WebSocket message from Binance → a Bbo, an ack, or a shutdown notice.

    Accepts raw payloads (``/ws/<stream>``) and the combined-stream wrapper
    ``{"stream": "btcusdt@bookTicker", "data": {...}}``.

    Raises:
        FeedMessageError: not JSON, an unknown event, or a malformed bookTicker.
    """
    try:
        if type(text) is bytes:
            text = text.decode()
        msg, end = _json_scan(text, 0)  # json.loads minus its whitespace regexes (hot path)
        if end != len(text) and text[end:].strip():
            raise ValueError(f"extra data at {end}")
    except StopIteration as exc:
        raise FeedMessageError("invalid JSON", f"expecting a value at {exc.value}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise FeedMessageError("invalid JSON", str(exc)[:100]) from None
    if type(msg) is not dict:
        raise FeedMessageError("not an object", repr(text[:100]))
    data = msg.get("data")
    if type(data) is dict and "stream" in msg:  # combined-stream wrapper
        msg = data
    if "u" in msg:
        return parse_book_ticker(msg, recv_ms)
    if "result" in msg and "id" in msg:
        return FeedAck(msg["id"], msg["result"])
    event = msg.get("e")
    if event == "serverShutdown":
        event_ms = msg.get("E")
        return ServerShutdown(event_ms if type(event_ms) is int else recv_ms)
    error = msg.get("error")
    if type(error) is dict and "code" in error and "msg" in error:
        return FeedError(msg.get("id"), error["code"], str(error["msg"])[:200])
    if "code" in msg and "msg" in msg:
        return FeedError(msg.get("id"), msg["code"], str(msg["msg"])[:200])
    raise FeedMessageError("unknown message", repr(text[:100]))


def feed_url(base_url: str, symbols: Sequence[str]) -> str:
    """Stream URL for these symbols: raw for one, combined for several (same root).

    ``wss://fstream.binance.com/public/ws`` + [BTCUSDT] → ``.../public/ws/btcusdt@bookTicker``;
    + [BTCUSDT, ETHUSDT] → ``.../public/stream?streams=btcusdt@bookTicker/ethusdt@bookTicker``.
    Stream names must be lower case (python-binance#848).
    """
    streams = [f"{s.lower()}@bookTicker" for s in symbols]
    if len(streams) == 1:
        return f"{base_url}/{urllib.parse.quote(streams[0], safe='@')}"
    root = base_url[: -len("/ws")]
    return f"{root}/stream?streams=" + "/".join(urllib.parse.quote(s, safe="@") for s in streams)


def shard_symbols(symbols: Sequence[str], per_connection: int) -> list[tuple[str, ...]]:
    """Split the symbols into connections of at most ``per_connection`` streams (Binance's
    advice: heavy fan-in on one connection degrades; it allows at most 1024 streams on one)."""
    per_connection = min(per_connection, FEED_MAX_STREAMS_PER_CONNECTION)  # a Config built in code skips the parser
    return [tuple(symbols[i:i + per_connection]) for i in range(0, len(symbols), per_connection)]


def retry_after_ms(value: str | None, now_ms: int) -> int | None:
    """A ``Retry-After`` header (seconds, or an HTTP date) → the time before which no new
    connection may be tried; None when absent, unreadable or already past."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        wait_s = float(value)
    else:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        # RFC 9110 dates are GMT: a missing zone is UTC, not local time
        wait_s = email.utils.mktime_tz((*parsed[:9], parsed[9] or 0)) - now_ms / 1000
    if wait_s <= 0:
        return None
    return now_ms + math.ceil(min(wait_s, FEED_RETRY_AFTER_MAX_S) * 1000)


def handshake_reason(status: int, now_ms: int | None = None, not_before_ms: int | None = None) -> str:
    """Why the exchange refused the WebSocket handshake, for a person.  ``not_before_ms`` is
    the Retry-After time (see retry_after_ms), named in the reason for 429 and 418."""
    if status == 429:
        if not_before_ms is None or now_ms is None:
            return "rate limited (HTTP 429)"
        return f"rate limited (HTTP 429), retrying after {math.ceil((not_before_ms - now_ms) / 1000)} s"
    if status == 418:
        if not_before_ms is None:
            return "IP banned (HTTP 418)"
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(not_before_ms / 1000))
        return f"IP banned (HTTP 418) until {until}"
    if status == 451:
        return "Binance refuses this location (HTTP 451, geo-blocked)"
    if status == 403:
        return "refused by Binance's firewall (HTTP 403)"
    if status == 404:
        return "no such stream path (HTTP 404): check WEBSOCKET_BASE_URL"
    if status >= 500:
        return f"exchange unavailable (HTTP {status})"
    return f"handshake refused (HTTP {status})"


def backoff_delay_s(failures: int, cfg: Config, rand01: float) -> float:
    """Delay before the next attempt after ``failures`` consecutive failures (≥ 1).

    Exponential from INITIAL_BACKOFF with full jitter (AWS "exponential backoff and jitter"),
    capped at 60 s, or at 300 s from EXTENDED_BACKOFF_THRESHOLD failures on; after MAX_RETRIES
    failures (0 = never) the feed is `failed` and retries every 60 s.  Never below
    FEED_MIN_RECONNECT_S, so a jitter draw near 0 cannot start a reconnect storm.
    """
    if cfg.max_retries and failures >= cfg.max_retries:
        return FEED_FAILED_RETRY_S
    cap = FEED_EXTENDED_BACKOFF_CAP_S if failures >= cfg.extended_backoff_threshold else FEED_BACKOFF_CAP_S
    ceiling = min(cap, cfg.initial_backoff_s * 2 ** min(failures - 1, 30))
    return max(FEED_MIN_RECONNECT_S, ceiling * rand01)


class FeedState(str, enum.Enum):
    CONNECTING = "connecting"
    LIVE = "live"
    STALE = "stale"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPED = "stopped"


class ShardHealth:
    """Health of one feed connection (a shard of symbols) as a small state machine.

    The shell reports what happened (``connecting``, ``opened``, ``data``, ``silent``,
    ``closed``) with the time; this object keeps the state, the counters and the failure
    count, and says how long to wait before the next attempt.
    """

    def __init__(self, symbols: tuple[str, ...], now_ms: int) -> None:
        self.symbols = symbols
        self.state = FeedState.CONNECTING           # current FeedState
        self.reason: str | None = None              # why the state is not live
        self.since_ms = now_ms                      # when the state began
        self.failures = 0                           # consecutive failed connections
        self.connected_since_ms: int | None = None  # when the current connection opened
        self.first_data_ms: int | None = None       # first data on the current connection
        self.last_data_ms: int | None = None        # last data message on any connection
        self.next_attempt_ms: int | None = None     # when the next attempt starts (backoff/failed)
        self.messages = 0                           # data messages received
        self.reconnects = 0                         # connections opened after the first
        self.parse_errors = 0                       # messages that could not be parsed
        self._opened_once = False

    def _set(self, state: FeedState, now_ms: int, reason: str | None) -> None:
        if state is not self.state or reason != self.reason:
            self.state, self.reason, self.since_ms = state, reason, now_ms

    def connecting(self, now_ms: int) -> None:
        self.next_attempt_ms = None
        # A rotation connects while staying live; a reconnect after a silent stall stays `stale`
        # until data flows again (else a stalled exchange would read "connecting" most of the time).
        if self.state not in (FeedState.LIVE, FeedState.STALE):
            self._set(FeedState.CONNECTING, now_ms, self.reason)

    def opened(self, now_ms: int) -> None:
        if self._opened_once:
            self.reconnects += 1
        self._opened_once = True
        self.connected_since_ms = now_ms
        self.first_data_ms = None

    def data(self, now_ms: int) -> None:
        """A data message arrived (hot path: a few attribute writes)."""
        self.messages += 1
        self.last_data_ms = now_ms
        if self.state is not FeedState.LIVE:
            self._set(FeedState.LIVE, now_ms, None)
        if self.first_data_ms is None:
            self.first_data_ms = now_ms
        elif self.failures and now_ms - self.first_data_ms >= FEED_HEALTHY_AFTER_S * 1000:
            self.failures = 0

    def silent(self, now_ms: int, stale_s: float) -> bool:
        """True when the connection has sent no data for ``stale_s`` (the silent stall)."""
        ref = self.last_data_ms if self.first_data_ms is not None else self.connected_since_ms
        return ref is not None and now_ms - ref >= stale_s * 1000

    def closed(self, now_ms: int, reason: str, failure: bool, cfg: Config, rand01: float,
               not_before_ms: int | None = None) -> float | None:
        """The connection ended (or never opened).  ``failure`` is False for the watchdog's
        reconnect of a silent connection (state `stale`), which is not a failure (rotations
        never close a shard: they hand over to a new connection).  ``not_before_ms``: a
        Retry-After the exchange gave; the delay never ends before it.  Returns the delay before
        reconnecting, or None when the feed must not reconnect (AUTO_RECONNECT=false)."""
        self.connected_since_ms = None
        self.first_data_ms = None
        if failure:
            self.failures += 1
        if not cfg.auto_reconnect:
            self._set(FeedState.STOPPED, now_ms, f"{reason}; AUTO_RECONNECT is off")
            return None
        if not failure:  # the watchdog's reconnect of a silent connection
            self._set(FeedState.STALE, now_ms, reason)
            delay = FEED_MIN_RECONNECT_S
        else:
            delay = backoff_delay_s(self.failures, cfg, rand01)
            failed = bool(cfg.max_retries) and self.failures >= cfg.max_retries
            self._set(FeedState.FAILED if failed else FeedState.BACKOFF, now_ms, reason)
        if not_before_ms is not None:  # Binance bans IPs that reconnect before Retry-After
            delay = max(delay, (not_before_ms - now_ms) / 1000)
        self.next_attempt_ms = now_ms + math.ceil(delay * 1000)
        return delay

    def status(self, now_ms: int) -> dict:
        return {
            "state": self.state.value, "reason": self.reason, "since": self.since_ms,
            "connectedSince": self.connected_since_ms, "nextAttempt": self.next_attempt_ms,
            "lastMessageAge": None if self.last_data_ms is None else now_ms - self.last_data_ms,
            "messages": self.messages, "reconnects": self.reconnects, "parseErrors": self.parse_errors,
            "failures": self.failures, "symbols": list(self.symbols),
        }


def symbol_state(last_ms: int | None, now_ms: int, suspect_after_ms: int, stale_ms: int) -> str:
    """A symbol's state in the feed status: `waiting` (no data yet), `live`, `suspect` (silent for
    ``suspect_after_ms``: longer than its own rate explains) or `quiet` (silent for FEED_STALE_SECONDS)."""
    if last_ms is None:
        return "waiting"
    age = now_ms - last_ms
    if age >= stale_ms:
        return "quiet"
    return "suspect" if age >= suspect_after_ms else "live"


# Order in which shard states summarise the whole feed: the best one wins.
_STATE_RANK = {FeedState.LIVE: 0, FeedState.CONNECTING: 1, FeedState.STALE: 2,
               FeedState.BACKOFF: 3, FeedState.FAILED: 4, FeedState.STOPPED: 5}


def shard_name(shard: ShardHealth) -> str:
    """A shard's symbols for log lines: the first three and how many more."""
    names = ",".join(shard.symbols[:3])
    return names + (f"+{len(shard.symbols) - 3}" if len(shard.symbols) > 3 else "")


# -- clock offset: the local clock against the exchange's --------------------------------------

class ClockEstimate(NamedTuple):
    offset_ms: float        # local clock minus exchange clock: positive = the local clock is ahead
    uncertainty_ms: float   # the true offset lies within offset_ms ± this
    measured_at_ms: int     # local time of the measurement


def rest_clock_sample(send_ms: float, recv_ms: float, server_ms: int) -> ClockEstimate:
    """One answer of the exchange's REST serverTime → an offset estimate (Cristian's algorithm).

    The exchange read its clock at some moment between our send and our receive (local ms, with
    fractions): taking the middle errs by at most half the round trip, whatever the two directions'
    share of it.  Its time is a whole ms, cut down: the true reading lies in [server_ms, server_ms + 1).
    """
    half_rtt = max(0.0, recv_ms - send_ms) / 2
    offset = (send_ms + recv_ms) / 2 - (server_ms + CLOCK_TRUNCATION_MS / 2)
    return ClockEstimate(offset, half_rtt + CLOCK_TRUNCATION_MS / 2, int(recv_ms))


class ClockOffsetEstimator:
    """The offset of the local clock against the exchange's, from two sources.

    `rest`: rounds of REST serverTime requests (rest_clock_sample; of a round, the sample with the
    shortest round trip).  `floor`: the minimum of recv - E over the last five minutes.  Every
    update took some time ≥ 0 to arrive, so recv - E ≥ offset (less the 1 ms of truncation): the
    floor bounds the offset from above, and is close to it when the fastest update's one-way trip
    is short.  Subtracting half the WebSocket's ping round trip estimates that trip.

    The REST estimate is published while the floor agrees with it; when the floor falls below what
    the REST estimate allows (the local clock was stepped since the check), the floor's estimate is.
    """

    def __init__(self, max_offset_ms: float = 100.0) -> None:
        self.max_offset_ms = max_offset_ms           # warn beyond this (CLOCK_MAX_OFFSET_MS)
        self.rest: ClockEstimate | None = None       # the last REST round's best sample
        self.rest_history: deque[tuple[int, float]] = deque(maxlen=CLOCK_HISTORY_MAX)  # (measured at, offset)
        self.rest_error: str | None = None           # why the last REST round failed; None after a success
        self.ws_rtt_ms: float | None = None          # the exchange WebSocket's last ping round trip
        self._floor: deque[list[int]] = deque(maxlen=CLOCK_FLOOR_WINDOW_MS // CLOCK_FLOOR_BUCKET_MS + 1)

    def add_rest_round(self, samples: Sequence[ClockEstimate]) -> ClockEstimate:
        best = min(samples, key=lambda sample: sample.uncertainty_ms)
        self.rest, self.rest_error = best, None
        self.rest_history.append((best.measured_at_ms, best.offset_ms))
        return best

    def observe_floor(self, at_ms: int, min_latency_ms: int) -> None:
        """The smallest recv - E of a batch of updates received up to ``at_ms``."""
        bucket = at_ms - at_ms % CLOCK_FLOOR_BUCKET_MS
        floor = self._floor
        if floor and floor[-1][0] == bucket:
            floor[-1][1] = min(floor[-1][1], min_latency_ms)
        elif not floor or bucket > floor[-1][0]:
            floor.append([bucket, min_latency_ms])

    def floor_ms(self, now_ms: int) -> int | None:
        """min(recv - E) over the last CLOCK_FLOOR_WINDOW_MS, or None without updates carrying E."""
        since = now_ms - CLOCK_FLOOR_WINDOW_MS
        values = [low for bucket, low in self._floor if bucket + CLOCK_FLOOR_BUCKET_MS > since]  # overlapping it
        return min(values) if values else None

    def current(self, now_ms: int) -> tuple[ClockEstimate | None, str | None]:
        """The estimate to use and its source ("rest" or "floor"), or (None, None)."""
        floor = self.floor_ms(now_ms)
        rest = self.rest
        if rest is not None and (floor is None or rest.offset_ms - rest.uncertainty_ms <= floor + CLOCK_TRUNCATION_MS):
            return rest, "rest"
        if floor is not None and self.ws_rtt_ms is not None:
            half = self.ws_rtt_ms / 2
            return ClockEstimate(floor - half, half + CLOCK_TRUNCATION_MS, now_ms), "floor"
        return (rest, "rest") if rest is not None else (None, None)  # no one-way estimate to replace it with

    def warning(self, estimate: ClockEstimate | None) -> str | None:
        """A warning when the local clock is off by more than max_offset_ms for certain."""
        if estimate is None or abs(estimate.offset_ms) - estimate.uncertainty_ms <= self.max_offset_ms:
            return None
        way = "ahead of" if estimate.offset_ms > 0 else "behind"
        return (f"the local clock is {abs(estimate.offset_ms):.0f} ms (± {estimate.uncertainty_ms:.1f}) {way} the "
                f"exchange's, more than CLOCK_MAX_OFFSET_MS ({self.max_offset_ms:g}); latencies are corrected by it, "
                "but sync the clock (NTP)")

    def status(self, now_ms: int) -> dict[str, Any]:
        """The `clock` object of /healthz and feed_status (contract)."""
        estimate, source = self.current(now_ms)
        if estimate is None:
            return {"offsetMs": None, "uncertaintyMs": None, "source": None, "measuredAt": None,
                    "warning": None, "error": self.rest_error}
        return {"offsetMs": round(estimate.offset_ms, 3), "uncertaintyMs": round(estimate.uncertainty_ms, 3),
                "source": source, "measuredAt": estimate.measured_at_ms, "warning": self.warning(estimate),
                "error": self.rest_error}

    def offsets_at(self, times_ms: np.ndarray, now_ms: int) -> np.ndarray | None:
        """The offset in effect at each of ``times_ms``: the REST estimate measured last before it
        (the first one for older times); without any, the current estimate; None without that."""
        if self.rest_history:
            at = np.array([t for t, _ in self.rest_history], np.int64)
            offsets = np.array([o for _, o in self.rest_history], np.float64)
            return offsets[np.maximum(np.searchsorted(at, times_ms, "right") - 1, 0)]
        estimate, _ = self.current(now_ms)
        return None if estimate is None else np.full(len(times_ms), estimate.offset_ms)


# ###########################################################################
# §5 History cache (numpy rings, 1-second bars, queries, on-disk codec)
# ###########################################################################
# Owns: per-symbol history: dedupe by `u`, a raw ring (62 B/update), a ring of 1 s bars,
# outages, range queries and latency statistics, and the JSON column codec used on disk.
# Pure: no clock, no files.  Appends are batched (PENDING_FLUSH_ROWS) into numpy.

# Raw ring columns: 8+4+4+2+8+4×8+4×1 = 62 bytes per update (goal ≤ 64).  Prices are exact:
# an int64 mantissa plus a uint8 count of decimals rebuilds Binance's string digit for digit.
RAW_COLUMNS: dict[str, Any] = {
    "recv_ms": np.int64,        # serverTimestamp; sorted (the ring is searched by it)
    "latency_ms": np.int32,     # recv_ms - E (backendLatency); INT32_NULL = none (spot)
    "e_minus_t_ms": np.int32,   # E - T; INT32_NULL = no T
    "emit_minus_recv_ms": np.int16,  # emitTimestamp - serverTimestamp; INT16_NULL = never written to clients
    "update_id": np.int64,      # u
    "bid_m": np.int64, "bid_qty_m": np.int64, "ask_m": np.int64, "ask_qty_m": np.int64,
    "bid_d": np.uint8, "bid_qty_d": np.uint8, "ask_d": np.uint8, "ask_qty_d": np.uint8,
}
_PRICE_FIELDS = (("bid", "bid_price"), ("bid_qty", "bid_qty"), ("ask", "ask_price"), ("ask_qty", "ask_qty"))

# One row per second that had updates: what a 12 h or 1 d chart needs once the raw ring
# (1,000,000 updates ≈ 1-3 h of BTCUSDT) no longer reaches back.
BAR_COLUMNS: dict[str, Any] = {
    "time_s": np.int64,
    "bid_first": np.float64, "bid_min": np.float64, "bid_max": np.float64, "bid_last": np.float64,
    "ask_first": np.float64, "ask_min": np.float64, "ask_max": np.float64, "ask_last": np.float64,
    "count": np.int32,          # updates in the second
    "lat_count": np.int32,      # of which had a latency
    "lat_min": np.float32, "lat_max": np.float32, "lat_sum": np.float64,
}

_POW10 = 10.0 ** np.arange(MAX_DIGITS + 1)
# Upper bounds (ms) of the exchange→server latency histogram on /metrics (Prometheus `le`).
LATENCY_BUCKETS_MS = np.array([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000], np.float64)
# Upper bounds (ms) of the latency legs' histograms (REST and /metrics): log-spaced, six a decade
# (1, 1.5, 2, 3, 5, 7), from 1 ms to 60 s; the first bucket, ≤ 0, takes what a clock offset makes negative.
LEG_BOUNDS_MS = np.array([0, 1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700,
                          1000, 1500, 2000, 3000, 5000, 7000, 10_000, 15_000, 20_000, 30_000, 60_000], np.float64)
# The legs of an update's way, in the order it travels them: (JSON name, /metrics label).
LATENCY_LEGS = (("exchangeInternal", "exchange_internal"),     # E - T: matching engine → push
                ("exchangeToServer", "exchange_to_server"),    # serverTimestamp - E, as the two clocks read
                ("exchangeToServerCorrected", "exchange_to_server_corrected"),  # the same minus the clock offset
                ("serverInternal", "server_internal"))         # emitTimestamp - serverTimestamp


class ColumnRing:
    """A fixed-capacity ring of rows stored as one numpy array per column.

    Rows have absolute indices 0, 1, 2, … (``total`` rows ever appended); the ring keeps
    the last ``capacity`` of them.  Storage grows lazily by doubling, so an idle symbol
    costs ~RING_INITIAL_ROWS rows, and append is O(1) amortised.  Row ``a`` lives at
    physical index ``a % capacity`` (growth only happens before the first wrap).
    """

    def __init__(self, columns: dict[str, Any], capacity: int) -> None:
        self.capacity = capacity                      # rows kept at most
        self.total = 0                                # rows ever appended
        self._alloc = min(capacity, RING_INITIAL_ROWS)
        self.cols = {name: np.zeros(self._alloc, dtype) for name, dtype in columns.items()}

    def __len__(self) -> int:
        return min(self.total, self.capacity)

    @property
    def first(self) -> int:
        """Absolute index of the oldest row kept."""
        return self.total - len(self)

    @property
    def nbytes(self) -> int:
        return sum(col.nbytes for col in self.cols.values())

    def extend(self, batch: dict[str, np.ndarray]) -> None:
        n = len(next(iter(batch.values())))
        if n == 0:
            return
        need = self.total + n
        if need > self._alloc and self._alloc < self.capacity:
            alloc = min(self.capacity, max(self._alloc * 2, need))
            for name, col in self.cols.items():
                grown = np.zeros(alloc, col.dtype)
                grown[: self.total] = col[: self.total]  # not wrapped yet: rows sit at 0..total
                self.cols[name] = grown
            self._alloc = alloc
        if n > self.capacity:  # only the newest `capacity` rows can be kept
            skip = n - self.capacity
            batch = {k: v[skip:] for k, v in batch.items()}
            self.total += skip
            n = self.capacity
        start = self.total % self.capacity
        head = min(n, self.capacity - start)
        for name, col in self.cols.items():
            values = batch[name]
            col[start:start + head] = values[:head]
            if head < n:
                col[: n - head] = values[head:]
        self.total += n

    def _segments(self, a: int, b: int) -> list[tuple[int, int]]:
        """Physical [start, stop) slices holding absolute rows [a, b)."""
        if a >= b:
            return []
        pa, n = a % self.capacity, b - a
        if pa + n <= self.capacity:
            return [(pa, pa + n)]
        return [(pa, self.capacity), (0, pa + n - self.capacity)]

    def take(self, a: int, b: int, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """Copies of absolute rows [a, b) (clamped to what is kept), oldest first."""
        a, b = max(a, self.first), min(b, self.total)
        segs = self._segments(a, b)
        out = {}
        for name in (names or self.cols):
            col = self.cols[name]
            parts = [col[s:e] for s, e in segs]
            out[name] = np.concatenate(parts) if len(parts) > 1 else (parts[0].copy() if parts else col[:0].copy())
        return out

    def search(self, name: str, value: int | float, side: str = "left") -> int:
        """Absolute index where ``value`` would be inserted in the sorted column ``name``."""
        first, length = self.first, len(self)
        if length == 0:
            return self.total
        segs = self._segments(first, self.total)
        col = self.cols[name]
        s0, e0 = segs[0]
        if len(segs) == 2:
            last0 = col[e0 - 1]
            if value > last0 or (side == "right" and value == last0):
                s1, e1 = segs[1]
                return first + (e0 - s0) + int(np.searchsorted(col[s1:e1], value, side))
        return first + int(np.searchsorted(col[s0:e0], value, side))

    def last_value(self, name: str) -> Any:
        return self.cols[name][(self.total - 1) % self.capacity] if self.total else None

    def set_last(self, row: dict[str, Any]) -> None:
        """Overwrite fields of the newest row (the open bar of the current second)."""
        i = (self.total - 1) % self.capacity
        for name, value in row.items():
            self.cols[name][i] = value


def format_decimal(mantissa: int, decimals: int) -> str:
    """Inverse of _mantissa: ``(2875010, 2)`` → ``"28750.10"``, ``(18, 3)`` → ``"0.018"``."""
    digits = str(mantissa)
    if not decimals:
        return digits
    if len(digits) <= decimals:
        digits = "0" * (decimals - len(digits) + 1) + digits
    return f"{digits[:-decimals]}.{digits[-decimals:]}"


def bbos_to_columns(bbos: Sequence[Bbo], emits: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Batch of Bbo → raw ring columns (one transpose, then one numpy array per column).

    ``emits``: the emit times (ms) of the first ``len(emits)`` updates; the others have none yet.
    """
    (_, bids, bid_qtys, asks, ask_qtys, events, recvs, lats, txns, uids, _) = zip(*bbos)
    out: dict[str, np.ndarray] = {"recv_ms": np.array(recvs, np.int64), "update_id": np.array(uids, np.int64)}
    emit_minus_recv = np.full(len(recvs), INT16_NULL, np.int16)
    if emits:
        emitted = np.array(emits, np.int64) - out["recv_ms"][:len(emits)]
        emit_minus_recv[:len(emits)] = np.clip(emitted, -MAX_EMIT_DELAY_MS, MAX_EMIT_DELAY_MS)
    out["emit_minus_recv_ms"] = emit_minus_recv
    if None in lats:
        lats = [INT32_NULL if v is None else v for v in lats]
    out["latency_ms"] = np.array(lats, np.int32)
    if None in txns:
        out["e_minus_t_ms"] = np.array([INT32_NULL if t is None else e - t for e, t in zip(events, txns)], np.int32)
    else:
        out["e_minus_t_ms"] = (np.array(events, np.int64) - np.array(txns, np.int64)).astype(np.int32)
    get, n = _DECIMAL_CACHE.get, len(recvs)
    for col, values in (("bid", bids), ("bid_qty", bid_qtys), ("ask", asks), ("ask_qty", ask_qtys)):
        codes = np.fromiter((get(v) or decimal_code(v) for v in values), np.int64, n)
        out[col + "_m"] = codes >> 5
        out[col + "_d"] = (codes & 31).astype(np.uint8)
    return out


def _price_floats(cols: dict[str, np.ndarray], col: str) -> np.ndarray:
    return cols[col + "_m"] / _POW10[cols[col + "_d"]]


def columns_to_bars(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Raw rows (sorted by recv_ms) → one bar per second that has rows."""
    secs = cols["recv_ms"] // 1000
    starts = np.flatnonzero(np.r_[True, secs[1:] != secs[:-1]])
    ends = np.r_[starts[1:], len(secs)]
    bid, ask = _price_floats(cols, "bid"), _price_floats(cols, "ask")
    lat = cols["latency_ms"]
    has_lat = lat != INT32_NULL
    latf = lat.astype(np.float64)
    out = {"time_s": secs[starts], "count": (ends - starts).astype(np.int32),
           "lat_count": np.add.reduceat(has_lat.astype(np.int32), starts),
           "lat_min": np.minimum.reduceat(np.where(has_lat, latf, np.inf), starts).astype(np.float32),
           "lat_max": np.maximum.reduceat(np.where(has_lat, latf, -np.inf), starts).astype(np.float32),
           "lat_sum": np.add.reduceat(np.where(has_lat, latf, 0.0), starts)}
    for name, values in (("bid", bid), ("ask", ask)):
        out[name + "_first"] = values[starts]
        out[name + "_last"] = values[ends - 1]
        out[name + "_min"] = np.minimum.reduceat(values, starts)
        out[name + "_max"] = np.maximum.reduceat(values, starts)
    return out


def _merge_bar(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Two bars of the same second → one (the open bar spans flush batches)."""
    merged = dict(new)
    for side in ("bid", "ask"):
        merged[side + "_first"] = old[side + "_first"]
        merged[side + "_min"] = min(old[side + "_min"], new[side + "_min"])
        merged[side + "_max"] = max(old[side + "_max"], new[side + "_max"])
    for key in ("count", "lat_count", "lat_sum"):
        merged[key] = old[key] + new[key]
    merged["lat_min"] = min(old["lat_min"], new["lat_min"])
    merged["lat_max"] = max(old["lat_max"], new["lat_max"])
    return merged


def decimal_strings(mantissas: np.ndarray, decimals: np.ndarray) -> list[str]:
    """Columns of mantissas and decimals → the exact strings (format_decimal), each distinct value
    formatted once: a price repeats from one update to the next."""
    if not len(mantissas):
        return []
    codes = (mantissas.astype(np.int64) << 5) | decimals.astype(np.int64)
    distinct, inverse = np.unique(codes, return_inverse=True)
    texts = np.array([format_decimal(c >> 5, c & 31) for c in distinct.tolist()], dtype=object)
    return texts[inverse].tolist()


def rows_to_bbos(cols: dict[str, np.ndarray], symbol: str) -> list[Bbo]:
    """Raw ring columns → Bbo records with the exchange's exact strings, oldest first."""
    recv = cols["recv_ms"].tolist()
    lat = cols["latency_ms"].tolist()
    emt = cols["e_minus_t_ms"].tolist()
    emr = cols["emit_minus_recv_ms"].tolist()
    uid = cols["update_id"].tolist()
    prices = [decimal_strings(cols[c + "_m"], cols[c + "_d"]) for c, _ in _PRICE_FIELDS]
    out = []
    for i, r in enumerate(recv):
        event = r if lat[i] == INT32_NULL else r - lat[i]
        out.append(Bbo(symbol, prices[0][i], prices[1][i], prices[2][i], prices[3][i], event, r,
                       None if lat[i] == INT32_NULL else lat[i],
                       None if emt[i] == INT32_NULL else event - emt[i], uid[i],
                       None if emr[i] == INT16_NULL else r + emr[i]))
    return out


def _json_ints_or_null(values: np.ndarray, present: np.ndarray) -> list[str]:
    return [str(v) if ok else "null" for v, ok in zip(values.tolist(), present.tolist())]


def rows_to_json_objects(cols: dict[str, np.ndarray], symbol: str, tail: str = "}") -> list[str]:
    """Raw ring columns → compact JSON objects, bbo_json's text exactly, oldest first; ``tail`` ends
    each (replay adds a key there).  Column by column: replay renders 200,000 rows a second with it."""
    n = len(cols["recv_ms"])
    if not n:
        return []
    recv_arr, lat, emt, emr = cols["recv_ms"], cols["latency_ms"], cols["e_minus_t_ms"], cols["emit_minus_recv_ms"]
    has_lat = lat != INT32_NULL
    event_arr = np.where(has_lat, recv_arr - lat.astype(np.int64), recv_arr)
    recv, event, uid = recv_arr.tolist(), event_arr.tolist(), cols["update_id"].tolist()
    lats = _json_ints_or_null(lat, has_lat)
    txns = _json_ints_or_null(event_arr - emt.astype(np.int64), emt != INT32_NULL)
    emits = _json_ints_or_null(recv_arr + emr.astype(np.int64), emr != INT16_NULL)
    bid, bid_qty, ask, ask_qty = (decimal_strings(cols[c + "_m"], cols[c + "_d"]) for c, _ in _PRICE_FIELDS)
    start = f'{{"symbol":"{symbol}","bidPrice":"'
    return [f'{start}{bid[i]}","bidQty":"{bid_qty[i]}","askPrice":"{ask[i]}","askQty":"{ask_qty[i]}",'
            f'"timestamp":{event[i]},"serverTimestamp":{recv[i]},"backendLatency":{lats[i]},"updateId":{uid[i]},'
            f'"transactionTime":{txns[i]},"emitTimestamp":{emits[i]}{tail}' for i in range(n)]


def rows_to_csv(cols: dict[str, np.ndarray], symbol: str) -> str:
    """Raw ring columns → CSV with a header of BBO_KEYS (empty cell = null)."""
    lines = [",".join(BBO_KEYS)]
    for b in rows_to_bbos(cols, symbol):
        values = (b.symbol, b.bid_price, b.bid_qty, b.ask_price, b.ask_qty, b.event_ms, b.recv_ms,
                  b.latency_ms, b.update_id, b.transaction_ms, b.emit_ms)  # BBO_KEYS order
        lines.append(",".join("" if v is None else str(v) for v in values))
    return "\r\n".join(lines) + "\r\n"


# --- Binance's bookTicker CSV: its public data dumps' schema, for import and export -------------
# Binance published daily USD-M and COIN-M bookTicker dumps (data.binance.vision) in this schema until
# 2024-03-31; spot never had any.  Rows carry no receive time: an imported row's serverTimestamp is
# its event_time (backendLatency unknown, null), and a row without times (a spot export) gets the
# time of the import.
BINANCE_CSV_HEADER = "update_id,best_bid_price,best_bid_qty,best_ask_price,best_ask_qty,transaction_time,event_time"
IMPORT_MAX_BAD_LISTED = 20           # bad rows listed by line number; the rest are only counted


def _null_or(values: np.ndarray, null: int) -> list[str]:
    """Integers as text, the empty string where ``null`` marks none (CSV's empty cell)."""
    return ["" if v == null else str(v) for v in values.tolist()]


def exchange_times(cols: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(E, T, has_e) of raw rows: E = serverTimestamp - backendLatency, or the receive time itself for
    a row that knows T but no latency (imported: its receive time was set to E); T = E - (E - T).
    ``has_e`` is False for rows without exchange times (spot), whose E and T are meaningless."""
    recv, lat, emt = cols["recv_ms"], cols["latency_ms"], cols["e_minus_t_ms"]
    has_lat = lat != INT32_NULL
    event = np.where(has_lat, recv - lat.astype(np.int64), recv)
    has_t = emt != INT32_NULL
    return event, np.where(has_t, event - emt.astype(np.int64), event), has_lat | has_t


def rows_to_binance_csv(cols: dict[str, np.ndarray]) -> str:
    """Raw ring columns → lines of BINANCE_CSV_HEADER's schema (no header), oldest first; spot rows
    leave both times empty."""
    n = len(cols["recv_ms"])
    if not n:
        return ""
    event, txn, has_e = exchange_times(cols)
    has_t = has_e & (cols["e_minus_t_ms"] != INT32_NULL)
    events = _null_or(np.where(has_e, event, -1), -1)
    txns = _null_or(np.where(has_t, txn, -1), -1)
    uid = cols["update_id"].tolist()
    bid, bid_qty, ask, ask_qty = (decimal_strings(cols[c + "_m"], cols[c + "_d"]) for c, _ in _PRICE_FIELDS)
    return "".join([f"{uid[i]},{bid[i]},{bid_qty[i]},{ask[i]},{ask_qty[i]},{txns[i]},{events[i]}\n"
                    for i in range(n)])


def rows_to_ndjson(cols: dict[str, np.ndarray], symbol: str) -> str:
    """Raw ring columns → one compact JSON update per line (bbo_json), oldest first."""
    return "".join([text + "\n" for text in rows_to_json_objects(cols, symbol)])


class CsvImport(NamedTuple):
    """What parse_binance_csv made of a file."""
    cols: dict[str, np.ndarray]   # ring columns (RAW_COLUMNS), sorted by receive time, one row per update id
    rows: int                     # data rows read (the header and empty lines not counted)
    duplicates: int               # rows whose update_id an earlier row of the file had
    untimed: int                  # rows without times, given the time of the import
    bad: int                      # rows refused
    bad_lines: list[str]          # "line N: why", the first IMPORT_MAX_BAD_LISTED


def _csv_int(text: str, name: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > INT64_MAX:
        raise ValueError(f"{name} {text[:30]!r} is not an integer from 0 to 2**63-1")
    return int(text)


def parse_binance_csv(lines: Iterable[str], import_ms: int) -> CsvImport:
    """Rows of Binance's bookTicker CSV (with or without the header line, in any order) → ring columns.

    Prices and quantities are validated like the feed's and kept digit for digit. A row with
    event_time but no transaction_time is taken; transaction_time without event_time is not.
    Rows are sorted by (receive time, update_id) and deduplicated by update_id (the first kept).

    Raises:
        ValueError: the first line is a header, but not this schema's.
    """
    uids: list[int] = []
    codes: list[list[int]] = [[], [], [], []]
    events: list[int] = []
    txns: list[int] = []
    bad_lines: list[str] = []
    rows = bad = untimed = 0
    cache_get = _DECIMAL_CACHE.get
    names = ("best_bid_price", "best_bid_qty", "best_ask_price", "best_ask_qty")
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if lineno == 1 and not line[:1].isdigit():
            if line.replace(" ", "").lstrip("\ufeff") != BINANCE_CSV_HEADER:
                raise ValueError(f"line 1 is not Binance's bookTicker header {BINANCE_CSV_HEADER!r}: {line[:120]!r}")
            continue
        rows += 1
        fields = line.split(",")
        try:
            if len(fields) != 7:
                raise ValueError(f"{len(fields)} fields, expected 7")
            u, b, bq, a, aq, t, e = fields
            uid = _csv_int(u, "update_id")
            values = [cache_get(v) for v in (b, bq, a, aq)]
            if None in values:
                try:
                    values = [decimal_code(v, name) for v, name in zip((b, bq, a, aq), names)]
                except FeedMessageError as exc:
                    raise ValueError(exc.detail) from None
            if e:
                event = _csv_int(e, "event_time")
                txn = _csv_int(t, "transaction_time") if t else -1
                if txn >= 0 and abs(event - txn) > MAX_SKEW_MS:
                    raise ValueError("event_time and transaction_time are over 24 days apart")
            elif t:
                raise ValueError("transaction_time without event_time")
            else:
                event = txn = -1
                untimed += 1
        except ValueError as exc:
            bad += 1
            if len(bad_lines) < IMPORT_MAX_BAD_LISTED:
                bad_lines.append(f"line {lineno}: {exc}")
            continue
        uids.append(uid)
        for column, value in zip(codes, values):
            column.append(value)
        events.append(event)
        txns.append(txn)
    uid_arr = np.array(uids, np.int64)
    event_arr, txn_arr = np.array(events, np.int64), np.array(txns, np.int64)
    recv = np.where(event_arr >= 0, event_arr, import_ms)
    order = np.lexsort((uid_arr, recv))
    _, first = np.unique(uid_arr[order], return_index=True)
    keep = order[np.sort(first)]
    cols: dict[str, np.ndarray] = {
        "recv_ms": recv[keep],
        "latency_ms": np.full(len(keep), INT32_NULL, np.int32),
        "e_minus_t_ms": np.where(txn_arr[keep] >= 0, event_arr[keep] - txn_arr[keep], INT32_NULL).astype(np.int32),
        "emit_minus_recv_ms": np.full(len(keep), INT16_NULL, np.int16),
        "update_id": uid_arr[keep]}
    for (col, _), column in zip(_PRICE_FIELDS, codes):
        arr = np.array(column, np.int64)[keep]
        cols[col + "_m"], cols[col + "_d"] = arr >> 5, (arr & 31).astype(np.uint8)
    return CsvImport(cols, rows, len(uids) - len(keep), untimed, bad, bad_lines)


class LatencyStats(NamedTuple):
    count: int
    min: float | None
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None


def latency_stats(values: np.ndarray, weights: np.ndarray | None = None) -> LatencyStats:
    """count, min, mean, p50/p90/p99 (nearest rank), max of latencies in ms.

    With ``weights`` (bars: per-second means weighted by their update counts) the
    percentiles are approximations; the caller says so.
    """
    if weights is None:  # raw rows: exact nearest-rank percentiles by partition, O(n)
        if not len(values):
            return LatencyStats(0, None, None, None, None, None, None)
        p50, p90, p99 = np.percentile(values, [50, 90, 99], method="inverted_cdf").tolist()
        return LatencyStats(len(values), round(float(values.min()), 3), round(float(values.mean(dtype=np.float64)), 3),
                            round(float(p50), 3), round(float(p90), 3), round(float(p99), 3), round(float(values.max()), 3))
    keep = weights > 0
    values, weights = values[keep].astype(np.float64), weights[keep]
    total = int(weights.sum())
    if total == 0:
        return LatencyStats(0, None, None, None, None, None, None)
    order = np.argsort(values, kind="stable")
    v, cum = values[order], np.cumsum(weights[order])

    def pct(p: float) -> float:
        rank = max(1, math.ceil(p / 100 * total))
        return round(float(v[np.searchsorted(cum, rank)]), 3)

    mean = float((values * weights).sum() / total)
    return LatencyStats(total, round(float(v[0]), 3), round(mean, 3), pct(50), pct(90), pct(99),
                        round(float(v[-1]), 3))


_LEG_BOUNDS_JSON = [int(b) if b == int(b) else b for b in LEG_BOUNDS_MS.tolist()]


def leg_histogram(values: np.ndarray) -> np.ndarray:
    """Counts of ``values`` (ms) per LEG_BOUNDS_MS bucket: ≤ bound, above the one before; the last
    count is above the last bound."""
    return np.bincount(np.searchsorted(LEG_BOUNDS_MS, values, "left"), minlength=len(LEG_BOUNDS_MS) + 1)


def leg_summary(values: np.ndarray) -> dict[str, Any]:
    """One latency leg of /api/history/latency: count, p50/p90/p99 (nearest rank), max and the
    histogram (ms; nulls when there are no values)."""
    out: dict[str, Any] = {"count": int(len(values)), "p50": None, "p90": None, "p99": None, "max": None}
    if len(values):
        p50, p90, p99 = np.percentile(values, [50, 90, 99], method="inverted_cdf").tolist()
        out.update(p50=round(float(p50), 3), p90=round(float(p90), 3), p99=round(float(p99), 3),
                   max=round(float(values.max()), 3))
    out["histogram"] = {"bounds": _LEG_BOUNDS_JSON, "counts": leg_histogram(values).tolist()}
    return out


def suspect_threshold_ms(recv_ms: np.ndarray) -> int:
    """How long a symbol may be silent before it is `suspect`: SUSPECT_GAP_FACTOR times the median
    gap between the receive times ``recv_ms`` (its updates in the minute before its last one), and
    never less than SUSPECT_FLOOR_MS (also when fewer than two updates give no gap at all)."""
    if len(recv_ms) < 2:
        return SUSPECT_FLOOR_MS
    median_gap = float(np.median(np.diff(recv_ms)))
    return max(SUSPECT_FLOOR_MS, math.ceil(SUSPECT_GAP_FACTOR * median_gap))


class SymbolHistory:
    """Everything kept for one symbol: dedupe state, raw ring, bars, outages, counters."""

    def __init__(self, symbol: str, raw_capacity: int, bars_capacity: int,
                 clock: ClockOffsetEstimator | None = None) -> None:
        self.symbol = symbol
        self.clock = clock if clock is not None else ClockOffsetEstimator()  # shared by every symbol
        self.raw = ColumnRing(RAW_COLUMNS, raw_capacity)            # every accepted update
        self.bars = ColumnRing(BAR_COLUMNS, max(1, bars_capacity))  # 1 s bars
        self.keep_bars = bars_capacity > 0
        self.pending: list[Bbo] = []            # accepted, not yet in the numpy ring
        self.pending_emits: list[int] = []      # emit times of the first pending updates (the fan-out's passes)
        self.unstamped_from: int | None = None  # first ring row (absolute) moved to numpy before its emit time came
        self.latest: Bbo | None = None          # newest accepted update
        self.last_u = -1                        # dedupe: highest `u` accepted (since the last reset)
        self.last_event_ms = -1                 # E of that update (tells a reset from a replay)
        self.accepted = 0                       # updates kept
        self.duplicates = 0                     # dropped: `u` not above the last (overlap, replay)
        self.u_resets = 0                       # `u` fell far back with a newer E: new baseline
        self.crossed = 0                        # kept although bid ≥ ask
        self.latency_hist = np.zeros(len(LATENCY_BUCKETS_MS) + 1, np.int64)  # per bucket, last = +Inf
        self.latency_sum_ms = 0                 # of every latency counted in latency_hist
        self.leg_hist = {leg: np.zeros(len(LEG_BOUNDS_MS) + 1, np.int64) for leg, _ in LATENCY_LEGS}  # live updates
        self.leg_sum_ms = dict.fromkeys(self.leg_hist, 0.0)  # of every value counted in leg_hist
        self.subscribed_ms: int | None = None   # when a connection asked for this symbol
        self.outages: collections.deque[list] = collections.deque(maxlen=MAX_OUTAGES_PER_SYMBOL)
        self.open_outage: list | None = None    # [start_ms, None, reason] until data resumes
        self._suspect: tuple[int, int, int] | None = None  # (accepted, computed at ms, threshold ms) last computed

    # -- ingest (hot path) -----------------------------------------------------
    def accept(self, bbo: Bbo, after_reconnect: bool = False) -> bool:
        """Keep ``bbo`` unless it is a duplicate or out of order; True when kept.

        `u` rising per symbol is observed on Binance, not documented by it: a `u` at or
        below the last one is a replay (overlapping connections during a rotation) and dropped —
        unless only an exchange-side reset of `u` explains it: `u` fell far (below
        U_RESET_MAX_KEPT_FRACTION of the last, by U_RESET_MIN_FALL or more), or fell at all in
        the symbol's first update on a new connection after the old one was lost
        (``after_reconnect``: Binance replays nothing then), or its exchange time is clearly
        newer.  A reset becomes the new baseline at once instead of dropping what follows.
        """
        if bbo.update_id <= self.last_u:
            fall = self.last_u - bbo.update_id
            if bbo.update_id < self.last_u * U_RESET_MAX_KEPT_FRACTION and fall >= U_RESET_MIN_FALL:
                self.u_resets += 1
            elif after_reconnect and bbo.update_id < self.last_u:
                self.u_resets += 1
            elif bbo.latency_ms is not None and bbo.event_ms > self.last_event_ms + U_RESET_MIN_ADVANCE_MS:
                self.u_resets += 1
            else:
                self.duplicates += 1
                return False
        self.last_u = bbo.update_id
        self.last_event_ms = bbo.event_ms
        self.latest = bbo
        self.accepted += 1
        if self.open_outage is not None:
            self.open_outage[1] = bbo.recv_ms
            self.open_outage = None
        self.pending.append(bbo)
        if len(self.pending) >= PENDING_FLUSH_ROWS:
            self.flush()
        return True

    def flush(self) -> None:
        """Move pending updates into the numpy rings (and the bars)."""
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        emits, self.pending_emits = self.pending_emits, []
        if len(emits) < len(batch) and self.unstamped_from is None:  # the fan-out's pass is still to come
            self.unstamped_from = self.raw.total + len(emits)
        self.append_columns(bbos_to_columns(batch, emits))

    def append_columns(self, cols: dict[str, np.ndarray], count_crossed: bool = True) -> None:
        recv = cols["recv_ms"]
        if "emit_minus_recv_ms" not in cols:  # rows built without emit times (benchmarks' synthetic rows)
            cols["emit_minus_recv_ms"] = np.full(len(recv), INT16_NULL, np.int16)
        floor = self.raw.last_value("recv_ms")
        # The ring is binary-searched by recv_ms, so it must never go back, even if the
        # wall clock was stepped back between two runs (recv_ms is monotonic within a run).
        if floor is not None and recv[0] < floor or np.any(recv[1:] < recv[:-1]):
            clamped = np.maximum.accumulate(np.maximum(recv, floor if floor is not None else recv[0]))
            # Keep E and T exact: latency = recv - E grows by the same shift (timestamp = recv - latency).
            lat = cols["latency_ms"]
            shifted = np.clip(lat.astype(np.int64) + (clamped - recv), INT32_NULL + 1, 2**31 - 1).astype(np.int32)
            cols["latency_ms"] = np.where(lat == INT32_NULL, lat, shifted)
            emr = cols["emit_minus_recv_ms"]  # and the emit time: it moves back by the same shift
            unshifted = np.clip(emr.astype(np.int64) - (clamped - recv), -MAX_EMIT_DELAY_MS, MAX_EMIT_DELAY_MS)
            cols["emit_minus_recv_ms"] = np.where(emr == INT16_NULL, emr, unshifted.astype(np.int16))
            cols["recv_ms"] = recv = clamped
        if count_crossed:  # live data (not rows restored from disk): crossed books, latency histogram
            self.crossed += int(np.count_nonzero(_price_floats(cols, "bid") >= _price_floats(cols, "ask")))
            lat = cols["latency_ms"][cols["latency_ms"] != INT32_NULL]
            if len(lat):
                self.latency_hist += np.bincount(np.searchsorted(LATENCY_BUCKETS_MS, lat, "left"),
                                                 minlength=len(self.latency_hist))
                self.latency_sum_ms += int(lat.sum(dtype=np.int64))
                self.clock.observe_floor(int(recv[-1]), int(lat.min()))
            self._count_legs(cols, lat, int(recv[-1]))
        self.raw.extend(cols)
        if self.keep_bars:
            self._append_bars(columns_to_bars(cols))

    def _count_legs(self, cols: dict[str, np.ndarray], lat: np.ndarray, now_ms: int) -> None:
        """Add live rows to the legs' histograms (/metrics); the correction is the offset known now."""
        e_minus_t, emitted = cols["e_minus_t_ms"], cols["emit_minus_recv_ms"]
        estimate, _ = self.clock.current(now_ms)
        legs = {"exchangeInternal": e_minus_t[e_minus_t != INT32_NULL], "exchangeToServer": lat,
                "exchangeToServerCorrected": lat - estimate.offset_ms if estimate is not None else lat[:0],
                "serverInternal": emitted[emitted != INT16_NULL]}
        for leg, values in legs.items():
            if len(values):
                self.leg_hist[leg] += leg_histogram(values)
                self.leg_sum_ms[leg] += float(values.sum(dtype=np.float64))

    def _append_bars(self, bars: dict[str, np.ndarray]) -> None:
        if self.bars.total and bars["time_s"][0] <= self.bars.last_value("time_s"):
            last = {k: v[(self.bars.total - 1) % self.bars.capacity] for k, v in self.bars.cols.items()}
            first_new = {k: v[0] for k, v in bars.items()}
            self.bars.set_last(_merge_bar(last, first_new))
            bars = {k: v[1:] for k, v in bars.items()}
        self.bars.extend(bars)

    def restore_last(self, cols: dict[str, np.ndarray]) -> None:
        """After loading from disk: dedupe state and `latest` from the newest row."""
        if not len(cols["recv_ms"]):
            return
        [self.latest] = rows_to_bbos({k: v[-1:] for k, v in cols.items()}, self.symbol)
        self.last_u, self.last_event_ms = self.latest.update_id, self.latest.event_ms

    def stamp_emit(self, emit_ms: int) -> None:
        """The fan-out wrote this symbol's updates accepted since the last stamp at ``emit_ms``.

        Those are the newest rows: the last pending ones and, when a batch reached numpy first
        (a read, or PENDING_FLUSH_ROWS within one loop pass), the newest rows of the ring.
        """
        if self.unstamped_from is not None:
            ring = self.raw
            for start, stop in ring._segments(max(self.unstamped_from, ring.first), ring.total):
                emitted = np.clip(emit_ms - ring.cols["recv_ms"][start:stop], -MAX_EMIT_DELAY_MS, MAX_EMIT_DELAY_MS)
                ring.cols["emit_minus_recv_ms"][start:stop] = emitted
                self.leg_hist["serverInternal"] += leg_histogram(emitted)
                self.leg_sum_ms["serverInternal"] += float(emitted.sum(dtype=np.float64))
            self.unstamped_from = None
        missing = len(self.pending) - len(self.pending_emits)
        if missing > 0:
            self.pending_emits.extend([emit_ms] * missing)
        latest = self.latest
        if latest is not None and latest.emit_ms is None:
            self.latest = latest._replace(emit_ms=emit_ms)

    def suspect_after_ms(self, now_ms: int) -> int:
        """The silence after which this symbol is `suspect` (suspect_threshold_ms over the minute
        before its last update; that minute does not move while it is silent).  Recomputed at most
        every SUSPECT_RECOMPUTE_MS, and only when updates came since."""
        cached = self._suspect
        if cached is not None and (cached[0] == self.accepted or now_ms - cached[1] < SUSPECT_RECOMPUTE_MS):
            return cached[2]
        self.flush()
        threshold = SUSPECT_FLOOR_MS
        if self.raw.total:
            last = int(self.raw.last_value("recv_ms"))
            a = self.raw.search("recv_ms", last - SUSPECT_WINDOW_MS, "left")
            threshold = suspect_threshold_ms(self.raw.take(a, self.raw.total, ["recv_ms"])["recv_ms"])
        self._suspect = (self.accepted, now_ms, threshold)
        return threshold

    # -- outages ----------------------------------------------------------------
    def begin_outage(self, start_ms: int, reason: str) -> None:
        if self.open_outage is None:
            self.open_outage = [start_ms, None, reason]
            self.outages.append(self.open_outage)

    def outages_in(self, start_ms: int, end_ms: int) -> list[dict]:
        return [{"start": s, "end": e, "reason": r} for s, e, r in self.outages
                if s <= end_ms and (e is None or e >= start_ms)]

    # -- queries -------------------------------------------------------------------
    def raw_bounds(self, start_ms: int, end_ms: int) -> tuple[int, int]:
        """Absolute raw rows [a, b) with start_ms ≤ recv_ms ≤ end_ms."""
        self.flush()
        return self.raw.search("recv_ms", start_ms, "left"), self.raw.search("recv_ms", end_ms, "right")

    def raw_covers(self, start_ms: int) -> bool:
        """True when the raw ring holds everything received since ``start_ms``."""
        self.flush()
        if not self.raw.total:
            return not (self.keep_bars and self.bars.total)
        raw_start = int(self.raw.cols["recv_ms"][self.raw.first % self.raw.capacity])
        if start_ms >= raw_start:
            return True
        older_bars = (self.keep_bars and self.bars.total
                      and int(self.bars.cols["time_s"][self.bars.first % self.bars.capacity]) < raw_start // 1000)
        return self.raw.first == 0 and not older_bars

    def bar_bounds(self, start_ms: int, end_ms: int) -> tuple[int, int]:
        self.flush()
        return (self.bars.search("time_s", start_ms // 1000, "left"),
                self.bars.search("time_s", end_ms // 1000, "right"))

    def latency(self, start_ms: int, end_ms: int) -> tuple[str, LatencyStats]:
        if self.raw_covers(start_ms) or not self.keep_bars:
            a, b = self.raw_bounds(start_ms, end_ms)
            lat = self.raw.take(a, b, ["latency_ms"])["latency_ms"]
            return "raw", latency_stats(lat[lat != INT32_NULL])
        a, b = self.bar_bounds(start_ms, end_ms)
        bars = self.bars.take(a, b, ["lat_count", "lat_sum", "lat_min", "lat_max"])
        n = bars["lat_count"]
        means = np.divide(bars["lat_sum"], n, out=np.zeros(len(n)), where=n > 0)
        stats = latency_stats(means, n)
        if stats.count:  # min and max are exact from the bars; percentiles are approximate
            stats = stats._replace(min=round(float(bars["lat_min"][n > 0].min()), 3),
                                   max=round(float(bars["lat_max"][n > 0].max()), 3))
        return "bars", stats

    def latency_legs(self, start_ms: int, end_ms: int, now_ms: int) -> dict[str, dict[str, Any]]:
        """The legs of the raw rows received in [start_ms, end_ms] (leg_summary each).  The corrected
        leg subtracts from each row the clock offset in effect when it came (ClockOffsetEstimator.offsets_at)."""
        a, b = self.raw_bounds(start_ms, end_ms)
        cols = self.raw.take(a, b, ["recv_ms", "latency_ms", "e_minus_t_ms", "emit_minus_recv_ms"])
        lat, e_minus_t, emitted = cols["latency_ms"], cols["e_minus_t_ms"], cols["emit_minus_recv_ms"]
        has_lat = lat != INT32_NULL
        lat = lat[has_lat]
        offsets = self.clock.offsets_at(cols["recv_ms"][has_lat], now_ms)
        return {"exchangeInternal": leg_summary(e_minus_t[e_minus_t != INT32_NULL]),
                "exchangeToServer": leg_summary(lat),
                "exchangeToServerCorrected": leg_summary(lat - offsets if offsets is not None else lat[:0]),
                "serverInternal": leg_summary(emitted[emitted != INT16_NULL])}

    def series(self, start_ms: int, end_ms: int, buckets: int) -> dict:
        """Decimated bid/ask series: per bucket first/min/max/last, only non-empty buckets."""
        span = end_ms - start_ms + 1
        bucket_ms = max(1, -(-span // buckets))
        if self.raw_covers(start_ms) or not self.keep_bars:
            tier = "raw"
            a, b = self.raw_bounds(start_ms, end_ms)
            cols = self.raw.take(a, b)
            t = cols["recv_ms"]
            src = {"bid": (_price_floats(cols, "bid"),) * 4, "ask": (_price_floats(cols, "ask"),) * 4}
            counts = np.ones(len(t), np.int64)
        else:
            tier = "bars"
            bucket_ms = max(1000, -(-bucket_ms // 1000) * 1000)
            a, b = self.bar_bounds(start_ms, end_ms)
            cols = self.bars.take(a, b)
            t = cols["time_s"] * 1000
            src = {side: tuple(cols[f"{side}_{k}"] for k in ("first", "min", "max", "last")) for side in ("bid", "ask")}
            counts = cols["count"].astype(np.int64)
        out: dict[str, Any] = {"symbol": self.symbol, "tier": tier, "start_time": start_ms, "end_time": end_ms,
                               "bucket_ms": bucket_ms}
        idx = (t - start_ms) // bucket_ms
        starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]]) if len(idx) else np.zeros(0, np.int64)
        ends = np.r_[starts[1:], len(idx)].astype(np.int64) if len(idx) else starts
        out["time"] = (start_ms + idx[starts] * bucket_ms).tolist()
        for side in ("bid", "ask"):
            first, low, high, last = src[side]
            empty = not len(starts)
            out[f"{side}First"] = [] if empty else first[starts].tolist()
            out[f"{side}Min"] = [] if empty else np.minimum.reduceat(low, starts).tolist()
            out[f"{side}Max"] = [] if empty else np.maximum.reduceat(high, starts).tolist()
            out[f"{side}Last"] = [] if empty else last[ends - 1].tolist()
        out["count"] = [] if not len(starts) else np.add.reduceat(counts, starts).tolist()
        out["outages"] = self.outages_in(start_ms, end_ms)
        return out

    def stats(self) -> dict:
        self.flush()
        oldest = int(self.raw.cols["recv_ms"][self.raw.first % self.raw.capacity]) if self.raw.total else None
        return {"symbol": self.symbol, "cached": len(self.raw), "capacity": self.raw.capacity,
                "accepted": self.accepted, "duplicates": self.duplicates, "uResets": self.u_resets,
                "crossed": self.crossed, "bars": len(self.bars) if self.keep_bars else 0,
                "oldest": oldest, "newest": None if self.latest is None else self.latest.recv_ms,
                "memoryBytes": self.raw.nbytes + (self.bars.nbytes if self.keep_bars else 0),
                "outages": len(self.outages)}


class BboHistory:
    """All symbols' histories; the one place the feed writes and the API reads."""

    def __init__(self, raw_capacity: int, bars_capacity: int) -> None:
        self.raw_capacity = raw_capacity
        self.bars_capacity = bars_capacity
        self.symbols: dict[str, SymbolHistory] = {}
        self._accept: dict[str, Callable[[Bbo], bool]] = {}   # symbol → its SymbolHistory.accept
        self.clock = ClockOffsetEstimator()                    # the local clock against the exchange's

    def get(self, symbol: str) -> SymbolHistory:
        hist = self.symbols.get(symbol)
        if hist is None:
            if len(self.symbols) >= MAX_SYMBOLS:
                raise FeedMessageError("too many symbols", f"{symbol}: over {MAX_SYMBOLS} symbols")
            hist = self.symbols[symbol] = SymbolHistory(symbol, self.raw_capacity, self.bars_capacity, self.clock)
            self._accept[symbol] = hist.accept
        return hist

    def find(self, symbol: str) -> SymbolHistory | None:
        return self.symbols.get(symbol.upper())

    def accept(self, bbo: Bbo) -> bool:
        """Dedupe and keep ``bbo`` in its symbol's history; True when it was new."""
        try:
            return self._accept[bbo[0]](bbo)  # hot path: one dict lookup, one call
        except KeyError:
            if bbo.symbol in self._accept:
                raise
            return self.get(bbo.symbol).accept(bbo)

    def latest(self) -> dict[str, Bbo]:
        return {s: h.latest for s, h in self.symbols.items() if h.latest is not None}

    def flush(self) -> None:
        for hist in self.symbols.values():
            hist.flush()

    def stamp_emit(self, emit_ms: int, symbols: Iterable[str]) -> None:
        """The fan-out wrote the updates of ``symbols`` accepted since its last pass at ``emit_ms``
        (Hub.on_emit)."""
        for symbol in symbols:
            hist = self.symbols.get(symbol)
            if hist is not None:
                hist.stamp_emit(emit_ms)


# --- On-disk codec -------------------------------------------------------------------
# A journal line and a segment are the same thing: one JSON object holding columns
#   {"v":2,"kind":"raw","symbol":"BTCUSDT","n":2,"cols":{"serverTimestamp":[...],...}}
# Raw columns use the public keys; prices are {"m":[mantissas],"d":decimals} where `d` is a
# number when all rows share it (always, on Binance) or a list.  Exact and fast to load.

_RAW_DISK_KEYS = {"recv_ms": "serverTimestamp", "latency_ms": "backendLatency", "e_minus_t_ms": "eventMinusTransaction",
                  "emit_minus_recv_ms": "emitMinusServerTimestamp", "update_id": "updateId", "bid": "bidPrice", "bid_qty": "bidQty", "ask": "askPrice",
                  "ask_qty": "askQty"}

_RAW_INT_KEYS = ("recv_ms", "latency_ms", "e_minus_t_ms", "emit_minus_recv_ms", "update_id")
_RAW_NULLS = {"latency_ms": INT32_NULL, "e_minus_t_ms": INT32_NULL, "emit_minus_recv_ms": INT16_NULL}  # ↔ JSON null


def encode_columns(kind: str, symbol: str, cols: dict[str, np.ndarray]) -> str:
    """Columns → one JSON line (no newline)."""
    n = len(next(iter(cols.values())))
    out: dict[str, Any] = {}
    if kind == "raw":
        for key in _RAW_INT_KEYS:
            values = cols[key].tolist()
            if key in _RAW_NULLS:
                null = _RAW_NULLS[key]
                values = [None if v == null else v for v in values]
            out[_RAW_DISK_KEYS[key]] = values
        for col, _ in _PRICE_FIELDS:
            d = cols[col + "_d"]
            same = bool(n) and bool((d == d[0]).all())
            out[_RAW_DISK_KEYS[col]] = {"m": cols[col + "_m"].tolist(), "d": int(d[0]) if same else d.tolist()}
    else:
        for key, values in cols.items():
            arr = values.tolist()
            if values.dtype.kind == "f":  # ±inf (no latency in that second) is not JSON
                arr = [None if not math.isfinite(v) else v for v in arr]
            out[key] = arr
    return json.dumps({"v": CACHE_SCHEMA_VERSION, "kind": kind, "symbol": symbol, "n": n, "cols": out},
                      separators=(",", ":"))


class CacheFormatError(ValueError):
    """A cache record that cannot be used as it is; ``newer`` when a later version wrote it."""

    def __init__(self, message: str, newer: bool = False) -> None:
        super().__init__(message)
        self.newer = newer


def _v1_to_v2(doc: dict) -> dict:
    """Version 2 adds the emit time of raw rows: rows written by version 1 have none (null)."""
    cols, n = doc.get("cols"), doc.get("n")
    if doc.get("kind") == "raw" and type(cols) is dict and type(n) is int and 0 <= n <= CACHE_MAX_FILE_BYTES:
        cols.setdefault(_RAW_DISK_KEYS["emit_minus_recv_ms"], [None] * n)
    return {**doc, "v": 2}


# Upgrades of an older record, by the version they upgrade from: each takes the decoded JSON
# object of version v and returns it as version v + 1, so files written by any earlier release
# load (never quarantined for their age).
CACHE_MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _v1_to_v2}


def _int_column(values: Any, dtype: Any, name: str) -> np.ndarray:
    """A column of whole numbers, refused unless every value is one that fits ``dtype``
    (a float, a string, a null or an overflow is a corrupt record, not something to round)."""
    arr = np.array(values)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise CacheFormatError(f"{name}: not a list of integers")
    info = np.iinfo(dtype)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise CacheFormatError(f"{name}: out of range for {np.dtype(dtype).name}")
    return arr.astype(dtype)


def decode_columns(text: str, kind: str, symbol: str | None = None) -> tuple[str, dict[str, np.ndarray]]:
    """One JSON line → (symbol, columns), migrated to CACHE_SCHEMA_VERSION.

    Every column is checked: integers where integers belong, the same length ``n``, decimals
    in range, times that never go back, and (given ``symbol``) the symbol of the folder.

    Raises:
        CacheFormatError: anything inconsistent; ``newer`` when a later version wrote it.
    """
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CacheFormatError(f"not JSON ({exc})") from None
    if type(doc) is not dict or type(doc.get("v")) is not int or doc.get("kind") != kind:
        raise CacheFormatError(f"not a {kind} cache record")
    if doc["v"] > CACHE_SCHEMA_VERSION:
        raise CacheFormatError(f"format version {doc['v']} is newer than this program's {CACHE_SCHEMA_VERSION}",
                               newer=True)
    while doc["v"] < CACHE_SCHEMA_VERSION:
        upgrade = CACHE_MIGRATIONS.get(doc["v"])
        if upgrade is None:
            raise CacheFormatError(f"format version {doc['v']} has no upgrade")
        doc = upgrade(doc)
    n, raw, found = doc.get("n"), doc.get("cols"), doc.get("symbol")
    if type(n) is not int or n < 0 or type(raw) is not dict or type(found) is not str or not _SYMBOL_RE.match(found):
        raise CacheFormatError("bad header")
    if symbol is not None and found != symbol:
        raise CacheFormatError(f"a record of {found[:MAX_SYMBOL_CHARS]!r} in the folder of {symbol}")
    cols: dict[str, np.ndarray] = {}
    try:
        if kind == "raw":
            for key in _RAW_INT_KEYS:
                values = raw[_RAW_DISK_KEYS[key]]
                if key in _RAW_NULLS and type(values) is list:
                    values = [_RAW_NULLS[key] if v is None else v for v in values]
                cols[key] = _int_column(values, RAW_COLUMNS[key], _RAW_DISK_KEYS[key])
            for col, _ in _PRICE_FIELDS:
                entry = raw[_RAW_DISK_KEYS[col]]
                cols[col + "_m"] = _int_column(entry["m"], np.int64, _RAW_DISK_KEYS[col])
                d = entry["d"]
                cols[col + "_d"] = (np.full(n, d, np.uint8) if type(d) is int and 0 <= d <= MAX_DIGITS
                                    else _int_column(d, np.uint8, _RAW_DISK_KEYS[col] + " decimals"))
                if cols[col + "_d"].size and cols[col + "_d"].max() > MAX_DIGITS:
                    raise CacheFormatError(f"{_RAW_DISK_KEYS[col]}: more than {MAX_DIGITS} decimals")
            times = cols["recv_ms"]
        else:
            for key, dtype in BAR_COLUMNS.items():
                values = raw[key]
                if np.dtype(dtype).kind == "f":
                    fill = np.inf if key == "lat_min" else -np.inf if key == "lat_max" else np.nan
                    arr = np.array([fill if v is None else v for v in values])
                    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iuf"):
                        raise CacheFormatError(f"{key}: not a list of numbers")
                    cols[key] = arr.astype(dtype)
                else:
                    cols[key] = _int_column(values, dtype, key)
            times = cols["time_s"]
    except (KeyError, TypeError) as exc:
        raise CacheFormatError(f"missing or malformed column ({exc})") from None
    if any(len(v) != n for v in cols.values()):
        raise CacheFormatError("column lengths differ from n")
    if n > 1 and bool(np.any(times[1:] < times[:-1])):
        raise CacheFormatError("times go back")
    return found, cols

# ###########################################################################
# §6 HTTP/1.1 and WebSocket frame codec
# ###########################################################################
# Owns: parsing a request head from bytes (with limits), body framing, keep-alive,
# rendering responses, CORS headers, and the WebSocket data frames the fan-out builds once
# for every client.  Pure: raises HttpError(status) on bad input.

HTTP_REASONS = {200: "OK", 101: "Switching Protocols", 204: "No Content", 304: "Not Modified",
                400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
                405: "Method Not Allowed", 429: "Too Many Requests",
                408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
                414: "URI Too Long", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
                501: "Not Implemented", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}
ALLOWED_METHODS = ("GET", "HEAD", "POST", "OPTIONS")
# \Z, not $: `$` also matches before a trailing "\n", which let a bare LF end a name or value.
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Field values: visible ASCII, space and tab, and obs-text (RFC 9110 §5.5); no CR/LF/NUL.  The
# same set is engine.io's checkInvalidHeaderChar (Origin) and what a response header may carry.
_FIELD_VALUE_CHARS = r"\t\x20-\x7e\x80-\xff"
_FIELD_VALUE_RE = re.compile(rf"^[{_FIELD_VALUE_CHARS}]*\Z")
_FIELD_VALUE_UNSAFE_RE = re.compile(rf"[^{_FIELD_VALUE_CHARS}]")
# A whole header block that needs no line-by-line check: each line a name, a colon and a value
# (one regex over the block costs a fifth of the checks line by line, a third of a head's parse).
_HEADER_BLOCK_RE = re.compile(rf"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[{_FIELD_VALUE_CHARS}]*\r\n)*\Z")
# C0 controls and DEL never belong in a request target, raw or percent-decoded in the path:
# a 400 instead of a 404, and nothing of the kind reaches a route or a file name.
_TARGET_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclasses.dataclass(slots=True)  # (not frozen: a frozen __init__ was a fifth of a long-poll GET's parse)
class HttpRequest:
    method: str                             # "GET"
    target: str                             # raw request-target "/api/bbo?x=1"
    path: str                               # percent-decoded path "/api/bbo"
    query: dict[str, list[str]]             # parse_qs(keep_blank_values=True)
    version: str                            # "HTTP/1.1"
    headers: tuple[tuple[str, str], ...]    # (lower-case name, value), in order
    raw_head: bytes                         # exact head bytes (replayed into websockets' ServerProtocol)
    peer: str = ""                          # "127.0.0.1:54321"

    def header(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def header_tokens(self, name: str) -> set[str]:
        """Comma-separated tokens of all ``name`` headers, lower case (Connection, Upgrade)."""
        return {t.strip().lower() for k, v in self.headers if k == name for t in v.split(",") if t.strip()}


@dataclasses.dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    stream: Iterator[bytes] | None = None  # a body of any size, made chunk by chunk as it is sent
                                           # (chunked transfer); raises HttpStreamCut when it cannot go on


class HttpStreamCut(BboStreamError):
    """A streamed body cannot be finished (its rows left the ring meanwhile): the connection is cut
    so that the client sees an incomplete body, never a short one that looks whole."""


def parse_request_head(raw_head: bytes, peer: str = "") -> HttpRequest:
    """Bytes up to and including CRLFCRLF → HttpRequest.  (A long-polling GET that repeats the one
    before it is not parsed again: see RepeatedHead.)

    Raises:
        HttpError: 400 malformed line/header (a bare LF included), obs-fold, missing or
        repeated Host on 1.1, a control character in the target or its decoded path;
        414 target longer than MAX_TARGET_BYTES; 431 more than MAX_HEADERS headers;
        505 a version other than HTTP/1.0 and 1.1.  (Which methods a path takes is the
        route's business: see check_method.)
    """
    text = raw_head.decode("latin-1")  # (latin-1 decodes every byte)
    lines = text[:-4].split("\r\n") if text.endswith("\r\n\r\n") else text.rstrip("\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN_RE.match(parts[0]) or not parts[1]:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if len(target) > MAX_TARGET_BYTES:
        raise HttpError(414, f"request target longer than {MAX_TARGET_BYTES} bytes")
    if _TARGET_CONTROL_RE.search(target):
        raise HttpError(400, "control character in the request target")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if re.fullmatch(r"HTTP/[0-9]\.[0-9]", version):
            raise HttpError(505, f"{version} is not supported; use HTTP/1.1")
        raise HttpError(400, "malformed request line")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    if _HEADER_BLOCK_RE.match(text, len(lines[0]) + 2, len(text) - 2):
        fields = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields.append((name.lower(), value.strip(" \t")))
    else:
        fields = _checked_header_fields(lines[1:])
    headers = tuple(fields)
    if version == "HTTP/1.1" and sum(1 for k, _ in headers if k == "host") != 1:
        raise HttpError(400, "HTTP/1.1 requests need exactly one Host header")
    if not target.startswith("/"):
        if target == "*" and method == "OPTIONS":
            target = "/"
        else:  # absolute-form is for proxies
            raise HttpError(400, "request target must be an absolute path")
    path, _, raw_query = target.partition("?")
    if "%" in path:  # (otherwise the path is part of the target, checked above)
        try:
            path = urllib.parse.unquote(path, errors="strict")
        except UnicodeDecodeError:
            raise HttpError(400, "invalid percent-encoding in the path") from None
        if _TARGET_CONTROL_RE.search(path):
            raise HttpError(400, "control character in the request path")
    return HttpRequest(method, target, path, parse_query(raw_query), version, headers, raw_head, peer)


def _checked_header_fields(lines: list[str]) -> list[tuple[str, str]]:
    """Header lines → (lower-case name, value), the first bad line raising its own HttpError 400."""
    headers = []
    for line in lines:
        if not line:
            raise HttpError(400, "empty header line")
        if line[0] in " \t":
            raise HttpError(400, "obsolete line folding is not allowed")
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN_RE.match(name):  # also rejects whitespace before the colon
            raise HttpError(400, f"malformed header field {name[:40]!r}")
        value = value.strip(" \t")
        if not _FIELD_VALUE_RE.match(value):
            raise HttpError(400, f"invalid characters in header {name[:40]!r}")
        headers.append((name.lower(), value))
    return headers


def parse_query(raw_query: str) -> dict[str, list[str]]:
    """A query string → parse_qs(keep_blank_values=True), at most MAX_QUERY_FIELDS fields.

    Raises:
        HttpError: 400 for more fields, or a percent-encoding that is not UTF-8.
    """
    if not raw_query:
        return {}
    if raw_query.count("&") >= MAX_QUERY_FIELDS:  # (parse_qs's own count: separators + 1)
        raise HttpError(400, f"more than {MAX_QUERY_FIELDS} query parameters")
    if "%" not in raw_query and "+" not in raw_query:  # nothing to decode: parse_qs's result, 4x faster
        query: dict[str, list[str]] = {}
        for field in raw_query.split("&"):
            if field:
                name, _, value = field.partition("=")
                values = query.get(name)
                if values is None:
                    query[name] = [value]
                else:
                    values.append(value)
        return query
    try:
        return urllib.parse.parse_qs(raw_query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise HttpError(400, "invalid percent-encoding in the query") from None


# A value that decodes to itself (no %, no +, no &): one whose bytes may change without changing a
# parse beyond that value.
_PLAIN_QUERY_VALUE_RE = re.compile(rb"[A-Za-z0-9._~-]*")
MAX_REPEAT_VALUE_BYTES = 64  # engine.io clients' `t` is 7-13 characters, python-socketio's a float's ~18


@dataclasses.dataclass(slots=True)
class RepeatedHead:
    """A parsed request head, and how to parse a repeat of it that differs only in the value of one
    query parameter: a long-polling client sends its GET again and again, the same bytes but for a
    new `t=` (engine.io clients' cache buster), or the very same bytes (the dashboard's own client).
    Such a repeat is told from its bytes alone, two comparisons and one match, and its HttpRequest
    is what parse_request_head would return.  It keeps offsets into the newest head recognised, not
    copies of its parts: a connection holds one head, as before."""
    request: HttpRequest       # the newest head recognised (the first, until a repeat comes)
    name: str | None           # the query parameter whose value may change (None: none may)
    value_at: int              # where the value starts in every repeat's head
    value_end: int             # where it ends in `request`'s
    max_value_bytes: int       # a longer value could take the target past MAX_TARGET_BYTES

    @classmethod
    def of(cls, req: HttpRequest, name: str) -> "RepeatedHead | None":
        """None unless ``req``'s target has one ``name=`` parameter with a plain value (see
        _PLAIN_QUERY_VALUE_RE) and no other spelling of ``name`` (percent-encoded, say), or no
        ``name`` at all (then only the same bytes repeat it)."""
        if name not in req.query:
            return cls(req, None, 0, 0, 0)
        if len(req.query[name]) != 1:
            return None
        target = req.target
        query_at = target.find("?") + 1
        field_at, value_at = query_at, -1
        for field in target[query_at:].split("&"):
            if field.startswith(name + "="):
                value_at = field_at + len(name) + 1
                value_end = field_at + len(field)
            field_at += len(field) + 1
        if value_at < 0 or not _PLAIN_QUERY_VALUE_RE.fullmatch(target.encode("latin-1"), value_at, value_end):
            return None
        at = len(req.method) + 1  # the target's offset in the head (latin-1: a character per byte)
        return cls(req, name, at + value_at, at + value_end,
                   min(MAX_REPEAT_VALUE_BYTES, MAX_TARGET_BYTES - len(target) + value_end - value_at))

    def parse(self, raw_head: bytes) -> HttpRequest | None:
        """``raw_head`` parsed, if it repeats the newest head recognised but for the value (None
        otherwise); it is then the newest."""
        last = self.request
        if self.name is None:
            return last if raw_head == last.raw_head else None
        last_head, value_at, last_end = last.raw_head, self.value_at, self.value_end
        value_end = len(raw_head) - (len(last_head) - last_end)
        if (not value_at <= value_end <= value_at + self.max_value_bytes
                or not raw_head.startswith(last_head[:value_at])
                or not raw_head.endswith(last_head[last_end:])
                or not _PLAIN_QUERY_VALUE_RE.fullmatch(raw_head, value_at, value_end)):
            return None
        value = raw_head[value_at:value_end].decode("ascii")
        query = dict(last.query)
        query[self.name] = [value]
        at = len(last.method) + 1
        target = last.target
        self.request = HttpRequest(last.method, target[:value_at - at] + value + target[last_end - at:], last.path,
                                   query, last.version, last.headers, raw_head, last.peer)
        self.value_end = value_end
        return self.request


def body_length(req: HttpRequest, max_bytes: int) -> int:
    """Length of the request body.  Only Content-Length framing is supported.

    Raises:
        HttpError: 501 Transfer-Encoding (no chunked request bodies); 400 duplicate,
        conflicting or malformed Content-Length (request smuggling); 413 over ``max_bytes``.
    """
    if req.header("transfer-encoding") is not None:
        raise HttpError(501, "Transfer-Encoding request bodies are not supported; send Content-Length")
    values = {v.strip() for k, v in req.headers if k == "content-length"}
    if not values:
        return 0
    if len(values) > 1 or len([1 for k, _ in req.headers if k == "content-length"]) > 1:
        raise HttpError(400, "more than one Content-Length")
    value = values.pop()
    if not value.isdigit() or not value.isascii() or len(value) > 19:
        raise HttpError(400, "malformed Content-Length")
    length = int(value)
    if length > max_bytes:
        raise HttpError(413, f"request body of {length} bytes is over the limit of {max_bytes} bytes")
    return length


def peer_address(peer: str) -> str:
    """The address of a peer as this server names it ("203.0.113.7:4711", "[2001:db8::1]:4711")."""
    return peer.rsplit(":", 1)[0].strip("[]")


def forwarded_address(hop: str) -> str | None:
    """The address of one X-Forwarded-For hop ("203.0.113.7", "203.0.113.7:4711", "2001:db8::1",
    "[2001:db8::1]:4711"), normalised; None when it is none."""
    hop = hop.strip()
    if hop.startswith("["):
        hop = hop[1:hop.find("]")] if "]" in hop else ""
    elif hop.count(":") == 1:
        hop = hop.split(":")[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None


def wants_keep_alive(req: HttpRequest) -> bool:
    """h11's rule: close if either side says `close`, and always for HTTP/1.0 (no 1.0 keep-alive)."""
    return req.version == "HTTP/1.1" and "close" not in req.header_tokens("connection")


def raw_head_keeps_alive(raw_head: bytes) -> bool:
    """Whether an unparsed request head surely lets its connection carry another request after
    the answer: HTTP/1.1, no body announced, and no Connection header but one saying just
    `keep-alive` (others may say `close` or `upgrade`).  False is always safe: the connection
    then closes."""
    low = raw_head.lower()
    if not low[:low.find(b"\r\n")].endswith(b" http/1.1") or b"\r\ncontent-length:" in low \
            or b"\r\ntransfer-encoding:" in low:
        return False
    at = low.find(b"\r\nconnection:")
    if at < 0:
        return True
    end = low.find(b"\r\n", at + 2)
    return low[at + 13:end].strip(b" \t") == b"keep-alive" and b"\r\nconnection:" not in low[end:]


def is_upgrade(req: HttpRequest) -> bool:
    """Node's rule for an "upgrade" request: an Upgrade header and the upgrade token in Connection."""
    connection = req.header("connection") or ""
    return req.header("upgrade") is not None and any(
        token.strip().lower() == "upgrade" for token in connection.split(","))


def has_invalid_header_char(value: str) -> bool:
    """engine.io's checkInvalidHeaderChar on Origin: control characters, DEL or non-Latin-1."""
    return _FIELD_VALUE_UNSAFE_RE.search(value) is not None


# On every response: no MIME sniffing (a JSON error echoing input must never run as HTML), no
# framing (clickjacking), no Referer with the page's URL to other sites.
SECURITY_HEADERS = (("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                    ("Referrer-Policy", "no-referrer"))
# Over HTTPS: browsers keep to HTTPS for a year (ignored while a certificate is not trusted).
HSTS_HEADER = ("Strict-Transport-Security", "max-age=31536000")
# The dashboard loads only its own files and talks only to its own server: no inline script or
# style, no plugin, nothing framed or framing it.
DASHBOARD_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                 "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                 "frame-ancestors 'none'")


def http_date(epoch_s: float) -> str:
    return _http_date_of_second(int(epoch_s))


@functools.lru_cache(maxsize=4)
def _http_date_of_second(second: int) -> str:  # (formatting it was 4 % of a long-poll's cost)
    return email.utils.formatdate(second, usegmt=True)


@functools.lru_cache(maxsize=4)
def http_date_bytes(second: int) -> bytes:
    """http_date of a whole second, as bytes (a long-poll answer's, made from bytes)."""
    return _http_date_of_second(second).encode()


def render_response(resp: HttpResponse, keep_alive: bool, head_only: bool = False, date: str = "",
                    chunked: bool = True) -> bytes:
    """Status line, headers and body.  Content-Length framing; a streamed response (``resp.stream``)
    gets only its head here, announcing chunked transfer (or, with ``chunked`` False for an HTTP/1.0
    client, a body that ends when the connection closes)."""
    lines = [_status_lines(resp.status)]
    if date:
        lines.append(f"Date: {date}\r\n")
    if resp.status not in (204, 304):
        if resp.content_type:  # engine.io sends its empty-bodied errors without one
            lines.append(f"Content-Type: {resp.content_type}\r\n")
        if resp.stream is None:
            lines.append(f"Content-Length: {len(resp.body)}\r\n")
        elif chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
    lines.extend(map(_header_line, resp.headers))
    lines.append("Connection: keep-alive\r\n\r\n" if keep_alive else "Connection: close\r\n\r\n")
    head = "".join(lines).encode("latin-1")
    return head if head_only or resp.status in (204, 304) or resp.stream is not None else head + resp.body


@functools.lru_cache(maxsize=64)
def _status_lines(status: int) -> str:
    return f"HTTP/1.1 {status} {HTTP_REASONS.get(status, 'Unknown')}\r\nServer: {SERVER_NAME}\r\n"


@functools.lru_cache(maxsize=1024)  # (most are the same few: security, CORS, polling headers)
def _header_line(field: tuple[str, Any]) -> str:
    """One header line.  Whatever a value holds, it stays one field: a character outside RFC 9110's
    field-value (CR, LF, NUL, other controls, or beyond Latin-1, which could not be encoded) becomes "?"."""
    name, value = field
    return f"{name}: {_FIELD_VALUE_UNSAFE_RE.sub('?', str(value))}\r\n"


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 §7.1); b"" is the last chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b"0\r\n\r\n"


def content_disposition(filename: str) -> str:
    """An attachment header any name fits in (RFC 6266): an ASCII `filename=` for old clients and
    `filename*=UTF-8''...` with the exact name (a symbol can be any Unicode)."""
    fallback = re.sub(r'[^\x20-\x7e]|["\\%]', "_", filename)
    exact = urllib.parse.quote(filename, safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{exact}"


def json_response(obj: Any, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> HttpResponse:
    body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    return HttpResponse(status, body, "application/json", list(headers))


def error_response(exc: HttpError) -> HttpResponse:
    return json_response({"error": exc.message}, exc.status, exc.headers)


def origin_allowed(origin: str | None, origins: tuple[str, ...], host: str | None = None) -> bool:
    """Whether a request with this Origin header may use the API: no Origin (not a browser's
    cross-site request), any origin with `*`, the server's own (the dashboard it serves, and
    clients such as python-socketio that send their target as Origin: Origin's host is the
    request's Host), else one of CORS_ORIGINS (`null` never is)."""
    if origin is None or origins == ("*",) or origin.rstrip("/") in origins:
        return True
    if host:
        with contextlib.suppress(ValueError):
            return urllib.parse.urlsplit(origin).netloc.lower() == host.strip().lower()
    return False


def cors_headers_any() -> list[tuple[str, str]]:
    """What `cors_headers` gives any request when CORS_ORIGINS is `*`."""
    return [("Access-Control-Allow-Origin", "*")]


def cors_headers(req: HttpRequest, origins: tuple[str, ...]) -> list[tuple[str, str]]:
    """CORS for the REST API and Engine.IO.  With `*`, any page may read the public data, but
    without credentials (no cookie or auth of the user's goes with it).  With a list, an
    allowed Origin is echoed with credentials (Socket.IO's `withCredentials` needs them)."""
    if origins == ("*",):
        return cors_headers_any()
    origin = req.header("origin")
    if origin is None:
        return []
    if not origin_allowed(origin, origins, req.header("host")):
        return [("Vary", "Origin")]
    return [("Access-Control-Allow-Origin", origin), ("Access-Control-Allow-Credentials", "true"),
            ("Vary", "Origin")]


def preflight_response(req: HttpRequest, origins: tuple[str, ...]) -> HttpResponse:
    headers = cors_headers(req, origins)
    if any(k == "Access-Control-Allow-Origin" for k, _ in headers):
        headers += [("Access-Control-Allow-Methods", "GET, HEAD, POST, OPTIONS"),
                    ("Access-Control-Max-Age", "86400")]
        asked = req.header("access-control-request-headers")
        if asked:
            headers.append(("Access-Control-Allow-Headers", asked))
    return HttpResponse(204, headers=headers)


def encode_ws_frame(payload: bytes, opcode: Opcode = Opcode.TEXT) -> bytes:
    """One unmasked, final frame as a server sends it (RFC 6455 §5.2), no extensions.

    Used for the broadcast hot path: built once per update, the same bytes go to every client.
    """
    length = len(payload)
    first = 0x80 | opcode  # FIN + opcode; RSV bits clear since no extension is negotiated
    if length < 126:
        return bytes((first, length)) + payload
    if length < 1 << 16:
        return struct.pack("!BBH", first, 126, length) + payload
    return struct.pack("!BBQ", first, 127, length) + payload

# ###########################################################################
# §7 REST routes
# ###########################################################################
# Owns: the JSON API and the route table (which code serves a path, its metrics label,
# CORS, auth), and the /metrics exposition.  Handlers are functions of (request,
# ApiContext) → HttpResponse; they read in-memory state and the `now_ms` they are given,
# never the clock or the disk.

MAX_TIME_MS = 2**53  # JSON-safe upper bound for an open-ended range


class MetricFamily(NamedTuple):
    """One metric of /metrics: ``samples`` are (suffix and labels, value), e.g.
    ('{transport="polling"}', 3), or ('_bucket{le="0.01"}', 7) for a histogram's parts."""
    name: str                                # without the "bbo_" prefix
    kind: str                                # "gauge", "counter" or "histogram"
    help: str
    samples: list[tuple[str, float]]


def render_metrics(families: Iterable[MetricFamily]) -> str:
    """Prometheus text exposition, format 0.0.4."""
    out: list[str] = []
    for family in families:
        out.append(f"# HELP bbo_{family.name} {family.help}")
        out.append(f"# TYPE bbo_{family.name} {family.kind}")
        out.extend(f"bbo_{family.name}{labels} {value}" for labels, value in family.samples)
    return "\n".join(out) + "\n"


def history_metrics(history: BboHistory, now_ms: int) -> list[MetricFamily]:
    """The per-symbol metrics of the history: what was dropped or kept, ages, latency, memory."""
    history.flush()  # crossed books are counted when a batch reaches numpy
    hists = sorted(history.symbols.items())
    bounds = [f"{b / 1000:g}" for b in LATENCY_BUCKETS_MS.tolist()] + ["+Inf"]
    latency: list[tuple[str, float]] = []
    for s, h in hists:
        cumulative = np.cumsum(h.latency_hist).tolist()
        latency.extend((f'_bucket{{symbol="{s}",le="{le}"}}', count) for le, count in zip(bounds, cumulative))
        latency.append((f'_sum{{symbol="{s}"}}', f"{h.latency_sum_ms / 1000:g}"))
        latency.append((f'_count{{symbol="{s}"}}', cumulative[-1]))
    leg_bounds = [f"{b / 1000:g}" for b in LEG_BOUNDS_MS.tolist()] + ["+Inf"]
    legs: list[tuple[str, float]] = []
    for s, h in hists:
        for leg, label in LATENCY_LEGS:
            cumulative = np.cumsum(h.leg_hist[leg]).tolist()
            tags = f'symbol="{s}",leg="{label}"'
            legs.extend((f'_bucket{{{tags},le="{le}"}}', count) for le, count in zip(leg_bounds, cumulative))
            legs.append((f'_sum{{{tags}}}', f"{h.leg_sum_ms[leg] / 1000:g}"))
            legs.append((f'_count{{{tags}}}', cumulative[-1]))
    estimate, source = history.clock.current(now_ms)
    clock = [] if estimate is None else [
        MetricFamily("clock_offset_seconds", "gauge", "Local clock minus the exchange's (positive: local is ahead), "
                     "by source", [(f'{{source="{source}"}}', round(estimate.offset_ms / 1000, 6))]),
        MetricFamily("clock_offset_uncertainty_seconds", "gauge", "The clock offset is within ± this",
                     [(f'{{source="{source}"}}', round(estimate.uncertainty_ms / 1000, 6))])]
    return clock + [
        MetricFamily("feed_duplicates_total", "counter", "Updates dropped as duplicate or out of order (by u)",
                     [(f'{{symbol="{s}"}}', h.duplicates) for s, h in hists]),
        MetricFamily("feed_crossed_total", "counter", "Updates kept although bid >= ask",
                     [(f'{{symbol="{s}"}}', h.crossed) for s, h in hists]),
        MetricFamily("feed_last_message_age_seconds", "gauge", "Seconds since the symbol's last update",
                     [(f'{{symbol="{s}"}}', round((now_ms - h.latest.recv_ms) / 1000, 3)) for s, h in hists if h.latest]),
        MetricFamily("feed_latency_seconds", "histogram",
                     "Exchange→server latency (serverTimestamp - E) of received updates", latency),
        MetricFamily("latency_leg_seconds", "histogram", "Each leg of an update's way: exchange_internal (E - T), "
                     "exchange_to_server (serverTimestamp - E), exchange_to_server_corrected (the same minus the "
                     "clock offset), server_internal (emitTimestamp - serverTimestamp)", legs),
        MetricFamily("cache_updates", "gauge", "Raw updates held per symbol",
                     [(f'{{symbol="{s}"}}', len(h.raw)) for s, h in hists]),
        MetricFamily("cache_memory_bytes", "gauge", "Memory of the history rings per symbol",
                     [(f'{{symbol="{s}"}}', h.raw.nbytes + h.bars.nbytes) for s, h in hists]),
    ]


@dataclasses.dataclass(slots=True)
class ApiContext:
    history: BboHistory
    feed_status: Callable[[int], dict]      # now_ms → the feed status object
    now_ms: int
    metrics: Callable[[int], list[MetricFamily]] | None = None  # now_ms → every metric of the server
    persistence: dict[str, Any] = dataclasses.field(  # the cache on disk: ok / failing / off / disabled, with why
        default_factory=lambda: {"state": "disabled", "reason": "CACHE_PERSIST=false"})


def _param(req: HttpRequest, name: str) -> str | None:
    values = req.query.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise HttpError(400, f"{name} given more than once")
    return values[0]


def _int_param(req: HttpRequest, name: str, default: int, lo: int, hi: int) -> int:
    raw = _param(req, name)
    if raw is None or raw == "":
        return default
    # ASCII digits only: int() also takes "١٢٣", "1_000", "+5" and " 5", none of them a number here.
    if not (raw.isascii() and raw.isdigit()):
        raise HttpError(400, f"{name} must be an integer (digits 0-9), got {raw[:40]!r}")
    try:
        value = int(raw)
    except ValueError:  # over sys.get_int_max_str_digits() digits
        raise HttpError(400, f"{name} must be at most {hi}") from None
    if value < lo:
        raise HttpError(400, f"{name} must be at least {lo}")
    if value > hi:
        raise HttpError(400, f"{name} must be at most {hi}")
    return value


def _symbol_param(req: HttpRequest, ctx: ApiContext) -> SymbolHistory:
    raw = _param(req, "symbol")
    if not raw:
        raise HttpError(400, "symbol is required, e.g. ?symbol=BTCUSDT")
    hist = ctx.history.find(raw)
    if hist is None:
        known = ", ".join(sorted(ctx.history.symbols)) or "none yet"
        raise HttpError(404, f"unknown symbol {raw[:40]!r}; known symbols: {known}")
    return hist


def _range_params(req: HttpRequest) -> tuple[int, int]:
    start = _int_param(req, "start_time", 0, 0, MAX_TIME_MS)
    end = _int_param(req, "end_time", MAX_TIME_MS, 0, MAX_TIME_MS)
    if start > end:
        raise HttpError(400, "start_time must not be after end_time")
    return start, end


def handle_symbols(req: HttpRequest, ctx: ApiContext) -> HttpResponse:
    return json_response({"symbols": sorted(ctx.history.symbols)})


def stream_rows(hist: SymbolHistory, a: int, b: int, render: Callable[[dict[str, np.ndarray]], str],
                header: str = "") -> Iterator[bytes]:
    """Raw rows [a, b) rendered STREAM_CHUNK_ROWS at a time: memory stays constant in the range.

    Raises:
        HttpStreamCut: rows not sent yet left the ring (a slow reader of a busy symbol).
    """
    if header:
        yield header.encode()
    while a < b:
        hist.flush()  # what is pending may overwrite the next rows: the check below must see it
        if a < hist.raw.first:
            raise HttpStreamCut(f"{hist.symbol}: rows from {a} left the ring before they were sent")
        stop = min(b, a + STREAM_CHUNK_ROWS)
        yield render(hist.raw.take(a, stop)).encode()
        a = stop


def handle_updates(req: HttpRequest, ctx: ApiContext) -> HttpResponse:
    hist = _symbol_param(req, ctx)
    start, end = _range_params(req)
    fmt = _param(req, "format") or "json"
    if fmt not in ("json", "csv", "binance", "ndjson"):
        raise HttpError(400, "format must be json, csv, binance or ndjson")
    if fmt in ("binance", "ndjson"):  # streamed: the whole range, or its newest `limit` rows
        limit = _int_param(req, "limit", MAX_TIME_MS, 1, MAX_TIME_MS)
        a, b = hist.raw_bounds(start, end)
        a = max(a, b - limit, hist.raw.first)
        symbol = hist.symbol
        if fmt == "ndjson":
            return HttpResponse(200, content_type="application/x-ndjson",
                                stream=stream_rows(hist, a, b, lambda cols: rows_to_ndjson(cols, symbol)))
        name = f"{symbol}-bookTicker-{start}-{min(end, ctx.now_ms)}.csv"
        return HttpResponse(200, content_type="text/csv; charset=utf-8",
                            headers=[("Content-Disposition", content_disposition(name))],
                            stream=stream_rows(hist, a, b, rows_to_binance_csv, BINANCE_CSV_HEADER + "\n"))
    limit = _int_param(req, "limit", DEFAULT_HISTORY_LIMIT, 1, MAX_HISTORY_LIMIT)
    a, b = hist.raw_bounds(start, end)
    cols = hist.raw.take(max(a, b - limit), b)
    if fmt == "csv":
        name = f"{hist.symbol}-{start}-{min(end, ctx.now_ms)}.csv"
        return HttpResponse(200, rows_to_csv(cols, hist.symbol).encode(), "text/csv; charset=utf-8",
                            [("Content-Disposition", content_disposition(name))])
    rows = rows_to_json_objects(cols, hist.symbol)
    complete = hist.raw_covers(start)
    extra = ""
    if not rows and not complete and hist.keep_bars:  # older than the raw ring: answer from the bars
        ba, bb = hist.bar_bounds(start, end)
        bars = hist.bars.take(max(ba, bb - limit), bb)
        series = [bar_json(bars, i) for i in range(len(bars["time_s"]))]
        body = json.dumps({"symbol": hist.symbol, "count": 0, "tier": "bars", "updates": [],
                           "bars": series, "barsCount": len(series)}, separators=(",", ":"))
        return HttpResponse(200, body.encode())
    if not complete:
        extra = f',"complete":false,"rawFrom":{int(hist.raw.cols["recv_ms"][hist.raw.first % hist.raw.capacity])}'
    body = (f'{{"symbol":"{hist.symbol}","count":{len(rows)},"tier":"raw"{extra},'
            f'"updates":[{",".join(rows)}]}}')
    return HttpResponse(200, body.encode())


def _finite(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    return value if not isinstance(value, float) or math.isfinite(value) else None


def bar_json(bars: dict[str, np.ndarray], i: int) -> dict[str, Any]:
    """Row ``i`` of bar columns as a REST object (camelCase, like the series endpoint)."""
    n = int(bars["lat_count"][i])
    row: dict[str, Any] = {"time": int(bars["time_s"][i]) * 1000}
    for side in ("bid", "ask"):
        for part in ("first", "min", "max", "last"):
            row[side + part.capitalize()] = _finite(bars[f"{side}_{part}"][i])
    row.update(count=int(bars["count"][i]), latencyCount=n,
               latencyMin=_finite(bars["lat_min"][i]) if n else None,
               latencyMean=round(float(bars["lat_sum"][i]) / n, 3) if n else None,
               latencyMax=_finite(bars["lat_max"][i]) if n else None)
    return row


def handle_latency(req: HttpRequest, ctx: ApiContext) -> HttpResponse:
    hist = _symbol_param(req, ctx)
    start, end = _range_params(req)
    tier, stats = hist.latency(start, end)
    return json_response({"symbol": hist.symbol, "tier": tier, "approximate": tier == "bars",
                          "start_time": start, "end_time": end, **stats._asdict(),
                          "legs": hist.latency_legs(start, end, ctx.now_ms), "legsComplete": hist.raw_covers(start),
                          "clock": ctx.history.clock.status(ctx.now_ms)})


def handle_series(req: HttpRequest, ctx: ApiContext) -> HttpResponse:
    hist = _symbol_param(req, ctx)
    start, end = _range_params(req)
    if end == MAX_TIME_MS:
        end = ctx.now_ms
    if start == 0:
        raise HttpError(400, "start_time is required for a series")
    if start > end:  # a start_time in the future, with end_time defaulting to now
        raise HttpError(400, "start_time must not be after end_time")
    buckets = _int_param(req, "buckets", DEFAULT_SERIES_BUCKETS, 1, MAX_SERIES_BUCKETS)
    return json_response(hist.series(start, end, buckets))


def handle_outages(req: HttpRequest, ctx: ApiContext) -> HttpResponse:
    hist = _symbol_param(req, ctx)
    start, end = _range_params(req)
    return json_response({"symbol": hist.symbol, "outages": hist.outages_in(start, end)})


def handle_stats(req: HttpRequest, ctx: ApiContext) -> HttpResponse:
    symbols = {s: h.stats() for s, h in sorted(ctx.history.symbols.items())}
    return json_response({"cache": {"symbols": symbols,
                                     "totalCached": sum(v["cached"] for v in symbols.values()),
                                     "memoryBytes": sum(v["memoryBytes"] for v in symbols.values())},
                          "feed": ctx.feed_status(ctx.now_ms)})


def handle_bbo(req: HttpRequest, ctx: ApiContext) -> HttpResponse:
    latest = ctx.history.latest()
    body = "{" + ",".join(f'"{s}":{bbo_json(b)}' for s, b in sorted(latest.items())) + "}"
    return HttpResponse(200, f'{{"symbols":{body}}}'.encode())


def handle_healthz(req: HttpRequest, ctx: ApiContext) -> HttpResponse:
    """Liveness: 200 while the process serves.  The feed and the cache on disk say how they are
    (a failing disk is reported here, not by /readyz, which is about the data flowing)."""
    return json_response({"status": "ok", "version": __version__, "feed": ctx.feed_status(ctx.now_ms),
                          "persistence": ctx.persistence, "clock": ctx.history.clock.status(ctx.now_ms)})


def handle_readyz(req: HttpRequest, ctx: ApiContext) -> HttpResponse:
    status = ctx.feed_status(ctx.now_ms)
    ready = status["state"] == FeedState.LIVE.value
    return json_response({"status": "ready" if ready else "not ready", "feed": status}, 200 if ready else 503)


def handle_metrics(req: HttpRequest, ctx: ApiContext) -> HttpResponse:
    if ctx.metrics is None:
        raise HttpError(404, "metrics are not enabled")
    return HttpResponse(200, render_metrics(ctx.metrics(ctx.now_ms)).encode(), "text/plain; version=0.0.4; charset=utf-8")


def static_response(req: HttpRequest, found: tuple[bytes, str, str] | None) -> HttpResponse:
    if found is None:
        return error_response(HttpError(404, f"not found: {req.path[:100]}"))
    body, ctype, etag = found
    headers = [("ETag", etag), ("Cache-Control", "no-cache")]  # revalidate: new releases show at once
    if ctype.startswith("text/html"):
        headers.append(("Content-Security-Policy", DASHBOARD_CSP))
    if etag in {t.strip() for t in (req.header("if-none-match") or "").split(",")}:
        return HttpResponse(304, headers=headers)
    return HttpResponse(200, body, ctype, headers)


# -- the route table ------------------------------------------------------------------------
# One table answers every question about a path: which code serves it, its label in /metrics,
# whether its responses carry CORS headers, and what it needs once a token is required.

class RouteKind(Enum):
    API = "api"            # a JSON (or text) handler of this section
    EIO = "eio"            # the Engine.IO endpoint (§16)
    STATIC = "static"      # a file of the dashboard
    FAVICON = "favicon"    # the built-in icon
    NOT_FOUND = "other"    # nothing here: 404


class RouteAuth(Enum):
    """What a route needs when AUTH_TOKEN is set (check_auth, called by the HTTP handler)."""

    OPEN = "open"          # health probes and the dashboard's files: never a credential
    TOKEN = "token"        # the data: REST history and Socket.IO
    METRICS = "metrics"    # /metrics: open or token, by a setting


ApiHandler = Callable[[HttpRequest, ApiContext], HttpResponse]


class Route(NamedTuple):
    label: str                       # low-cardinality name for /metrics ("/api/bbo", "static", ...)
    kind: RouteKind
    handler: ApiHandler | None = None  # RouteKind.API: the handler; None = no such endpoint (404)
    static_name: str = ""            # RouteKind.STATIC: the file; "" = the path after /static/
    cors: bool = False               # responses carry CORS headers (read by other origins' scripts)
    auth: RouteAuth = RouteAuth.OPEN


def _api(path: str, handler: ApiHandler, auth: RouteAuth = RouteAuth.TOKEN) -> tuple[str, Route]:
    return path, Route(path, RouteKind.API, handler, cors=True, auth=auth)


def _static(path: str, name: str) -> tuple[str, Route]:
    return path, Route("static", RouteKind.STATIC, static_name=name)


ROUTES: dict[str, Route] = dict([
    _api("/api/history/symbols", handle_symbols),
    _api("/api/history/updates", handle_updates),
    _api("/api/history/latency", handle_latency),
    _api("/api/history/series", handle_series),
    _api("/api/history/outages", handle_outages),
    _api("/api/history/stats", handle_stats),
    _api("/api/bbo", handle_bbo),
    _api("/healthz", handle_healthz, RouteAuth.OPEN),
    _api("/readyz", handle_readyz, RouteAuth.OPEN),
    _api("/metrics", handle_metrics, RouteAuth.METRICS),
    _static("/", "index.html"),
    _static("/index.html", "index.html"),
    _static("/app.js", "app.js"),
    _static("/style.css", "style.css"),
    ("/favicon.ico", Route("static", RouteKind.FAVICON)),
])
# Prefixes, tried when no exact path matches.
# Engine.IO's requests themselves stay open: as in socket.io, the token rides in the Socket.IO
# CONNECT packet (`auth`), which BboApp.on_connect checks.
EIO_ROUTE = Route(EIO_PATH, RouteKind.EIO, cors=True, auth=RouteAuth.TOKEN)
STATIC_DIR_ROUTE = Route("static", RouteKind.STATIC)                       # /static/<file>
UNKNOWN_API_ROUTE = Route("other", RouteKind.API, cors=True, auth=RouteAuth.TOKEN)  # /api/<typo>: JSON 404
NOT_FOUND_ROUTE = Route("other", RouteKind.NOT_FOUND)


def is_eio_path(path: str) -> bool:
    """Whether a request path belongs to the Engine.IO endpoint (/socket.io and below, not /socket.iox)."""
    return path.startswith(EIO_PATH) or path == EIO_PATH[:-1]


def resolve_route(path: str) -> Route:
    """The route serving a percent-decoded request path (a trailing slash is ignored)."""
    if is_eio_path(path):
        return EIO_ROUTE
    key = path.rstrip("/") or "/"
    route = ROUTES.get(key)
    if route is not None:
        return route
    if key.startswith("/static/"):
        return STATIC_DIR_ROUTE
    if key.startswith("/api/"):
        return UNKNOWN_API_ROUTE
    return NOT_FOUND_ROUTE


def check_method(req: HttpRequest, route: Route) -> None:
    """Refuse a method no route of this server takes, before its body is read.

    Engine.IO answers every method under /socket.io/ itself, in its own format (the reference
    gives PUT without a sid `400 {"code":2,...}`); everywhere else only ALLOWED_METHODS exist.

    Raises:
        HttpError: 405 with the Allow header.
    """
    if req.method not in ALLOWED_METHODS and route.kind is not RouteKind.EIO:
        raise HttpError(405, f"method {req.method} not allowed", [("Allow", ", ".join(ALLOWED_METHODS))])


# -- authentication (AUTH_TOKEN) ------------------------------------------------------------

def token_matches(presented: Any, expected: str) -> bool:
    """Whether a client's token is AUTH_TOKEN, in a time that says nothing about either.

    Both are hashed first, so that hmac.compare_digest compares equal-length bytes (on its own
    it returns early on a length difference); `presented` comes from a client and may be any
    JSON value or text: what is no string never matches, and surrogatepass encodes every str
    (a lone surrogate from JSON too) to bytes no other string has.
    """
    if not expected or not isinstance(presented, str):
        return False
    return hmac.compare_digest(_token_digest(presented), _token_digest(expected))


def _token_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def bearer_token(req: HttpRequest) -> str | None:
    """The token of `Authorization: Bearer <token>` (the scheme is case-insensitive, RFC 9110 §11.1)."""
    scheme, _, token = (req.header("authorization") or "").strip().partition(" ")
    if scheme.lower() != AUTH_SCHEME.lower():
        return None
    return token.strip() or None


def route_needs_token(route: Route, metrics_public: bool) -> bool:
    """Whether a route takes a token (once AUTH_TOKEN is set): TOKEN routes, and METRICS unless METRICS_PUBLIC."""
    return route.auth is RouteAuth.TOKEN or (route.auth is RouteAuth.METRICS and not metrics_public)


def check_auth(req: HttpRequest, route: Route, token: str, metrics_public: bool) -> None:
    """Let a request of an API route through when no token is configured, the route is open, or it
    carries the token.

    Raises:
        HttpError: 401 with `WWW-Authenticate: Bearer` (RFC 6750 §3; `error="invalid_token"`
            when a token was sent but is not the one).
    """
    if not token or not route_needs_token(route, metrics_public):
        return
    presented = bearer_token(req)
    if token_matches(presented, token):
        return
    if presented is None:
        raise HttpError(401, f"this server needs a token: send Authorization: {AUTH_SCHEME} <token>",
                        [("WWW-Authenticate", AUTH_SCHEME)])
    raise HttpError(401, "the token is not the one this server takes",
                    [("WWW-Authenticate", f'{AUTH_SCHEME} error="invalid_token"')])


def handle_api(req: HttpRequest, ctx: ApiContext, route: Route | None = None) -> HttpResponse:
    """Serve a request of a RouteKind.API route; every HttpError becomes a JSON error response."""
    handler = (route or resolve_route(req.path)).handler
    try:
        if handler is None:
            raise HttpError(404, f"no such endpoint: {req.path[:100]}")
        if req.method not in ("GET", "HEAD"):
            raise HttpError(405, f"method {req.method} not allowed here", [("Allow", "GET, HEAD, OPTIONS")])
        return handler(req, ctx)
    except HttpError as exc:
        return error_response(exc)

# ###########################################################################
# §8 Engine.IO v4 codec
# ###########################################################################
# Owns: Engine.IO packets and polling payloads.  Pure: str/bytes in, values out; raises
# EioProtocolError.  Spec: engine.io-protocol v4.
#
# Wire format of one packet: <type digit><data>, e.g. "0{...}" open, "2" ping, "3probe",
# "4hello" message. A binary message is a binary WebSocket frame, or over polling "b" + base64
# of the bytes. A polling payload joins packets with the record separator: "4hello\x1e2\x1e4world".

def _json_dumps(value: Any) -> str:
    """JSON as the reference puts it on the wire: compact, non-ASCII kept, no NaN (JSON.stringify)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_loads(text: str) -> Any:
    """Parse JSON like JSON.parse: NaN/Infinity are refused (Python accepts them by default)."""
    return json.loads(text, parse_constant=_reject_constant)




class EioType(IntEnum):
    """Engine.IO packet types (spec §Packet)."""

    OPEN = 0
    CLOSE = 1
    PING = 2
    PONG = 3
    MESSAGE = 4
    UPGRADE = 5
    NOOP = 6


class EioPacket(NamedTuple):
    """One decoded packet; `data` is bytes only for a binary message."""

    kind: EioType
    data: str | bytes = ""


EIO_SEPARATOR = "\x1e"
_EIO_TYPE_BY_CHAR = {str(int(kind)): kind for kind in EioType}


def encode_eio(kind: EioType, data: str = "") -> str:
    """Encode one text packet: ``encode_eio(EioType.MESSAGE, "hi") == "4hi"``."""
    return f"{int(kind)}{data}"


def encode_eio_binary(raw: bytes) -> str:
    """Encode a binary message for polling: "b" + base64 (spec §Payload)."""
    return "b" + base64.b64encode(raw).decode("ascii")


def decode_eio(text: str) -> EioPacket:
    """Decode one text packet (a WebSocket text frame or one polling segment).

    Raises:
        EioProtocolError: empty text, an unknown type character or bad base64 (any
            character outside the base64 alphabet, non-ASCII ones included).
    """
    if not text:
        raise EioProtocolError("empty packet")
    head = text[0]
    if head == "b":
        try:
            return EioPacket(EioType.MESSAGE, base64.b64decode(text[1:], validate=True))
        except (binascii.Error, ValueError):  # ValueError: b64decode's answer to a non-ASCII character
            # node's Buffer.from(..., "base64") skips bad characters; refusing them is stricter.
            raise EioProtocolError("bad base64 in binary packet") from None
    kind = _EIO_TYPE_BY_CHAR.get(head)
    if kind is None:
        raise EioProtocolError(f"unknown packet type {head!r}")
    return EioPacket(kind, text[1:])


def encode_eio_payload(packets: Iterable[str]) -> str:
    """Join encoded packets into one polling payload."""
    return EIO_SEPARATOR.join(packets)


def iter_eio_payload(body: str) -> Iterator[EioPacket]:
    """Decode a polling payload packet by packet.

    A generator on purpose: engine.io-parser's decodePayload hands over the packets before a bad
    one and then stops, so the caller processes those and closes the session at the bad one.

    Raises:
        EioProtocolError: at the first invalid packet.
    """
    start = 0  # (not str.split: a 1 MB body of tiny bad packets would make 70,000 strings for one error)
    while (end := body.find(EIO_SEPARATOR, start)) >= 0:
        yield decode_eio(body[start:end])
        start = end + 1
    yield decode_eio(body[start:])


_EIO_SEPARATOR_BYTE = 0x1E
_EIO_PACKET_HEADS = frozenset(b"0123456b")  # the first byte of every valid packet (one ASCII character)


def find_invalid_eio_packet(data: bytes | bytearray, pos: int, complete: bool) -> tuple[int, int | None]:
    """Check a polling payload while its bytes arrive, so that a body can be refused at its first
    invalid packet without reading the rest: `iter_eio_payload` fails on ``data`` decoded as
    node does (UTF-8, bad sequences replaced) exactly when this finds an invalid packet.  (UTF-8
    keeps the separator and ASCII as they are, and any other byte first in a packet is an
    unknown type.)

    Args:
        data: the body so far.  pos: where checking resumes (0, then what the last call returned).
        complete: whether ``data`` is the whole body (an empty last packet is invalid then).

    Returns:
        (where to resume once more bytes came, None) or, at an invalid packet, (its start, cut):
        ``data[:cut]`` decodes to the packets before it, then fails.
    """
    n = len(data)
    while True:
        if pos == 0 or data[pos - 1] == _EIO_SEPARATOR_BYTE:  # a packet starts at pos
            if pos == n:
                return pos, (pos if complete else None)     # empty so far: invalid only at the end
            head = data[pos]
            if head == _EIO_SEPARATOR_BYTE:                 # an empty packet
                return pos, pos
            if head not in _EIO_PACKET_HEADS:               # an unknown type
                return pos, pos + 1
            if head == 0x62:                                # "b": checked once whole (its base64)
                end = data.find(_EIO_SEPARATOR_BYTE, pos)
                if end < 0:
                    if not complete:
                        return pos, None
                    end = n
                try:
                    decode_eio(bytes(data[pos:end]).decode("ascii"))
                except (EioProtocolError, UnicodeDecodeError):
                    return pos, end
                if end == n:
                    return n, None
                pos = end + 1
                continue
        end = data.find(_EIO_SEPARATOR_BYTE, pos)             # the rest of a text packet: anything goes
        if end < 0:
            return n, None
        pos = end + 1


# ###########################################################################
# §9 Socket.IO v5 codec
# ###########################################################################
# Owns: Socket.IO packets, binary attachments, ack arguments.  Pure: str/bytes in, values
# out; raises SioProtocolError.  Spec: socket.io-protocol v5.
#
# Wire format (the text inside an Engine.IO message):
#     <type>[<attachments>-][<namespace>,][<ack id>][<JSON>]
# namespace omitted for "/". Golden examples, all from the reference server on this machine:
#     "0"  "0/admin,{"token":"x"}"  "0{"sid":"Gi3v..."}"   CONNECT (client) / CONNECT answer
#     "4/admin,{"message":"Invalid namespace"}"            CONNECT_ERROR
#     "2["bbo_update",{...}]"  "212["ping"]" -> "312[{"time":1}]"   EVENT with ack id 12, ACK
#     "51-["e",{"_placeholder":true,"num":0}]" + one binary attachment   BINARY_EVENT


class SioType(IntEnum):
    """Socket.IO packet types (spec §Packet types)."""

    CONNECT = 0
    DISCONNECT = 1
    EVENT = 2
    ACK = 3
    CONNECT_ERROR = 4
    BINARY_EVENT = 5
    BINARY_ACK = 6


@dataclass(frozen=True, slots=True)
class SioPacket:
    """One Socket.IO packet. `data` is decoded JSON, or None when the packet has none."""

    kind: SioType
    namespace: str = "/"
    data: Any = None
    ack_id: int | None = None
    attachments: int = 0  # binary packets: how many binary messages follow the text


_SIO_BINARY = (SioType.BINARY_EVENT, SioType.BINARY_ACK)
_DIGITS = frozenset("0123456789")
# Event names the reference refuses from clients (socket.io-parser RESERVED_EVENTS).
SIO_RESERVED_EVENTS = frozenset(
    {"connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"})


def encode_sio(pkt: SioPacket) -> str:
    """Encode a packet's text part: ``encode_sio(SioPacket(SioType.EVENT, data=["a"])) == '2["a"]'``."""
    out = [str(int(pkt.kind))]
    if pkt.kind in _SIO_BINARY:
        out.append(f"{pkt.attachments}-")
    if pkt.namespace != "/":
        out.append(pkt.namespace + ",")
    if pkt.ack_id is not None:
        out.append(str(pkt.ack_id))
    if pkt.data is not None:
        out.append(_json_dumps(pkt.data))
    return "".join(out)


def _sio_payload_valid(kind: SioType, data: Any) -> bool:
    """socket.io-parser Decoder.isPayloadValid, for a payload that is present."""
    if kind is SioType.CONNECT:
        return isinstance(data, dict)
    if kind is SioType.CONNECT_ERROR:
        return isinstance(data, (str, dict))
    if kind in (SioType.EVENT, SioType.BINARY_EVENT):
        if not isinstance(data, list) or not data:
            return False
        name = data[0]
        if isinstance(name, bool):  # bool is an int in Python, not a number in JS
            return False
        return isinstance(name, (int, float)) or (isinstance(name, str) and name not in SIO_RESERVED_EVENTS)
    if kind in (SioType.ACK, SioType.BINARY_ACK):
        return isinstance(data, list)
    return False  # DISCONNECT carries no payload


def _take_digits(text: str, start: int) -> int:
    end = start
    while end < len(text) and text[end] in _DIGITS:
        end += 1
    return end


def decode_sio(text: str, max_attachments: int = SIO_MAX_ATTACHMENTS) -> SioPacket:
    """Decode a packet's text part, as socket.io-parser's decodeString does.

    Binary placeholders are left in place; SioDecoder swaps in the attachments.
    Known difference: "2 [..]" is an event here; the reference reads the space as ack id 0.

    Raises:
        SioProtocolError: unknown type, bad attachment count, over-long namespace or ack id,
            bad JSON, or a payload of the wrong shape for the type.
    """
    if not text or text[0] not in "0123456":
        raise SioProtocolError(f"unknown packet type {text[:1]!r}")
    kind = SioType(int(text[0]))
    pos, attachments = 1, 0
    if kind in _SIO_BINARY:
        end = _take_digits(text, 1)
        if end == 1 or end >= len(text) or text[end] != "-" or end - 1 > 3:
            raise SioProtocolError("Illegal attachments")
        attachments = int(text[1:end])
        if not 1 <= attachments <= max_attachments:
            raise SioProtocolError("Illegal attachments" if attachments < 1 else "too many attachments")
        pos = end + 1
    namespace = "/"
    if text.startswith("/", pos):
        comma = text.find(",", pos)
        end = len(text) if comma < 0 else comma
        namespace = text[pos:end]
        if len(namespace) > SIO_MAX_NAMESPACE_CHARS:
            raise SioProtocolError("namespace too long")
        pos = end + 1
    ack_id = None
    end = _take_digits(text, pos)
    if end > pos:
        if end - pos > SIO_MAX_ACK_ID_DIGITS:
            raise SioProtocolError("ack id too long")
        ack_id, pos = int(text[pos:end]), end
    data = None
    if pos < len(text):
        try:
            data = _json_loads(text[pos:])
        except (ValueError, RecursionError):
            raise SioProtocolError("invalid payload") from None
        if not _sio_payload_valid(kind, data):
            raise SioProtocolError("invalid payload")
    return SioPacket(kind, namespace, data, ack_id, attachments)


def _sio_reconstruct(data: Any, buffers: list[bytes]) -> Any:
    """Replace {"_placeholder":true,"num":i} by attachment i (socket.io-parser reconstructPacket)."""
    if isinstance(data, list):
        return [_sio_reconstruct(item, buffers) for item in data]
    if isinstance(data, dict):
        if data.get("_placeholder") is True:
            num = data.get("num")
            if isinstance(num, int) and not isinstance(num, bool) and 0 <= num < len(buffers):
                return buffers[num]
            raise SioProtocolError("illegal attachments")
        return {key: _sio_reconstruct(value, buffers) for key, value in data.items()}
    return data


def sio_deconstruct(data: Any) -> tuple[Any, list[bytes]]:
    """Split bytes out of `data` into placeholders + attachments (socket.io-parser deconstructPacket)."""
    buffers: list[bytes] = []

    def walk(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            buffers.append(bytes(value))
            return {"_placeholder": True, "num": len(buffers) - 1}
        if isinstance(value, (list, tuple)):
            return [walk(item) for item in value]
        if isinstance(value, dict):
            return {key: walk(item) for key, item in value.items()}
        return value

    return walk(data), buffers


def ack_args(result: Any) -> list[Any]:
    """A handler's return value as ack arguments (python-socketio's convention)."""
    if result is None:
        return []
    if isinstance(result, tuple):
        return list(result)
    return [result]


class SioDecoder:
    """Turns the Engine.IO messages of one client into complete Socket.IO packets.

    A BINARY_EVENT/BINARY_ACK text is held until its attachments (binary messages) arrive; the
    result is an EVENT/ACK whose data holds bytes, as the reference's Decoder does. The bytes
    waiting for the rest of a packet are bounded by ``max_pending_bytes`` (a packet with its
    attachments is held to the size of one message), and the shell times out a packet whose
    attachments stop coming (see SioClientState.attachments_overdue).
    """

    __slots__ = ("_pending", "_buffers", "_pending_bytes", "max_attachments", "max_pending_bytes", "pending_since_s")

    def __init__(self, max_attachments: int = SIO_MAX_ATTACHMENTS, max_pending_bytes: int = 1_000_000) -> None:
        self._pending: SioPacket | None = None  # the binary packet being reassembled
        self._buffers: list[bytes] = []         # attachments received so far
        self._pending_bytes = 0                 # their total size
        self.max_attachments = max_attachments  # refused beyond this many per packet
        self.max_pending_bytes = max_pending_bytes  # refused beyond this many bytes of attachments
        self.pending_since_s: float | None = None   # when the packet now being reassembled began

    @property
    def pending(self) -> bool:
        return self._pending is not None

    @property
    def pending_bytes(self) -> int:
        """Bytes of attachments held for the packet being reassembled."""
        return self._pending_bytes

    def feed(self, data: str | bytes, now_s: float = 0.0) -> SioPacket | None:
        """Add one Engine.IO message (received at ``now_s``); return a packet once one is complete.

        Raises:
            SioProtocolError: a malformed packet, text while attachments are expected, binary
                data nobody announced, or attachments over ``max_pending_bytes``.
        """
        if isinstance(data, str):
            if self._pending is not None:
                raise SioProtocolError("got plaintext data when reconstructing a packet")
            pkt = decode_sio(data, self.max_attachments)
            if pkt.kind in _SIO_BINARY:
                self._pending, self._buffers, self._pending_bytes = pkt, [], 0
                self.pending_since_s = now_s
                return None
            return pkt
        if self._pending is None:
            raise SioProtocolError("got binary data when not reconstructing a packet")
        self._pending_bytes += len(data)
        if self._pending_bytes > self.max_pending_bytes:
            raise SioProtocolError(f"attachments over {self.max_pending_bytes} bytes")
        self._buffers.append(bytes(data))
        pending = self._pending
        if len(self._buffers) < pending.attachments:
            return None
        buffers, self._pending, self._buffers, self._pending_bytes = self._buffers, None, [], 0
        self.pending_since_s = None
        kind = SioType.EVENT if pending.kind is SioType.BINARY_EVENT else SioType.ACK
        try:
            data = _sio_reconstruct(pending.data, buffers)
        except RecursionError:  # JSON nested nearly as deep as json.loads allows
            raise SioProtocolError("payload nested too deep") from None
        return SioPacket(kind, pending.namespace, data, pending.ack_id)


# ###########################################################################
# §10 Sessions (Engine.IO and Socket.IO state machines)
# ###########################################################################
# Owns: what one client has yet to receive (EioOutbox), where its Engine.IO and Socket.IO
# sessions stand, what a returning client missed (RecoveryLog, recover_updates) and where a
# replay stands (ReplayCursor, ReplayPacer).  Pure: state machines driven by (input, now_s); `now_s` is monotonic seconds
# passed in, never read.
# Effects come back as Actions (kind, payload) for the I/O shell to carry out.


class EioUpdate(NamedTuple):
    """A message that a newer one with the same key supersedes (for BBO Stream: a symbol's BBO).

    Built once per update by the layer above and shared by every client's outbox. What a key
    means is that layer's business: the outbox only filters, rate-limits and conflates by it.
    """

    key: str              # what a newer update supersedes, and what a client's filter selects
    text: str             # the Engine.IO packet: '42["bbo_update",{...}]'
    frame: bytes          # the same packet as a ready unmasked WebSocket text frame
    always: bool = False  # passes every filter and rate limit (a status every client must see)
    offset: int = 0       # its recovery offset (the publish sequence number, in the text too); 0 = none
    slot: int = -1        # recovery: its key's index in the RecoveryLog (a mark names held keys by it)
    mark: str = ""        # recovery: the mark in its text when it is not str(offset) (see recovery_mark)


class EioOutbox:
    """A client's bounded outbox: a FIFO of control packets plus conflating updates.

    Control packets (open, ping, CONNECT answers, acks, events) are never dropped; past
    OUTBOX_MAX_CONTROL_BYTES the client is too slow and gets disconnected. Updates are kept in
    arrival order while they fit in OUTBOX_MAX_UPDATE_BYTES, then compacted to the newest per
    key; a client coming back from a backlog asks for the newest per key only. A filter (a set
    of keys) and a rate limit per key select what the client gets; with a rate limit, an update
    that is not due yet waits in `held` (newest wins) until `release_due`.
    """

    __slots__ = ("control", "control_bytes", "updates", "update_bytes", "keys", "interval_s",
                 "max_rate", "held", "due_at", "skipped", "sent", "_compact_at", "seen_offset", "given",
                 "held_mask")

    def __init__(self) -> None:
        self.control: deque[str | bytes] = deque()  # encoded packets, str = text, bytes = binary message
        self.control_bytes = 0                      # sum of len() of `control`
        self.updates: list[EioUpdate] = []          # pending updates, oldest first
        self.update_bytes = 0                       # sum of len(text) of `updates`
        self.keys: frozenset[str] | None = None     # the filter: keys the client wants; None = every key
        self.max_rate: float | None = None          # updates per second per key, as the client gave it
        self.interval_s: float | None = None        # 1 / max_rate; None = every update
        self.held: dict[str, EioUpdate] = {}        # rate-limited: newest update not due yet, per key
        self.due_at: dict[str, float] = {}          # rate-limited: when the next update of a key may go
        self.skipped = 0                            # updates superseded before they were sent
        self.sent = 0                               # updates handed to the transport
        self._compact_at = OUTBOX_MAX_UPDATE_BYTES  # compact when update_bytes passes this
        self.seen_offset = 0                        # recovery: the newest offset offered
        self.given: EioUpdate | None = None         # recovery: the last update handed to the transport
        self.held_mask = 0                          # recovery: bit `slot` set for each key in `held`

    @property
    def passthrough(self) -> bool:
        """True when every update goes out as published (no filter, no rate limit)."""
        return self.keys is None and self.interval_s is None

    def has_data(self) -> bool:
        return bool(self.control or self.updates)

    def push_control(self, item: str | bytes) -> bool:
        """Queue a control packet; False when the bound is exceeded (disconnect the client)."""
        self.control.append(item)
        self.control_bytes += len(item)
        return self.control_bytes <= OUTBOX_MAX_CONTROL_BYTES

    def wants(self, key: str) -> bool:
        """Whether the filter selects `key`."""
        return self.keys is None or key in self.keys

    def push_update(self, update: EioUpdate, now_s: float) -> bool:
        """Offer an update; True when something new is ready to send now."""
        if update.offset > self.seen_offset:
            self.seen_offset = update.offset
        if update.always:
            self._append(update)
            return True
        key = update.key
        if not self.wants(key):
            return False
        if self.interval_s is not None:
            due = self.due_at.get(key)
            if due is not None and now_s < due:
                if key in self.held:
                    self.skipped += 1
                else:
                    self.held_mask |= 1 << update.slot if update.slot >= 0 else 0
                self.held[key] = update
                return False
            self.due_at[key] = now_s + self.interval_s
            if key in self.held:  # due before its release ran (a busy loop): the older one must not follow
                self._unhold(key)
                self.skipped += 1
        self._append(update)
        return True

    def _unhold(self, key: str) -> EioUpdate:
        update = self.held.pop(key)
        if update.slot >= 0:
            self.held_mask &= ~(1 << update.slot)
        return update

    def mark(self, offset: int) -> str:
        """The client's position (recovery_mark) once everything up to ``offset`` it takes has
        gone to it but what waits in `held`."""
        return recovery_mark(offset, self.held_mask)

    def _append(self, update: EioUpdate) -> None:
        if update.offset and (self.held or update.offset < self.seen_offset):
            update = self._remarked(update)
        self.updates.append(update)
        self.update_bytes += len(update.text)
        if self.update_bytes > self._compact_at:
            self._compact()

    def _remarked(self, update: EioUpdate) -> EioUpdate:
        """Recovery with a rate limit: an update that goes while others wait in `held`, or that
        waited itself (its offset older than updates of other keys sent before it), carries the
        client's true position instead of its own offset: the newest offset offered plus the
        held keys, each owed its newest update up to there (recovery_mark).  The offset alone
        would make a recovering client miss a held update or get later ones twice."""
        mark = self.mark(self.seen_offset)
        text = update.text[:update.text.rindex(',"')] + f',"{mark}"]'
        return update._replace(text=text, frame=encode_ws_frame(text.encode()), mark=mark)

    def _compact(self) -> None:
        """Keep only the newest pending update per key, ordered by their last arrival."""
        newest: dict[str, EioUpdate] = {}
        for update in self.updates:
            newest.pop(update.key, None)
            newest[update.key] = update
        self.skipped += len(self.updates) - len(newest)
        self.updates = list(newest.values())
        self.update_bytes = sum(len(update.text) for update in self.updates)
        # With more symbols than fit under the bound, compacting on every append would be
        # quadratic: wait until the queue doubles (it is still bounded by twice the symbols).
        self._compact_at = max(OUTBOX_MAX_UPDATE_BYTES, 2 * self.update_bytes)

    def release_due(self, now_s: float) -> bool:
        """Move held updates whose time has come to the send queue; True if any moved."""
        due = [key for key in self.held if self.due_at[key] <= now_s]
        for key in due:
            self.due_at[key] = now_s + (self.interval_s or 0.0)
            self._append(self._unhold(key))
        return bool(due)

    def next_due_at(self) -> float | None:
        if not self.held:  # (the usual case: asked after every request of the session)
            return None
        return min(self.due_at[key] for key in self.held)

    def set_filter(self, keys: frozenset[str] | None, max_rate: float | None) -> None:
        """Change the filter (None = every key) and the rate per key (None = every update);
        pending updates no longer wanted are dropped."""
        self.keys, self.max_rate = keys, max_rate
        self.interval_s = None if max_rate is None else 1.0 / max_rate
        self.updates = [update for update in self.updates if update.always or self.wants(update.key)]
        self.update_bytes = sum(len(update.text) for update in self.updates)
        for key in [key for key in self.held if not self.wants(key)]:
            self._unhold(key)
        if self.interval_s is None:
            self.due_at.clear()
            while self.held:  # (one at a time: each one's mark names those still held)
                self._append(self._unhold(next(iter(self.held))))
        else:
            self.due_at = {key: due for key, due in self.due_at.items() if self.wants(key)}

    def drop_held(self) -> None:
        self.held, self.held_mask = {}, 0

    def take_control(self) -> list[str | bytes]:
        items = list(self.control)
        self.control.clear()
        self.control_bytes = 0
        return items

    def take_updates(self, conflate: bool) -> list[EioUpdate]:
        """Everything pending, or only the newest per key when the client is catching up."""
        if conflate and len(self.updates) > 1:
            self._compact()
        updates, self.updates, self.update_bytes = self.updates, [], 0
        self.sent += len(updates)
        if updates:
            self.given = updates[-1]
        return updates

    def clear(self) -> None:
        self.take_control()
        self.skipped += len(self.updates) + len(self.held)
        self.updates, self.update_bytes, self.held, self.held_mask = [], 0, {}, 0


class InboundBudget:
    """How many packets a client may still send: MAX_CLIENT_MESSAGES_PER_S, refilled continuously,
    with a burst of EIO_INBOUND_BURST_S worth (a token bucket).  Pure: the caller passes now_s."""

    __slots__ = ("rate_per_s", "capacity", "tokens", "at_s")

    def __init__(self, rate_per_s: float, now_s: float) -> None:
        self.rate_per_s = rate_per_s                    # refill per second
        self.capacity = rate_per_s * EIO_INBOUND_BURST_S  # the most that can be spent at once
        self.tokens = self.capacity                     # what may be spent now
        self.at_s = now_s                               # when `tokens` was last brought up to date

    def spend(self, now_s: float, count: int = 1) -> bool:
        """Take ``count`` packets' worth; False when the client is over its budget."""
        self.tokens = min(self.capacity, self.tokens + (now_s - self.at_s) * self.rate_per_s)
        self.at_s = now_s
        if self.tokens < count:
            return False
        self.tokens -= count
        return True


INBOUND_RATE_REASON = "message rate limit"  # close reason of a client over MAX_CLIENT_MESSAGES_PER_S
HELD_BYTES_REASON = "server busy"           # close reason of a client whose large message found HELD_BYTES_LIMIT spent


class HeldBytesBudget:
    """Bytes of unfinished client messages the whole server holds (see HELD_BYTES_LIMIT).

    Each holder (a WebSocket's partial frame, a packet's attachments, a POST body) keeps a
    HeldBytes share; its first HELD_FREE_BYTES are free, so ordinary traffic never touches the
    budget and only large messages can be refused.  Pure bookkeeping."""

    __slots__ = ("limit_bytes", "used_bytes", "refusals")

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes  # the most counted at once
        self.used_bytes = 0             # counted now, over all holders
        self.refusals = 0               # holders refused because the budget was spent


class HeldBytes:
    """One holder's share of a HeldBytesBudget."""

    __slots__ = ("budget", "counted_bytes")

    def __init__(self, budget: HeldBytesBudget) -> None:
        self.budget = budget
        self.counted_bytes = 0  # what this holder has counted in the budget (beyond its free share)

    def hold(self, nbytes: int) -> bool:
        """This holder now holds ``nbytes``; False, with nothing changed, when the budget cannot
        take them (the caller then drops what it holds and calls release())."""
        want = max(0, nbytes - HELD_FREE_BYTES)
        budget = self.budget
        if want > self.counted_bytes and budget.used_bytes + want - self.counted_bytes > budget.limit_bytes:
            budget.refusals += 1
            return False
        budget.used_bytes += want - self.counted_bytes
        self.counted_bytes = want
        return True

    def release(self) -> None:
        self.hold(0)


class AddressRateLimit:
    """New sessions per client address: a token bucket each (`rate_per_s`, a burst of `burst_s`
    worth), so that one address cannot churn sessions however few it holds at once.  An
    address whose bucket is full again is forgotten (memory: the addresses active lately).
    Pure: the caller passes now_s."""

    __slots__ = ("rate_per_s", "capacity", "_buckets", "_prune_at")

    def __init__(self, rate_per_s: float, burst_s: float) -> None:
        self.rate_per_s = rate_per_s                       # refill per second
        self.capacity = max(1.0, rate_per_s * burst_s)     # the most an address can spend at once
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when counted)
        self._prune_at = ADDRESS_RATE_PRUNE_AT             # table size that triggers forgetting full buckets

    def _tokens(self, address: str, now_s: float) -> float:
        entry = self._buckets.get(address)
        if entry is None:
            return self.capacity
        tokens, at_s = entry
        return min(self.capacity, tokens + (now_s - at_s) * self.rate_per_s)

    def wait_s(self, address: str, now_s: float) -> float:
        """0 when ``address`` may open a session now; else the seconds until it may."""
        tokens = self._tokens(address, now_s)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate_per_s

    def spend(self, address: str, now_s: float) -> None:
        """Count a session ``address`` opened (once `wait_s` said 0)."""
        self._buckets[address] = (self._tokens(address, now_s) - 1, now_s)
        if len(self._buckets) > self._prune_at:
            for idle in [a for a in self._buckets if self._tokens(a, now_s) >= self.capacity]:
                del self._buckets[idle]
            self._prune_at = max(ADDRESS_RATE_PRUNE_AT, 2 * len(self._buckets))  # amortised: O(1) per spend

    def __len__(self) -> int:
        return len(self._buckets)


class EioState(Enum):
    """Where an Engine.IO session is (one state instead of engine.io's five booleans)."""

    POLLING = "polling"      # long-polling transport
    PROBING = "probing"      # polling; a WebSocket with this sid is open, `2probe` not seen yet
    UPGRADING = "upgrading"  # polling; `3probe` sent, waiting for `5` on the WebSocket
    WEBSOCKET = "websocket"  # WebSocket transport (direct, or upgraded)
    CLOSING = "closing"      # polling, closed by the server: the next GET carries the `1`
    CLOSED = "closed"


class Act(IntEnum):
    """What the I/O shell must do after feeding a session."""

    DELIVER = 0      # payload str | bytes: a message for the layer above
    FLUSH = 1        # the outbox has packets to transmit now (answer the parked GET, or write the WebSocket)
    CLOSE = 2        # payload reason: the session is over for the layers above; tear down the transport
    REJECT_REQUEST = 3  # answer the request being handled with 400 and no body (a second concurrent GET or POST)
    PROBE_PONG = 4   # write `3probe` on the probing WebSocket
    UPGRADED = 5     # the probing WebSocket is now the session's transport
    CLOSE_PROBE = 6  # close the probing WebSocket; the session stays on polling


Action = tuple[Act, Any]
_FLUSH: Action = (Act.FLUSH, None)


class EioSession:
    """One Engine.IO v4 session as a pure state machine (engine.io's lib/socket.ts redone).

    Inputs are methods taking `now_s`; outputs are lists of Actions. The outbox holds what goes
    to the client; the shell drains it when it gets FLUSH: `take_poll_payload()` for a GET,
    or the outbox directly for a WebSocket.

    Heartbeat (spec §Heartbeat): the server queues `2` at `next_ping_at` and expects `3` by
    `pong_deadline`, on polling too; both are armed from the handshake, and `tick(now_s)` applies
    whatever has lapsed, so a late request sees an expired session as gone.
    """

    __slots__ = ("sid", "state", "outbox", "ping_interval_s", "ping_timeout_s", "next_ping_at",
                 "pong_deadline", "_ping_refreshed", "upgrade_deadline", "close_deadline",
                 "close_reason", "poll_parked", "post_in_flight", "_poll_final", "inbound")

    def __init__(self, sid: str, *, websocket: bool, now_s: float, ping_interval_s: float,
                 ping_timeout_s: float, max_payload_bytes: int, max_messages_per_s: float | None = None) -> None:
        self.sid = sid                                   # public session id (query `sid`)
        self.state = EioState.WEBSOCKET if websocket else EioState.POLLING
        self.outbox = EioOutbox()                        # what the client has yet to receive
        self.inbound = None if max_messages_per_s is None else InboundBudget(max_messages_per_s, now_s)
        self.ping_interval_s = ping_interval_s           # server ping period
        self.ping_timeout_s = ping_timeout_s             # how long a pong may take
        self.next_ping_at: float | None = now_s + ping_interval_s  # None while a pong is awaited
        self.pong_deadline: float | None = None          # close at this time unless a pong came
        self._ping_refreshed = False                     # deadline already extended once for this ping
        self.upgrade_deadline: float | None = None       # PROBING/UPGRADING must end by then
        self.close_deadline: float | None = None         # CLOSING gives up waiting for a GET then
        self.close_reason: str | None = None             # why the session ended
        self.poll_parked = False                         # a GET is waiting for data
        self.post_in_flight = False                      # a POST's head came, its body is still arriving
        self._poll_final: str | None = None              # appended to the parked GET's answer when closing
        # Exactly the five keys, compact (ref: byte for byte the same, sid of 20 characters).
        self.outbox.push_control(encode_eio(EioType.OPEN, _json_dumps({
            "sid": sid, "upgrades": [] if websocket else ["websocket"],
            "pingInterval": round(ping_interval_s * 1000), "pingTimeout": round(ping_timeout_s * 1000),
            "maxPayload": max_payload_bytes})))

    # -- queries ---------------------------------------------------------------

    @property
    def transport(self) -> str:
        """The transport the session's data flows on: "websocket" only once upgraded (or direct)."""
        return "websocket" if self.state is EioState.WEBSOCKET else "polling"

    @property
    def closed(self) -> bool:
        return self.state in (EioState.CLOSING, EioState.CLOSED)

    def can_transmit(self) -> bool:
        return self.state is EioState.WEBSOCKET or self.poll_parked

    def next_deadline(self) -> float | None:
        """The earliest time `tick` has something to do."""
        due = self.next_ping_at
        for at in (self.pong_deadline, self.upgrade_deadline, self.close_deadline, self.outbox.next_due_at()):
            if at is not None and (due is None or at < due):
                due = at
        return due

    # -- time ------------------------------------------------------------------

    def tick(self, now_s: float) -> list[Action]:
        """Apply every deadline that has passed by `now_s`."""
        if self.state is EioState.CLOSED:
            return []
        if self.state is EioState.CLOSING:
            if self.close_deadline is not None and now_s >= self.close_deadline:
                self._end()
            return []
        actions: list[Action] = []
        ping_at = self.next_ping_at
        if ping_at is not None and now_s >= ping_at:
            # The client gets the whole pingTimeout from when the ping can go out (engine.io starts
            # the timer on send): a late tick after an event-loop stall must not drop every client.
            # A polling client with no GET parked is timed from when the ping was due, so a client
            # that stopped polling is still closed within pingInterval + pingTimeout.
            sent_at = now_s if self.can_transmit() else ping_at
            self.next_ping_at, self.pong_deadline = None, sent_at + self.ping_timeout_s
            self._ping_refreshed = False
            if not self.outbox.push_control(encode_eio(EioType.PING)):
                return self._abort("outbox overflow", "1")
            if self.can_transmit():
                actions.append(_FLUSH)
        if self.pong_deadline is not None and now_s >= self.pong_deadline:
            return self._abort("ping timeout", "1")
        if self.upgrade_deadline is not None and now_s >= self.upgrade_deadline:
            self.state, self.upgrade_deadline = EioState.POLLING, None
            actions.append((Act.CLOSE_PROBE, None))
        if self.outbox.held and self.outbox.release_due(now_s) and self.can_transmit():
            actions.append(_FLUSH)
        return actions

    # -- sending ---------------------------------------------------------------

    def send(self, item: str | bytes) -> list[Action]:
        """Queue one encoded packet (text, e.g. "42[...]") or a binary message (bytes)."""
        if self.closed:
            return []
        if not self.outbox.push_control(item):
            return self._abort("outbox overflow", "1")
        return [_FLUSH] if self.can_transmit() else []

    def send_many(self, items: list[str]) -> list[Action]:
        """Queue several encoded packets at once (one FLUSH for all)."""
        if self.closed:
            return []
        for item in items:
            if not self.outbox.push_control(item):
                return self._abort("outbox overflow", "1")
        return [_FLUSH] if self.can_transmit() else []

    def push_updates(self, updates: list[EioUpdate], now_s: float) -> list[Action]:
        """Offer a batch of conflatable updates (the Hub's slow path); at most one FLUSH."""
        if self.closed:
            return []
        ready = False
        for update in updates:
            ready = self.outbox.push_update(update, now_s) or ready
        return [_FLUSH] if ready and self.can_transmit() else []

    # -- polling ---------------------------------------------------------------

    def begin_poll(self, now_s: float) -> list[Action]:
        """A GET arrived. FLUSH means answer it now; otherwise it parks until a FLUSH."""
        # engine.io polling.ts onPollRequest: "overlap from client". (ref: the parked GET gets `1`,
        # this one 400 with no body and no Content-Type, then the sid is unknown.)
        refused = self._refuse_if(self.poll_parked, "overlap from client")
        if refused is not None:
            return refused
        self.poll_parked = True
        if self.state is EioState.CLOSING:
            # (ref: after a server-side close, e.g. a bad Socket.IO packet, the next GET gets `6\x1e1`.)
            self._poll_final = "1" if self.outbox.has_data() else "6" + EIO_SEPARATOR + "1"
            self._end()
            return [_FLUSH]
        if self.state is EioState.UPGRADING or self.outbox.has_data():
            return [_FLUSH]  # during an upgrade a GET never parks: it gets data or a noop
        return []

    def take_poll_payload(self) -> str:
        """The body for the parked GET: everything queued, or a noop; un-parks it."""
        items = [item if isinstance(item, str) else encode_eio_binary(item)
                 for item in self.outbox.take_control()]
        items.extend(update.text for update in self.outbox.take_updates(conflate=False))
        if self._poll_final is not None:
            items.append(self._poll_final)
            self._poll_final = None
        self.poll_parked = False
        return encode_eio_payload(items) if items else encode_eio(EioType.NOOP)

    def take_poll_payload_of(self, updates: list[EioUpdate]) -> str:
        """The body for the parked GET of a session with nothing queued: ``updates``, handed over
        without being queued (the Hub's fast path); un-parks it."""
        self.poll_parked = False
        return updates[0].text if len(updates) == 1 else encode_eio_payload([update.text for update in updates])

    def abort_poll(self, now_s: float) -> list[Action]:
        """The client dropped the connection of its parked GET (engine.io: "poll connection closed prematurely")."""
        if not self.poll_parked or self.closed:
            return []
        self.poll_parked = False
        return self._abort("poll connection closed prematurely", None)

    def begin_post(self, now_s: float) -> list[Action]:
        """A POST's head arrived; its body is still to come (engine.io polling.ts onDataRequest)."""
        # (ref: "data request overlap from client": this POST gets 400 with no body, the session
        # closes, and the POST whose body is still arriving has its connection destroyed.)
        refused = self._refuse_if(self.post_in_flight, "data request overlap from client")
        if refused is not None:
            return refused
        self.post_in_flight = True
        return []

    def end_post(self, complete: bool, now_s: float) -> list[Action]:
        """The POST's body was read whole, or its client went away first (ref: the session closes)."""
        self.post_in_flight = False
        if complete or self.state is EioState.CLOSED:
            return []
        return self._abort("data request connection closed prematurely", "1")

    def receive_post(self, body: str, now_s: float) -> list[Action]:
        """Packets from a POST body; those before an invalid one count, then the session closes."""
        if self.closed:
            return []  # engine.io ignores packets once the socket is not "open" (ref: the POST still gets "ok")
        actions: list[Action] = []
        try:
            for pkt in iter_eio_payload(body):
                actions.extend(self.receive_packet(pkt, now_s))
                if self.closed:
                    break
        except EioProtocolError:
            actions.extend(self._abort("parse error", "1"))
        return actions

    # -- packets from the session's transport ------------------------------------

    def receive_packet(self, pkt: EioPacket, now_s: float) -> list[Action]:
        """One packet from the client on the session's own transport."""
        if self.closed:
            return []
        if self.pong_deadline is not None and pkt.kind is not EioType.PONG and not self._ping_refreshed:
            # engine.io 6.6 socket.ts (hasRefreshedPingTimeout): any packet while a pong is awaited
            # restarts the pong timer once, so a busy client whose pong sits behind data is not cut off.
            self.pong_deadline, self._ping_refreshed = now_s + self.ping_timeout_s, True
        kind = pkt.kind
        if kind is EioType.MESSAGE:
            if self.inbound is not None and not self.inbound.spend(now_s):
                return self._abort(INBOUND_RATE_REASON, "1")  # one client's flood must not slow the others
            return [(Act.DELIVER, pkt.data)]
        if kind is EioType.PONG:
            # engine.io clears the timeout and restarts the interval from the pong.
            self.pong_deadline, self.next_ping_at = None, now_s + self.ping_interval_s
            return []
        if kind is EioType.CLOSE:
            # (ref: polling, the parked GET gets `6`.) Over WebSocket engine.io 6.6 ignores `1` and waits
            # for the socket to close (ref: no answer, then a ping timeout); we follow the spec: close now.
            self.outbox.clear()
            return self._end_with("transport close", "6")
        if kind is EioType.PING:
            # v4 heartbeats go server -> client only (ref: `2` or `2probe` on a session closes it, 1005).
            return self._abort("transport error", "1")
        return []  # OPEN, UPGRADE, NOOP (ref: `0`, `5`, `6`, `3probe` are ignored on a session)

    def receive_pings(self, count: int, now_s: float) -> list[Action]:
        """WebSocket ping frames (the transport answers them): they cost the client's budget like
        packets, or a client that pings without end makes the server answer without end."""
        if self.closed or self.inbound is None or self.inbound.spend(now_s, count):
            return []
        return self._abort(INBOUND_RATE_REASON, "1")

    # -- upgrade (spec §Upgrade) ----------------------------------------------------

    def begin_upgrade(self, now_s: float) -> bool:
        """A WebSocket with this sid was accepted; False when it must be closed (not polling)."""
        if self.state is not EioState.POLLING:
            return False  # already probing/upgraded: the reference accepts the socket then closes it
        self.state, self.upgrade_deadline = EioState.PROBING, now_s + EIO_UPGRADE_TIMEOUT_S
        return True

    def receive_probe_packet(self, pkt: EioPacket, now_s: float) -> list[Action]:
        """One packet on the probing WebSocket: `2probe`, then `5`; anything else drops the probe."""
        if self.state not in (EioState.PROBING, EioState.UPGRADING):
            return [(Act.CLOSE_PROBE, None)]
        if pkt.kind is EioType.PING and pkt.data == "probe":
            self.state = EioState.UPGRADING
            # Release the parked GET so the client can pause polling (ref: it gets `6` within 100 ms).
            return [(Act.PROBE_PONG, None), _FLUSH] if self.poll_parked else [(Act.PROBE_PONG, None)]
        if pkt.kind is EioType.UPGRADE:
            actions: list[Action] = []
            if self.poll_parked:
                # `5` without a probe while a GET is parked: release it (with whatever is queued),
                # before the switch so the FLUSH still targets the GET.
                actions.append(_FLUSH)
            self.state, self.upgrade_deadline = EioState.WEBSOCKET, None
            actions.append((Act.UPGRADED, None))
            return actions
        self.state, self.upgrade_deadline = EioState.POLLING, None
        return [(Act.CLOSE_PROBE, None)]

    def end_probe(self, now_s: float) -> list[Action]:
        """Give up the probe (it closed, or sent garbage); the session stays on polling."""
        if self.state not in (EioState.PROBING, EioState.UPGRADING):
            return []
        self.state, self.upgrade_deadline = EioState.POLLING, None
        return [(Act.CLOSE_PROBE, None)]

    # -- closing -------------------------------------------------------------------

    def close(self, reason: str, now_s: float) -> list[Action]:
        """Server-side close: what is queued still goes out, then the close.

        Polling: a parked GET gets the queue + `1`; otherwise the session waits (CLOSING) for one
        more GET, answered `6\\x1e1` like the reference, for at most EIO_POLL_CLOSE_TIMEOUT_S.
        WebSocket: the shell writes the queue, then a close frame.
        """
        if self.closed:
            return []
        self.close_reason = reason
        self._stop_timers()
        if self.state is not EioState.WEBSOCKET and not self.poll_parked:
            self.state, self.close_deadline = EioState.CLOSING, now_s + EIO_POLL_CLOSE_TIMEOUT_S
            return [(Act.CLOSE, reason)]
        return self._end_with(reason, "1")

    def abort(self, reason: str, now_s: float) -> list[Action]:
        """Close at once, dropping the queue: protocol errors, slow clients, a lost transport."""
        return self._end_now(reason, "1")

    def drop(self, reason: str) -> list[Action]:
        """End at once as if the transport were lost (shutdown): a parked GET gets a noop, not
        `1`, so that clients reconnect (to another instance behind a proxy)."""
        return self._end_now(reason, "6")

    def _end_now(self, reason: str, poll_final: str) -> list[Action]:
        if self.state is EioState.CLOSED:
            return []
        if self.state is EioState.CLOSING:
            self._end()
            return []
        return self._abort(reason, poll_final)

    def _refuse_if(self, overlapping: bool, reason: str) -> list[Action] | None:
        """None when a GET or POST may go on; else what answers it: nothing on a closed session,
        and for a second one while the first is under way, a refusal and the session's end."""
        if self.state is EioState.CLOSED:
            return []
        if overlapping:
            return [(Act.REJECT_REQUEST, None), *self._abort(reason, "1")]
        return None

    def _abort(self, reason: str, poll_final: str | None) -> list[Action]:
        """Close at once, dropping the queue (ping timeout, protocol error, slow client)."""
        self.outbox.clear()
        return self._end_with(reason, poll_final)

    def _end_with(self, reason: str, poll_final: str | None) -> list[Action]:
        self.close_reason = reason
        parked = self.poll_parked and self.state is not EioState.WEBSOCKET
        if parked and poll_final is not None:
            self._poll_final = poll_final
        self._end()
        return [_FLUSH, (Act.CLOSE, reason)] if parked else [(Act.CLOSE, reason)]

    def _end(self) -> None:
        self.state = EioState.CLOSED
        self._stop_timers()
        self.close_deadline = None

    def _stop_timers(self) -> None:
        self.next_ping_at = self.pong_deadline = self.upgrade_deadline = None
        self.outbox.drop_held()


class SioClientState:
    """Socket.IO state of one Engine.IO connection: decoder, joined namespaces, connect timeout.

    `receive` enforces the reference's rules (socket.io client.ts ondecoded): CONNECT only for a
    namespace not joined yet, every other packet only for a joined one, never CONNECT_ERROR from
    a client; a violation is a protocol error that closes the connection.
    """

    __slots__ = ("decoder", "namespaces", "connect_deadline", "held")

    def __init__(self, now_s: float, connect_timeout_s: float = SIO_CONNECT_TIMEOUT_S,
                 max_pending_bytes: int = 1_000_000, held: HeldBytes | None = None) -> None:
        self.decoder = SioDecoder(max_pending_bytes=max_pending_bytes)  # packet reassembly for this connection
        self.namespaces: dict[str, Any] = {}             # joined namespace -> the layer above's socket
        self.connect_deadline: float | None = now_s + connect_timeout_s  # None once a namespace is joined
        self.held = held                                 # the attachments' share of the server's held bytes

    def receive(self, data: str | bytes, now_s: float = 0.0) -> SioPacket | None:
        """Decode one Engine.IO message; a complete, allowed packet or None (attachments pending).

        Raises:
            SioProtocolError: malformed, or not allowed in the current state.
        """
        pkt = self.decoder.feed(data, now_s)
        if self.held is not None and not self.held.hold(self.decoder.pending_bytes):
            raise HeldBytesRefused(f"attachments of {self.decoder.pending_bytes} bytes while the server holds "
                                   f"{self.held.budget.used_bytes} bytes of unfinished messages")
        if pkt is None:
            return None
        joined = pkt.namespace in self.namespaces
        if pkt.kind is SioType.CONNECT:
            if joined:
                raise SioProtocolError("already connected to " + pkt.namespace)
            return pkt
        if pkt.kind is SioType.CONNECT_ERROR or not joined:
            raise SioProtocolError(f"invalid state (packet type {pkt.kind.name})")
        return pkt

    def joined(self, namespace: str, socket: Any) -> None:
        self.namespaces[namespace] = socket
        self.connect_deadline = None

    def left(self, namespace: str) -> Any:
        return self.namespaces.pop(namespace, None)

    def connect_expired(self, now_s: float) -> bool:
        return self.connect_deadline is not None and now_s >= self.connect_deadline and not self.namespaces

    def attachments_overdue(self, now_s: float) -> bool:
        """A binary packet waits for attachments since SIO_ATTACHMENT_TIMEOUT_S or longer."""
        since = self.decoder.pending_since_s
        return since is not None and now_s - since >= SIO_ATTACHMENT_TIMEOUT_S


# -- connection state recovery: what a client that comes back missed --------------------------------


class RecoveryLog:
    """The symbol of each published update by its offset (the fan-out's publish sequence number,
    from 1), for the last RECOVERY_LOG_UPDATES: how a missed update is found again in its symbol's
    history ring, with no copy of it kept per client.  Pure; allocated only when recovery is on."""

    def __init__(self, capacity: int = RECOVERY_LOG_UPDATES) -> None:
        self.capacity = capacity                          # offsets remembered
        self.symbol_at = np.zeros(capacity, np.uint16)    # offset k's symbol index, at (k - 1) % capacity
        self.last = 0                                     # the newest offset given out
        self.names: list[str] = []                        # symbol index -> symbol (those the feed ever
                                                          # streamed: the exchange lists thousands, far under 65,536)
        self.index: dict[str, int] = {}                   # symbol -> symbol index

    def record(self, symbol: str) -> int:
        """The next update is of ``symbol``: its offset."""
        i = self.index.get(symbol)
        if i is None:
            i = self.index[symbol] = len(self.names)
            self.names.append(symbol)
        self.symbol_at[self.last % self.capacity] = i
        self.last += 1
        return self.last

    @property
    def oldest_after(self) -> int:
        """The oldest offset a client may come back with (the updates after it are all known)."""
        return max(0, self.last - self.capacity)

    def symbols(self, after: int, upto: int) -> np.ndarray:
        """Symbol indices of offsets after+1 .. upto, oldest first."""
        if upto <= after:
            return self.symbol_at[:0]
        a, b = after % self.capacity, upto % self.capacity
        if upto - after == self.capacity or b <= a:
            return np.concatenate((self.symbol_at[a:], self.symbol_at[:b]))
        return self.symbol_at[a:b]


RECOVERY_MARK_LISTED_KEYS = 8  # a mark lists this many held keys at most; beyond, a bit mask is shorter and cheaper
_RECOVERY_MARK = re.compile(r"([0-9]{1,19})(?:((?:\.[0-9]{1,5}){0,%d})|\.x([0-9a-f]{1,16384}))" % RECOVERY_MARK_LISTED_KEYS)


def recovery_mark(offset: int, held_mask: int) -> str:
    """A client's position in the update stream, the last argument of what it is sent: every update
    up to ``offset`` it takes has reached it, except that each key whose bit is set in ``held_mask``
    (bit = its RecoveryLog symbol index: keys held back by maxRate) is still owed its newest update
    up to there.  Without held keys it is the offset itself, as the reference's offsets are; with a
    few, "<offset>.<slot>.<slot>"; with more, "<offset>.x<mask in hex>"."""
    if not held_mask:
        return str(offset)
    if held_mask.bit_count() > RECOVERY_MARK_LISTED_KEYS:
        return f"{offset}.x{held_mask:x}"
    slots = []
    while held_mask:
        low = held_mask & -held_mask
        slots.append(f".{low.bit_length() - 1}")
        held_mask ^= low
    return str(offset) + "".join(slots)


def parse_recovery_mark(mark: str, symbols: int) -> tuple[int, tuple[int, ...]] | None:
    """(offset, held slots) of a mark a client came back with; None if it is not one we give
    (``symbols``: how many the RecoveryLog knows)."""
    match = _RECOVERY_MARK.fullmatch(mark)
    if match is None:
        return None
    if match[3] is not None:
        mask = int(match[3], 16)
        if mask.bit_length() > symbols or mask.bit_count() <= RECOVERY_MARK_LISTED_KEYS:
            return None
        slots = tuple(i for i in range(mask.bit_length()) if mask >> i & 1)
    else:
        slots = tuple(int(slot) for slot in match[2].split(".")[1:])
        if len(set(slots)) != len(slots) or any(slot >= symbols for slot in slots):
            return None
    return int(match[1]), slots


def recover_updates(log: RecoveryLog, history: BboHistory, after: int, upto: int, keys: frozenset[str] | None,
                    max_rate: float | None, max_updates: int, held: Sequence[int] = (),
                    prefix: str = '42["bbo_update",') -> tuple[list[str], int]:
    """The packets of the updates a client with this filter and rate took or would have taken
    after the mark (``after``, ``held``: see recovery_mark) up to offset ``upto``, in their order,
    each with its own mark, and how many were skipped.

    Each update's row is the n-th newest of its symbol's ring, n counted in ``log`` (every
    published update is one row, appended when published); a held key's row is the one before
    its first after ``after``, and goes first.  With ``max_rate``, the outbox's rule runs over the
    receive times: an update goes if its symbol's previous one that went is at least 1/max_rate
    older, and each symbol's last one goes.  Beyond ``max_updates`` (or RECOVERY_MAX_BYTES, or
    rows the rings no longer hold) only the newest of each symbol goes, and the count of the
    others is ``skipped``.  Pure (moves pending rows to the rings, as any read does)."""
    history.flush()
    syms = log.symbols(after, upto)
    later = np.bincount(log.symbols(upto, log.last), minlength=len(log.names))
    if keys is None:
        pos = np.arange(len(syms))
    else:
        wanted = [log.index[key] for key in keys if key in log.index]
        pos = np.flatnonzero(np.isin(syms, np.asarray(wanted, np.uint16)))
    owed = {slot for slot in held if keys is None or log.names[slot] in keys}
    owner = syms[pos]
    # symbol index -> (history, its first row, candidate positions: -1 for the held row, then offset - after - 1)
    rows: dict[int, tuple[SymbolHistory, int, np.ndarray]] = {}
    lost = False
    for i in sorted(set(np.unique(owner).tolist()) | owed):
        hist = history.symbols.get(log.names[i])
        mine = pos[owner == i]
        if i in owed:
            mine = np.concatenate(([-1], mine))
        if hist is None:
            lost = True
            continue
        first = hist.raw.total - int(later[i]) - len(mine)
        if first < hist.raw.first:
            lost = True
        rows[i] = (hist, first, mine)
    candidates = sum(len(mine) for _, _, mine in rows.values())
    gap = lost or candidates > max_updates
    if gap:
        keep = {i: np.array([len(mine) - 1]) for i, (hist, first, mine) in rows.items()
                if first + len(mine) - 1 >= hist.raw.first}
    else:
        keep = {}
        for i, (hist, first, mine) in rows.items():
            if max_rate is None:
                keep[i] = np.arange(len(mine))
                continue
            recv = hist.raw.take(first, first + len(mine), ["recv_ms"])["recv_ms"].tolist()
            interval_ms, due, chosen = 1000.0 / max_rate, -math.inf, []
            for k, at in enumerate(recv):
                if at >= due or k == len(recv) - 1:
                    chosen.append(k)
                    due = at + interval_ms
            keep[i] = np.asarray(chosen)
    # Every candidate in order, (position, symbol, its JSON if it goes, else None): a skipped one
    # leaves its symbol owed (in the marks) until the next one of it goes.
    events: list[tuple[int, int, str | None]] = []
    for i, chosen in keep.items():
        hist, first, mine = rows[i]
        base = max(first, hist.raw.first)  # (rows gone from the ring are never chosen)
        cols = {name: col[chosen - (base - first)] for name, col in hist.raw.take(base, first + len(mine)).items()}
        events.extend(zip(mine[chosen].tolist(), itertools.repeat(i), rows_to_json_objects(cols, log.names[i])))
        if not gap and len(chosen) < len(mine):
            skipped_at = np.ones(len(mine), bool)
            skipped_at[chosen] = False
            events.extend((at, i, None) for at in mine[skipped_at].tolist())
    events.sort(key=lambda event: (event[0], event[2] is not None))
    pending = 0  # bit i: symbol i owed (recovery_mark)
    for i in owed if not gap else [i for i in owed if i in keep and len(rows[i][2]) == 1]:
        pending |= 1 << i
    out = []
    for at, i, obj in events:
        if obj is None:
            pending |= 1 << i
            continue
        pending &= ~(1 << i)
        out.append(f'{prefix}{obj},"{recovery_mark(after + 1 + at if at >= 0 else after, pending)}"]')
    if not gap and sum(map(len, out)) > RECOVERY_MAX_BYTES:
        return recover_updates(log, history, after, upto, keys, max_rate, 0, held, prefix)
    return out, candidates - len(out) if gap else 0


class RecoverySession(NamedTuple):
    """What a disconnected client gets back if it reconnects in time with its pid."""
    sid: str                         # its Socket.IO sid
    keys: frozenset[str] | None      # its symbol filter
    max_rate: float | None           # its maxRate
    disconnected_s: float            # when it left (monotonic)


class RecoverySessions:
    """Disconnected sessions by pid, for ``window_s`` (at most RECOVERY_MAX_SESSIONS: the oldest
    goes).  A pid is taken once: a second client with it gets a new session.  Pure."""

    def __init__(self, window_s: float, max_sessions: int = RECOVERY_MAX_SESSIONS) -> None:
        self.window_s = window_s
        self.max_sessions = max_sessions
        self._by_pid: dict[str, RecoverySession] = {}  # in the order they left

    def __len__(self) -> int:
        return len(self._by_pid)

    def keep(self, pid: str, session: RecoverySession) -> None:
        self._expire(session.disconnected_s)
        self._by_pid.pop(pid, None)
        self._by_pid[pid] = session
        while len(self._by_pid) > self.max_sessions:
            del self._by_pid[next(iter(self._by_pid))]

    def take(self, pid: str, now_s: float) -> RecoverySession | None:
        self._expire(now_s)
        return self._by_pid.pop(pid, None)

    def _expire(self, now_s: float) -> None:
        while self._by_pid:
            pid, session = next(iter(self._by_pid.items()))
            if session.disconnected_s + self.window_s > now_s:
                return
            del self._by_pid[pid]


# -- replay: which recorded rows a /replay client gets next, and when ---------------------------------


class ReplayRequest(NamedTuple):
    """A /replay client's CONNECT `auth` (parse_replay_auth)."""
    symbols: tuple[str, ...]
    from_ms: int
    to_ms: int
    speed: float           # replay ms per wall ms; 0 = as fast as the client reads
    clock: str             # "server": paced by serverTimestamp; "exchange": by T, else E


def _replay_number(auth: dict, key: str, default: Any, lo: float, hi: float, integer: bool) -> Any:
    value = auth.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (integer and value != int(value)) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{key} must be {kind} from {lo:g} to {hi:g}")
    return int(value) if integer else float(value)


def parse_replay_auth(auth: Any, history: BboHistory) -> ReplayRequest:
    """The replay a client asks for: ``{"symbols": [...], "from": ms, "to": ms, "speed": 10,
    "clock": "server"}`` (speed 1 and clock "server" by default; other keys, e.g. `token`, ignored).

    Raises:
        ValueError: with the message the client gets in its CONNECT_ERROR.
    """
    if not isinstance(auth, dict):
        raise ValueError("auth must be an object")
    raw = auth.get("symbols")
    if not isinstance(raw, list) or not 1 <= len(raw) <= REPLAY_MAX_SYMBOLS or \
            not all(isinstance(name, str) and _SYMBOL_RE.match(name) for name in raw):
        raise ValueError(f"symbols must be a list of 1 to {REPLAY_MAX_SYMBOLS} symbol names")
    symbols = tuple(dict.fromkeys(name.upper() for name in raw))
    unknown = [name for name in symbols if name not in history.symbols]
    if unknown:
        raise ValueError(f"no recorded data for {', '.join(unknown[:5])}")
    start = _replay_number(auth, "from", None, 0, MAX_TIME_MS, True)
    end = _replay_number(auth, "to", None, 0, MAX_TIME_MS, True)
    if start > end:
        raise ValueError("from must not be after to")
    speed = _replay_number(auth, "speed", 1, 0, REPLAY_MAX_SPEED, False)
    clock = auth.get("clock", "server")
    if clock not in ("server", "exchange"):
        raise ValueError('clock must be "server" or "exchange"')
    if clock == "exchange":
        for name in symbols:
            hist = history.symbols[name]
            a, b = hist.raw_bounds(start - REPLAY_EXCHANGE_SLACK_MS, end + REPLAY_EXCHANGE_SLACK_MS)
            probe = {k: v for k, v in hist.raw.take(a, min(b, a + 1)).items()}
            latest = hist.latest
            if (len(probe["recv_ms"]) and not exchange_times(probe)[2][0]) or (
                    latest is not None and latest.latency_ms is None and latest.transaction_ms is None):
                raise ValueError(f'clock "exchange" needs exchange times: {name} has none (spot sends no E or T)')
    return ReplayRequest(symbols, start, end, speed, clock)


class ReplayChunk(NamedTuple):
    """Rows of several symbols merged in time order, not yet sent."""
    keys: np.ndarray        # each row's replay time (ms), non-decreasing
    texts: list[str]        # each row's Engine.IO packet: 42/replay,["bbo_update",{...,"replay":true}]
    symbols: np.ndarray     # each row's symbol, as an index into ReplayCursor.symbols


class ReplayCursor:
    """Where a replay stands in each symbol's raw ring, and the next rows of all of them merged by
    time.  Pure: reads the rings (absolute row indices stay valid while they grow), never the clock.

    Keys: clock "server" is serverTimestamp (the rings' order); clock "exchange" is T (else E), made
    non-decreasing per symbol by a running maximum, so that a symbol's rows keep their recorded
    order and pacing never goes back.
    """

    def __init__(self, history: BboHistory, request: ReplayRequest, prefix: str) -> None:
        self.hists = [history.symbols[name] for name in request.symbols]
        self.symbols = request.symbols
        self.request = request
        self.prefix = prefix                       # the packet's start, up to the update object
        self.pos: list[int] = []                   # per symbol: the next ring row
        self.end: list[int] = []                   # per symbol: the row after the range's last
        self.floor: list[int] = []                 # per symbol: the running maximum of its keys so far
        self.seek(request.from_ms)

    def seek(self, time_ms: int) -> None:
        """Start again at the first row at or after ``time_ms`` (within the range)."""
        req = self.request
        slack = REPLAY_EXCHANGE_SLACK_MS if req.clock == "exchange" else 0
        start = self.start_ms = max(req.from_ms, time_ms)  # clock "exchange": rows keyed before it are skipped
        self.pos, self.end, self.floor = [], [], []
        for hist in self.hists:
            a, b = hist.raw_bounds(start - slack, req.to_ms + slack)
            self.pos.append(a)
            self.end.append(b)
            self.floor.append(-INT64_MAX)

    def _keys(self, i: int, cols: dict[str, np.ndarray]) -> np.ndarray:
        if self.request.clock == "server":
            return cols["recv_ms"]
        _, txn, _ = exchange_times(cols)
        return np.maximum.accumulate(np.maximum(txn, self.floor[i]))

    def peek(self, max_rows: int = REPLAY_CHUNK_ROWS) -> ReplayChunk | None:
        """The next rows (at most about ``max_rows``), merged; None when the range is done."""
        req = self.request
        parts: list[tuple[int, np.ndarray, dict[str, np.ndarray]]] = []
        bound, bounding = math.inf, -1
        per_symbol = max(1, max_rows // max(1, len(self.hists)))
        for i, hist in enumerate(self.hists):
            self.pos[i] = max(self.pos[i], hist.raw.first)  # rows that left the ring meanwhile are gone
            a, b = self.pos[i], min(self.end[i], self.pos[i] + per_symbol)
            if a >= b:
                continue
            cols = hist.raw.take(a, b)
            keys = self._keys(i, cols)
            if req.clock == "exchange":  # the slack brought rows outside the range: skip or stop at them
                skip = int(np.searchsorted(keys, self.start_ms, "left"))
                stop = int(np.searchsorted(keys, req.to_ms, "right"))
                if stop < len(keys):
                    self.end[i] = a + stop
                if skip:
                    self.pos[i] = a + skip
                    return self.peek(max_rows)
                keys, cols = keys[:stop], {k: v[:stop] for k, v in cols.items()}
                if not len(keys):
                    continue
            if a + len(keys) < self.end[i] and int(keys[-1]) < bound:
                bound, bounding = int(keys[-1]), i  # this symbol has more: nothing later may go first
            parts.append((i, keys, cols))
        if not parts:
            return None
        all_keys, texts, owners = [], [], []
        for i, keys, cols in parts:
            # Rows of one ms go in the order the symbols were asked for: a later symbol's rows at the
            # bound wait, the bounding symbol may have more of them beyond its chunk.
            n = len(keys) if bound == math.inf else int(np.searchsorted(keys, bound, "right" if i <= bounding else "left"))
            all_keys.append(keys[:n])
            texts.extend(self.prefix + obj for obj in rows_to_json_objects(
                {k: v[:n] for k, v in cols.items()}, self.symbols[i], ',"replay":true}]'))
            owners.append(np.full(n, i, np.int32))
        keys = np.concatenate(all_keys)
        owner = np.concatenate(owners)
        order = np.argsort(keys, kind="stable")
        return ReplayChunk(keys[order], [texts[j] for j in order.tolist()], owner[order])

    def advance(self, chunk: ReplayChunk, count: int) -> None:
        """The first ``count`` rows of ``chunk`` were sent."""
        for i, n in enumerate(np.bincount(chunk.symbols[:count], minlength=len(self.hists)).tolist()):
            self.pos[i] += n
        if count:
            last = int(chunk.keys[count - 1])
            self.floor = [max(f, last) if self.request.clock == "exchange" else f for f in self.floor]

    def outages(self) -> list[tuple[int, dict[str, Any]]]:
        """(start, outage with its symbol) of every recorded outage that begins in the range, by start."""
        req = self.request
        found = [(o["start"], {"symbol": hist.symbol, **o}) for hist in self.hists
                 for o in hist.outages_in(req.from_ms, req.to_ms) if o["start"] >= req.from_ms]
        return sorted(found, key=lambda item: item[0])


class ReplayPacer:
    """Replay time against wall time: the position moves at ``speed`` while playing (speed 0: it is
    where the last row sent was).  Pure: every call takes the monotonic ``now_s``."""

    def __init__(self, position_ms: float, speed: float, now_s: float) -> None:
        self.speed = speed
        self.paused = False
        self._anchor_ms = position_ms   # the position at...
        self._anchor_s = now_s          # ...this wall time

    def position(self, now_s: float) -> float:
        if self.paused or not self.speed:
            return self._anchor_ms
        return self._anchor_ms + (now_s - self._anchor_s) * 1000.0 * self.speed

    def wall_at(self, position_ms: float) -> float:
        """When (monotonic s) the position reaches ``position_ms``; now for speed 0."""
        if not self.speed:
            return self._anchor_s
        return self._anchor_s + (position_ms - self._anchor_ms) / 1000.0 / self.speed

    def reached(self, position_ms: float, now_s: float) -> None:
        """Speed 0: the last row sent was at ``position_ms``."""
        self._anchor_ms, self._anchor_s = position_ms, now_s

    def _rebase(self, now_s: float) -> None:
        self._anchor_ms, self._anchor_s = self.position(now_s), now_s

    def pause(self, now_s: float) -> None:
        self._rebase(now_s)
        self.paused = True

    def resume(self, now_s: float) -> None:
        self._rebase(now_s)
        self.paused = False

    def seek(self, position_ms: float, now_s: float) -> None:
        self._anchor_ms, self._anchor_s = position_ms, now_s

    def set_speed(self, speed: float, now_s: float) -> None:
        self._rebase(now_s)
        self.speed = speed


# ===========================================================================
# ======================  I/O below this line  ===============================
# ===========================================================================
# Everything below awaits, reads the clock, or touches sockets and files.

_WALL_ANCHOR_NS = time.time_ns() - time.monotonic_ns()


def now_ms() -> int:
    """Epoch ms from the monotonic clock anchored at start: never goes back, so the history
    stays sorted even if NTP steps the wall clock (slews still apply to both clocks)."""
    return (time.monotonic_ns() + _WALL_ANCHOR_NS) // 1_000_000


def now_ms_fine() -> float:
    """now_ms with the fraction: the same clock, for round trips shorter than a millisecond."""
    return (time.monotonic_ns() + _WALL_ANCHOR_NS) / 1_000_000


class LogOnce:
    """Log the first problem of each kind at WARNING, the rest at DEBUG; count all of them
    (a misbehaving peer must not flood the log: engineio's `_log_error_once` idea)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.counts: collections.Counter[str] = collections.Counter()

    def __call__(self, kind: str, message: str, *args: Any) -> None:
        self.counts[kind] += 1
        if self.counts[kind] == 1:
            self.logger.warning(message + " (further ones of this kind are logged at DEBUG)", *args)
        elif self.logger.isEnabledFor(logging.DEBUG):
            self.logger.debug(message, *args)


_log_once = LogOnce(log)  # client-caused problems (Engine.IO / Socket.IO peers)

LOG_SID_CHARS = 6  # of a 20-character sid: enough to tell sessions apart in a log, useless as a credential
_SID_IN_QUERY_RE = re.compile(r"((?:^|[?&])sid=[^&]{0,%d})[^&]*" % LOG_SID_CHARS)


def short_sid(sid: str) -> str:
    """An Engine.IO sid for a log line: the sid is a polling session's only credential, so a log
    reader must not be able to take the session over."""
    return sid[:LOG_SID_CHARS] + "…"


def loggable_target(target: str) -> str:
    """A request target for a log line: its `sid` parameter cut to a short prefix (see short_sid)."""
    return _SID_IN_QUERY_RE.sub(r"\1…", target[:200]) if "sid=" in target else target[:200]


# ###########################################################################
# §11 Binance feed
# ###########################################################################
# Owns: the exchange connections (one per shard of symbols) and the threads that read their
# sockets, their watchdog, 24 h rotation (make-before-break), reconnect backoff, outage
# recording, the feed status, symbols added and removed while running, and the exchange's
# REST time (the clock offset).


class FeedSocketReader:
    """Reads one exchange socket on a thread of its own, so that its bytes are read, and their
    receive time taken, as they arrive, even while the event loop runs a fan-out pass; the loop
    then parses them in order (``deliver``).  (The thread needs the interpreter lock to take the
    time: within the switch interval, 5 ms, of a busy loop; later only behind one long call that
    holds the lock.)  The asyncio transport keeps the writing, the closing and (TLS) the
    decryption: only the reading moves here.  At most FEED_READ_AHEAD_BYTES wait for the loop,
    and the transport's flow control (websockets' max_queue) pauses this reader instead of the
    selector."""

    def __init__(self, raw: asyncio.Transport, on_read: Callable[[int], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self.raw = raw                        # the socket's asyncio transport (writes, closes)
        self._protocol = raw.get_protocol()   # the transport's reader: the WebSocket, or the TLS layer
        self._on_read = on_read               # told each chunk's read time (epoch ms) before it is parsed
        self._fd = os.dup(raw.get_extra_info("socket").fileno())  # ours: its number is never another socket's
        self._wake_r, self._wake_w = os.pipe()  # stop() closes the write end: the thread's poll wakes
        self._state = threading.Condition()   # guards the three below
        self._waiting_bytes = 0               # read, not yet parsed by the loop
        self._paused = False                  # the transport's flow control says stop
        self.stopped = False
        raw.pause_reading()                   # the selector no longer reads it; from now on pausing is ours
        raw.pause_reading = self.pause        # type: ignore[method-assign]  # (asyncio's TLS layer looks
        raw.resume_reading = self.resume      # type: ignore[method-assign]  # them up when it calls them)
        self._thread = threading.Thread(target=self._run, name="feed-reader", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, protocol: asyncio.BaseProtocol, on_read: Callable[[int], None]) -> FeedSocketReader | None:
        """A reader for the socket under ``protocol``'s transport (through asyncio's TLS layer when
        there is one), or None where there is no plain selector socket to read (the loop reads)."""
        transport = getattr(protocol, "transport", None)
        raw = getattr(getattr(transport, "_ssl_protocol", None), "_transport", transport)  # (no public way down)
        if not isinstance(raw, asyncio.Transport) or raw.is_closing() or raw.get_extra_info("socket") is None \
                or not hasattr(raw, "_sock_fd"):
            return None
        return cls(raw, on_read)

    # -- the loop's side -------------------------------------------------------------------

    def pause(self) -> None:
        with self._state:
            self._paused = True

    def resume(self) -> None:
        with self._state:
            self._paused = False
            self._state.notify()

    def stop(self) -> None:
        """The connection is gone (idempotent): the thread ends and closes its descriptors."""
        if self.stopped:
            return
        with self._state:
            self.stopped = True
            self._state.notify()
        os.close(self._wake_w)

    def _deliver(self, data: bytes, read_ms: int) -> None:
        with self._state:
            self._waiting_bytes -= len(data)
            self._state.notify()
        if self.stopped or self.raw.is_closing():
            return
        self._on_read(read_ms)
        protocol = self._protocol
        try:
            if isinstance(protocol, asyncio.BufferedProtocol):  # (asyncio's TLS layer)
                view = memoryview(data)
                while view:
                    buf = protocol.get_buffer(len(view))
                    n = min(len(buf), len(view))
                    buf[:n] = view[:n]
                    protocol.buffer_updated(n)
                    view = view[n:]
            else:
                protocol.data_received(data)  # type: ignore[attr-defined]
        except Exception as exc:  # as asyncio's own reading does: the connection ends, the feed reconnects
            log.warning("feed: reading the exchange's connection failed: %s", describe_error(exc))
            self.raw.abort()

    def _eof(self) -> None:
        if not self.raw.is_closing() and not self._protocol.eof_received():  # type: ignore[attr-defined]
            self.raw.close()

    def _failed(self, exc: OSError) -> None:
        if not self.raw.is_closing():
            log.info("feed: the exchange's connection failed: %s", describe_error(exc))
            self.raw.abort()

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while True:
                with self._state:
                    while not self.stopped and (self._paused or self._waiting_bytes >= FEED_READ_AHEAD_BYTES):
                        self._state.wait()
                    if self.stopped:
                        return
                ready = [fd for fd, _ in poller.poll()]
                if self.stopped:
                    return
                if self._fd not in ready:
                    continue
                try:
                    data = os.read(self._fd, FEED_READ_CHUNK_BYTES)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    self._post(self._failed, exc)
                    return
                read_ms = now_ms()
                if not data:
                    self._post(self._eof)
                    return
                with self._state:
                    self._waiting_bytes += len(data)
                if not self._post(self._deliver, data, read_ms):
                    return
        finally:
            os.close(self._fd)
            os.close(self._wake_r)

    def _post(self, callback: Callable[..., None], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
            return True
        except RuntimeError:  # the loop is closed: nobody left to read for
            return False


class FeedConnection(ClientConnection):
    """An exchange WebSocket that notes when each message was read from the socket.

    The receive time (`serverTimestamp`) is the moment the frame was read from the socket: by
    the connection's FeedSocketReader thread once ``read_on_thread`` started it, so a fan-out
    pass under way delays the parsing, never the reading; not the later moment the consumer
    task got to the message."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_ms: deque[int] = deque()  # read time of each message not yet taken, in order
        self._chunk_ms = 0                  # read time of the bytes being parsed
        self._thread_read_ms = 0            # the reader thread's read time of the last chunk it handed over
        self.reader: FeedSocketReader | None = None

    def read_on_thread(self) -> bool:
        """Move the reading of the socket to a FeedSocketReader thread; False where it cannot be."""
        if self.reader is None:
            reader = self.reader = FeedSocketReader.start(self, self._note_thread_read)
            if reader is not None and self.transport is reader.raw:
                # websockets' flow control (max_queue) holds the transport's own pause/resume, taken when
                # the connection was made: resuming that would have the selector read the socket too.
                self.recv_messages.pause, self.recv_messages.resume = reader.pause, reader.resume
        return self.reader is not None

    def _note_thread_read(self, read_ms: int) -> None:
        self._thread_read_ms = read_ms

    def data_received(self, data: bytes) -> None:
        # (TLS: bytes decrypted late, once websockets' queue has room again, were read at the
        # latest by the last chunk the thread read)
        self._chunk_ms = self._thread_read_ms or now_ms()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.reader is not None:
            self.reader.stop()
        super().connection_lost(exc)

    def process_event(self, event: Any) -> None:
        if isinstance(event, Frame) and event.fin and event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            self.read_ms.append(self._chunk_ms)
        super().process_event(event)

    def take_read_ms(self) -> int:
        """The read time of the message just received (now if none was noted)."""
        return self.read_ms.popleft() if self.read_ms else now_ms()


class _Conn:
    """One open exchange connection and its consumer task."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.first_data = asyncio.Event()       # set by the first data message
        self.shutdown_notice = False            # spot serverShutdown seen: rotate now
        self.task: asyncio.Task | None = None   # the consumer
        self.fresh: set[str] | None = None      # after a lost connection: symbols with no data on this one yet


class FeedEditError(BboStreamError):
    """A symbol cannot be added to or removed from the feed; the message says why, for a person."""


class BinanceFeed:
    """Runs the exchange connections; calls ``on_update(bbo)`` for every new update.

    ``symbols``: what to stream (default: SYMBOL); add_symbol/remove_symbol change it while running.
    ``on_symbols``: called with the new list after each change (to remember it across restarts).
    """

    def __init__(self, cfg: Config, history: BboHistory, on_update: Callable[[Bbo], None],
                 on_status: Callable[[], None] = lambda: None, symbols: Sequence[str] | None = None,
                 on_symbols: Callable[[list[str]], Any] = lambda symbols: None) -> None:
        self.cfg = cfg
        self.history = history
        self.on_update = on_update                      # hub publish; must not block
        self.on_status = on_status                      # the feed state changed
        self.on_symbols = on_symbols                    # the symbol list changed (may return an awaitable)
        self.symbols: list[str] = list(cfg.symbols if symbols is None else symbols)  # streamed now, in order
        now = now_ms()
        self.shards = [ShardHealth(s, now) for s in shard_symbols(self.symbols, cfg.feed_streams_per_connection)]
        self.stale_ms = int(cfg.feed_stale_seconds * 1000)
        self.rotate_s = cfg.feed_rotate_hours * 3600
        self.log_once = LogOnce(log)
        self._silent_warned: set[str] = set()
        self._tasks: list[asyncio.Task] = []
        self._last_signature: Any = None
        self._not_before_ms = 0                         # Retry-After: no connection (any shard) before this
        self._last_connect_s = -math.inf                # loop time of the last connection attempt (any shard)
        self._connect_lock = asyncio.Lock()             # one shard at a time takes the next connect slot
        self.symbol_errors: dict[str, tuple[int, Any, str]] = {}  # symbol → (ms, code, msg) of an exchange error
        self._clock_warning: str | None = None          # the clock warning last logged
        self._conns: dict[ShardHealth, _Conn] = {}      # each shard's open connection (for SUBSCRIBE)
        self._edit_lock = asyncio.Lock()                # one symbol change at a time
        self._last_request_s = -math.inf                # loop time of the last SUBSCRIBE/UNSUBSCRIBE
        self._request_id = 0
        self._listed: tuple[float, dict[str, str]] | None = None  # (loop time, symbol → status) of exchangeInfo
        for symbol in self.symbols:
            history.get(symbol)

    # -- status -------------------------------------------------------------------
    def status(self, now_ms: int) -> dict:
        """The feed status object of /healthz and Socket.IO `feed_status` (contract)."""
        self.history.flush()  # crossed books are counted when a batch reaches numpy
        best = min(self.shards, key=lambda s: _STATE_RANK[s.state])
        last = max((s.last_data_ms for s in self.shards if s.last_data_ms is not None), default=None)
        age = None if last is None else now_ms - last
        state, reason = best.state.value, best.reason
        since = best.since_ms
        if state == FeedState.LIVE.value and age is not None and age >= self.stale_ms:
            state, reason, since = FeedState.STALE.value, f"no data for {age // 1000} s", last + self.stale_ms
        symbols = {}
        for symbol in self.symbols:
            hist = self.history.symbols[symbol]
            last_sym = hist.latest.recv_ms if hist.latest else None
            suspect_after = min(self.stale_ms, hist.suspect_after_ms(now_ms))
            symbols[symbol] = {
                "state": symbol_state(last_sym, now_ms, suspect_after, self.stale_ms),
                "suspectAfterMs": suspect_after,
                "lastMessage": last_sym, "messages": hist.accepted, "duplicates": hist.duplicates,
                "crossed": hist.crossed, "uResets": hist.u_resets}
            error = self.symbol_errors.get(symbol)
            if error is not None and (last_sym is None or last_sym < error[0]):  # data since then: it works
                symbols[symbol]["error"] = {"code": error[1], "msg": error[2], "at": error[0]}
        hists = [self.history.symbols[s] for s in self.symbols]
        return {
            "state": state, "reason": reason, "market": self.cfg.market,
            "since": since, "connectedSince": best.connected_since_ms,
            "nextAttempt": best.next_attempt_ms if best.state in (FeedState.BACKOFF, FeedState.FAILED) else None,
            "lastMessageAge": age,
            "messages": sum(s.messages for s in self.shards),
            "reconnects": sum(s.reconnects for s in self.shards),
            "duplicates": sum(h.duplicates for h in hists),
            "parseErrors": sum(s.parse_errors for s in self.shards),
            "crossed": sum(h.crossed for h in hists), "uResets": sum(h.u_resets for h in hists),
            "connections": [s.status(now_ms) for s in self.shards] if len(self.shards) > 1 else None,
            "symbols": symbols,
            "clock": self.history.clock.status(now_ms),
        }

    def metrics(self, now_ms: int) -> list[MetricFamily]:
        status = self.status(now_ms)
        states = [s.value for s in FeedState]
        return [
            MetricFamily("feed_state", "gauge", "1 for the feed's current state",
                         [(f'{{state="{s}"}}', int(status["state"] == s)) for s in states]),
            MetricFamily("feed_connection_state", "gauge",
                         "1 for each exchange connection's current state (connection = shard index)",
                         [(f'{{connection="{i}",state="{s}"}}', int(shard.state.value == s))
                          for i, shard in enumerate(self.shards) for s in states]),
            MetricFamily("feed_reconnects_total", "counter", "Exchange connections opened after the first",
                         [("", status["reconnects"])]),
            MetricFamily("feed_messages_total", "counter", "bookTicker messages received", [("", status["messages"])]),
            MetricFamily("feed_parse_errors_total", "counter", "Exchange messages that could not be parsed",
                         [("", status["parseErrors"])]),
        ]

    def _status_signature(self, now_ms: int) -> tuple:
        status = self.status(now_ms)
        return (status["state"], status["reason"], status["nextAttempt"], tuple(s.state for s in self.shards),
                tuple(status["symbols"]), tuple(s["state"] for s in status["symbols"].values()),
                status["clock"]["source"], status["clock"]["warning"], self.history.clock.rest)  # a REST round

    def notify(self) -> None:
        """Send the feed status if it changed (the state, a symbol's state, the clock)."""
        signature = self._status_signature(now_ms())
        if signature != self._last_signature:
            self._last_signature = signature
            self.on_status()

    # -- lifecycle ------------------------------------------------------------------
    async def run(self) -> None:
        """Run every shard and the per-symbol watchdog until cancelled."""
        self._tasks = [asyncio.create_task(self._run_shard(shard), name=f"feed-{i}")
                       for i, shard in enumerate(self.shards)]
        self._tasks.append(asyncio.create_task(self._watch_symbols(), name="feed-watch"))
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            now = now_ms()
            for shard in self.shards:
                shard._set(FeedState.STOPPED, now, "shutting down")

    async def _watch_symbols(self) -> None:
        """Warn about symbols that never sent data (Binance accepts misspellings silently)
        and push status changes that happen without an event (e.g. going quiet)."""
        while True:
            await asyncio.sleep(FEED_WATCHDOG_TICK_S)
            now = now_ms()
            for symbol in self.symbols:
                hist = self.history.symbols[symbol]
                if (hist.latest is None and hist.subscribed_ms is not None and symbol not in self._silent_warned
                        and now - hist.subscribed_ms >= self.stale_ms):
                    self._silent_warned.add(symbol)
                    log.warning("%s: no data %.0f s after subscribing — is the symbol spelled right and "
                                "listed on %s? (Binance accepts unknown symbols silently)",
                                symbol, self.cfg.feed_stale_seconds, self.cfg.market)
            self._watch_clock(now)
            self.notify()

    def _watch_clock(self, now: int) -> None:
        """Log the clock warning when it appears and when it ends."""
        clock = self.history.clock
        warning = clock.warning(clock.current(now)[0])
        if warning != self._clock_warning:
            if warning is not None:
                log.warning("clock: %s", warning)
            elif self._clock_warning is not None:
                log.info("clock: the local clock is within CLOCK_MAX_OFFSET_MS of the exchange's again")
            self._clock_warning = warning

    async def _run_shard(self, shard: ShardHealth) -> None:
        rng = random.Random()
        opened_before = False
        while shard.symbols:  # a shard whose last symbol was removed ends here
            url = feed_url(self.cfg.feed_base_url, shard.symbols)
            await self._connect_slot()  # before `connecting`: a shard held back by Retry-After still reads backoff
            shard.connecting(now_ms())
            self.notify()
            try:
                conn = await self._open(shard, url, reconnect=opened_before)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every connect failure is retried; never exits the server
                reason, failure = self._connect_failure(exc, url), True
            else:
                opened_before = True
                reason, failure = await self._supervise(shard, conn, url)
            if not shard.symbols:
                return
            now = now_ms()
            for symbol in shard.symbols:
                start = shard.last_data_ms if shard.last_data_ms is not None else now
                self.history.symbols[symbol].begin_outage(start, reason)
            delay = shard.closed(now, reason, failure, self.cfg, rng.random(), self._not_before_ms or None)
            self.notify()
            if delay is None:
                log.error("feed %s: %s; not reconnecting (AUTO_RECONNECT=false)", ",".join(shard.symbols[:3]), reason)
                return
            level = logging.WARNING if failure else logging.INFO
            log.log(level, "feed %s: %s; reconnecting in %.1f s (state %s, %d consecutive failures)",
                    shard_name(shard), reason, delay, shard.state.value, shard.failures)
            await asyncio.sleep(delay)

    def _connect_failure(self, exc: Exception, url: str) -> str:
        """The reason a connection attempt failed; a Retry-After (429, 418) holds back every shard."""
        if isinstance(exc, websockets.exceptions.InvalidStatus):
            now = now_ms()
            not_before = retry_after_ms(exc.response.headers.get("Retry-After"), now)
            if not_before is not None:
                self._not_before_ms = max(self._not_before_ms, not_before)
            return handshake_reason(exc.response.status_code, now, not_before)
        return describe_error(exc, url)

    async def _connect_slot(self) -> None:
        """Wait until a new connection may be opened: FEED_CONNECT_SPACING_S after the last
        attempt of any shard (Binance limits new connections per IP), and not before a
        Retry-After.  Startup, reconnects and rotations all pass here."""
        loop = asyncio.get_running_loop()
        async with self._connect_lock:
            while (wait_s := max(self._last_connect_s + FEED_CONNECT_SPACING_S - loop.time(),
                                 (self._not_before_ms - now_ms()) / 1000)) > 0:
                await asyncio.sleep(wait_s)
            self._last_connect_s = loop.time()

    def _exchange_error(self, shard: ShardHealth, error: FeedError, recv_ms: int) -> None:
        """An error reply: logged with its code and message, and shown on the symbols it
        concerns: the streams its ``msg`` names, or else every stream of its connection (the
        configured streams are in the URL; only symbols added by a client are requested)."""
        text = error.msg.lower()
        named = [s for s in shard.symbols if s.lower() in text]
        for symbol in named or shard.symbols:
            self.symbol_errors[symbol] = (recv_ms, error.code, error.msg)
        self.log_once(f"exchange error {error.code}", "feed %s: exchange error %s: %s (request id %s)",
                      ",".join(named) if named else shard_name(shard), error.code, error.msg, error.request_id)
        self.notify()

    async def _open(self, shard: ShardHealth, url: str, reconnect: bool = False) -> _Conn:
        ws = await ws_connect(url, create_connection=FeedConnection, open_timeout=FEED_OPEN_TIMEOUT_S,
                              max_size=FEED_MAX_MESSAGE_BYTES,
                              ping_interval=FEED_PING_INTERVAL_S, ping_timeout=FEED_PING_TIMEOUT_S,
                              close_timeout=FEED_CLOSE_TIMEOUT_S, max_queue=FEED_MAX_QUEUE_MESSAGES)
        ws.read_on_thread()
        now = now_ms()
        shard.opened(now)
        for symbol in shard.symbols:
            self.history.symbols[symbol].subscribed_ms = now
        log.info("feed %s: connected to %s", shard_name(shard), url if len(url) < 200 else url[:200] + "…")
        conn = _Conn(ws)
        if reconnect:  # the old connection is gone: `u` going back on this one is an exchange reset
            conn.fresh = set(shard.symbols)
        conn.task = asyncio.create_task(self._consume(shard, conn))
        return conn

    async def _consume(self, shard: ShardHealth, conn: _Conn) -> str:
        """Read one connection until it closes; returns why it closed."""
        history, on_update, fresh = self.history, self.on_update, conn.fresh
        try:
            async for message in conn.ws:
                recv = conn.ws.take_read_ms()
                try:
                    item = parse_feed_message(message, recv)
                except FeedMessageError as exc:
                    shard.parse_errors += 1
                    self.log_once(exc.kind, "feed: malformed message (%s): %s", exc.kind, exc.detail)
                    continue
                if type(item) is Bbo:
                    was_live = shard.state is FeedState.LIVE
                    shard.data(recv)
                    if not conn.first_data.is_set():
                        conn.first_data.set()
                    try:
                        if fresh and item.symbol in fresh:
                            fresh.discard(item.symbol)
                            kept = history.symbols[item.symbol].accept(item, after_reconnect=True)
                        else:
                            kept = history.accept(item)
                        if kept:
                            on_update(item)
                    except FeedMessageError as exc:  # e.g. more than MAX_SYMBOLS symbols
                        shard.parse_errors += 1
                        self.log_once(exc.kind, "feed: %s", exc.detail)
                    if not was_live:
                        self.notify()
                elif type(item) is ServerShutdown:
                    log.info("feed %s: exchange announced a server shutdown; rotating", shard_name(shard))
                    conn.shutdown_notice = True
                elif type(item) is FeedError:
                    self._exchange_error(shard, item, recv)
                else:
                    log.debug("feed: ack %s", item)
        except websockets.exceptions.ConnectionClosed as exc:
            return describe_error(exc)
        code = conn.ws.close_code
        return f"closed by exchange: {code} {conn.ws.close_reason or ''}".rstrip()

    async def _supervise(self, shard: ShardHealth, conn: _Conn, url: str) -> tuple[str, bool]:
        """Watch an open connection: silence → reconnect; age → rotate make-before-break.
        Returns (reason, failure) when the connection is gone."""
        loop = asyncio.get_running_loop()
        rotate_at = loop.time() + self.rotate_s
        self._conns[shard] = conn
        try:
            while True:
                done, _ = await asyncio.wait({conn.task}, timeout=FEED_WATCHDOG_TICK_S)
                if done:
                    return conn.task.result(), True
                if not shard.symbols:  # its last symbol was removed while it connected
                    return "no symbols left", False
                if conn.ws.latency:  # the last keepalive ping's round trip: the floor's estimate of one way
                    self.history.clock.ws_rtt_ms = conn.ws.latency * 1000
                if shard.silent(now_ms(), self.cfg.feed_stale_seconds):
                    reason = f"no data for {self.cfg.feed_stale_seconds:g} s (silent stall)"
                    return reason, False
                if loop.time() >= rotate_at or conn.shutdown_notice:
                    successor = await self._rotate(shard, conn, feed_url(self.cfg.feed_base_url, shard.symbols))
                    if successor is None:
                        rotate_at = loop.time() + FEED_ROTATE_RETRY_S
                        conn.shutdown_notice = False
                    else:
                        conn, rotate_at = successor, loop.time() + self.rotate_s
                        self._conns[shard] = conn
        finally:
            if self._conns.get(shard) is conn:
                del self._conns[shard]
            await _close_conn(conn)

    async def _rotate(self, shard: ShardHealth, old: _Conn, url: str) -> _Conn | None:
        """Open a new connection, wait for its first data, then close the old one.  Both feed
        the same dedupe (by `u`), so the history gets neither a hole nor a duplicate."""
        if now_ms() < self._not_before_ms:  # a Retry-After is pending: the current connection stays
            log.info("feed %s: rotation postponed (Retry-After); keeping the current connection", shard_name(shard))
            return None
        try:
            await self._connect_slot()
            new = await self._open(shard, url)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("feed %s: rotation failed (%s); keeping the current connection", shard_name(shard),
                        self._connect_failure(exc, url))
            return None
        waiter = asyncio.create_task(new.first_data.wait())
        await asyncio.wait({waiter, new.task}, timeout=FEED_ROTATE_OVERLAP_S, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if new.task.done():
            log.warning("feed %s: rotation connection closed early; keeping the current one", shard_name(shard))
            return None
        log.info("feed %s: rotated connection (make-before-break)", shard_name(shard))
        await _close_conn(old)
        return new

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    # -- symbols added and removed while running ---------------------------------------
    async def add_symbol(self, symbol: str) -> list[str]:
        """Stream ``symbol`` too: checked against the exchange's symbol list (exchangeInfo, status
        TRADING), within FEED_MAX_SYMBOLS, then subscribed on a connection with room (a paced
        SUBSCRIBE on its open connection; its URL has it from the next connect on), or on a new one.

        Raises:
            FeedEditError: already streamed, over the limit, not listed or not trading, or the
            exchange's symbol list could not be read.
        """
        async with self._edit_lock:
            if symbol in self.symbols:
                raise FeedEditError(f"{symbol} is already streamed")
            if len(self.symbols) >= self.cfg.feed_max_symbols:
                raise FeedEditError(f"the feed has {len(self.symbols)} symbols, the most FEED_MAX_SYMBOLS allows")
            await self._check_listed(symbol)
            self.history.get(symbol)
            self.symbols.append(symbol)
            shard = next((s for s in self.shards if len(s.symbols) < self.cfg.feed_streams_per_connection), None)
            if shard is None:
                shard = ShardHealth((symbol,), now_ms())
                self.shards.append(shard)
                self._tasks.append(asyncio.create_task(self._run_shard(shard), name=f"feed-{len(self.shards) - 1}"))
            else:
                shard.symbols = (*shard.symbols, symbol)
                await self._request(shard, "SUBSCRIBE", symbol)
            log.info("feed: %s added (%d symbols)", symbol, len(self.symbols))
            await self._changed()
            return list(self.symbols)

    async def remove_symbol(self, symbol: str) -> list[str]:
        """Stop streaming ``symbol`` (a paced UNSUBSCRIBE; a connection left without symbols is
        closed).  Its history stays.

        Raises:
            FeedEditError: not streamed, or the last symbol.
        """
        async with self._edit_lock:
            if symbol not in self.symbols:
                raise FeedEditError(f"{symbol} is not streamed")
            if len(self.symbols) == 1:
                raise FeedEditError("the feed needs at least one symbol")
            self.symbols.remove(symbol)
            shard = next(s for s in self.shards if symbol in s.symbols)
            shard.symbols = tuple(s for s in shard.symbols if s != symbol)
            if shard.symbols:
                await self._request(shard, "UNSUBSCRIBE", symbol)
            else:  # its task sees no symbols and ends once the connection is closed
                self.shards.remove(shard)
                conn = self._conns.get(shard)
                if conn is not None:
                    await _close_conn(conn)
            self.history.symbols[symbol].subscribed_ms = None
            self.symbol_errors.pop(symbol, None)
            log.info("feed: %s removed (%d symbols)", symbol, len(self.symbols))
            await self._changed()
            return list(self.symbols)

    async def _changed(self) -> None:
        saved = self.on_symbols(list(self.symbols))
        if saved is not None:
            await saved
        self.notify()

    async def _request(self, shard: ShardHealth, method: str, symbol: str) -> None:
        """SUBSCRIBE or UNSUBSCRIBE one stream on the shard's open connection, FEED_REQUEST_SPACING_S
        after the previous request (Binance answers only part of a burst).  Without an open
        connection there is nothing to send: the next connection's URL has the new symbol list."""
        loop = asyncio.get_running_loop()
        while (wait_s := self._last_request_s + FEED_REQUEST_SPACING_S - loop.time()) > 0:
            await asyncio.sleep(wait_s)
        conn = self._conns.get(shard)
        if conn is None:
            return
        self._last_request_s = loop.time()
        self._request_id += 1
        request = {"method": method, "params": [f"{symbol.lower()}@bookTicker"], "id": self._request_id}
        with contextlib.suppress(websockets.exceptions.ConnectionClosed):
            await conn.ws.send(json.dumps(request))
        if method == "SUBSCRIBE":
            self.history.symbols[symbol].subscribed_ms = now_ms()

    async def _check_listed(self, symbol: str) -> None:
        """Raise FeedEditError unless the exchange lists ``symbol`` as TRADING (exchangeInfo on the
        market's REST host: spot is asked for the one symbol, futures list them all, kept a while)."""
        prefix, loop = MARKET_REST_PREFIXES[self.cfg.market], asyncio.get_running_loop()
        rest = ExchangeRest(self.cfg.rest_base_url)
        try:
            if self.cfg.market == "spot":
                status, doc = await rest.get_json(f"{prefix}/exchangeInfo?symbol={urllib.parse.quote(symbol)}")
                if status == 400 and isinstance(doc, dict) and doc.get("code") == -1121:  # "Invalid symbol."
                    raise FeedEditError(f"{symbol} is not listed on {self.cfg.market}")
                listed = self._listed_symbols(status, doc)
            elif self._listed is not None and loop.time() - self._listed[0] < EXCHANGE_INFO_TTL_S:
                listed = self._listed[1]
            else:
                status, doc = await rest.get_json(f"{prefix}/exchangeInfo")
                listed = self._listed_symbols(status, doc)
                self._listed = (loop.time(), listed)
        except RestError as exc:
            raise FeedEditError(f"cannot check {symbol} against the exchange's symbol list ({exc})") from None
        finally:
            await rest.close()
        state = listed.get(symbol)
        if state is None:
            raise FeedEditError(f"{symbol} is not listed on {self.cfg.market}")
        if state != "TRADING":
            raise FeedEditError(f"{symbol} is {state} on {self.cfg.market}, not TRADING")

    def _listed_symbols(self, status: int, doc: Any) -> dict[str, str]:
        """An exchangeInfo answer → symbol → status.  Raises RestError for anything else."""
        try:
            if status != 200:
                raise ValueError
            return {str(item["symbol"]): str(item["status"]) for item in doc["symbols"]}
        except (ValueError, KeyError, TypeError):
            raise RestError(f"exchangeInfo answered HTTP {status} without a symbol list") from None


class RestError(BboStreamError):
    """A REST request to the exchange failed; the message says why, for a person."""


class ExchangeRest:
    """A minimal HTTP/1.1 client for the exchange's REST API (asyncio streams and the standard
    library's TLS): GET requests on one keep-alive connection, reopened when the server closes it.
    Content-Length, chunked and read-until-close bodies, each bounded."""

    def __init__(self, base_url: str) -> None:
        parts = urllib.parse.urlsplit(base_url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        self.url = base_url
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str) -> tuple[int, bytes, float, float]:
        """GET ``path`` → (status, body, local ms just before the request was written, local ms when
        the response head arrived).

        Raises:
            RestError: no connection, a timeout, or a response that is not HTTP/1.x within the bounds.
        """
        try:
            return await asyncio.wait_for(self._get(path), REST_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, ssl.SSLError) as exc:
            await self.close()
            if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
                raise RestError(f"no answer from {self.host}:{self.port} within {REST_TIMEOUT_S:g} s") from None
            if isinstance(exc, (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)):
                raise RestError(f"unreadable answer from {self.host}:{self.port} ({type(exc).__name__})") from None
            raise RestError(describe_error(exc, self.url)) from None

    async def _get(self, path: str) -> tuple[int, bytes, float, float]:
        if self._streams is None or self._streams[1].is_closing():
            ctx = ssl.create_default_context() if self.tls else None
            self._streams = await asyncio.open_connection(self.host, self.port, ssl=ctx, limit=REST_MAX_HEAD_BYTES,
                                                          server_hostname=self.host if self.tls else None)
        reader, writer = self._streams
        request = (f"GET {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}\r\nUser-Agent: {SERVER_NAME}\r\n"
                   "Accept: application/json\r\nConnection: keep-alive\r\n\r\n")
        sent_ms = now_ms_fine()
        writer.write(request.encode("ascii"))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        head_ms = now_ms_fine()
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            raise ValueError("not an HTTP/1.x response")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = await self._read_chunked(reader)
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if not 0 <= length <= REST_MAX_BODY_BYTES:
                raise ValueError("body too large")
            body = await reader.readexactly(length)
        else:  # the body ends with the connection
            body = await reader.read(REST_MAX_BODY_BYTES + 1)
            while len(body) <= REST_MAX_BODY_BYTES and (more := await reader.read(REST_MAX_BODY_BYTES + 1 - len(body))):
                body += more
            headers["connection"] = "close"
            if len(body) > REST_MAX_BODY_BYTES:
                raise ValueError("body too large")
        if "close" in headers.get("connection", "").lower():
            await self.close()
        return int(rest[:3]), body, sent_ms, head_ms

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            total += size
            if total > REST_MAX_BODY_BYTES:
                raise ValueError("body too large")
            parts.append((await reader.readexactly(size + 2))[:-2])

    async def get_json(self, path: str) -> tuple[int, Any]:
        """GET ``path`` → (status, decoded JSON).  Raises RestError (also for a body that is not JSON)."""
        status, body, _, _ = await self.get(path)
        try:
            return status, json.loads(body)
        except (ValueError, RecursionError):
            raise RestError(f"{self.host} answered HTTP {status} with something that is not JSON") from None

    async def close(self) -> None:
        streams, self._streams = self._streams, None
        if streams is not None:
            streams[1].close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(streams[1].wait_closed(), CONNECTION_CLOSE_WAIT_S)


class ExchangeClock:
    """Measures the local clock against the exchange's REST serverTime every CLOCK_CHECK_MINUTES
    (CLOCK_SAMPLES_PER_ROUND requests on one connection; ClockOffsetEstimator keeps the best), on the
    market's REST host; a failed round is retried after CLOCK_RETRY_S."""

    def __init__(self, cfg: Config, clock: ClockOffsetEstimator, on_change: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self.clock = clock
        self.on_change = on_change
        self.path = MARKET_REST_PREFIXES[cfg.market] + "/time"
        self.log_once = LogOnce(log)

    async def measure(self) -> ClockEstimate:
        """One round.  Raises RestError."""
        rest = ExchangeRest(self.cfg.rest_base_url)
        samples = []
        try:
            for _ in range(CLOCK_SAMPLES_PER_ROUND):
                status, body, sent_ms, head_ms = await rest.get(self.path)
                try:
                    server_ms = json.loads(body)["serverTime"] if status == 200 else None
                except (ValueError, KeyError, TypeError):
                    server_ms = None
                if type(server_ms) is not int:
                    raise RestError(f"{rest.host}{rest.prefix}{self.path} answered HTTP {status} without a serverTime")
                samples.append(rest_clock_sample(sent_ms, head_ms, server_ms))
        finally:
            await rest.close()
        return self.clock.add_rest_round(samples)

    async def run(self) -> None:
        interval_s = self.cfg.clock_check_minutes * 60
        while True:
            try:
                estimate = await self.measure()
            except RestError as exc:
                self.clock.rest_error = str(exc)
                self.log_once("clock check", "clock: cannot read the exchange's time (%s); retrying in %g s",
                              exc, min(CLOCK_RETRY_S, interval_s))
                delay_s = min(CLOCK_RETRY_S, interval_s)
            else:
                log.info("clock: local clock %+.1f ms (± %.1f) against %s", estimate.offset_ms, estimate.uncertainty_ms,
                         self.cfg.rest_base_url)
                delay_s = interval_s
            self.on_change()
            await asyncio.sleep(delay_s)


async def _close_conn(conn: _Conn) -> None:
    if conn.task is not None and not conn.task.done():
        conn.task.cancel()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(conn.ws.close(), FEED_CLOSE_TIMEOUT_S)
    if conn.task is not None:
        await asyncio.gather(conn.task, return_exceptions=True)

# ###########################################################################
# §12 Cache persistence (disk)
# ###########################################################################
# Owns: CACHE_DIR, its lock, and `import` of Binance's CSV into it.  Every CACHE_FLUSH_SECONDS the new rows of each symbol are appended as
# one JSON line to a journal (`raw-00000007.jsonl`) and fsynced; a journal that reaches
# SEGMENT_ROWS is compacted into one columnar segment (`raw-00000007-<last_ms>.json`,
# temp file + fsync + rename).  JSON encoding holds the GIL even in a thread, so no single
# encode is larger than a segment (~15 ms); the writes and fsyncs run in a thread.
# Crash safety: a torn last journal line is ignored on load; a segment and the journal it
# replaced (crash between rename and unlink) are never both loaded.

_CACHE_FILE_RE = re.compile(r"^(raw|bars)-(\d{8})(?:-(\d+))?\.(jsonl|json)$")
CACHE_TMP_SUFFIX = ".tmp"              # atomic_write's temporary files: removed at start if a crash left one
CACHE_HEARTBEAT_FILE = "last-run"      # touched at every flush: when the process was last known to run
CACHE_LOCK_FILE = "lock"               # flock()ed by the server (persistence on) and by an import: one at a time
IMPORT_NEW_PREFIX = ".import-new-"     # a symbol's folder as an import builds it, beside the one it replaces...
IMPORT_OLD_PREFIX = ".import-old-"     # ...and the replaced one, until the swap is complete


class _LogState:
    """Where one (symbol, kind) stands on disk."""

    def __init__(self, seq: int, start: int) -> None:
        self.seq = seq                  # sequence number of the open journal
        self.journal_start = start      # absolute ring row of the journal's first row
        self.persisted = start          # absolute ring rows [0, persisted) are on disk


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file, never half
    (and a failed write, e.g. a full disk, leaves no temporary file behind)."""
    tmp = path.with_name(path.name + CACHE_TMP_SUFFIX)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def append_whole(fd: int, data: bytes, write: Callable[[int, bytes], int] = os.write,
                 truncate: Callable[[int, int], None] = os.ftruncate) -> None:
    """Append ``data`` to the end of the file ``fd`` (opened O_APPEND) so that it lands whole or
    not at all: a failed or short write (a full disk) is cut off again, so the next append
    starts on a line boundary instead of gluing a whole line onto half of one.

    Raises:
        OSError: the write failed; the file is as it was.
    """
    size = os.fstat(fd).st_size
    done = 0
    try:
        while done < len(data):
            written = write(fd, data[done:])
            if written <= 0:
                raise OSError(errno.ENOSPC, "no bytes written")
            done += written
    except BaseException:
        if done:
            with contextlib.suppress(OSError):
                truncate(fd, size)
        raise


def _cut_partial_tail(fd: int) -> None:
    """Cut a journal back to its last newline: whatever follows one is a line whose write failed
    and could not be cut off then (every line this program writes ends with a newline)."""
    size = end = os.fstat(fd).st_size
    while end > 0:
        start = max(0, end - 65536)
        chunk = os.pread(fd, end - start, start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            end = start + cut + 1
            break
        end = start
    if end != size:
        os.ftruncate(fd, end)


FEED_SYMBOLS_FILE = "feed-symbols.json"  # the feed's symbols as clients last changed them


def load_feed_symbols(path: Path, configured: tuple[str, ...]) -> tuple[str, ...]:
    """The feed's symbols at start: as clients last changed them (``path``), as long as SYMBOL is
    still what it was then; when SYMBOL changed since, or without a usable file, SYMBOL."""
    try:
        if path.stat().st_size > CACHE_MAX_FILE_BYTES:
            raise ValueError("too large")
        doc = json.loads(path.read_text())
        base, symbols = doc["base"], doc["symbols"]
        if not (isinstance(symbols, list) and 0 < len(symbols) <= MAX_SYMBOLS
                and all(isinstance(s, str) and _SYMBOL_RE.match(s) and s == s.upper() for s in symbols)):
            raise ValueError("not a list of symbols")
    except FileNotFoundError:
        return configured
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("feed: %s is unusable (%s); streaming SYMBOL", path, str(exc)[:100])
        return configured
    if base != list(configured):
        log.info("feed: SYMBOL changed since clients last changed the symbols; streaming SYMBOL")
        return configured
    if symbols != list(configured):
        log.info("feed: streaming the symbols as clients last changed them: %s", ",".join(symbols[:20]))
    return tuple(dict.fromkeys(symbols))


def save_feed_symbols(path: Path, configured: tuple[str, ...], symbols: list[str]) -> None:
    """Write the feed's symbols for load_feed_symbols, with the SYMBOL they were changed from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"base": list(configured), "symbols": symbols}, separators=(",", ":")).encode())


class CacheLoaded(NamedTuple):
    """What loading CACHE_DIR found: rows per symbol, and where each file sequence stands."""
    rows: dict[str, int]                          # symbol → raw rows restored
    logs: dict[tuple[str, str], _LogState]        # (symbol, kind) → the next journal to write
    outage_sigs: dict[str, tuple]                 # symbol → (count, last end) of outages.json
    last_run_ms: int | None                       # the last moment the previous run is known to have run
    skipped_lines: int                            # unusable journal lines left out (logged)
    quarantined: list[str]                        # files moved aside (*.corrupt-<time>)


class CacheLoader:
    """Reads CACHE_DIR into the history at start (blocking: it runs before serving).

    It trusts no file: each record is validated (CacheFormatError); a journal keeps every whole,
    valid line and skips the others (counted, logged); a file with nothing usable, or larger
    than any file this program writes, is moved aside; temporary files of a compaction cut
    short by a crash are removed.
    """

    def __init__(self, root: Path, history: BboHistory) -> None:
        self.root = root
        self.history = history
        self._skipped = 0
        self._quarantined: list[str] = []

    def load(self) -> CacheLoaded:
        self._skipped, self._quarantined = 0, []
        rows: dict[str, int] = {}
        logs: dict[tuple[str, str], _LogState] = {}
        sigs: dict[str, tuple] = {}
        if not self.root.exists():
            return CacheLoaded(rows, logs, sigs, None, 0, [])
        finish_interrupted_imports(self.root)
        self._remove_temporaries()
        for sym_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            symbol = sym_dir.name.upper()
            if not _SYMBOL_RE.match(symbol):
                continue
            hist = self.history.get(symbol)
            raw_cols = self.load_kind(sym_dir, symbol, "raw")
            bar_cols = self.load_kind(sym_dir, symbol, "bars")
            if raw_cols:
                cols = {k: np.concatenate([c[k] for c in raw_cols]) for k in RAW_COLUMNS}
                hist.raw.extend(cols)
                hist.restore_last(cols)
                rows[symbol] = len(cols["recv_ms"])
            if bar_cols and hist.keep_bars:
                hist.bars.extend({k: np.concatenate([c[k] for c in bar_cols]) for k in BAR_COLUMNS})
            if hist.keep_bars and hist.raw.total:
                # Bars of the last seconds before the stop were still open: rebuild them from raw.
                after = (int(hist.bars.last_value("time_s")) + 1) * 1000 if hist.bars.total else 0
                a = hist.raw.search("recv_ms", after, "left")
                if a < hist.raw.total:
                    hist._append_bars(columns_to_bars(hist.raw.take(a, hist.raw.total)))
            if self._load_outages(sym_dir, hist):
                sigs[symbol] = (len(hist.outages), hist.outages[-1][1] if hist.outages else None)
            for kind, ring in (("raw", hist.raw), ("bars", hist.bars)):
                seqs = [int(m.group(2)) for p in sym_dir.iterdir() if (m := _CACHE_FILE_RE.match(p.name)) and m.group(1) == kind]
                persisted = ring.total - (1 if kind == "bars" and ring.total else 0)
                logs[(symbol, kind)] = _LogState(max(seqs, default=0) + 1, persisted)
        if self._skipped:
            log.warning("cache: left out %d unusable journal line(s); every valid line was restored", self._skipped)
        return CacheLoaded(rows, logs, sigs, self._last_run_ms(), self._skipped, self._quarantined)

    def _remove_temporaries(self) -> None:
        """A compaction or an outages write cut short by a crash leaves its temporary file."""
        count = size = 0
        for path in self.root.glob(f"*/*{CACHE_TMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                size += path.stat().st_size
                path.unlink()
                count += 1
        if count:
            log.info("cache: removed %d temporary file(s) (%d bytes) left by an interrupted write", count, size)

    def _last_run_ms(self) -> int | None:
        """When the previous run was last known to be running: the heartbeat it touches at every
        flush, or else the newest file it wrote."""
        stamps = [p.stat().st_mtime_ns for p in [self.root / CACHE_HEARTBEAT_FILE, *self.root.glob("*/*")]
                  if p.is_file()]
        return max(stamps) // 1_000_000 if stamps else None

    def load_kind(self, sym_dir: Path, symbol: str, kind: str) -> list[dict[str, np.ndarray]]:
        files: dict[int, dict[str, Path]] = {}
        for path in sym_dir.iterdir():
            m = _CACHE_FILE_RE.match(path.name)
            if m and m.group(1) == kind:
                files.setdefault(int(m.group(2)), {})[m.group(4)] = path
        out: list[dict[str, np.ndarray]] = []
        time_col = "recv_ms" if kind == "raw" else "time_s"
        for seq in sorted(files):
            entry = files[seq]
            if "json" in entry:
                if "jsonl" in entry:  # crash between compaction's rename and unlink
                    with contextlib.suppress(OSError):
                        entry["jsonl"].unlink()
                path = entry["json"]
            else:
                path = entry["jsonl"]
            for cols in self._load_file(path, symbol, kind):
                if out and len(cols[time_col]) and cols[time_col][0] < out[-1][time_col][-1]:
                    self._skipped += 1  # older than what came before it: the ring must stay sorted
                    log.warning("cache: %s has rows older than the file before it; left out", path)
                    continue
                if len(cols[time_col]):
                    out.append(cols)
        return out

    def _load_file(self, path: Path, symbol: str, kind: str) -> list[dict[str, np.ndarray]]:
        try:
            size = path.stat().st_size
            if size > CACHE_MAX_FILE_BYTES:
                self._quarantine(path, f"{size} bytes, over the {CACHE_MAX_FILE_BYTES} this program writes at most")
                return []
            lines = path.read_bytes().split(b"\n")
        except OSError as exc:
            log.error("cache: cannot read %s (%s); skipping it", path, exc.strerror or exc)
            return []
        out, bad, first_error = [], 0, ""
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                _, cols = decode_columns(line.decode("utf-8", "replace"), kind, symbol)
            except CacheFormatError as exc:
                if exc.newer:
                    log.warning("cache: %s was written by a newer version of bbo_stream (%s); left as it is", path, exc)
                    return out
                if path.suffix == ".jsonl" and i == len(lines) - 1:  # no newline after it: a write cut short
                    log.info("cache: ignoring a torn last line in %s (the process stopped mid-write)", path)
                    break
                bad += 1
                first_error = first_error or f"line {i + 1}: {str(exc)[:200]}"
                continue
            out.append(cols)
        if bad and not out:
            self._quarantine(path, first_error)
        elif bad:
            self._skipped += bad
            log.warning("cache: %s: left out %d unusable line(s) (first: %s), kept %d", path, bad, first_error, len(out))
        return out

    def _quarantine(self, path: Path, reason: str) -> None:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        log.error("cache: %s is unusable (%s); moved aside to %s, starting without it", path, reason, aside.name)
        with contextlib.suppress(OSError):
            path.rename(aside)
            self._quarantined.append(str(aside))

    @staticmethod
    def _load_outages(sym_dir: Path, hist: SymbolHistory) -> bool:
        """Restore outages.json; True when it was read."""
        path = sym_dir / "outages.json"
        if not path.exists():
            return False
        try:
            if path.stat().st_size > CACHE_MAX_FILE_BYTES:
                raise ValueError("larger than any outages file this program writes")
            doc = json.loads(path.read_text())
            items = [[int(o["start"]), None if o["end"] is None else int(o["end"]), str(o["reason"])]
                     for o in doc["outages"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = path.with_name(f"outages.json.corrupt-{int(time.time())}")
            log.error("cache: %s is unreadable (%s); moved aside to %s", path, str(exc)[:100], aside.name)
            with contextlib.suppress(OSError):
                path.rename(aside)
            return False
        hist.outages.extend(items)
        return True


def lock_cache_dir(root: Path) -> int | None:
    """Take the cache's lock (CACHE_LOCK_FILE): the open descriptor holding it, or None when another
    process (or another open of it) holds it.  The lock goes with the process, however it ends."""
    fd = os.open(root / CACHE_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def finish_interrupted_imports(root: Path) -> None:
    """An import cut short leaves its folders: a new one half built (removed), or a replaced one
    whose successor is in place (removed) or is not (put back: the import did not happen)."""
    for path in sorted(root.glob(".import-*")):
        if path.name.startswith(IMPORT_OLD_PREFIX) and path.is_dir():
            symbol_dir = root / path.name[len(IMPORT_OLD_PREFIX):]
            if symbol_dir.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.rename(symbol_dir)
                log.warning("cache: an import into %s was cut short; its previous data is back", symbol_dir.name)
        elif path.name.startswith(IMPORT_NEW_PREFIX):
            shutil.rmtree(path, ignore_errors=True)


class ImportRefused(BboStreamError):
    """An import that changed nothing, and why."""


class ImportReport(NamedTuple):
    symbol: str
    parsed: CsvImport
    imported: int          # rows that were not in the cache yet
    known: int             # rows whose update_id the cache already had
    dropped: int           # older rows beyond CACHE_MAX_ITEMS, not kept
    cached: int            # rows of the symbol in the cache now


def _segment_files(kind: str, cols: dict[str, np.ndarray]) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """Columns cut into segment files of SEGMENT_ROWS rows, named as CacheWriter names them."""
    n = len(cols["recv_ms" if kind == "raw" else "time_s"])
    for seq, start in enumerate(range(0, n, SEGMENT_ROWS), 1):
        part = {k: v[start:start + SEGMENT_ROWS] for k, v in cols.items()}
        last = int(part["recv_ms"][-1]) if kind == "raw" else int(part["time_s"][-1]) * 1000
        yield f"{kind}-{seq:08d}-{last}.json", part


def import_binance_csv(cfg: Config, source: Path, symbol: str, skip_bad: bool, import_ms: int) -> ImportReport:
    """Load a bookTicker CSV (or the one inside its .zip) into CACHE_DIR/<symbol>: rows merged with
    what is there in time order, deduplicated by update_id, bars of the seconds they touch rebuilt;
    the symbol's folder is rebuilt aside and swapped in, so an import either happened or did not.

    Raises:
        ImportRefused: the cache is in use (lock), the file has bad rows (without ``skip_bad``), or
            nothing could be read; the cache is then as it was.
    """
    root = Path(cfg.cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    lock = lock_cache_dir(root)
    if lock is None:
        raise ImportRefused(f"CACHE_DIR {root} is in use (a running bbo_stream, or another import, holds "
                            f"{root / CACHE_LOCK_FILE}): stop it first")
    try:
        finish_interrupted_imports(root)
        try:
            parsed = _read_binance_csv(source, import_ms)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise ImportRefused(f"cannot read {source}: {exc}") from None
        if parsed.bad and not skip_bad:
            raise ImportRefused(f"{parsed.bad} bad row(s) of {parsed.rows} in {source}; nothing imported "
                                "(--skip-bad imports the others):\n  " + "\n  ".join(parsed.bad_lines)
                                + ("\n  ..." if parsed.bad > len(parsed.bad_lines) else ""))
        symbol_dir = root / symbol
        loader = CacheLoader(root, BboHistory(1, 0))
        old_raw = loader.load_kind(symbol_dir, symbol, "raw") if symbol_dir.is_dir() else []
        old_bars = loader.load_kind(symbol_dir, symbol, "bars") if symbol_dir.is_dir() else []
        new = parsed.cols
        known = 0
        if old_raw:
            old = {k: np.concatenate([c[k] for c in old_raw]) for k in RAW_COLUMNS}
            fresh = ~np.isin(new["update_id"], old["update_id"])
            known = int(len(fresh) - fresh.sum())
            new = {k: v[fresh] for k, v in new.items()}
            merged = {k: np.concatenate([old[k], new[k]]) for k in RAW_COLUMNS}
            order = np.argsort(merged["recv_ms"], kind="stable")  # the cache's rows first within a ms
            merged = {k: v[order] for k, v in merged.items()}
        else:
            merged = new
        total = len(merged["recv_ms"])
        dropped = max(0, total - cfg.cache_max_items)
        if dropped:
            merged = {k: v[dropped:] for k, v in merged.items()}
        bars = _bars_after_import(merged, new["recv_ms"], old_bars, cfg.bars_capacity)
        _swap_in_symbol_dir(root, symbol, merged, bars)
        return ImportReport(symbol, parsed, len(new["recv_ms"]), known, dropped, len(merged["recv_ms"]))
    finally:
        os.close(lock)


def _read_binance_csv(source: Path, import_ms: int) -> CsvImport:
    """The CSV itself, or the first .csv member of a .zip (Binance ships each day's file zipped)."""
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            members = [m for m in archive.namelist() if m.lower().endswith(".csv")]
            if not members:
                raise ValueError("the .zip holds no .csv file")
            with archive.open(members[0]) as raw, io.TextIOWrapper(raw, "utf-8", newline="") as text:
                return parse_binance_csv(text, import_ms)
    with open(source, encoding="utf-8", newline="") as text:
        return parse_binance_csv(text, import_ms)


def _bars_after_import(merged: dict[str, np.ndarray], imported_recv: np.ndarray,
                       old_bars: list[dict[str, np.ndarray]], capacity: int) -> dict[str, np.ndarray] | None:
    """The 1 s bars once rows were imported: the seconds the imported rows fall in, rebuilt from the
    raw rows; every other second as it was.  None when bars are off."""
    if capacity <= 0:
        return None
    touched = np.unique(imported_recv // 1000)
    secs = merged["recv_ms"] // 1000
    rebuilt = columns_to_bars({k: v[np.isin(secs, touched)] for k, v in merged.items()}) if len(touched) else None
    parts = []
    if old_bars:
        old = {k: np.concatenate([c[k] for c in old_bars]) for k in BAR_COLUMNS}
        keep = ~np.isin(old["time_s"], touched)
        parts.append({k: v[keep] for k, v in old.items()})
    if rebuilt is not None:
        parts.append(rebuilt)
    if not parts:
        return None
    bars = {k: np.concatenate([p[k] for p in parts]).astype(BAR_COLUMNS[k]) for k in BAR_COLUMNS}
    order = np.argsort(bars["time_s"], kind="stable")
    return {k: v[order][-capacity:] for k, v in bars.items()}


def _swap_in_symbol_dir(root: Path, symbol: str, raw: dict[str, np.ndarray],
                        bars: dict[str, np.ndarray] | None) -> None:
    """Write the symbol's folder anew beside the old one, then swap them (two renames; a cut between
    them is undone at the next start by finish_interrupted_imports)."""
    symbol_dir = root / symbol
    staging = root / f"{IMPORT_NEW_PREFIX}{symbol}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        files = list(_segment_files("raw", raw))
        if bars is not None:
            files += _segment_files("bars", bars)
        for name, cols in files:
            with open(staging / name, "wb") as fh:
                fh.write(encode_columns(name.split("-")[0], symbol, cols).encode() + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
        outages = symbol_dir / "outages.json"
        if outages.exists():
            shutil.copy2(outages, staging / "outages.json")
        _fsync_dir(staging)
        old = root / f"{IMPORT_OLD_PREFIX}{symbol}"
        if symbol_dir.exists():
            symbol_dir.rename(old)
        staging.rename(symbol_dir)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class WriteJob(NamedTuple):
    """One write that a flush plans in the event loop and carries out in a thread."""
    kind: str                               # "raw", "bars" or "outages"
    symbol: str
    path: Path                              # the journal to append to, or outages.json
    payload: Any                            # the rows' columns, or the outage list
    log_state: _LogState | None = None      # where (symbol, kind) stands; None for outages
    after: tuple[int, int, int] = (0, 0, 0)  # the log state's (seq, journal_start, persisted) once written
    segment: Path | None = None             # compaction: the rows go here as one segment, the journal goes


class CacheWriter:
    """Keeps CACHE_DIR up to date: journal appends, compaction into segments, outages, cleanup."""

    def __init__(self, root: Path, history: BboHistory) -> None:
        self.root = root
        self.history = history
        self.logs: dict[tuple[str, str], _LogState] = {}   # (symbol, kind) → where it stands on disk
        self.errors = 0                          # failed writes (disk full, permissions)
        self.lag_ms = 0                          # age of the oldest unpersisted row at the last plan
        self._last_error_log_s = -math.inf       # monotonic time of the last error line
        self._dirty_outages: set[str] = set()      # outage files whose last write failed
        self._outage_sigs: dict[str, tuple] = {}   # symbol → (count, last end) last written
        self.failure: str | None = None          # why the last write pass failed; None: it wrote everything
        self.last_write_ms: int | None = None    # when a write pass last wrote everything it had

    def resume(self, loaded: CacheLoaded) -> None:
        """Continue the file sequences that loading found."""
        self.logs.update(loaded.logs)
        self._outage_sigs.update(loaded.outage_sigs)

    def plan(self, now_ms: int) -> list[WriteJob]:
        """In the event loop: copy what must be written (cheap numpy slices) and plan the
        journal appends and compactions.  No job holds more than SEGMENT_ROWS rows, so no
        single JSON encode holds the GIL for long, however far behind the disk is."""
        jobs: list[WriteJob] = []
        oldest_unpersisted: int | None = None
        for symbol, hist in self.history.symbols.items():
            hist.flush()
            sym_dir = self.root / symbol
            for kind, ring, upto in (("raw", hist.raw, hist.raw.total),
                                     ("bars", hist.bars, hist.bars.total - 1 if hist.bars.total else 0)):
                if kind == "bars" and not hist.keep_bars:
                    continue
                state = self.logs.setdefault((symbol, kind), _LogState(1, ring.first))
                start = max(state.persisted, ring.first)
                if upto <= start:
                    continue
                if kind == "raw":
                    t0 = int(ring.cols["recv_ms"][start % ring.capacity])
                    oldest_unpersisted = t0 if oldest_unpersisted is None else min(oldest_unpersisted, t0)
                seq, journal_start = state.seq, state.journal_start
                while start < upto:
                    end = min(upto, start + max(0, SEGMENT_ROWS - (start - journal_start)))
                    journal = sym_dir / f"{kind}-{seq:08d}.jsonl"
                    if end - journal_start >= SEGMENT_ROWS:  # the journal is full: compact it
                        seg_cols = ring.take(max(journal_start, ring.first), end)
                        last = int(seg_cols["recv_ms"][-1]) if kind == "raw" else int(seg_cols["time_s"][-1]) * 1000
                        segment = sym_dir / f"{kind}-{seq:08d}-{last}.json"
                        jobs.append(WriteJob(kind, symbol, journal, seg_cols, state, (seq + 1, end, end), segment))
                        seq, journal_start = seq + 1, end
                    else:
                        jobs.append(WriteJob(kind, symbol, journal, ring.take(start, end), state,
                                             (seq, journal_start, end)))
                    start = end
            signature = (len(hist.outages), hist.outages[-1][1] if hist.outages else None)
            if signature != self._outage_sigs.get(symbol) or symbol in self._dirty_outages:
                self._dirty_outages.discard(symbol)
                self._outage_sigs[symbol] = signature
                jobs.append(WriteJob("outages", symbol, sym_dir / "outages.json",
                                     [{"start": s, "end": e, "reason": r} for s, e, r in hist.outages]))
        self.lag_ms = 0 if oldest_unpersisted is None else max(0, now_ms - oldest_unpersisted)
        return jobs

    def write(self, jobs: list[WriteJob]) -> list[WriteJob]:
        """In a thread: encode and write.  Returns the jobs that succeeded; after a failed
        job, the later jobs of the same journal are skipped (they would leave a hole)."""
        done, failed = [], set()
        failure = None
        for job in jobs:
            if id(job.log_state) in failed:
                continue
            try:
                job.path.parent.mkdir(parents=True, exist_ok=True)
                if job.kind == "outages":
                    atomic_write(job.path, json.dumps({"outages": job.payload}, separators=(",", ":")).encode())
                elif job.segment is not None:
                    atomic_write(job.segment, encode_columns(job.kind, job.symbol, job.payload).encode() + b"\n")
                    with contextlib.suppress(FileNotFoundError):
                        job.path.unlink()
                else:
                    self._append_line(job.path, encode_columns(job.kind, job.symbol, job.payload).encode() + b"\n")
            except OSError as exc:
                self.errors += 1
                failure = failure or f"cannot write {job.path} ({exc.strerror or exc})"
                if job.log_state is not None:
                    failed.add(id(job.log_state))
                now_s = time.monotonic()
                if now_s - self._last_error_log_s >= PERSIST_ERROR_LOG_INTERVAL_S:
                    self._last_error_log_s = now_s
                    log.error("cache: cannot write %s (%s); still serving from memory, will retry",
                              job.path, exc.strerror or exc)
                if job.kind == "outages":
                    self._dirty_outages.add(job.symbol)
                continue
            done.append(job)
        self._touch_heartbeat()
        self.failure = failure
        if failure is None:
            self.last_write_ms = now_ms()
        return done

    def _touch_heartbeat(self) -> None:
        """Mark this moment as one when the process ran (read at the next start: see CacheLoader)."""
        path = self.root / CACHE_HEARTBEAT_FILE
        with contextlib.suppress(OSError):
            try:
                os.utime(path)
            except FileNotFoundError:
                path.touch()

    @staticmethod
    def _append_line(path: Path, line: bytes) -> None:
        """Append one whole line and fsync it, or raise with the journal as it was."""
        new = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _cut_partial_tail(fd)
            append_whole(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            _fsync_dir(path.parent)

    @staticmethod
    def commit(done: list[WriteJob]) -> None:
        """Back in the event loop: what was written counts as persisted."""
        for job in done:
            if job.log_state is not None:
                job.log_state.seq, job.log_state.journal_start, job.log_state.persisted = job.after

    def cleanup(self) -> int:
        """Delete segments whose rows the rings no longer hold.  Returns files removed."""
        removed = 0
        for symbol, hist in self.history.symbols.items():
            sym_dir = self.root / symbol
            if not sym_dir.is_dir():
                continue
            floors = {"raw": int(hist.raw.cols["recv_ms"][hist.raw.first % hist.raw.capacity]) if hist.raw.total else 0,
                      "bars": int(hist.bars.cols["time_s"][hist.bars.first % hist.bars.capacity]) * 1000 if hist.bars.total else 0}
            for path in sym_dir.iterdir():
                m = _CACHE_FILE_RE.match(path.name)
                if not m:
                    continue
                kind, seq = m.group(1), int(m.group(2))
                state = self.logs.get((symbol, kind))
                if m.group(3):
                    last = int(m.group(3))
                elif state is not None and seq >= state.seq:
                    continue  # the open journal
                else:  # a journal left by an earlier run: its newest row is on its last line
                    last = self._journal_last_ms(path, kind)
                if last is not None and last < floors[kind]:
                    with contextlib.suppress(OSError):
                        path.unlink()
                        removed += 1
        return removed

    @staticmethod
    def _journal_last_ms(path: Path, kind: str) -> int | None:
        try:
            lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
            _, cols = decode_columns(lines[-1].decode(), kind)
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None
        return int(cols["recv_ms"][-1]) if kind == "raw" else int(cols["time_s"][-1]) * 1000


class CachePersistence:
    """The history on disk over the process's life: load at start, a flush every
    CACHE_FLUSH_SECONDS (planned in the loop, written in a thread), cleanup, the final flush.
    When CACHE_DIR cannot be used at all, persistence is off (`off_reason`) and the server
    serves from memory."""

    def __init__(self, cfg: Config, history: BboHistory) -> None:
        self.root = Path(cfg.cache_dir)
        self.history = history
        self.loader = CacheLoader(self.root, history)
        self.writer = CacheWriter(self.root, history)
        self.flush_s = cfg.cache_flush_seconds
        self.cleanup_s = cfg.cache_cleanup_hours * 3600
        self.last_flush_ms: int | None = None    # when the last flush completed
        self.off_reason: str | None = None       # why persistence is off; None: it is on
        self.last_run_ms: int | None = None      # when the previous run was last known to run
        self.skipped_lines = 0                   # unusable journal lines left out at load
        self.quarantined: list[str] = []         # files moved aside at load
        self.lock_fd: int | None = None          # holds CACHE_DIR's lock (the server's load), None: not held

    def metrics(self) -> list[MetricFamily]:
        return [MetricFamily("persist_lag_seconds", "gauge", "Age of the oldest update not yet on disk at the last flush",
                             [("", self.writer.lag_ms / 1000)]),
                MetricFamily("persist_errors_total", "counter", "Failed cache writes", [("", self.writer.errors)]),
                MetricFamily("persist_ok", "gauge", "1 while every write succeeds, 0 while failing or off",
                             [("", int(self.off_reason is None and self.writer.failure is None))])]

    def status(self) -> dict[str, Any]:
        """The `persistence` object of /healthz."""
        if self.off_reason is not None:
            return {"state": "off", "reason": self.off_reason}
        return {"state": "failing" if self.writer.failure else "ok", "reason": self.writer.failure,
                "lagSeconds": self.writer.lag_ms / 1000, "lastWrite": self.writer.last_write_ms,
                "errors": self.writer.errors, "skippedLines": self.skipped_lines,
                "quarantined": len(self.quarantined)}

    def _unusable_dir(self) -> str | None:
        """Why CACHE_DIR cannot hold the history, or None."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            return f"CACHE_DIR {self.root} is not a directory"
        except OSError as exc:
            return f"cannot create CACHE_DIR {self.root} ({exc.strerror or exc})"
        if not self.root.is_dir():
            return f"CACHE_DIR {self.root} is not a directory"
        if not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
            return f"CACHE_DIR {self.root} is not readable and writable by uid {os.getuid()}"
        return None

    def load(self, lock: bool = False) -> dict[str, int]:
        """Read CACHE_DIR into the history (blocking; runs before serving).  Returns rows per symbol.
        With ``lock`` (the server), CACHE_DIR's lock is taken first and held until ``unlock``: while
        another process holds it (an import), persistence is off."""
        self.off_reason = self._unusable_dir()
        if self.off_reason is None and lock:
            self.lock_fd = lock_cache_dir(self.root)
            if self.lock_fd is None:
                self.off_reason = (f"CACHE_DIR {self.root} is in use by another process (an import, or another "
                                   f"bbo_stream: {self.root / CACHE_LOCK_FILE} is locked)")
        if self.off_reason is None:
            try:
                loaded = self.loader.load()
            except OSError as exc:
                self.off_reason = f"cannot read CACHE_DIR {self.root} ({exc.strerror or exc})"
        if self.off_reason is not None:
            log.error("cache: persistence is off: %s; serving from memory only", self.off_reason)
            return {}
        self.writer.resume(loaded)
        self.last_run_ms, self.skipped_lines, self.quarantined = (loaded.last_run_ms, loaded.skipped_lines,
                                                                   loaded.quarantined)
        return loaded.rows

    def mark_restart_outages(self, now_ms: int) -> None:
        """Close what the previous run left open at the last moment it is known to have run, and
        record the time it was not running as one closed outage per symbol with a history."""
        for hist in self.history.symbols.values():
            if hist.latest is None and not hist.outages:
                continue
            known = [t for t in (self.last_run_ms, hist.latest.recv_ms if hist.latest else None) if t is not None]
            if not known:
                continue
            stopped = min(max(known), now_ms)
            for outage in hist.outages:
                if outage[1] is None:  # open when the last run stopped: it lasted until then
                    outage[1] = max(outage[0], stopped)
            hist.open_outage = None
            hist.outages.append([stopped, now_ms, "bbo_stream was not running"])

    async def flush(self) -> None:
        jobs = self.writer.plan(now_ms())
        self.writer.commit(await asyncio.to_thread(self.writer.write, jobs))
        self.last_flush_ms = now_ms()

    def unlock(self) -> None:
        """Let go of CACHE_DIR's lock (after the final flush)."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def flush_sync(self) -> str | None:
        """Final flush at shutdown (the loop has nothing else left to do).  Returns why it failed, or None."""
        self.writer.commit(self.writer.write(self.writer.plan(now_ms())))
        return self.writer.failure

    async def run(self) -> None:
        """Flush every CACHE_FLUSH_SECONDS and clean up every CACHE_CLEANUP_HOURS."""
        loop = asyncio.get_running_loop()
        next_cleanup = loop.time() + self.cleanup_s
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()
            if loop.time() >= next_cleanup:
                next_cleanup = loop.time() + self.cleanup_s
                removed = await asyncio.to_thread(self.writer.cleanup)
                log.info("cache: cleanup removed %d obsolete segment(s)", removed)

# ###########################################################################
# §13 Fan-out hub
# ###########################################################################
# Owns: the attached clients and the write passes: one encoding per update (packet text +
# WebSocket frame), the same bytes to every client, routing by symbol, passes in slices,
# helper threads for large passes.


class SocketWriterPool:
    """Writes the same bytes to many plain sockets, split between the calling thread and helpers.

    ``os.write`` releases the GIL for the system call, which is most of a loopback or LAN write's
    cost, so with spare cores a pass over 1,000 sockets takes a fraction of one thread's time.
    The caller (the event loop's thread) waits for the helpers before returning, so no transport
    can close, and no fd be reused, while they write.
    """

    def __init__(self, helpers: int) -> None:
        self._done: queue.SimpleQueue[list[tuple[int, int]] | BaseException] = queue.SimpleQueue()
        self._jobs: list[queue.SimpleQueue[tuple[list[int], list[bytes], int, int] | None]] = []
        self._threads: list[threading.Thread] = []
        for i in range(helpers):
            jobs: queue.SimpleQueue[tuple[list[int], list[bytes], int, int] | None] = queue.SimpleQueue()
            thread = threading.Thread(target=self._serve, args=(jobs,), name=f"bbo-fanout-{i + 1}", daemon=True)
            thread.start()
            self._jobs.append(jobs)
            self._threads.append(thread)

    @staticmethod
    def write_each(fds: list[int], datas: list[bytes], start: int, stop: int) -> list[tuple[int, int]]:
        """Write datas[i] to fds[i] for i in [start, stop); (index, bytes written) of each not written whole."""
        short: list[tuple[int, int]] = []
        write = os.write
        for i in range(start, stop):
            data = datas[i]
            try:
                sent = write(fds[i], data)
            except OSError:  # full (EAGAIN) or gone: the transport retries it and reports a loss
                sent = 0
            if sent != len(data):
                short.append((i, sent))
        return short

    def _serve(self, jobs: queue.SimpleQueue[tuple[list[int], list[bytes], int, int] | None]) -> None:
        while (job := jobs.get()) is not None:
            try:
                self._done.put(self.write_each(*job))
            except BaseException as exc:  # noqa: BLE001 - the waiting loop thread re-raises it
                self._done.put(exc)

    def write(self, fds: list[int], datas: list[bytes]) -> list[tuple[int, int]]:
        """Write datas[i] to fds[i] (often the same bytes object for all); (index, bytes written) of
        those not written whole."""
        share = -(-len(fds) // (len(self._jobs) + 1))
        for k, jobs in enumerate(self._jobs, 1):
            jobs.put((fds, datas, min(len(fds), k * share), min(len(fds), (k + 1) * share)))
        failure: BaseException | None = None
        try:
            short = self.write_each(fds, datas, 0, min(len(fds), share))
        except BaseException as exc:  # noqa: BLE001 - raised once the helpers are done with these fds
            short, failure = [], exc
        for _ in self._jobs:  # always collect every helper's answer, so none is read by a later pass
            result = self._done.get()
            if isinstance(result, BaseException):
                failure = failure or result
            else:
                short.extend(result)
        if failure is not None:
            raise failure
        return short

    def close(self) -> None:
        for jobs in self._jobs:
            jobs.put(None)
        for thread in self._threads:
            thread.join(1.0)


# Why a socket left that lets it take its session back (ref: RECOVERABLE_DISCONNECT_REASONS); a client
# that leaves the namespace, or breaks the protocol, starts anew.
RECOVERABLE_REASONS = frozenset({"transport close", "transport error", "ping timeout", "forced close",
                                 "server shutting down", "forced server close", "poll connection closed prematurely",
                                 "data request connection closed prematurely"})
SUPERSEDED_REASON = "reconnected elsewhere"  # close reason of a connection whose client came back on another
FEED_STATUS_KEY = "\x00feed_status"  # conflation key of `feed_status` packets: cannot collide with a symbol


class Hub:
    """Fans BBO updates and feed status out to the attached Engine.IO connections.

    `publish(bbo)` encodes the update once and queues it; once per event-loop pass the pass's
    updates get their emit time (one clock read for the pass: `emitTimestamp`, the last key), are
    finished as `42["bbo_update",{...}]` packets and their WebSocket text frames, and every
    attached client gets them in one write (WebSocket clients that keep up: the same joined bytes;
    others: through their conflating outbox, see EioOutbox). Nothing here awaits, so a slow
    client never delays a publish or another client. With `writer_threads` and at least
    FANOUT_PARALLEL_MIN_LINKS clients, the plain-TCP clients that keep up are written by a
    SocketWriterPool, the pass split across threads. Call from the event loop's thread.

    Clients are routed by what they asked for: a pass visits the clients that take every key,
    and of the others only those subscribed to a key in the pass (node's rooms do the same);
    clients with the same keys share their part of the pass, encoded once for all of them.
    """

    def __init__(self, writer_threads: int = 0) -> None:
        # attached → (sent, skipped, passed_upto) at attach
        self._conns: dict[EioConnection, tuple[int, int, int]] = {}
        self.writer_threads = writer_threads             # helpers of SocketWriterPool (0: loop thread only)
        self._pool: SocketWriterPool | None = None       # started by the first pass that needs it
        self._everyone: dict[EioConnection, None] = {}   # attached clients that take every key
        self._everyone_snapshot: tuple[EioConnection, ...] | None = ()  # frozen for a pass; None: stale
        self._keys_of: dict[EioConnection, frozenset[str]] = {}  # the other attached clients → their keys
        self._by_key: dict[str, dict[EioConnection, None]] = {}   # key → those of them that asked for it
        self._pass: Iterator[None] | None = None          # the write pass under way, run a slice at a time
        self._batch: list[EioUpdate | tuple[str, str]] = []  # since the last flush: feed status, or
                                                         # (symbol, update packet without its emit time)
        self.on_emit: Callable[[int, set[str]], None] | None = None  # (emit ms, symbols) after each pass
        self._flush_handle: asyncio.Handle | None = None  # the pending flush callback
        self.published = 0                               # updates published
        self.recovery: RecoveryLog | None = None         # offsets of the updates, when recovery is on
        self.passed_upto = 0                             # recovery: the newest offset taken into a pass
        self.done_upto = 0                               # recovery: the newest offset of a finished pass
        self._gone_sent = 0                              # deliveries counted for detached clients
        self._gone_skipped = 0                           # conflated updates of detached clients

    def attach(self, conn: EioConnection) -> None:
        if conn not in self._conns:  # counters from here on: a client may leave "/" and rejoin
            self._conns[conn] = (*conn.counters, self.passed_upto)
            self._route(conn)
            conn.on_filter = self.refilter

    def detach(self, conn: EioConnection) -> None:
        base = self._conns.pop(conn, None)
        if base is not None:
            conn.on_filter = None
            self._unroute(conn)
            sent, skipped = conn.counters
            self._gone_sent += sent - base[0]
            self._gone_skipped += skipped - base[1]

    def refilter(self, conn: EioConnection) -> None:
        """Route a client by its new filter (EioConnection.set_filter calls this): O(its keys)."""
        if conn in self._conns:
            self._unroute(conn)
            self._route(conn)

    def _route(self, conn: EioConnection) -> None:
        keys = conn.filter_keys
        if keys is None:
            self._everyone[conn] = None
            self._everyone_snapshot = None
            return
        self._keys_of[conn] = keys
        for key in keys:
            self._by_key.setdefault(key, {})[conn] = None

    def _unroute(self, conn: EioConnection) -> None:
        if conn in self._everyone:
            del self._everyone[conn]
            self._everyone_snapshot = None
        for key in self._keys_of.pop(conn, ()):
            members = self._by_key.get(key)
            if members is not None:
                members.pop(conn, None)
                if not members:
                    del self._by_key[key]

    def enable_recovery(self, log: RecoveryLog | None = None) -> None:
        """Give every update an offset (its last argument) from now on: connection state recovery."""
        self.recovery = log or RecoveryLog()

    def publish(self, bbo: Bbo) -> None:
        """Queue one BBO update for every attached client (finished with its emit time by the pass)."""
        if self.recovery is None:
            self._queue((bbo.symbol, '42["bbo_update",' + bbo_json_head(bbo)))
        else:  # the offset follows the emit time: encoded here once, the same bytes for every client
            offset = self.recovery.record(bbo.symbol)
            self._queue((bbo.symbol, '42["bbo_update",' + bbo_json_head(bbo), f',"{offset}"]', offset,
                         self.recovery.index[bbo.symbol]))

    def publish_feed_status(self, status: dict[str, Any]) -> None:
        """Queue a feed status change; like an update, only the newest one waits for a slow client."""
        offset = 0 if self.recovery is None else self.recovery.last
        text = '42["feed_status",' + _json_dumps(status) + (f',"{offset}"' if offset else "") + "]"
        self._queue(EioUpdate(FEED_STATUS_KEY, text, encode_ws_frame(text.encode()), True, offset))

    def offset_for(self, conn: EioConnection) -> str:
        """The mark (recovery_mark) of an event emitted to this client alone now.  It goes before
        the updates waiting in the client's outbox: with some waiting, the client then stands where
        the last update handed to its transport left it; with none, everything it takes up to the
        last finished pass (or any update offered to it since) has gone to it but what is held.
        Passes begun before it was attached never visit it."""
        attached = self._conns.get(conn)
        if attached is None:
            return str(self.passed_upto)  # not attached: passes begun before attach do not visit it
        outbox = conn.session.outbox
        given = outbox.given
        given_mark = "" if given is None else given.mark or str(given.offset)
        given_at = int(given_mark.partition(".")[0]) if given_mark else 0
        if outbox.updates:
            return given_mark if given_at >= attached[2] else str(attached[2])
        return outbox.mark(max(attached[2], self.done_upto, outbox.seen_offset, given_at))

    def _queue(self, item: EioUpdate | tuple) -> None:
        self._batch.append(item)
        self.published += 1
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._pass is not None or not self._batch:
            return  # (a pass under way takes the next batch when it ends: each client gets the passes in order)
        items, self._batch = self._batch, []
        emit_ms = now_ms()
        emitted = emit_suffix(emit_ms)
        tail = emitted + "]"
        symbols: set[str] = set()
        batch: list[EioUpdate] = []
        for item in items:
            if type(item) is tuple:
                if len(item) == 2:
                    key, text = item[0], item[1] + tail
                    symbols.add(key)
                    item = EioUpdate(key, text, encode_ws_frame(text.encode()))
                else:  # with its offset
                    key, text = item[0], item[1] + emitted + item[2]
                    symbols.add(key)
                    item = EioUpdate(key, text, encode_ws_frame(text.encode()), False, item[3], item[4])
            batch.append(item)
        if self.recovery is not None:
            self.passed_upto = self.recovery.last
        if symbols and self.on_emit is not None:
            self.on_emit(emit_ms, symbols)
        self._pass = self._deliver_pass(batch)
        self._step()

    def _step(self) -> None:
        """Run the pass under way to its next slice; between slices the loop reads the exchange feed
        (and the clients), so a frame from the exchange never waits for a whole pass to be read."""
        assert self._pass is not None
        try:
            next(self._pass)
        except StopIteration:
            self._pass = None
            self.done_upto = self.passed_upto
            self._flush()  # what was published meanwhile
            return
        asyncio.get_running_loop().call_soon(self._step)

    def _deliver_pass(self, batch: list[EioUpdate]) -> Iterator[None]:
        """Hand the batch to every client that wants part of it, FANOUT_SLICE_CLIENTS at a time.
        Clients taking every key get the whole batch; clients with a filter are visited only for
        a key in it, and each group with the same keys gets one share (its part and joined frames).
        The clients are those attached when the pass begins: one attached later gets the next pass
        (recovery counts on it)."""
        now_s = asyncio.get_running_loop().time()
        joined = batch[0].frame if len(batch) == 1 else b"".join(update.frame for update in batch)
        threads = bool(self.writer_threads) and len(self._conns) >= FANOUT_PARALLEL_MIN_LINKS
        attached = self._conns
        everyone = self._everyone_snapshot
        if everyone is None:
            everyone = self._everyone_snapshot = tuple(self._everyone)
        filtered = self._filtered_targets(batch)
        step = FANOUT_SLICE_CLIENTS
        turned = False  # a turn was given: clients may have gone since the pass began
        # The hot path: clients taking every key get the same batch, nothing per client but deliver.
        for start in range(0, len(everyone), step):
            raw: list[EioConnection] | None = [] if threads else None
            for conn in everyone if len(everyone) <= step else everyone[start:start + step]:
                if not turned or conn in attached:
                    conn.deliver(batch, joined, now_s, raw)
            if raw:  # written before any turn: a socket closed meanwhile could see its fd reused
                self._write_raw(raw, [joined] * len(raw))
            if start + step < len(everyone):
                turned = True
                yield
        if not filtered:
            return
        raw, raw_frames = ([] if threads else None), []
        shares: dict[frozenset[str], tuple[list[EioUpdate], bytes]] = {}
        visited = len(everyone)
        for conn, keys in filtered.items():
            if turned and conn not in attached:
                continue
            share = shares.get(keys)
            if share is None:
                part = [update for update in batch if update.always or update.key in keys]
                share = shares[keys] = (part, part[0].frame if len(part) == 1 else b"".join(u.frame for u in part))
            taken = len(raw) if raw is not None else 0
            conn.deliver(share[0], share[1], now_s, raw, filtered=True)
            if raw is not None and len(raw) > taken:
                raw_frames.append(share[1])
            visited += 1
            if visited % step == 0:
                if raw:
                    self._write_raw(raw, raw_frames)
                    raw, raw_frames = [], []
                turned = True
                yield
        if raw:
            self._write_raw(raw, raw_frames)

    def _filtered_targets(self, batch: list[EioUpdate]) -> dict[EioConnection, frozenset[str]]:
        """The clients with a filter that this batch concerns, with their keys (a copy, taken now)."""
        if not self._keys_of:
            return {}
        if any(update.always for update in batch):  # feed status: for every client
            return dict(self._keys_of)
        targets: dict[EioConnection, frozenset[str]] = {}
        for key in {update.key for update in batch}:
            for conn in self._by_key.get(key, ()):
                targets[conn] = self._keys_of[conn]
        return targets

    def _write_raw(self, conns: list[EioConnection], frames: list[bytes]) -> None:
        """Write each client's frames straight to its socket (clients that keep up), on several threads."""
        if len(conns) < FANOUT_PARALLEL_MIN_LINKS:
            for conn, data in zip(conns, frames):
                conn.write_frames(data)
            return
        if self._pool is None:
            self._pool = SocketWriterPool(self.writer_threads)
        for i, sent in self._pool.write([conn.raw_fd for conn in conns], frames):
            conns[i].write_frames(frames[i][sent:])  # the rest through the transport, which keeps order

    def close(self) -> None:
        """Stop the writer threads."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def stats(self) -> dict[str, int]:
        """Counters: clients, published, delivered, skipped (conflated away for a slow client)."""
        live = [(conn.counters, base) for conn, base in self._conns.items()]
        return {"clients": len(live), "published": self.published,
                "delivered": self._gone_sent + sum(now[0] - base[0] for now, base in live),
                "skipped": self._gone_skipped + sum(now[1] - base[1] for now, base in live)}

    def metrics(self) -> list[MetricFamily]:
        stats = self.stats()
        return [
            MetricFamily("sio_clients", "gauge", "Socket.IO clients receiving updates", [("", stats["clients"])]),
            MetricFamily("sio_updates_published_total", "counter", "Packets handed to the fan-out (updates and "
                         "feed status changes)", [("", stats["published"])]),
            MetricFamily("sio_deliveries_total", "counter", "Updates written to clients", [("", stats["delivered"])]),
            MetricFamily("sio_skipped_total", "counter", "Updates superseded by a newer one before a slow or "
                         "rate-limited client could take them", [("", stats["skipped"])]),
        ]


# ###########################################################################
# §14 The BBO application (Socket.IO handlers)
# ###########################################################################
# Owns: the Socket.IO handlers of BBO Stream on namespace "/": its events and payloads (README),
# and what "subscribe" means for a client's filter; and the playback of namespace "/replay".


class BboApp:
    """The BBO Stream Socket.IO application: a set of handlers on "/".

    Args:
        sio: the Socket.IO server to register on.
        hub: the fan-out hub the feed publishes to.
        latest_bbos: returns the current Bbo of every symbol (for request_initial_data).
        feed_status: returns the feed status object (the "feed" of /healthz), sent on connect.
        now_ms: wall clock in ms for `pong` (injectable for tests).
        symbols: the configured symbols (what "all symbols" means before each has sent data).
        auth_token: AUTH_TOKEN; when set, a CONNECT must carry `auth: {"token": ...}` with it.
        feed: the feed whose symbols `feed_add_symbol` / `feed_remove_symbol` change; None = none.
        feed_edit: whether clients may change them (AUTH_TOKEN set, so every client has it, or
            FEED_EDIT_ALLOWED); max_feed_symbols: FEED_MAX_SYMBOLS, told to clients.
        history, recovery_s, recovery_max_updates: connection state recovery (RECOVERY_SECONDS,
            RECOVERY_MAX_UPDATES; 0 s = off): the missed updates come from the history's rings.
    """

    def __init__(self, sio: SioServer, hub: Hub, latest_bbos: Callable[[], Iterable[Bbo]],
                 feed_status: Callable[[], dict[str, Any]],
                 now_ms: Callable[[], int] = now_ms, symbols: Callable[[], Iterable[str]] = tuple,
                 auth_token: str = "", feed: BinanceFeed | None = None, feed_edit: bool = False,
                 max_feed_symbols: int = 0, history: BboHistory | None = None, recovery_s: float = 0.0,
                 recovery_max_updates: int = 10_000) -> None:
        self.hub = hub
        self.history = history
        self.recovery_s = recovery_s if history is not None else 0.0
        self.recovery_max_updates = recovery_max_updates
        self.sessions: RecoverySessions | None = None     # disconnected sessions a client may take back
        self._live: dict[str, SioSocket] = {}             # recovery: connected sockets by pid
        if self.recovery_s:
            self.sessions = RecoverySessions(self.recovery_s)
            hub.enable_recovery()
        self.auth_token = auth_token
        self.feed = feed
        self.feed_edit = feed_edit and feed is not None
        self.max_feed_symbols = max_feed_symbols
        self.latest_bbos = latest_bbos
        self.symbols = symbols          # the configured symbols, including those not heard from yet
        self.feed_status = feed_status
        self.now_ms = now_ms
        sio.on_connect()(self.on_connect)
        sio.on_disconnect()(self.on_disconnect)
        sio.on("ready")(self.on_ready)
        sio.on("request_initial_data")(self.on_request_initial_data)
        sio.on("ping")(self.on_ping)
        sio.on("subscribe")(self.on_subscribe)
        sio.on("unsubscribe")(self.on_unsubscribe)
        sio.on("feed_add_symbol")(self.on_feed_add_symbol)
        sio.on("feed_remove_symbol")(self.on_feed_remove_symbol)

    def on_connect(self, sock: SioSocket, auth: Any) -> None:
        if self.auth_token:
            # Only `token` is read: the auth object may carry other keys (replay, recovery).
            presented = auth.get("token") if isinstance(auth, dict) else None
            if not token_matches(presented, self.auth_token):
                log.info("sio %s: client %s refused: %s token", short_sid(sock.conn.sid), sock.conn.peer,
                         "no" if presented is None else "wrong")
                # (ref: io.use() calling `next(new Error("unauthorized"))` answered 40, 40{"token":"x"} and
                # 40{"token":5} with 44{"message":"unauthorized"}; the connection stayed and took a next CONNECT.)
                raise SioConnectRefused(AUTH_REFUSED)
        if self.sessions is not None:
            self._recover(sock, auth)
        log.info("sio %s: client %s connected (%s)%s", short_sid(sock.conn.sid), sock.conn.peer, sock.conn.transport,
                 " and recovered its session" if sock.recovered else "")
        welcome = {"message": "Welcome to BBO Stream", "feedEdit": self.feed_edit, "maxFeedSymbols": self.max_feed_symbols}
        if self.sessions is not None:  # events carry one more argument, the offset: handlers expecting it know
            welcome["recoverySeconds"] = self.recovery_s
        sock.emit("welcome", welcome)
        sock.emit("feed_status", self.feed_status())
        self.hub.attach(sock.conn)

    def _recover(self, sock: SioSocket, auth: Any) -> None:
        """Recovery on: give the socket a pid and offsets; a client back in time with its pid and
        last offset (`auth.pid`, `auth.offset`, as socket.io-client sends them) takes its sid and
        subscription back and gets what it missed first (SioSocket.send_first)."""
        assert self.sessions is not None and self.hub.recovery is not None and self.history is not None
        conn, hub = sock.conn, self.hub
        sock.offset = lambda: hub.offset_for(conn)
        pid = auth.get("pid") if isinstance(auth, dict) else None
        offset = auth.get("offset") if isinstance(auth, dict) else None
        mark = parse_recovery_mark(offset, len(hub.recovery.names)) if isinstance(offset, str) else None
        session = None
        if isinstance(pid, str) and mark is not None \
                and hub.recovery.oldest_after <= mark[0] <= hub.passed_upto:  # (else as the ref: a new session)
            now_s = asyncio.get_running_loop().time()
            old = self._live.pop(pid, None)
            if old is not None:
                # Its old connection is still open here: long-polling cannot tell a cut between two GETs
                # until the heartbeat fails.  The client would not reconnect if it had not lost it.
                session = RecoverySession(old.sid, old.conn.filter_keys, old.conn.max_rate, now_s)
                old.conn.abort(SUPERSEDED_REASON)
            else:
                session = self.sessions.take(pid, now_s)
        if session is None:
            sock.pid = secrets.token_urlsafe(EIO_SID_BYTES)
            self._live[sock.pid] = sock
            return
        self._live[pid] = sock
        sock.pid, sock.sid, sock.recovered = pid, session.sid, True
        conn.set_filter(session.keys, session.max_rate)
        assert mark is not None
        texts, skipped = recover_updates(hub.recovery, self.history, mark[0], hub.passed_upto, session.keys,
                                         session.max_rate, self.recovery_max_updates, mark[1])
        if skipped:
            texts.insert(0, f'42["gap",{_json_dumps({"skipped": skipped})},"{offset}"]')
        sock.send_first(texts)

    def on_disconnect(self, sock: SioSocket, reason: str) -> None:
        log.info("sio %s: client %s disconnected (%s)", short_sid(sock.conn.sid), sock.conn.peer, reason)
        self.hub.detach(sock.conn)
        if sock.pid is not None and self._live.get(sock.pid) is sock:
            del self._live[sock.pid]
        if self.sessions is not None and sock.pid is not None and reason in RECOVERABLE_REASONS:
            conn = sock.conn
            self.sessions.keep(sock.pid, RecoverySession(sock.sid, conn.filter_keys, conn.max_rate,
                                                         asyncio.get_running_loop().time()))

    def on_ready(self, sock: SioSocket, *args: Any) -> None:
        return None  # accepted and harmless (the seed's clients send it)

    def on_request_initial_data(self, sock: SioSocket, *args: Any) -> None:
        for bbo in self.latest_bbos():
            if sock.conn.wants(bbo.symbol):
                sock.emit_json("bbo_update", bbo_json(bbo))

    def on_ping(self, sock: SioSocket, *args: Any) -> dict[str, int]:
        answer = {"time": self.now_ms()}
        sock.emit("pong", answer)
        return answer  # also the ack, when the client asked for one

    def on_subscribe(self, sock: SioSocket, request: Any = None, *args: Any) -> dict[str, Any]:
        """`{"symbols": [...], "maxRate": 10}`: add symbols (from "all": exactly these); set the rate."""
        if not isinstance(request, dict):
            return {"error": "subscribe expects an object"}
        try:
            symbols = self._parse_symbols(request.get("symbols"))
            max_rate = self._parse_rate(request.get("maxRate"))
        except ValueError as exc:
            return {"error": str(exc)}
        current = sock.conn.filter_keys
        if symbols is not None:
            current = symbols if current is None else current | symbols
            if len(current) > BBO_MAX_SUBSCRIBE_SYMBOLS:
                return {"error": f"at most {BBO_MAX_SUBSCRIBE_SYMBOLS} symbols"}
        sock.conn.set_filter(current, max_rate)
        return self._subscription(sock)

    def on_unsubscribe(self, sock: SioSocket, request: Any = None, *args: Any) -> dict[str, Any]:
        """`{"symbols": [...]}`: stop those symbols; the rate stays."""
        if not isinstance(request, dict):
            return {"error": "unsubscribe expects an object"}
        try:
            symbols = self._parse_symbols(request.get("symbols")) or frozenset()
        except ValueError as exc:
            return {"error": str(exc)}
        conn = sock.conn
        current = conn.filter_keys if conn.filter_keys is not None else self._known_symbols()
        conn.set_filter(current - symbols, conn.max_rate)
        return self._subscription(sock)

    def on_feed_add_symbol(self, sock: SioSocket, request: Any = None, *args: Any) -> Any:
        """`{"symbol": "ETHUSDT"}`: the feed streams it too (BinanceFeed.add_symbol); ack
        `{"ok": true, "symbols": [...]}` or `{"error": "..."}`."""
        return self._edit_feed(sock, request, "add")

    def on_feed_remove_symbol(self, sock: SioSocket, request: Any = None, *args: Any) -> Any:
        """`{"symbol": "ETHUSDT"}`: the feed stops streaming it; the same acks."""
        return self._edit_feed(sock, request, "remove")

    def _edit_feed(self, sock: SioSocket, request: Any, action: str) -> Any:
        if not self.feed_edit or self.feed is None:
            return {"error": "changing the feed's symbols is off: it needs AUTH_TOKEN (clients then connect with it) "
                             "or FEED_EDIT_ALLOWED=true"}
        symbol = request.get("symbol") if isinstance(request, dict) else None
        if not isinstance(symbol, str) or not _SYMBOL_RE.match(symbol):
            return {"error": f'expected {{"symbol": "ETHUSDT"}}: 1 to {MAX_SYMBOL_CHARS} letters, digits or _'}
        log.info("sio %s: client %s asks to %s %s", short_sid(sock.conn.sid), sock.conn.peer, action, symbol.upper())
        change = self.feed.add_symbol if action == "add" else self.feed.remove_symbol
        return self._feed_change(change, symbol.upper())

    @staticmethod
    async def _feed_change(change: Callable[[str], Any], symbol: str) -> dict[str, Any]:
        try:
            return {"ok": True, "symbols": await change(symbol)}
        except FeedEditError as exc:
            return {"error": str(exc)}

    def _known_symbols(self) -> frozenset[str]:
        return frozenset(self.symbols()) | {bbo.symbol for bbo in self.latest_bbos()}

    def _subscription(self, sock: SioSocket) -> dict[str, Any]:
        conn = sock.conn
        symbols = conn.filter_keys if conn.filter_keys is not None else self._known_symbols()
        return {"symbols": sorted(symbols), "maxRate": conn.max_rate}

    @staticmethod
    def _parse_symbols(raw: Any) -> frozenset[str] | None:
        if raw is None or raw == []:
            return None  # omitted or empty: the symbol set does not change
        if not isinstance(raw, list) or len(raw) > BBO_MAX_SUBSCRIBE_SYMBOLS:
            raise ValueError(f"symbols must be a list of at most {BBO_MAX_SUBSCRIBE_SYMBOLS} names")
        if not all(isinstance(name, str) and _SYMBOL_RE.match(name) for name in raw):
            raise ValueError(f"each symbol must be 1 to {MAX_SYMBOL_CHARS} letters, digits or _")
        return frozenset(name.upper() for name in raw)

    @staticmethod
    def _parse_rate(raw: Any) -> float | None:
        if raw is None:
            return None  # omitted or null: every update
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0 < raw <= BBO_MAX_RATE_PER_S:
            raise ValueError(f"maxRate must be a number in (0, {BBO_MAX_RATE_PER_S:g}]")
        return raw


class ReplaySession:
    """One /replay client's playback: a task that sends the range's rows (ReplayCursor) at the pace
    ReplayPacer sets, with outages and status; pause/resume/seek/speed wake it to re-plan."""

    def __init__(self, sock: SioSocket, history: BboHistory, request: ReplayRequest) -> None:
        self.sock = sock
        self.request = request
        prefix = "4" + encode_sio(SioPacket(SioType.EVENT, sock.namespace, ["bbo_update"]))[:-1] + ","
        self.cursor = ReplayCursor(history, request, prefix)
        self.loop = asyncio.get_running_loop()
        self.pacer = ReplayPacer(request.from_ms, request.speed, self.loop.time())
        self.state = "playing"                    # "playing" | "paused" | "done"
        self._outages = self.cursor.outages()     # (start, outage) not announced yet, by start
        self._wake = asyncio.Event()              # a control event changed the plan
        self._pending: ReplayChunk | None = None  # rows rendered but not due yet (paced): kept, not rendered again
        self.task: asyncio.Task | None = None
        self.sent = 0                             # updates sent

    def start(self) -> None:
        self.task = self.loop.create_task(self._run(), name=f"replay {short_sid(self.sock.sid)}")

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    def status(self) -> dict[str, Any]:
        position = min(self.pacer.position(self.loop.time()), self.request.to_ms)
        return {"state": self.state, "position": int(position), "speed": self.pacer.speed}

    def _announce(self) -> dict[str, Any]:
        status = self.status()
        self.sock.emit("replay_status", status)
        return status

    # -- control events (the client's) ------------------------------------------------------
    def pause(self) -> dict[str, Any]:
        if self.state == "playing":
            self.pacer.pause(self.loop.time())
            self.state = "paused"
            self._wake.set()
        return self._announce()

    def resume(self) -> dict[str, Any]:
        if self.state == "paused":
            self.pacer.resume(self.loop.time())
            self.state = "playing"
            self._wake.set()
        return self._announce()

    def seek(self, time_ms: int) -> dict[str, Any]:
        time_ms = min(max(time_ms, self.request.from_ms), self.request.to_ms)
        self.cursor.seek(time_ms)
        self._pending = None
        self.pacer.seek(time_ms, self.loop.time())
        self._outages = [item for item in self.cursor.outages() if item[0] >= time_ms]
        if self.state == "done":
            self.state = "playing"
        self._wake.set()
        return self._announce()

    def set_speed(self, speed: float) -> dict[str, Any]:
        self.pacer.set_speed(speed, self.loop.time())
        self._wake.set()
        return self._announce()

    # -- the playback task ------------------------------------------------------------------
    async def _sleep_until(self, wall_s: float) -> bool:
        """Wait until the loop time ``wall_s``; False when a control event came first."""
        delay = wall_s - self.loop.time()
        if delay <= 0:
            return True
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except TimeoutError:
            return True
        return False

    def _outages_before(self, key: float) -> None:
        while self._outages and self._outages[0][0] <= key:
            self.sock.emit("outage", self._outages.pop(0)[1])

    async def _run(self) -> None:
        conn = self.sock.conn
        self._announce()
        while not conn.closed:
            self._wake.clear()
            if self.state != "playing":
                await self._wake.wait()
                continue
            polling = conn.transport == "polling"
            if not await conn.wait_room(0 if polling else REPLAY_HIGH_WATER_BYTES):
                return
            chunk = self._pending or self.cursor.peek(REPLAY_POLLING_ROWS if polling else REPLAY_CHUNK_ROWS)
            self._pending = None
            if chunk is None:
                # The range plays to its end, rows or not: a paced 60 s range takes 60 s / speed.
                if self.pacer.speed and not await self._sleep_until(self.pacer.wall_at(self.request.to_ms)):
                    continue
                self._outages_before(self.request.to_ms)
                self.pacer.reached(self.request.to_ms, self.loop.time())
                self.state = "done"
                self._announce()
                continue
            count = self._due_rows(chunk)
            if count == 0:
                self._pending = chunk
                if not await self._sleep_until(self.pacer.wall_at(float(chunk.keys[0]))):
                    continue  # re-plan: the pace, the position or the state changed
                self._pending = None
                count = self._due_rows(chunk)
            self._send(chunk, count)
            if count < len(chunk.keys):  # the rest is due later: sent from this chunk, not rendered again
                self._pending = ReplayChunk(chunk.keys[count:], chunk.texts[count:], chunk.symbols[count:])

    def _due_rows(self, chunk: ReplayChunk) -> int:
        """How many of the chunk's rows are due now (all of them at speed 0)."""
        if not self.pacer.speed:
            return len(chunk.keys)
        return int(np.searchsorted(chunk.keys, self.pacer.position(self.loop.time()), "right"))

    def _send(self, chunk: ReplayChunk, count: int) -> None:
        keys, texts = chunk.keys, chunk.texts
        start = 0
        while start < count:  # outages go out between the rows they fall between
            if self._outages and self._outages[0][0] <= keys[count - 1]:
                stop = int(np.searchsorted(keys[:count], self._outages[0][0], "left"))
                if stop > start:
                    self.sock.conn.send_packets(texts[start:stop])
                self._outages_before(float(keys[stop]) if stop < count else math.inf)
                start = stop
                continue
            self.sock.conn.send_packets(texts[start:count])
            start = count
        self.cursor.advance(chunk, count)
        self.sent += count
        if not self.pacer.speed:
            self.pacer.reached(float(keys[count - 1]), self.loop.time())


class ReplayApp:
    """The /replay namespace: recorded ranges played back as bbo_update events (see README)."""

    def __init__(self, sio: SioServer, history: BboHistory, auth_token: str = "") -> None:
        self.history = history
        self.auth_token = auth_token
        ns = REPLAY_NAMESPACE
        sio.on_connect(ns)(self.on_connect)
        sio.on_disconnect(ns)(self.on_disconnect)
        sio.on("pause", ns)(lambda sock, *args: self._session(sock).pause())
        sio.on("resume", ns)(lambda sock, *args: self._session(sock).resume())
        sio.on("seek", ns)(self.on_seek)
        sio.on("speed", ns)(self.on_speed)

    @staticmethod
    def _session(sock: SioSocket) -> ReplaySession:
        return sock.data["replay"]

    def on_connect(self, sock: SioSocket, auth: Any) -> None:
        if self.auth_token:
            presented = auth.get("token") if isinstance(auth, dict) else None
            if not token_matches(presented, self.auth_token):
                raise SioConnectRefused(AUTH_REFUSED)
        try:
            request = parse_replay_auth(auth, self.history)
        except ValueError as exc:
            raise SioConnectRefused(str(exc)) from None
        log.info("sio %s: client %s replays %s from %d to %d at %gx (%s clock)", short_sid(sock.conn.sid),
                 sock.conn.peer, ",".join(request.symbols[:5]), request.from_ms, request.to_ms, request.speed,
                 request.clock)
        session = sock.data["replay"] = ReplaySession(sock, self.history, request)
        session.start()  # its first step runs after the CONNECT answer is out

    def on_disconnect(self, sock: SioSocket, reason: str) -> None:
        session = sock.data.get("replay")
        if session is not None:
            session.stop()

    def on_seek(self, sock: SioSocket, request: Any = None, *args: Any) -> dict[str, Any]:
        time_ms = request.get("time") if isinstance(request, dict) else None
        if isinstance(time_ms, bool) or not isinstance(time_ms, int) or not 0 <= time_ms <= MAX_TIME_MS:
            return {"error": 'seek expects {"time": <ms>}'}
        return self._session(sock).seek(time_ms)

    def on_speed(self, sock: SioSocket, request: Any = None, *args: Any) -> dict[str, Any]:
        speed = request.get("speed") if isinstance(request, dict) else None
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 <= speed <= REPLAY_MAX_SPEED:
            return {"error": f'speed expects {{"speed": x}}, x from 0 (as fast as you read) to {REPLAY_MAX_SPEED:g}'}
        return self._session(sock).set_speed(float(speed))


# ###########################################################################
# §15 Socket.IO server
# ###########################################################################
# Owns: namespaces, on(event) handlers, acks both ways, on top of EioServer (module docstring).


class SioConnectRefused(Exception):
    """Raise in a connect handler to refuse: the client gets CONNECT_ERROR {"message", "data"}."""

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class SioSocket:
    """A client's membership of one namespace (the reference's server-side Socket)."""

    __slots__ = ("server", "conn", "namespace", "sid", "data", "connected", "_acks", "_next_ack_id",
                 "_held", "pid", "offset", "recovered", "_first")

    def __init__(self, server: SioServer, conn: EioConnection, namespace: str) -> None:
        self.server = server                       # owner
        self.conn = conn                           # the Engine.IO connection carrying it
        self.namespace = namespace                 # "/" or "/name"
        self.sid = secrets.token_urlsafe(EIO_SID_BYTES)  # own id: the reference never reuses the EIO sid
        self.data: dict[str, Any] = {}             # free for the application
        self.connected = False                     # CONNECT answered and not left yet
        self._acks: dict[int, Callable[..., Any]] = {}  # ack id -> callback, oldest first
        self._next_ack_id = 0                      # per socket, from 0 like the reference
        self._held: list[SioPacket] | None = []    # packets emitted by the connect handler, sent after CONNECT
        # Connection state recovery (set by the connect handler when it offers it):
        self.pid: str | None = None                # private session id, in the CONNECT answer
        self.offset: Callable[[], str] | None = None  # the mark an event emitted now carries (its last argument)
        self.recovered = False                     # this socket took back a disconnected session
        self._first: list[str] = []                # Engine.IO packets sent before the CONNECT answer (missed ones)

    def emit(self, event: str, *args: Any, callback: Callable[..., Any] | None = None) -> None:
        """Send an event; `callback(*args)` runs when the client acknowledges it."""
        if event in SIO_RESERVED_EVENTS:
            raise ValueError(f"{event!r} is a reserved event name")
        ack_id = None
        if callback is not None:
            ack_id = self._next_ack_id
            self._next_ack_id += 1
            self._acks[ack_id] = callback
            if len(self._acks) > SIO_MAX_PENDING_ACKS:
                self._acks.pop(next(iter(self._acks)))  # bounded: the oldest never gets its answer
        elif self.offset is not None:  # (ref: an event awaiting an ack carries no offset)
            args = (*args, self.offset())
        self._send(SioPacket(SioType.EVENT, self.namespace, [event, *args], ack_id))

    def emit_json(self, event: str, json_arg: str) -> None:
        """Send an event whose single argument is JSON text already encoded (no re-encoding)."""
        prefix = "" if self.namespace == "/" else self.namespace + ","
        offset = "" if self.offset is None else f',"{self.offset()}"'
        text = f"2{prefix}[{_json_dumps(event)},{json_arg}{offset}]"
        if self._held is not None:
            self._held.append(decode_sio(text))
        elif self.connected:
            self.conn.send(text)

    def send_first(self, texts: list[str]) -> None:
        """From a connect handler: Engine.IO packets that go before the CONNECT answer (the updates a
        recovered client missed: the reference writes them first; the client holds them until the
        answer, then hands them to its handlers in order)."""
        self._first.extend(texts)

    def disconnect(self) -> None:
        """Leave the namespace: the client gets DISCONNECT; the Engine.IO connection stays."""
        if self.connected:
            self._send(SioPacket(SioType.DISCONNECT, self.namespace))
            self.server._leave(self, "server namespace disconnect")

    def _send(self, pkt: SioPacket) -> None:
        if self._held is not None:
            self._held.append(pkt)
        elif self.connected or pkt.kind is SioType.CONNECT:
            self.server._send(self.conn, pkt)

    def _on_ack(self, pkt: SioPacket) -> None:
        callback = self._acks.pop(pkt.ack_id, None) if pkt.ack_id is not None else None
        if callback is None:
            return  # the reference ignores an ack nobody waits for ("bad ack")
        try:
            callback(*(pkt.data or []))
        except Exception:
            log.exception("ack callback failed")


class _SioNamespace:
    __slots__ = ("name", "events", "on_connect", "on_disconnect")

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: dict[str, Callable[..., Any]] = {}
        self.on_connect: Callable[[SioSocket, Any], None] | None = None
        self.on_disconnect: Callable[[SioSocket, str], None] | None = None


class SioServer:
    """Socket.IO v5 server on top of an EioServer (see the module docstring for the API)."""

    def __init__(self, eio: EioServer, connect_timeout_s: float = SIO_CONNECT_TIMEOUT_S) -> None:
        self.eio = eio
        eio.handler = self
        self.connect_timeout_s = connect_timeout_s
        self.namespaces: dict[str, _SioNamespace] = {"/": _SioNamespace("/")}  # "/" always exists
        self._connect_timers: dict[EioConnection, asyncio.TimerHandle] = {}
        self._pending: set[asyncio.Task] = set()  # handlers that returned a coroutine: their acks wait for it
        self.protocol_errors = 0

    # -- registration -----------------------------------------------------------------

    def _namespace(self, name: str) -> _SioNamespace:
        return self.namespaces.setdefault(name, _SioNamespace(name))

    def on(self, event: str, namespace: str = "/") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: `handler(sock, *args)` for `event`; its return value is the ack."""
        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            self._namespace(namespace).events[event] = handler
            return handler
        return register

    def on_connect(self, namespace: str = "/") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: `handler(sock, auth)`; raise SioConnectRefused to refuse the client."""
        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            self._namespace(namespace).on_connect = handler
            return handler
        return register

    def on_disconnect(self, namespace: str = "/") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: `handler(sock, reason)` once the socket left (client, server or transport)."""
        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            self._namespace(namespace).on_disconnect = handler
            return handler
        return register

    # -- EioServer handler interface ---------------------------------------------------------

    def on_open(self, conn: EioConnection) -> None:
        loop = asyncio.get_running_loop()
        # A binary packet with its attachments is held to the size of one Engine.IO message.
        conn.upper = SioClientState(loop.time(), self.connect_timeout_s, self.eio.max_payload_bytes,
                                    HeldBytes(self.eio.held_budget))
        self._connect_timers[conn] = loop.call_later(self.connect_timeout_s, self._check_connected, conn)

    def on_message(self, conn: EioConnection, data: str | bytes) -> None:
        client: SioClientState = conn.upper
        loop = asyncio.get_running_loop()
        was_pending = client.decoder.pending
        try:
            pkt = client.receive(data, loop.time())
            if client.decoder.pending and not was_pending:  # attachments announced: they must come in time
                loop.call_later(SIO_ATTACHMENT_TIMEOUT_S, self._check_attachments, conn)
        except HeldBytesRefused as exc:
            log.debug("sio %s: closing %s: %s", short_sid(conn.sid), conn.peer, exc)
            conn.close(HELD_BYTES_REASON)
            return
        except SioProtocolError as exc:
            # socket.io client.ts: a decode error or a packet in the wrong state closes the connection
            # (ref: "42{}", "4abc", an event before CONNECT, a second CONNECT -> close; polling `6\x1e1`).
            # A CONNECT joins at once here, so an event in the same payload as its CONNECT is served;
            # the reference joins a tick later and closes on it (a race no official client triggers).
            self.protocol_errors += 1
            _log_once("sio-parse", "sio %s: closing %s: %s", short_sid(conn.sid), conn.peer, exc)
            conn.close("parse error")
            return
        if pkt is None:
            return
        if pkt.kind is SioType.CONNECT:
            self._connect(conn, client, pkt)
            return
        sock: SioSocket = client.namespaces[pkt.namespace]
        if pkt.kind is SioType.EVENT:
            self._dispatch(sock, pkt)
        elif pkt.kind is SioType.ACK:
            sock._on_ack(pkt)
        elif pkt.kind is SioType.DISCONNECT:
            self._leave(sock, "client namespace disconnect")

    def on_close(self, conn: EioConnection, reason: str) -> None:
        timer = self._connect_timers.pop(conn, None)
        if timer is not None:
            timer.cancel()
        client: SioClientState | None = conn.upper
        if client is None:
            return
        if client.held is not None:
            client.held.release()
        for sock in list(client.namespaces.values()):
            self._leave(sock, reason)

    # -- packets ------------------------------------------------------------------------------

    def _check_attachments(self, conn: EioConnection) -> None:
        client: SioClientState | None = conn.upper
        if client is not None and not conn.closed and client.attachments_overdue(self.eio.now_s()):
            self.protocol_errors += 1
            _log_once("sio-attachments", "sio %s: closing %s: attachments not received within %g s",
                      short_sid(conn.sid), conn.peer, SIO_ATTACHMENT_TIMEOUT_S)
            conn.close("parse error")

    def _check_connected(self, conn: EioConnection) -> None:
        self._connect_timers.pop(conn, None)
        client: SioClientState | None = conn.upper
        if client is not None and client.connect_expired(self.eio.now_s()):
            conn.close("connect timeout")

    def _connect(self, conn: EioConnection, client: SioClientState, pkt: SioPacket) -> None:
        namespace = self.namespaces.get(pkt.namespace)
        if namespace is None:
            # (ref: 44/<ns>,{"message":"Invalid namespace"} and the connection stays usable.)
            self._send(conn, SioPacket(SioType.CONNECT_ERROR, pkt.namespace, {"message": "Invalid namespace"}))
            return
        sock = SioSocket(self, conn, pkt.namespace)
        try:
            if namespace.on_connect is not None:
                namespace.on_connect(sock, pkt.data if pkt.data is not None else {})
        except SioConnectRefused as exc:
            refusal = {"message": exc.message} if exc.data is None else {"message": exc.message, "data": exc.data}
            self._send(conn, SioPacket(SioType.CONNECT_ERROR, pkt.namespace, refusal))
            return
        except Exception:
            log.exception("connect handler failed for %s", pkt.namespace)
            self._send(conn, SioPacket(SioType.CONNECT_ERROR, pkt.namespace, {"message": "connect handler failed"}))
            return
        client.joined(pkt.namespace, sock)
        timer = self._connect_timers.pop(conn, None)
        if timer is not None:
            timer.cancel()
        sock.connected = True
        held, sock._held = sock._held or [], None
        if sock._first:  # (ref: a recovered socket's missed packets, then "40{...}")
            conn.send_packets(sock._first)
            sock._first = []
        # The CONNECT answer first, then whatever the connect handler emitted (ref: the same
        # order, "40{...}" then "42["welcome",...]"); with recovery on, the pid beside the sid.
        answer = {"sid": sock.sid} if sock.pid is None else {"sid": sock.sid, "pid": sock.pid}
        self._send(conn, SioPacket(SioType.CONNECT, pkt.namespace, answer))
        for packet in held:
            self._send(conn, packet)

    def _dispatch(self, sock: SioSocket, pkt: SioPacket) -> None:
        if not pkt.data:
            return  # (ref: "42" alone is accepted and does nothing)
        event, args = pkt.data[0], pkt.data[1:]
        handler = self.namespaces[sock.namespace].events.get(event) if isinstance(event, str) else None
        if handler is None:
            return
        try:
            result = handler(sock, *args)
        except Exception:
            log.exception("handler for %r failed", event)
            return
        if asyncio.iscoroutine(result):  # work that awaits (the exchange's REST API): ack when it is done
            task = asyncio.get_running_loop().create_task(result)
            self._pending.add(task)
            task.add_done_callback(lambda done: self._ack_when_done(sock, pkt, event, done))
            return
        if pkt.ack_id is not None and sock.connected:
            self._send(sock.conn, SioPacket(SioType.ACK, sock.namespace, ack_args(result), pkt.ack_id))

    def _ack_when_done(self, sock: SioSocket, pkt: SioPacket, event: str, task: asyncio.Task) -> None:
        self._pending.discard(task)
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("handler for %r failed", event, exc_info=task.exception())
            return
        if pkt.ack_id is not None and sock.connected:
            self._send(sock.conn, SioPacket(SioType.ACK, sock.namespace, ack_args(task.result()), pkt.ack_id))

    def _leave(self, sock: SioSocket, reason: str) -> None:
        if not sock.connected:
            return
        sock.connected = False
        client: SioClientState = sock.conn.upper
        client.left(sock.namespace)
        sock._acks.clear()
        handler = self.namespaces[sock.namespace].on_disconnect
        if handler is not None:
            try:
                handler(sock, reason)
            except Exception:
                log.exception("disconnect handler failed")

    def _send(self, conn: EioConnection, pkt: SioPacket) -> None:
        try:
            text = encode_sio(pkt)
        except TypeError:
            # bytes somewhere in the data: BINARY_EVENT/BINARY_ACK + one binary message per attachment.
            data, buffers = sio_deconstruct(pkt.data)
            kind = SioType.BINARY_EVENT if pkt.kind is SioType.EVENT else SioType.BINARY_ACK
            conn.send(encode_sio(SioPacket(kind, pkt.namespace, data, pkt.ack_id, len(buffers))))
            for raw in buffers:
                conn.send_binary(raw)
            return
        except (ValueError, RecursionError) as exc:  # NaN, or nesting too deep to encode
            _log_once("sio-encode", "sio: cannot encode a packet for %s: %s", short_sid(conn.sid), exc)
            return
        conn.send(text)


# ###########################################################################
# §16 Engine.IO server
# ###########################################################################
# Owns: the session registry and request checks (EioServer), each session's timers, transports
# and backpressure (EioConnection), long-polling (EioPolling), WebSocket sessions and upgrades
# (EioWebSocket).
# Errors are the reference's (engine.io server.ts): HTTP 400 + {"code","message"}; 403 for code 4.

EIO_ERROR_MESSAGES = {
    0: "Transport unknown",
    1: "Session ID unknown",
    2: "Bad handshake method",
    3: "Bad request",
    4: "Forbidden",
    5: "Unsupported protocol version",
}
_POLL_HEADERS = (("Cache-Control", "no-store"),)  # engine.io sets it on every polling answer
EIO_POST_READ_WHOLE_BYTES = 16 * 1024  # a POST body up to this is read whole and answered as engine.io does (`ok`,
                                       # even with an invalid packet); a larger one is refused at its first invalid
                                       # packet, unread beyond it (reading 1 MB of junk costs the loop ~3 ms)
_WS_LOG = logging.getLogger("bbo_stream.ws")        # websockets' per-connection log lines


@functools.lru_cache(maxsize=8)
def _refusal_json(message: str) -> bytes:  # (made once: a flood of refusals repeats a few messages)
    return _json_dumps({"code": 4, "message": message}).encode()


def _log_held_refusal(budget: HeldBytesBudget, peer: str) -> None:
    _log_once("held-bytes", "%s sent a large message while %d bytes of unfinished messages were held "
              "(server-wide limit %d); disconnected", peer, budget.used_bytes, budget.limit_bytes)


class EioConnection:
    """The I/O side of one Engine.IO session: transport(s), timers, the parked GET.

    The layer above uses `send`, `send_binary`, `close`, `transport`, `sid`, `peer`, `upper`,
    and for conflating updates (see EioOutbox) `set_filter`, `filter_keys`, `max_rate`, `wants`
    and `counters`; what the keys mean (symbols, for BBO Stream) is that layer's business.
    """

    __slots__ = ("server", "session", "sid", "peer", "upper", "ws", "probe", "_poll_waiter", "_post_transport",
                 "_timer", "_timer_at", "_drain_task", "_close_notified", "_close_code", "on_filter", "_room")

    def __init__(self, server: EioServer, session: EioSession, peer: str) -> None:
        self.server = server                 # owner: registry, handler, settings
        self.session = session               # the pure state machine
        self.sid = session.sid               # public session id
        self.peer = peer                     # "ip:port", for logs
        self.upper: Any = None               # slot for the layer above (Socket.IO client state)
        self.ws: WsLink | None = None        # the WebSocket once it is the session's transport
        self.probe: WsLink | None = None     # a WebSocket probing for an upgrade
        self._poll_waiter: Callable[[str], None] | None = None  # called once with the parked GET's body
        self._post_transport: asyncio.BaseTransport | None = None  # the POST whose body is arriving
        self._timer: asyncio.TimerHandle | None = None        # fires at the session's next deadline
        self._timer_at = 0.0                 # when `_timer` fires (loop time)
        self._drain_task: asyncio.Task[None] | None = None    # owns writing while the WebSocket is backed up
        self._close_notified = False         # on_close was called
        self._close_code: int | None = None  # WebSocket close code to use (None -> empty close frame)
        self.on_filter: Callable[[EioConnection], None] | None = None  # told of set_filter (the hub's routing)
        self._room: asyncio.Future[None] | None = None  # wait_room's waiter: resolved whenever queued bytes went out

    # -- API for the layer above -------------------------------------------------------

    @property
    def transport(self) -> str:
        return self.session.transport

    @property
    def closed(self) -> bool:
        return self.session.closed

    def send(self, text: str) -> None:
        """Send one Engine.IO text message (`4` + text)."""
        self._apply(self.session.send("4" + text))

    def send_binary(self, raw: bytes) -> None:
        """Send one Engine.IO binary message."""
        self._apply(self.session.send(bytes(raw)))

    def close(self, reason: str = "server close", code: int | None = None) -> None:
        """Close the session after what is already queued (polling `1`, WebSocket close frame)."""
        self._close_code = code
        self._apply(self.session.close(reason, self.server.now_s()))

    def abort(self, reason: str) -> None:
        """Close at once, dropping what is queued."""
        self._apply(self.session.abort(reason, self.server.now_s()))

    def flush(self) -> None:
        """Transmit the outbox if the transport can take it now."""
        self._apply([_FLUSH] if self.session.can_transmit() else [])

    def send_packets(self, texts: list[str]) -> None:
        """Several Engine.IO text packets in order (a replay step): over a WebSocket that keeps up
        and has nothing queued, as frames in one write; otherwise through the outbox."""
        link, outbox = self.ws, self.session.outbox
        if link is not None and link.writable and not link.backed_up and not outbox.control and not outbox.updates:
            self.write_frames(b"".join([encode_ws_frame(text.encode()) for text in texts]))
            return
        self._apply(self.session.send_many(texts))

    def has_room(self, max_bytes: int) -> bool:
        """Whether this client has at most ``max_bytes`` queued and its WebSocket is not backed up."""
        outbox = self.session.outbox
        return not (self.ws is not None and self.ws.backed_up) and outbox.control_bytes + outbox.update_bytes <= max_bytes

    async def wait_room(self, max_bytes: int) -> bool:
        """Until has_room (backpressure for a producer as fast as the client reads); False once closed."""
        while not self.closed and not self.has_room(max_bytes):
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await self._room
        return not self.closed

    def _wake_room(self) -> None:
        room, self._room = self._room, None
        if room is not None and not room.done():
            room.set_result(None)

    # -- which updates this client gets, and how many it got -------------------------------

    @property
    def filter_keys(self) -> frozenset[str] | None:
        """The keys this client wants; None = every key."""
        return self.session.outbox.keys

    @property
    def max_rate(self) -> float | None:
        """Updates per second per key this client takes; None = every update."""
        return self.session.outbox.max_rate

    def wants(self, key: str) -> bool:
        return self.session.outbox.wants(key)

    def set_filter(self, keys: frozenset[str] | None, max_rate: float | None) -> None:
        """Choose the updates this client gets; what waits and is now due goes out at once."""
        self.session.outbox.set_filter(keys, max_rate)
        if self.on_filter is not None:
            self.on_filter(self)
        self.flush()

    @property
    def counters(self) -> tuple[int, int]:
        """(updates sent, updates superseded before they could be sent) since the session began."""
        outbox = self.session.outbox
        return outbox.sent, outbox.skipped

    # -- the Hub's hot path --------------------------------------------------------------

    def deliver(self, batch: list[EioUpdate], joined_frames: bytes, now_s: float,
                raw: list[EioConnection] | None = None, filtered: bool = False) -> None:
        """Hand a batch of updates to this client.

        Fast paths, for a client that has nothing queued and takes every update of `batch` (all
        of them, or `filtered`: the hub picked those it asked for, and it has no rate limit):
        over a WebSocket that keeps up, it gets the batch's pre-built frames, the same bytes as
        its peers, in one write; given a `raw` list, a plain-TCP one whose transport holds
        nothing unsent is appended to it instead, for the hub to write to its socket directly
        (see SocketWriterPool).  Long-polling with a GET parked, the batch answers the GET.
        Everyone else goes through the conflating outbox (and so does a batch larger than the
        outbox's bound, which it would conflate).
        """
        link, session = self.ws, self.session
        outbox = session.outbox
        if ((outbox.passthrough or (filtered and outbox.interval_s is None))
                and not outbox.control and not outbox.updates):
            if link is not None and link.writable and not link.backed_up:
                outbox.sent += len(batch)
                outbox.given = batch[-1]  # (recovery: where an event emitted to it alone stands)
                if (raw is not None and link.raw_fd >= 0 and not link.transport.get_write_buffer_size()
                        and not link.transport.is_closing()):
                    raw.append(self)
                else:
                    self.write_frames(joined_frames)
                return
            answer = self._poll_waiter
            # (Over the outbox's bound, the outbox keeps the newest update per key instead.)
            if (answer is not None and session.poll_parked and session.state is EioState.POLLING
                    and len(joined_frames) <= OUTBOX_MAX_UPDATE_BYTES):
                outbox.sent += len(batch)
                outbox.given = batch[-1]
                self._poll_waiter = None
                answer(session.take_poll_payload_of(batch))
                if self._room is not None:
                    self._wake_room()
                return
        self._apply(self.session.push_updates(batch, now_s))

    @property
    def raw_fd(self) -> int:
        return self.ws.raw_fd if self.ws is not None else -1

    def write_frames(self, frames: bytes) -> None:
        """Write ready WebSocket frames through the transport, watching for a peer that falls behind."""
        link = self.ws
        if link is None:
            return
        link.write(frames)
        if link.backed_up:
            self._start_drain(link)

    # -- carrying out the session's actions ------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for kind, payload in actions:
            if kind is Act.DELIVER:
                if not self.session.closed:
                    self.server._dispatch(self, payload)
            elif kind is Act.FLUSH:
                self._flush(conflate=False)
            elif kind is Act.CLOSE:
                self._on_session_closed(payload)
            elif kind is Act.PROBE_PONG and self.probe is not None:
                self.probe.send(["3probe"])
            elif kind is Act.UPGRADED and self.probe is not None:
                self.ws, self.probe = self.probe, None
                self.server.upgrades += 1
                self._flush(conflate=False)
            elif kind is Act.CLOSE_PROBE and self.probe is not None:
                probe, self.probe = self.probe, None
                probe.close()
        if self.session.state is EioState.CLOSED:
            self._cancel_timer()
            self.server._forget(self)
        else:
            self._arm_timer()

    def _flush(self, conflate: bool) -> None:
        """Transmit the outbox: on the WebSocket, or as the answer to the parked GET."""
        link = self.ws
        if link is not None:
            outbox = self.session.outbox
            if link.backed_up:
                self._start_drain(link)  # the drain task flushes once the peer catches up
                return
            if not link.writable or not outbox.has_data():
                return
            control = outbox.take_control()
            frames = [update.frame for update in outbox.take_updates(conflate)]
            link.send(control, frames)
            if link.backed_up:
                self._start_drain(link)
            elif self._room is not None:
                self._wake_room()
            return
        answer = self._poll_waiter
        if answer is not None and self.session.poll_parked:
            self._poll_waiter = None
            answer(self.session.take_poll_payload())
            if self._room is not None:
                self._wake_room()

    def _on_session_closed(self, reason: str) -> None:
        if self._close_notified:
            return
        self._close_notified = True
        self._wake_room()
        log.debug("eio %s closed: %s", short_sid(self.sid), reason)
        if reason == INBOUND_RATE_REASON:
            self.server.rate_disconnects += 1
            _log_once("inbound-rate", "eio %s: %s sent more than %g packets/s (MAX_CLIENT_MESSAGES_PER_S); disconnected",
                      short_sid(self.sid), self.peer, self.server.max_messages_per_s)
        elif reason == HELD_BYTES_REASON:
            _log_held_refusal(self.server.held_budget, self.peer)
        if self._post_transport is not None:  # (ref: polling doClose destroys the data request)
            self._post_transport.abort()
        if self.probe is not None:
            probe, self.probe = self.probe, None
            probe.close()
        link = self.ws
        if link is not None:
            if link.backed_up:
                link.abort()  # it cannot take more bytes; nothing graceful is possible
            elif reason in (INBOUND_RATE_REASON, HELD_BYTES_REASON):
                link.abort()  # a flood: reading on while a closing handshake waits would serve it 10 s more
            else:
                self._flush(conflate=True)
                link.close(self._close_code)
        self.server._notify_close(self, reason)

    # -- timers and backpressure -----------------------------------------------------------

    def _arm_timer(self) -> None:
        due = self.session.next_deadline()
        if due is None:
            self._cancel_timer()
            return
        if self._timer is not None:
            if self._timer_at <= due:
                return  # fires no later than needed; `_on_timer` re-arms
            self._timer.cancel()
        self._timer_at = due
        self._timer = asyncio.get_running_loop().call_at(due, self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        # call_at may run a hair early (clock resolution); the deadline itself counts as reached.
        self._apply(self.session.tick(max(self.server.now_s(), self._timer_at)))

    def _start_drain(self, link: WsLink) -> None:
        if self._drain_task is None or self._drain_task.done():
            self._drain_task = asyncio.get_running_loop().create_task(self._drain(link))

    async def _drain(self, link: WsLink) -> None:
        """Own a backed-up WebSocket until it drains; disconnect it if it stays stuck.

        While it is backed up nothing else writes to it: updates wait in the outbox, where only
        the newest per symbol is kept, so the client resumes with current prices, not a backlog.
        """
        try:
            while link.backed_up and link is self.ws:
                await asyncio.wait_for(link.writer.drain(), WS_WRITE_TIMEOUT_S)
                link.backed_up = link.transport.get_write_buffer_size() > WS_HIGH_WATER_BYTES
                if not link.backed_up:
                    self._flush(conflate=True)
                    self._wake_room()
        except TimeoutError:
            self.server.slow_disconnects += 1
            _log_once("slow", "eio %s: peer %s did not read for %.0f s, disconnecting",
                      short_sid(self.sid), self.peer, WS_WRITE_TIMEOUT_S)
            self.abort("write timeout")
            link.abort()
        except (ConnectionError, OSError):
            link.abort()  # the read loop sees the end and closes the session

    # -- WebSocket messages --------------------------------------------------------------------

    def on_ws_message(self, link: WsLink, message: str | bytes) -> None:
        now_s = self.server.now_s()
        try:
            pkt = decode_eio(message) if isinstance(message, str) else EioPacket(EioType.MESSAGE, message)
        except EioProtocolError as exc:
            _log_once("eio-parse", "eio %s: invalid packet from %s: %s", short_sid(self.sid), self.peer, exc)
            pkt = None
        if link is self.probe:
            self._apply(self.session.receive_probe_packet(pkt, now_s) if pkt else self.session.end_probe(now_s))
        elif link is self.ws:
            self._apply(self.session.receive_packet(pkt, now_s) if pkt else self.session.abort("parse error", now_s))

    def on_ws_pings(self, link: WsLink, count: int) -> None:
        if link is self.ws:
            self._apply(self.session.receive_pings(count, self.server.now_s()))

    def on_ws_closed(self, link: WsLink) -> None:
        now_s = self.server.now_s()
        if link is self.ws:
            self._apply(self.session.abort("transport close", now_s))
        elif link is self.probe:
            self._apply(self.session.end_probe(now_s))


class EioServer:
    """Engine.IO v4 server on our own HTTP layer (see the module docstring for the API).

    It owns the sessions and checks every request as the reference does (server.ts verify and
    handshake); its transports, `polling` (EioPolling) and `websocket` (EioWebSocket), serve them.

    Args:
        ping_interval_ms, ping_timeout_ms: heartbeat, sent in the open packet.
        max_payload_bytes: the largest POST body and WebSocket message accepted.
        max_clients: sessions held at once; a handshake beyond gets 503.
        handler: the layer above (on_open / on_message / on_close); settable later.
    """

    def __init__(self, *, ping_interval_ms: int = 25000, ping_timeout_ms: int = 20000,
                 max_payload_bytes: int = 1_000_000, max_clients: int = 10_000, handler: Any = None,
                 cors_origins: tuple[str, ...] = ("*",), max_sessions_per_address: int = 256,
                 max_new_sessions_per_address_per_s: float = 20.0,
                 max_messages_per_s: float | None = None) -> None:
        self.ping_interval_s = ping_interval_ms / 1000
        self.ping_timeout_s = ping_timeout_ms / 1000
        self.max_payload_bytes = max_payload_bytes
        self.max_clients = max_clients
        self.cors_origins = cors_origins             # browser origins that may open a session (CORS_ORIGINS)
        self.max_sessions_per_address = max_sessions_per_address  # one address cannot take every slot
        self.max_messages_per_s = max_messages_per_s  # packets a client may send per second (None: any)
        self._sessions_of: collections.Counter[str] = collections.Counter()  # client address -> live sessions
        # Sessions opened lately per address: a flood of short-lived ones never reaches the cap above.
        self.new_sessions = AddressRateLimit(max_new_sessions_per_address_per_s, NEW_SESSION_BURST_S)
        self.handler = handler                       # on_open / on_message / on_close
        self.connections: dict[str, EioConnection] = {}  # sid -> live (or closing) connection
        self.handshakes = 0                          # sessions opened
        self.upgrades = 0                            # polling sessions moved to WebSocket
        self.slow_disconnects = 0                    # clients cut off for not reading
        self.rate_disconnects = 0                    # clients cut off for sending too many packets
        self.refused_full = 0                        # handshakes refused by max_clients
        self.refused_origin = 0                      # requests refused for their Origin
        self.refused_address = 0                     # handshakes refused by max_sessions_per_address
        self.refused_rate = 0                        # handshakes refused by max_new_sessions_per_address_per_s
        # Unfinished client messages (frames, attachments, POST bodies) held at once, all clients together.
        self.held_budget = HeldBytesBudget(max(HELD_BYTES_LIMIT, 2 * max_payload_bytes))
        # Told the outcome of requests that end without an HttpResponse for the HTTP layer to
        # write: 101 (WebSocket accepted), websockets' own 4xx refusal, 499 (a parked GET
        # whose client went away, nginx's "client closed request").  The HTTP layer counts them.
        self.request_outcome: Callable[[HttpRequest, int], None] = lambda req, status: None
        self.polling = EioPolling(self)              # the long-polling transport
        self.websocket = EioWebSocket(self)          # the WebSocket transport

    def metrics(self) -> list[MetricFamily]:
        by_transport = {"polling": 0, "websocket": 0}
        for conn in self.connections.values():
            by_transport[conn.transport] += 1
        return [
            MetricFamily("eio_sessions", "gauge", "Engine.IO sessions by transport",
                         [(f'{{transport="{name}"}}', count) for name, count in by_transport.items()]),
            MetricFamily("eio_handshakes_total", "counter", "Engine.IO sessions opened", [("", self.handshakes)]),
            MetricFamily("eio_upgrades_total", "counter", "Polling sessions upgraded to WebSocket",
                         [("", self.upgrades)]),
            MetricFamily("eio_slow_disconnects_total", "counter", "Clients cut off for not reading",
                         [("", self.slow_disconnects)]),
            MetricFamily("eio_rate_disconnects_total", "counter", "Clients cut off for sending over "
                         "MAX_CLIENT_MESSAGES_PER_S", [("", self.rate_disconnects)]),
            MetricFamily("eio_refused_full_total", "counter", "Handshakes refused at max clients",
                         [("", self.refused_full)]),
            MetricFamily("eio_refused_origin_total", "counter", "Requests refused for an Origin not in CORS_ORIGINS",
                         [("", self.refused_origin)]),
            MetricFamily("eio_refused_address_total", "counter", "Handshakes refused at MAX_SESSIONS_PER_ADDRESS",
                         [("", self.refused_address)]),
            MetricFamily("eio_refused_rate_total", "counter", "Handshakes refused at "
                         "MAX_NEW_SESSIONS_PER_ADDRESS_PER_S", [("", self.refused_rate)]),
            MetricFamily("eio_held_bytes", "gauge", "Bytes of unfinished client messages counted against "
                         "the server-wide limit", [("", self.held_budget.used_bytes)]),
            MetricFamily("eio_held_refusals_total", "counter", "Large client messages refused because the "
                         "server-wide limit on unfinished messages was reached", [("", self.held_budget.refusals)]),
        ]

    @classmethod
    def from_config(cls, cfg: Any, handler: Any = None) -> EioServer:
        return cls(ping_interval_ms=cfg.ping_interval_ms, ping_timeout_ms=cfg.ping_timeout_ms,
                   max_payload_bytes=cfg.max_payload_bytes, max_clients=cfg.max_clients, handler=handler,
                   cors_origins=cfg.cors_origins, max_sessions_per_address=cfg.max_sessions_per_address,
                   max_new_sessions_per_address_per_s=cfg.max_new_sessions_per_address_per_s,
                   max_messages_per_s=cfg.max_client_messages_per_s)

    # The event loop's clock (asyncio's loop.time() is time.monotonic()), the `now_s` of every
    # session; read directly, as get_running_loop() costs a getpid() system call in Python 3.11.
    now_s = staticmethod(time.monotonic)

    # -- calls from connections -------------------------------------------------------------

    def _dispatch(self, conn: EioConnection, data: str | bytes) -> None:
        if self.handler is not None:
            self.handler.on_message(conn, data)

    def _notify_close(self, conn: EioConnection, reason: str) -> None:
        if self.handler is not None:
            self.handler.on_close(conn, reason)

    def _forget(self, conn: EioConnection) -> None:
        if self.connections.get(conn.sid) is conn:
            del self.connections[conn.sid]
            self._sessions_of[conn.peer] -= 1
            if not self._sessions_of[conn.peer]:
                del self._sessions_of[conn.peer]

    # -- requests ---------------------------------------------------------------------------

    async def handle_request(self, req: HttpRequest, body: bytes | None, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> HttpResponse | None:
        """Serve one request under /socket.io/ for the HTTP layer (§18).

        `body` is None when the HTTP layer did not read it because it exceeds max_payload_bytes.
        Returns the response for polling, the handshake and errors (the HTTP layer adds the
        framing and CORS headers and writes it), or None once this took the connection: a
        WebSocket, or a parked GET whose client left; the outcome then goes to
        `request_outcome` and the HTTP layer leaves reader and writer alone.  While a GET is
        parked, `reader` is watched for EOF (the client going away closes the session).
        """
        query = self.query_of(req)
        upgrade = is_upgrade(req)
        refused = self._verify(req, query, upgrade)
        if refused is not None:
            return refused
        sid = query.get("sid") or None
        if upgrade:
            await self.websocket.serve(req, query, reader, writer)
            return None
        if sid is None:
            return self.polling.open(req)
        conn = self.connections[sid]
        if req.method == "GET":
            return await self.polling.get(req, conn, reader)
        if req.method == "POST":
            return self.polling.post(conn, req, body)
        # Deliberate difference: the reference answers PUT, DELETE, HEAD... with a sid 500 (empty
        # body), which reads as our failure; it is the client's, so it gets code 2 as without a sid.
        # The session lives on, as in the reference.
        return self._error(2, upgrade)

    def take_poll(self, req: HttpRequest, answer: Callable[[str], None]) -> HttpResponse | None:
        """Serve a polling GET with a sid (not an upgrade) as handle_request would, without a task:
        engine.io's refusal, or None once the GET is parked, ``answer`` then being called once
        with its body (at once when data waits).  The HTTP layer's callback path (§18)."""
        query = self.query_of(req)
        refused = self._verify(req, query, False)
        if refused is not None:
            return refused
        return self.polling.park(self.connections[query["sid"]], answer)

    def take_repeated_poll(self, sid: str, answer: Callable[[str], None]) -> HttpResponse | None:
        """take_poll for a GET that repeats, but for its cache buster `t` if anything, one take_poll
        parked on the same connection: what _verify decides from its bytes (transport, origin,
        EIO) held then, and the settings are fixed; the session is checked again, since it may
        have closed or upgraded to WebSocket meanwhile."""
        conn = self._live(sid)
        if conn is None or conn.transport != "polling":
            return self._session_refusal(conn, "polling", EIO_PROTOCOL, False)
        return self.polling.park(conn, answer)

    @staticmethod
    def query_of(req: HttpRequest) -> dict[str, str]:
        """The query as engine.io reads it: each parameter's last value (node's querystring)."""
        return {key: values[-1] for key, values in req.query.items() if values}

    def _error(self, code: int, upgrade: bool) -> HttpResponse:
        message = EIO_ERROR_MESSAGES[code]
        if upgrade:  # (ref: abortUpgrade answers 400, text/html, the bare message, then closes)
            return HttpResponse(403 if code == 4 else 400, message.encode(), "text/html")
        return HttpResponse(403 if code == 4 else 400, _json_dumps({"code": code, "message": message}).encode())

    def _verify(self, req: HttpRequest, query: dict[str, str], upgrade: bool) -> HttpResponse | None:
        """The checks of engine.io server.ts verify() + handshake(), in the same order."""
        transport = query.get("transport")
        if transport not in ("polling", "websocket"):
            return self._error(0, upgrade)
        origin = req.header("origin")
        if origin is not None and has_invalid_header_char(origin):
            return self._error(3, upgrade)
        if not origin_allowed(origin, self.cors_origins, req.header("host")):
            # A page of another site must not open a session (cross-site WebSocket hijacking:
            # browsers send cookies and never apply CORS to WebSocket).  Shaped like the
            # reference's allowRequest refusal: 403, code 4.
            self.refused_origin += 1
            return self._error(4, upgrade)
        sid = query.get("sid") or None  # an empty sid counts as none, as in JS
        if sid is not None:
            return self._session_refusal(self._live(sid), transport, query.get("EIO"), upgrade)
        if req.method != "GET":
            return self._error(2, upgrade)  # (ref: POST, PUT, OPTIONS, HEAD without a sid)
        if transport == "websocket" and not upgrade:
            return self._error(3, upgrade)  # (ref: a plain GET with transport=websocket)
        if query.get("EIO") != EIO_PROTOCOL:
            # (ref: EIO=3, EIO=5 or no EIO -> 400 {"code":5,"message":"Unsupported protocol version"}.)
            return self._error(5, upgrade)
        if len(self.connections) >= self.max_clients:
            self.refused_full += 1
            return self._refuse_handshake(503, "Too many clients", upgrade)
        return self._address_refusal(req.peer, upgrade)

    def _session_refusal(self, conn: EioConnection | None, transport: str, eio: str | None,
                         upgrade: bool) -> HttpResponse | None:
        """_verify's checks of a request with a sid, ``conn`` the live session of that sid."""
        if conn is None:
            return self._error(1, upgrade)
        if not upgrade and (conn.transport != transport or transport == "websocket"):
            # (ref: polling after the upgrade, or GET transport=websocket.)  Not a request with
            # transport=websocket on a WebSocket session either: it parked on a session whose
            # data goes to its WebSocket, never answered.
            return self._error(3, upgrade)
        if eio != EIO_PROTOCOL:
            return self._error(3, upgrade)  # (ref: EIO=3 with a live sid -> code 3, not 5)
        return None

    def _address_refusal(self, address: str, upgrade: bool) -> HttpResponse | None:
        """The 429 for a new session from ``address`` when it is over MAX_SESSIONS_PER_ADDRESS or
        MAX_NEW_SESSIONS_PER_ADDRESS_PER_S; None when it may open one."""
        wait_s = self._limit_wait_s(address)
        if wait_s is None:
            return None
        if wait_s == 0:
            # One address (a script, a squatter) must not fill MAX_CLIENTS for everyone else.
            self.refused_address += 1
            _log_once("sessions-per-address", "eio: %s holds %d sessions (MAX_SESSIONS_PER_ADDRESS): refusing more",
                      address, self.max_sessions_per_address)
            return self._refuse_handshake(429, "Too many sessions from this address", upgrade)
        # Sessions opened and dropped at once never reach the cap above; each still costs a session.
        self.refused_rate += 1
        _log_once("new-sessions-per-address", "eio: %s opens sessions faster than %g/s "
                  "(MAX_NEW_SESSIONS_PER_ADDRESS_PER_S): refusing more", address, self.new_sessions.rate_per_s)
        return self._refuse_handshake(429, "Too many new sessions from this address", upgrade,
                                      [("Retry-After", str(math.ceil(wait_s)))])

    def _limit_wait_s(self, address: str) -> float | None:
        """None when ``address`` may open a session now; 0 when it holds MAX_SESSIONS_PER_ADDRESS
        (until one ends); else the seconds until MAX_NEW_SESSIONS_PER_ADDRESS_PER_S lets it."""
        if self._sessions_of.get(address, 0) >= self.max_sessions_per_address:
            return 0.0
        wait_s = self.new_sessions.wait_s(address, self.now_s())
        return wait_s if wait_s > 0 else None

    def refuse_early(self, raw_head: bytes, address: str) -> HttpResponse | None:
        """The 429 for a handshake from ``address`` while it is over its limits, judged from the
        request line alone, before the rest of the request is parsed or checked: a flood of
        refused handshakes must cost less than requests.  None for anything else (the whole
        request path serves it, and checks it)."""
        if not self.is_bare_handshake(raw_head):
            return None
        return self._address_refusal(address, b"\r\nupgrade:" in raw_head.lower())

    def over_limits_early(self, raw_head: bytes, address: str) -> bool:
        """Whether refuse_early would refuse this now (nothing counted or logged)."""
        return self.is_bare_handshake(raw_head) and self._limit_wait_s(address) is not None

    @staticmethod
    def is_bare_handshake(raw_head: bytes) -> bool:
        """A handshake's request line (not one with a sid, which the whole path must see)."""
        return raw_head.startswith(b"GET /socket.io/?") and b"sid=" not in raw_head[:raw_head.find(b"\r\n")]

    @staticmethod
    def _refuse_handshake(status: int, message: str, upgrade: bool,
                          headers: list[tuple[str, str]] | None = None) -> HttpResponse:
        """Not in the reference; shaped like its allowRequest refusals (code 4, own message)."""
        if upgrade:
            return HttpResponse(status, message.encode(), "text/html", headers or [])
        return HttpResponse(status, _refusal_json(message), headers=headers or [])

    def _live(self, sid: str) -> EioConnection | None:
        """The connection for `sid` after applying its lapsed deadlines (a timer may be late)."""
        conn = self.connections.get(sid)
        if conn is not None:
            actions = conn.session.tick(self.now_s())
            # Nothing to carry out, still open: its timer needs no change (a deadline that moved
            # later is met by the timer re-arming when it fires).
            if actions or conn.session.state is EioState.CLOSED:
                conn._apply(actions)
                conn = self.connections.get(sid)
        if conn is None or conn.session.state is EioState.CLOSED:
            return None
        return conn

    def _create(self, req: HttpRequest, now_s: float, link: WsLink | None) -> EioConnection:
        sid = secrets.token_urlsafe(EIO_SID_BYTES)
        session = EioSession(sid, websocket=link is not None, now_s=now_s, ping_interval_s=self.ping_interval_s,
                             ping_timeout_s=self.ping_timeout_s, max_payload_bytes=self.max_payload_bytes,
                             max_messages_per_s=self.max_messages_per_s)
        conn = EioConnection(self, session, req.peer)
        conn.ws = link
        self.connections[sid] = conn
        self._sessions_of[conn.peer] += 1
        self.new_sessions.spend(conn.peer, now_s)
        self.handshakes += 1
        if self.handler is not None:
            self.handler.on_open(conn)
        conn._arm_timer()
        return conn

    async def close_all(self) -> None:
        """Close every session (shutdown): WebSocket clients get a 1001 close, polling sessions end
        as if the transport were lost (see `EioSession.drop`): every client reconnects."""
        for conn in list(self.connections.values()):
            if conn.transport == "websocket":
                conn.close("server shutdown", CloseCode.GOING_AWAY)
            else:
                # Not `1`: python-socketio takes an Engine.IO close as "server disconnect" and does
                # not reconnect.  A parked GET gets a noop and the session is gone, so the client's
                # next request fails (refused, or 400 from another instance) and it reconnects.
                conn._apply(conn.session.drop("server shutdown"))
        await asyncio.sleep(0)


class EioPolling:
    """The long-polling transport of an EioServer: the handshake GET, parked GETs, POSTs.

    Answers are the reference's (engine.io polling.ts), byte for byte where a test compares them.
    """

    def __init__(self, server: EioServer) -> None:
        self.server = server  # owner: registry, settings, clock

    async def read_body(self, req: HttpRequest, length: int, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> bytes | HttpResponse:
        """Read the body of a POST under /socket.io/ for the HTTP layer, its session told while it
        arrives: a second POST meanwhile gets the returned 400 and ends the session, and so does
        a client that goes away before the end (engine.io polling.ts onDataRequest).

        A body over EIO_POST_READ_WHOLE_BYTES is read only as far as it can be used: a POST that
        engine.io would refuse (unknown sid, Origin...) gets its refusal unread, and the body is
        checked as it arrives: at its first invalid packet, the packets before it go to the
        session, which closes as engine.io's does, and the POST gets 400 {"code":3} (engine.io,
        having read it all, says `ok`).  The HTTP layer sends a returned response and closes.
        """
        conn, refusal = self._post_target(req)
        large = length > EIO_POST_READ_WHOLE_BYTES
        if refusal is not None and large:
            return refusal
        if conn is not None:
            refusal = self._refusal(conn, conn.session.begin_post(self.server.now_s()))
            if refusal is not None:
                return refusal
            conn._post_transport = writer.transport
        complete, cut = False, None
        try:
            # (asyncio.timeout, not wait_for: no task per body)
            async with asyncio.timeout(BODY_TIMEOUT_S):
                if large:
                    data, cut = await self._read_checked(reader, length)
                else:  # (refused or not, the connection can carry on: handle_request answers)
                    data = await reader.readexactly(length)
            complete = True
        finally:
            if conn is not None:
                conn._post_transport = None
                conn._apply(conn.session.end_post(complete, self.server.now_s()))
        if cut is None:
            return bytes(data)
        assert conn is not None  # (a large body is read only for a live session)
        # The packets before the invalid one count, then the session closes (a parse error).
        self.post(conn, req, bytes(data[:cut]))
        return self.server._error(3, False)

    @staticmethod
    async def _read_checked(reader: asyncio.StreamReader, length: int) -> tuple[bytearray, int | None]:
        """Up to ``length`` bytes of a polling payload, as they arrive, stopping at the first
        invalid packet: (what was read, None or the cut of `find_invalid_eio_packet`)."""
        data = bytearray()
        resume, cut = 0, None
        while len(data) < length and cut is None:
            piece = await reader.read(length - len(data))
            if not piece:
                raise asyncio.IncompleteReadError(bytes(data), length)
            data += piece
            resume, cut = find_invalid_eio_packet(data, resume, len(data) == length)
        return data, cut

    @staticmethod
    def _refusal(conn: EioConnection, actions: list[Action]) -> HttpResponse | None:
        """For a second concurrent GET or POST: carry out the session's end, answer 400 (ref: no
        body, no Content-Type).  None when the session took the request."""
        if not actions or actions[0][0] is not Act.REJECT_REQUEST:
            return None
        conn._apply(actions[1:])
        return HttpResponse(400, b"", content_type="")

    def _post_target(self, req: HttpRequest) -> tuple[EioConnection | None, HttpResponse | None]:
        """The polling session a POST carries packets for, or engine.io's refusal of the POST."""
        query = self.server.query_of(req)
        refused = self.server._verify(req, query, False)
        if refused is not None:
            return None, refused
        return self.server.connections[query["sid"]], None

    def open(self, req: HttpRequest) -> HttpResponse:
        now_s = self.server.now_s()
        conn = self.server._create(req, now_s, None)
        conn.session.begin_poll(now_s)  # the open packet is queued, so this GET is answered at once
        return HttpResponse(200, conn.session.take_poll_payload().encode(), "text/plain; charset=UTF-8",
                            list(_POLL_HEADERS))

    def park(self, conn: EioConnection, answer: Callable[[str], None]) -> HttpResponse | None:
        """Park a GET of ``conn``'s: ``answer`` is called once with its body, at once when data
        waits.  A second GET meanwhile ends the session: returned is its 400 (the parked one
        gets `1`)."""
        actions = conn.session.begin_poll(self.server.now_s())
        refusal = self._refusal(conn, actions)
        if refusal is not None:
            return refusal
        conn._poll_waiter = answer
        if actions:  # (none: the GET is parked, the session's deadlines are as they were)
            conn._apply(actions)
        return None

    def client_left(self, req: HttpRequest, answer: Callable[[str], None]) -> None:
        """The client of a GET parked with ``answer`` went away: the session's poll is aborted
        (engine.io closes the session then) and the request counted as 499."""
        conn = self.server.connections.get(req.query["sid"][-1])
        if conn is not None and conn._poll_waiter is answer:
            conn._poll_waiter = None
            conn._apply(conn.session.abort_poll(self.server.now_s()))
        self.server.request_outcome(req, 499)

    @staticmethod
    def answer(payload: str) -> HttpResponse:
        """The response to a GET, carrying ``payload`` (packets joined as engine.io does)."""
        return HttpResponse(200, payload.encode(), "text/plain; charset=UTF-8", list(_POLL_HEADERS))

    async def get(self, req: HttpRequest, conn: EioConnection, reader: asyncio.StreamReader) -> HttpResponse | None:
        """A GET on the request loop's task: parked until answered; None when the client left
        (the HTTP layer closes the connection)."""
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        answer = waiter.set_result
        refusal = self.park(conn, answer)
        if refusal is not None:
            return refusal
        if not waiter.done() and not await self._park(conn, waiter, reader):
            self.client_left(req, answer)
            return None
        return self.answer(waiter.result())

    async def _park(self, conn: EioConnection, waiter: asyncio.Future[str],
                    reader: asyncio.StreamReader) -> bool:
        """Wait for data for a parked GET while watching its connection; False if the client left.

        Reading is how an aborted GET is noticed (engine.io closes the session then). Engine.IO
        clients never pipeline, so bytes arriving here count as the client leaving too.
        """
        watch = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait((waiter, watch), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            conn._poll_waiter = None
            conn._apply(conn.session.abort_poll(self.server.now_s()))
            raise
        finally:
            if not watch.done():
                # Wait for the cancellation to land: until then the reader still has a waiter and
                # the HTTP layer's next readuntil() would fail.
                watch.cancel()
                await asyncio.wait((watch,))
            if not watch.cancelled():
                watch.exception()  # retrieved: a reset here just means the client left
        return waiter.done()

    def post(self, conn: EioConnection, req: HttpRequest, body: bytes | None) -> HttpResponse:
        if body is None or len(body) > self.server.max_payload_bytes:
            return HttpResponse(413, b"", content_type="")  # (ref: 413, no body; the session lives on)
        if req.header("content-type") == "application/octet-stream":
            conn.abort("invalid content")  # polling.ts refuses binary bodies in v4 (from its source)
            return HttpResponse(400, b"", content_type="")
        # node decodes the body with setEncoding("utf8"), which replaces bad sequences too.
        conn._apply(conn.session.receive_post(body.decode("utf-8", "replace"), self.server.now_s()))
        return HttpResponse(200, b"ok", "text/html", list(_POLL_HEADERS))


class EioWebSocket:
    """The WebSocket transport of an EioServer: the handshake, then the link's read loop, for a
    new session or as the probe of a polling session's upgrade."""

    def __init__(self, server: EioServer) -> None:
        self.server = server  # owner: registry, settings, clock

    async def serve(self, req: HttpRequest, query: dict[str, str],
                    reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handshake with websockets, then run the link: a new session, or a probe for one."""
        link = self._handshake(req, reader, writer)
        if link is None:
            return
        now_s = self.server.now_s()
        sid = query.get("sid") or None
        if query.get("transport") != "websocket":
            conn = None  # (ref: onWebSocket: polling does not handle upgrades, with or without a sid)
        else:
            conn = self.server.connections.get(sid) if sid is not None else self.server._create(req, now_s, link)
        if conn is None or conn.ws is not link:
            # engine.io accepts the WebSocket, then closes it when it cannot be an upgrade (ref: a
            # second WebSocket for a sid, during or after the upgrade, and a transport=polling
            # upgrade get 101 then an empty close frame, i.e. 1005; the first WebSocket is unaffected).
            if conn is None or not conn.session.begin_upgrade(now_s):
                link.close()
                await serve_ws_link(link, lambda _link, _message: None)
                return
            conn.probe = link
            conn._arm_timer()
        else:
            conn._flush(conflate=False)  # the open packet
        try:
            await serve_ws_link(link, conn.on_ws_message, conn.on_ws_pings)
        finally:
            conn.on_ws_closed(link)

    def _handshake(self, req: HttpRequest, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> WsLink | None:
        """Replay the head our HTTP layer read into websockets' ServerProtocol; the link once it is OPEN."""
        # An oversized message closes with 1009 (ref: ws closes 1009 too). websockets logs each
        # connection at INFO: give it our logger so the application's config decides.
        proto = ServerProtocol(max_size=self.server.max_payload_bytes, logger=_WS_LOG)
        proto.receive_data(req.raw_head)
        events = proto.events_received()
        link = WsLink(proto, reader, writer, HeldBytes(self.server.held_budget))
        status = 400  # a head websockets cannot parse: it queues a 400 itself
        if events and isinstance(events[0], WsRequest):
            response = proto.accept(events[0])
            proto.send_response(response)
            status = response.status_code
        link.write_pending()  # the 101, or websockets' own 4xx
        self.server.request_outcome(req, status)
        if proto.state is not WsState.OPEN:
            link.finished()
            writer.close()
            return None
        writer.transport.set_write_buffer_limits(high=WS_HIGH_WATER_BYTES)  # drain() resumes at a quarter
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WS_SNDBUF_BYTES)
        return link


# ###########################################################################
# §17 WebSocket transport
# ###########################################################################
# Owns: one accepted WebSocket: websockets' sans-I/O ServerProtocol driven from our own
# StreamReader/StreamWriter (the head our HTTP layer read is replayed into it).  No write
# awaits, so a frame, ours or the protocol's, always lands in the transport whole: writes
# never interleave.


class WsLink:
    """One accepted WebSocket: the protocol object plus the streams it is driven over."""

    __slots__ = ("proto", "reader", "writer", "transport", "raw_fd", "writable", "backed_up", "_abort_timer",
                 "_kind", "_parts", "pings", "held")

    def __init__(self, proto: ServerProtocol, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, held: HeldBytes | None = None) -> None:
        self.proto = proto                  # websockets' sans-I/O state machine
        self.reader = reader                # bytes from the peer
        self.writer = writer                # only for drain() and close(); writes go to `transport`
        self.transport = writer.transport   # synchronous writes, whole frames only
        sock = writer.get_extra_info("socket")
        plain = sock is not None and writer.get_extra_info("sslcontext") is None
        self.raw_fd = sock.fileno() if plain else -1  # the socket, for SocketWriterPool; -1: TLS (no raw writes)
        self.writable = True                # protocol OPEN and no close frame sent: data frames allowed
        self.backed_up = False              # unsent bytes passed WS_HIGH_WATER_BYTES; a drain task owns writing
        self._abort_timer: asyncio.TimerHandle | None = None  # ends a closing handshake the peer ignores
        self._kind = Opcode.TEXT            # opcode of the message being reassembled
        self._parts: list[bytes | bytearray | memoryview] = []  # its fragments so far
        self.pings = 0                      # ping frames received and not yet reported
        self.held = held                    # the unfinished message's share of the server's held bytes

    def write(self, data: bytes) -> None:
        """Write whole frames; notes when the peer stops keeping up."""
        if self.transport.is_closing():  # lost before the read loop noticed: writing would only warn
            self.writable = False
            return
        self.transport.write(data)
        if self.transport.get_write_buffer_size() > WS_HIGH_WATER_BYTES:
            self.backed_up = True

    def write_pending(self) -> None:
        """Move what the protocol queued (pongs, close frames, the handshake) onto the transport."""
        for chunk in self.proto.data_to_send():
            if chunk:
                self.write(chunk)
            elif self.writer.can_write_eof():  # b"" means: half-close our side
                self.writer.write_eof()
            else:                              # TLS cannot half-close
                self.transport.close()
        self.writable = self.proto.state is WsState.OPEN and self.writable

    def send(self, items: Iterable[str | bytes], frames: Iterable[bytes] = ()) -> None:
        """Send packets (str as text, bytes as binary) then ready frames, in one write."""
        if not self.writable:
            return
        for item in items:
            if isinstance(item, str):
                self.proto.send_text(item.encode())
            else:
                self.proto.send_binary(item)
        chunks = self.proto.data_to_send()
        chunks.extend(frames)
        if chunks:
            self.write(b"".join(chunks))

    def close(self, code: int | None = None, reason: str = "") -> None:
        """Start the closing handshake; abort if the peer does not finish it in time.

        No code gives an empty close frame, which the client reads as 1005, the way the
        reference closes a session (checked with websockets' client against engine.io 6.6).
        """
        if self.proto.state is WsState.OPEN:
            if code is None:
                self.proto.send_close()
            else:
                self.proto.send_close(code, reason)
            self.write_pending()
        self.expect_close()

    def expect_close(self) -> None:
        """The connection should end soon; abort it if it has not after WS_CLOSE_TIMEOUT_S."""
        self.writable = False
        if self._abort_timer is None and not self.transport.is_closing():
            loop = asyncio.get_running_loop()
            self._abort_timer = loop.call_later(WS_CLOSE_TIMEOUT_S, self.transport.abort)

    def abort(self) -> None:
        """Drop the TCP connection now (a stuck client)."""
        self.writable = False
        self.transport.abort()

    def receive(self, data: bytes) -> list[str | bytes]:
        """Feed bytes read from the peer (b"" = EOF); the complete messages they finish.

        Fragments are joined here (the sans-I/O layer hands over frames); the protocol caps a
        message at its max_size. Invalid UTF-8 in a text message fails the connection (1007).
        """
        if data:
            self.proto.receive_data(data)
        else:
            self.proto.receive_eof()
        self.write_pending()  # automatic pongs and close echoes
        messages: list[str | bytes] = []
        for frame in self.proto.events_received():
            if isinstance(frame, Frame) and frame.opcode is Opcode.PING:
                self.pings += 1  # answered by the protocol; counted against the client's budget
            if not isinstance(frame, Frame) or frame.opcode not in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                continue
            if frame.opcode is not Opcode.CONT:
                self._kind, self._parts = frame.opcode, []
            self._parts.append(frame.data)
            if not frame.fin:
                continue
            payload, self._parts = b"".join(self._parts), []
            if self._kind is Opcode.BINARY:
                messages.append(payload)
                continue
            try:
                messages.append(payload.decode())
            except UnicodeDecodeError:
                self.proto.fail(CloseCode.INVALID_DATA, "invalid UTF-8")
                self.write_pending()
                break
        return messages

    def unfinished_bytes(self) -> int:
        """Bytes of the message under way: the frame websockets is still reading, and the
        fragments already joined here."""
        return len(self.proto.reader.buffer) + sum(map(len, self._parts))

    def finished(self) -> None:
        if self.held is not None:
            self.held.release()
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None


async def _drain_answers(link: WsLink) -> bool:
    """Wait, reading nothing more, until a peer takes the answers queued for it; False (and the
    connection aborted) if it does not within WS_WRITE_TIMEOUT_S.  Without this, a client that
    sends pings or events and never reads makes every answer wait in memory without limit."""
    try:
        await asyncio.wait_for(link.writer.drain(), WS_WRITE_TIMEOUT_S)
        return True
    except (TimeoutError, ConnectionError, OSError):
        _log_once("ws-unread", "ws %s: the peer sends but does not read (%d bytes of answers waiting); cut off",
                  link.writer.get_extra_info("peername"), link.transport.get_write_buffer_size())
        link.abort()
        return False


async def serve_ws_link(link: WsLink, on_message: Callable[[WsLink, str | bytes], None],
                        on_pings: Callable[[WsLink, int], None] | None = None) -> None:
    """Read until the connection ends, handing each complete message to `on_message`.

    Text messages arrive as str, binary ones as bytes (Socket.IO attachments). Control frames
    are answered by the protocol object itself. Returns when the TCP connection is done.
    """
    proto = link.proto
    try:
        while True:
            try:
                data = await link.reader.read(WS_READ_CHUNK_BYTES)
            except (ConnectionError, OSError):
                data = b""
            messages = link.receive(data)
            many = len(messages) + link.pings >= WS_MESSAGES_PER_YIELD
            if link.held is not None and not link.held.hold(link.unfinished_bytes()):
                _log_held_refusal(link.held.budget, str(link.writer.get_extra_info("peername")))
                link.abort()  # (no close frame: the peer may not be reading, and nothing more is read)
                data = b""
            for count, message in enumerate(messages, 1):
                if link.writable:  # nothing more is handled once we started closing
                    on_message(link, message)
                if count % WS_MESSAGES_PER_YIELD == 0:
                    await asyncio.sleep(0)  # a read of many small messages must not hold up other clients
            if link.pings:
                pings, link.pings = link.pings, 0
                if on_pings is not None and link.writable:
                    on_pings(link, pings)
            if not data or proto.state is WsState.CLOSED or link.transport.is_closing():
                return  # (aborted: what the stream still holds would only be parsed for nothing)
            if many:  # (a read returns at once while the stream holds data: no turn for others otherwise)
                await asyncio.sleep(0)
            if link.transport.get_write_buffer_size() > WS_MAX_UNSENT_BYTES and not await _drain_answers(link):
                return
            if proto.close_expected():
                # Keep feeding the protocol (the peer's close frame must still reach it), but not
                # forever: the peer gets WS_CLOSE_TIMEOUT_S to finish, then the socket is aborted.
                link.expect_close()
    finally:
        link.writable = False
        link.finished()
        link.writer.close()


# ###########################################################################
# §18 HTTP connection handler
# ###########################################################################
# Owns: the listening socket, TLS-or-plain detection per connection, the keep-alive
# request loop with its timeouts, the read-callback path of long-polling GETs (HttpProtocol),
# static files, and dispatch to REST and Engine.IO.

MAX_API_BODY_BYTES = 64 * 1024   # no REST endpoint takes a body; read (and drop) at most this much
REFUSED_HANDSHAKE_DELAY_S = 1.0  # a handshake refused from its request line is answered this late on average
                                 # (0.5-1.5 s, so that a flood's refusals do not all come due in one turn): a
                                 # flooder's connection gets one try a second, each costing a timer, not ~50 µs
HTTP_REQUESTS_PER_TURN = 4       # requests started per event-loop turn (~0.5 ms of cheap ones): the fan-out gets its
                                 # turn however many connections flood the server (32 left a 200-client flood 8x p99)
POLLS_IN_CALLBACK_PER_TURN = 128 # long-poll GETs served in their read callback per turn (~15 µs each, 2 ms): past 100
                                 # clients answering one update in a turn, the rest wait their turns as other requests
POLL_HEAD_KEPT_BYTES = 4096      # a parked GET's head kept for the next one to reuse (a browser's, cookies and all,
                                 # is 1-2 KiB); a larger one is parsed anew each time rather than held per connection
FAVICON_SVG = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" '
               b'fill="#0b1220"/><path d="M3 11l3-4 3 2 4-5" stroke="#22c55e" stroke-width="2" fill="none"/></svg>')


async def drain_within(writer: asyncio.StreamWriter, timeout_s: float) -> None:
    """writer.drain(), given at most ``timeout_s``.  Most writes leave nothing unsent: then there
    is nothing to wait for, and no timer is set (wait_for made a task for every response)."""
    if writer.transport.get_write_buffer_size():
        async with asyncio.timeout(timeout_s):
            await writer.drain()


class TurnAdmission:
    """Lets at most `per_turn` requests start in one turn of the event loop; the others wait for
    the next turns, in arrival order.  A flood of cheap requests (~100 µs each) from hundreds of
    connections otherwise filled whole turns, and the fan-out, one callback among them, waited."""

    def __init__(self, per_turn: int, light_per_turn: int = 0) -> None:
        self.per_turn = per_turn
        self.left = per_turn                                  # starts left in this turn
        self.light_per_turn = light_per_turn
        self.light_left = light_per_turn                      # light starts left in this turn (see take_light)
        self.waiting: deque[asyncio.Future[None]] = deque()   # requests waiting for a later turn
        self._refill: asyncio.Handle | None = None            # the next turn's refill, when armed
        self._loop: asyncio.AbstractEventLoop | None = None   # (kept: get_running_loop() is a system call)

    async def enter(self) -> None:
        if self.left > 0 and not self.waiting:
            self.left -= 1
            self._arm()
            return
        waiter = asyncio.get_running_loop().create_future()
        self.waiting.append(waiter)
        self._arm()
        await waiter

    def take_light(self) -> bool:
        """Whether a light request (served in a callback, about a tenth of most) may start in this
        turn: `light_per_turn` of them may, beside the others.  When not, it is served as any
        other, through `enter`."""
        if self.light_left <= 0:
            return False
        self.light_left -= 1
        self._arm()
        return True

    def _arm(self) -> None:
        if self._refill is None:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._refill = self._loop.call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._refill = None
        self.left = self.per_turn
        self.light_left = self.light_per_turn
        while self.waiting and self.left > 0:
            waiter = self.waiting.popleft()
            if not waiter.done():  # (a cancelled one: its connection ended while it waited)
                waiter.set_result(None)
                self.left -= 1
        if self.waiting or self.left < self.per_turn:
            self._arm()


class StaticFiles:
    """Files under one directory, cached in memory by (mtime, size), with strong ETags."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._cache: dict[Path, tuple[tuple[int, int], bytes, str]] = {}

    def lookup(self, name: str) -> tuple[bytes, str, str] | None:
        """``name`` relative to the root → (body, content type, etag), or None (404).
        Anything resolving outside the root, a directory, or a dotfile is None."""
        if not name or "\x00" in name or any(part.startswith(".") for part in name.split("/")):
            return None
        path = (self.root / name).resolve()
        if self.root not in path.parents:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        if not path.is_file() or st.st_size > STATIC_MAX_BYTES:
            return None
        key = (st.st_mtime_ns, st.st_size)
        cached = self._cache.get(path)
        if cached is None or cached[0] != key:
            body = path.read_bytes()
            cached = (key, body, '"' + hashlib.sha256(body).hexdigest()[:20] + '"')
            self._cache[path] = cached
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
            ctype += "; charset=utf-8"
        return cached[1], ctype, cached[2]


async def _wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    fut = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: fut.done() or fut.set_result(None))
    try:
        await fut
    finally:
        loop.remove_reader(sock.fileno())


class HttpProtocol(asyncio.StreamReaderProtocol):
    """One connection's protocol: the StreamReader of its request loop (HttpServer.serve_connection),
    and a callback path for long polling.  While the loop awaits a next request with nothing
    buffered (`armed`), bytes that arrive are first offered to HttpServer.offer_poll, which serves
    a long-poll GET in this callback; anything it does not take goes to the reader as before."""

    def __init__(self, reader: asyncio.StreamReader, loop: asyncio.AbstractEventLoop, server: HttpServer,
                 tls: bool) -> None:
        super().__init__(reader, loop=loop)
        self.loop = loop
        self.server = server
        self.tls = tls
        self.reader = reader
        self.peer, self.host, self.direct = "", "", True  # set by serve_connection (see HttpServer._prepare)
        self.armed = False            # the request loop awaits a next request and its reader holds nothing
        # A GET served by the callback path and not yet answered: (request, its answer callback).
        self.parked: tuple[HttpRequest, Callable[[str], None]] | None = None
        self.served_at = 0.0          # loop time of the last GET served or answered here (it keeps the connection)
        # The last GET parked here, to tell its repeats by (only their `t` changes, if anything),
        # and its route: kept while they come, if its head is small (POLL_HEAD_KEPT_BYTES).
        self.repeat: RepeatedHead | None = None
        self.repeat_route: Route | None = None
        # The answer's head for its headers (and keep-alive): the parts around its Date and length.
        self.answer_head: tuple[tuple[tuple[str, str], ...], bool, bytes, bytes, bytes] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.transport = transport  # type: ignore[assignment]

    def arm(self) -> None:
        """The request loop waits for a next request: offer what arrives, if the reader is empty
        (reading its private buffer; a Python without it just never offers)."""
        buffered = getattr(self.reader, "_buffer", None)
        self.armed = buffered is not None and not buffered and not self.reader.at_eof()

    def data_received(self, data: bytes) -> None:
        if self.parked is not None:
            # Engine.IO clients never pipeline: bytes while a GET is parked mean its client left.
            self._client_left()
            self.armed = False
            self.transport.close()
            return
        if self.armed:
            if self.server.offer_poll(self, data):
                return
            self.armed = False
        super().data_received(data)

    def eof_received(self) -> bool | None:
        self._client_left()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._client_left()
        super().connection_lost(exc)

    def _client_left(self) -> None:
        parked, self.parked = self.parked, None
        if parked is not None:
            self.server.app.eio.polling.client_left(*parked)


class HttpServer:
    """HTTP/1.1 on one port, TLS and plain side by side (peek at the first byte)."""

    def __init__(self, app: "App", ssl_ctx: ssl.SSLContext | None) -> None:
        self.app = app
        self.cfg = app.cfg
        self.ssl_ctx = ssl_ctx
        self.static = StaticFiles(Path(__file__).resolve().parent / "static")
        # A request flood cannot fill the loop's turns.
        self.admission = TurnAdmission(HTTP_REQUESTS_PER_TURN, POLLS_IN_CALLBACK_PER_TURN)
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.connections: set[asyncio.Task] = set()   # one task per accepted socket
        self.idle: set[asyncio.Task] = set()          # of those, the ones waiting for a next request
        self.refusals_delayed = 0                     # handshakes whose refusal from the request line was delayed
        self.polls_in_callback = 0                    # long-poll GETs served by HttpProtocol's callback path
        self.polls_repeated = 0                       # of those, repeats of the GET before (RepeatedHead)
        self._poll_body: tuple[str, bytes] = ("", b"")  # the last long-poll answer's text and its bytes
        self.sock: socket.socket | None = None
        self.port = 0
        self._accept_task: asyncio.Task | None = None
        self._trusted = [ipaddress.ip_network(n) for n in self.cfg.trusted_proxies]
        self.closing = False                                 # shutdown began: no new request, no keep-alive
        app.eio.request_outcome = self._count_outcome

    def metrics(self) -> list[MetricFamily]:
        return [MetricFamily("http_requests_total", "counter", "HTTP requests by route and status",
                             [(f'{{route="{r}",status="{c}"}}', n) for (r, c), n in sorted(self.requests.items())]),
                MetricFamily("http_long_polls_in_callback_total", "counter", "Long-poll GETs served in their "
                             "connection's read callback, by how their head was read: parsed whole, or told from "
                             "its bytes as a repeat of the GET before",
                             [('{head="parsed"}', self.polls_in_callback - self.polls_repeated),
                              ('{head="repeat"}', self.polls_repeated)])]

    def _count_outcome(self, req: HttpRequest, status: int) -> None:
        self.requests[(resolve_route(req.path).label, status)] += 1
        if log.isEnabledFor(logging.DEBUG):  # the access line of an upgrade or an aborted poll
            log.debug("http %s %s %s → %d", req.peer, req.method, loggable_target(req.target), status)

    async def start(self) -> int:
        infos = socket.getaddrinfo(self.cfg.web_host or None, self.cfg.web_port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self.sock, self.port = sock, sock.getsockname()[1]
        self._accept_task = asyncio.create_task(self._accept_loop(), name="http-accept")
        return self.port

    async def close(self) -> None:
        """Stop accepting; connections are ended by the App's shutdown."""
        self.closing = True
        if self._accept_task:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        if self.sock:
            self.sock.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        accepted = 0  # since the last turn given
        while True:
            try:
                # (returns at once, without a turn for anyone, while connections wait in the backlog)
                conn, addr = await loop.sock_accept(self.sock)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("http: accept failed (%s)", exc.strerror or exc)
                await asyncio.sleep(ACCEPT_RETRY_S)
                continue
            task = asyncio.create_task(self._handle_socket(conn, addr))
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)
            accepted += 1
            if accepted >= ACCEPTS_PER_TURN:
                accepted = 0
                await asyncio.sleep(0)

    async def _handle_socket(self, conn: socket.socket, addr: Any) -> None:
        loop = asyncio.get_running_loop()
        if isinstance(addr, tuple):  # "[v6]:port", so that the address splits off its port
            peer = f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
        else:
            peer = str(addr)
        writer = None
        accepted_at = loop.time()
        try:
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            use_tls = False
            if self.ssl_ctx is not None:
                # Peek (not read) the first byte: 0x16 starts a TLS handshake.  Reading it
                # through a stream and then calling start_tls hangs (the rest of the
                # ClientHello stays in the stream's buffer).
                await asyncio.wait_for(_wait_readable(loop, conn), HEAD_TIMEOUT_S)
                first = conn.recv(1, socket.MSG_PEEK)
                if not first:
                    return
                use_tls = first == b"\x16"
            reader = asyncio.StreamReader(limit=MAX_HEAD_BYTES, loop=loop)  # + exact check in _read_head
            protocol = HttpProtocol(reader, loop, self, use_tls)
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self.ssl_ctx if use_tls else None,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S if use_tls else None)
            if not use_tls and isinstance(getattr(transport, "max_size", None), int):
                transport.max_size = CONN_RECV_BYTES
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            await self.serve_connection(reader, writer, peer, accepted_at, protocol)
        except (asyncio.TimeoutError, TimeoutError, ConnectionError, ssl.SSLError, OSError) as exc:
            log.debug("http %s: connection ended: %s", peer, describe_error(exc))
        finally:
            if writer is not None:
                if not writer.is_closing():
                    writer.close()
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(writer.wait_closed(), CONNECTION_CLOSE_WAIT_S)
            else:
                conn.close()

    async def _read_head(self, reader: asyncio.StreamReader, deadline: float | None,
                         writer: asyncio.StreamWriter, protocol: HttpProtocol) -> bytes | None:
        """Read one request head.  A first request must arrive whole by ``deadline`` (counted
        from accept: slowloris guard); later ones may idle KEEPALIVE_IDLE_S before their first
        byte (see _next_request_byte), then get HEAD_TIMEOUT_S.  Returns None when the
        connection should just close."""
        loop = asyncio.get_running_loop()
        try:
            # (asyncio.timeout, not wait_for: no task per read)
            if deadline is None:
                first = await self._next_request_byte(reader, protocol)
                deadline = loop.time() + HEAD_TIMEOUT_S
            else:
                async with asyncio.timeout_at(deadline):
                    first = await reader.readexactly(1)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, TimeoutError):
            return None
        try:
            async with asyncio.timeout_at(deadline):
                raw_head = first + await reader.readuntil(b"\r\n\r\n")
            if len(raw_head) <= MAX_HEAD_BYTES:
                return raw_head
        except asyncio.LimitOverrunError:
            pass
        except (asyncio.TimeoutError, TimeoutError):
            await self._send(writer, error_response(HttpError(408, f"request head not received within {HEAD_TIMEOUT_S:g} s")), False)
            return None
        except asyncio.IncompleteReadError:
            return None
        await self._send(writer, error_response(HttpError(431, f"request head over {MAX_HEAD_BYTES} bytes")), False)
        return None

    @staticmethod
    async def _next_request_byte(reader: asyncio.StreamReader, protocol: HttpProtocol) -> bytes:
        """The first byte of a next request on a kept-alive connection.  Meanwhile ``protocol``
        serves the long-poll GETs that arrive whole (HttpProtocol); the connection idles out
        KEEPALIVE_IDLE_S after the last of them was answered, never while one is parked.

        Raises:
            TimeoutError: idle for KEEPALIVE_IDLE_S.
            asyncio.IncompleteReadError: the client closed the connection.
        """
        loop = asyncio.get_running_loop()
        idle_until = loop.time() + KEEPALIVE_IDLE_S
        protocol.arm()
        try:
            while True:
                try:
                    async with asyncio.timeout_at(idle_until):
                        return await reader.readexactly(1)
                except TimeoutError:
                    if protocol.parked is None and protocol.served_at + KEEPALIVE_IDLE_S <= loop.time():
                        raise
                    idle_until = (loop.time() if protocol.parked else protocol.served_at) + KEEPALIVE_IDLE_S
        finally:
            protocol.armed = False

    def offer_poll(self, protocol: HttpProtocol, data: bytes) -> bool:
        """Serve ``data``, which arrived whole while its kept-alive connection had nothing else to
        do, if it is a long-poll GET of a live session: parse and check it as the request loop
        would, park it, and have its answer written by whatever makes it (the fan-out, a timer)
        through `_answer_poll`.  No task is woken and no timer set for it: this path, not the
        coroutine's, is what keeps 100 long-polling clients at 100 updates/s cheap.  A GET that
        repeats the one before it on the connection but for its `t=`, or byte for byte
        (RepeatedHead), is not parsed or verified again: only its session is checked.  False for
        anything else, left to the request loop, including what the loop must refuse."""
        if (len(data) > MAX_HEAD_BYTES or self.closing or protocol.transport is None
                or protocol.transport.get_write_buffer_size()):  # (unsent bytes: the loop's drain() waits)
            return False
        req = protocol.repeat.parse(data) if protocol.repeat is not None else None
        repeated = req is not None
        if not repeated and (not data.startswith(b"GET /socket.io/?") or data.find(b"\r\n\r\n") != len(data) - 4
                            or EioServer.is_bare_handshake(data)):  # (the loop may refuse it unparsed)
            return False
        if not self.admission.take_light():
            return False
        started = time.perf_counter()
        if repeated:  # (the checks of its bytes below held for the GET it repeats)
            route = protocol.repeat_route
            self.polls_repeated += 1
        else:
            protocol.repeat = None
            try:
                req, route = self._prepare(data, protocol.peer, protocol.host, protocol.direct)
                sids = req.query.get("sid")
                # (A session's plain GET only: no upgrade, no body, kept alive.)
                if (route.kind is not RouteKind.EIO or not sids or not sids[-1] or is_upgrade(req)
                        or not wants_keep_alive(req) or body_length(req, 0)):
                    return False
            except HttpError:
                return False
        self.polls_in_callback += 1
        protocol.served_at = protocol.loop.time()
        answer: Callable[[str], None] = lambda payload: self._answer_poll(protocol, req, route, payload, started)
        protocol.parked = (req, answer)  # (before parking: the answer may come at once)
        if repeated:
            refusal = self.app.eio.take_repeated_poll(req.query["sid"][-1], answer)
        else:
            refusal = self.app.eio.take_poll(req, answer)
            if refusal is None and len(data) <= POLL_HEAD_KEPT_BYTES:
                protocol.repeat, protocol.repeat_route = RepeatedHead.of(req, EIO_CACHE_BUSTER), route
        if refusal is not None:
            protocol.parked = protocol.repeat = None
            protocol.transport.write(self._response_bytes(req, route, refusal, True, protocol.tls))
            self._served(req, route, refusal.status, started)
        return True

    def _answer_poll(self, protocol: HttpProtocol, req: HttpRequest, route: Route, payload: str,
                     started: float) -> None:
        """Write the answer of a GET parked by offer_poll (during shutdown, with `Connection: close`):
        the bytes `_response_bytes` makes, from a head made once for the connection's headers with
        only its Date and Content-Length filled in per answer."""
        protocol.parked = None
        protocol.served_at = protocol.loop.time()
        transport = protocol.transport
        if transport is None or transport.is_closing():
            self._served(req, route, 499, started)  # (the client went: nothing can be written)
            return
        keep_alive = not self.closing
        head = protocol.answer_head
        if head is None or head[0] is not req.headers or head[1] != keep_alive:
            # "\x00" stands for the date: a header value never holds it (render_response replaces it).
            template = self._response_bytes(req, route, EioPolling.answer(""), keep_alive, protocol.tls, "\x00")
            before_date, _, rest = template.partition(b"\x00")
            between, _, after = rest.partition(b"\r\nContent-Length: 0\r\n")
            head = (req.headers, keep_alive, before_date, between + b"\r\nContent-Length: ", b"\r\n" + after)
            # Kept beside the headers the connection keeps anyway (its repeats'), not for any others.
            repeat = protocol.repeat
            protocol.answer_head = head if repeat is not None and repeat.request.headers is req.headers else None
        # A pass hands every parked GET the same text: encoded once, for all of them.
        encoded_text, body = self._poll_body
        if payload is not encoded_text:
            body = payload.encode()
            self._poll_body = (payload, body)
        transport.write(b"".join((head[2], http_date_bytes(int(time.time())), head[3], b"%d" % len(body), head[4],
                                  body)))
        self._served(req, route, 200, started)
        if not keep_alive:
            transport.close()

    def _response_bytes(self, req: HttpRequest, route: Route, resp: HttpResponse, keep_alive: bool, tls: bool,
                        date: str | None = None) -> bytes:
        """The head of ``resp`` (and its body, unless streamed) as the answer to ``req``: CORS
        where the route has it, the security headers, HSTS over TLS."""
        # A preflight response carries its own CORS headers; a refused upgrade none (ref: abortUpgrade).
        if route.cors and req.method != "OPTIONS" and not is_upgrade(req):
            resp.headers.extend(cors_headers(req, self.cfg.cors_origins))
        # HTTP/1.0 has no chunked transfer: a stream ends with the connection.
        return self._render(resp, keep_alive, tls, req.method == "HEAD", req.version != "HTTP/1.0", date)

    def _served(self, req: HttpRequest, route: Route, status: int, started: float) -> None:
        """Count a request answered with ``status`` (and log it at DEBUG)."""
        self.requests[(route.label, status)] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("http %s %s %s → %d (%.1f ms)", req.peer, req.method, loggable_target(req.target),
                      status, (time.perf_counter() - started) * 1000)

    @staticmethod
    def _render(resp: HttpResponse, keep_alive: bool, tls: bool, head_only: bool = False,
                chunked: bool = True, date: str | None = None) -> bytes:
        resp.headers.extend(SECURITY_HEADERS)
        if tls:
            resp.headers.append(HSTS_HEADER)
        return render_response(resp, keep_alive, head_only, http_date(time.time()) if date is None else date,
                               chunked)

    async def _send(self, writer: asyncio.StreamWriter, resp: HttpResponse, keep_alive: bool,
                    head_only: bool = False, chunked: bool = True, head: bytes | None = None) -> None:
        """Write ``resp`` (rendered here, or given as ``head``) and its stream, if any, as the client takes them."""
        if head is None:
            head = self._render(resp, keep_alive, writer.get_extra_info("sslcontext") is not None, head_only, chunked)
        writer.write(head)
        await drain_within(writer, WRITE_TIMEOUT_S)
        if resp.stream is not None and not head_only:
            await self._send_stream(writer, resp.stream, chunked)

    @staticmethod
    async def _send_stream(writer: asyncio.StreamWriter, stream: Iterator[bytes], chunked: bool) -> None:
        """A streamed body: each piece made only once the client took the one before (memory
        constant, however large the range).  A stream that cannot go on cuts the connection."""
        try:
            for data in stream:
                if data:
                    writer.write(chunk(data) if chunked else data)
                    await drain_within(writer, WRITE_TIMEOUT_S)
        except HttpStreamCut as exc:
            log.warning("http: %s; connection cut", exc)
            writer.transport.abort()
            raise ConnectionAbortedError(str(exc)) from None
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        if chunked:
            writer.write(chunk(b""))
            await drain_within(writer, WRITE_TIMEOUT_S)

    def client_ip(self, req: HttpRequest) -> str:
        """The client's address (logs, the per-address limits): when the peer is a trusted proxy
        (TRUSTED_PROXIES), the nearest X-Forwarded-For hop that is not one, read from the right
        across every line of the header (a proxy may add a line of its own rather than extend the
        client's, whose own lines come first and are anyone's to forge); a hop that is no address
        ends the walk at the last trusted one.  Anyone else could forge the header: ignored then."""
        host = peer_address(req.peer)
        if not self._trusted or not self._is_trusted(host):
            return host
        hops = [hop for key, value in req.headers if key == "x-forwarded-for" for hop in value.split(",")]
        for hop in reversed(hops):
            address = forwarded_address(hop)
            if address is None:
                break
            host = address
            if not self._is_trusted(address):
                break
        return host

    def _is_trusted(self, host: str) -> bool:
        """Whether ``host`` (an address) is one of TRUSTED_PROXIES."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in net for net in self._trusted)

    async def serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str,
                               accepted_at: float, protocol: HttpProtocol) -> None:
        """The keep-alive request loop of one connection (accepted at loop time ``accepted_at``);
        long-poll GETs between its requests are served in its ``protocol``'s callback."""
        deadline: float | None = accepted_at + HEAD_TIMEOUT_S
        task = asyncio.current_task()
        host = peer_address(peer)
        # The client's address is the peer's unless the peer is a trusted proxy (see client_ip).
        direct = not self._trusted or not self._is_trusted(host)
        protocol.peer, protocol.host, protocol.direct = peer, host, direct
        while True:
            if self.closing:  # e.g. a long-poll answered at shutdown: no next request on this connection
                return
            if deadline is None and task is not None:  # idle keep-alive: shutdown may end it at once
                self.idle.add(task)
            try:
                raw_head = await self._read_head(reader, deadline, writer, protocol)
            finally:
                self.idle.discard(task)
            if raw_head is None:
                return
            deadline = None
            await self.admission.enter()
            if direct and self.app.eio.over_limits_early(raw_head, host):
                await self._refusal_delay()
                # Judged again when answered: the address may be under its limits by then (a new
                # session's token came meanwhile), and the Retry-After is counted from now.
                refusal = self.app.eio.refuse_early(raw_head, host)
                if refusal is not None:
                    if not await self._refuse_early(writer, raw_head, refusal, peer):
                        return
                    continue
            held = HeldBytes(self.app.eio.held_budget)  # the body's share of the server's held bytes
            try:
                if not await self._serve_request(raw_head, peer, host, direct, held, reader, writer):
                    return
            finally:
                held.release()

    async def _refusal_delay(self) -> None:
        """REFUSED_HANDSHAKE_DELAY_S (0.5-1.5×, spread so that a flood's refusals do not come due
        in one turn) before a handshake refused from its request line is answered."""
        self.refusals_delayed += 1
        task = asyncio.current_task()
        if task is not None:
            self.idle.add(task)  # shutdown ends it at once: a refusal is nothing to wait for
        try:
            await asyncio.sleep(REFUSED_HANDSHAKE_DELAY_S * (0.5 + random.random()))
        finally:
            self.idle.discard(task)

    async def _refuse_early(self, writer: asyncio.StreamWriter, raw_head: bytes, resp: HttpResponse,
                            peer: str) -> bool:
        """Send a refusal made from the request line alone (see EioServer.refuse_early), once
        _refusal_delay is over; True when the connection may carry another request.  It may
        when the head allows it plainly: a refused flooder reconnecting at once cost 3× more than
        one reusing its connection."""
        if self.cfg.cors_origins == ("*",):  # (with a list, echoing an allowed Origin needs the headers parsed)
            resp.headers.extend(cors_headers_any())
        self.requests[(EIO_ROUTE.label, resp.status)] += 1
        keep_alive = raw_head_keeps_alive(raw_head) and not self.closing
        await self._send(writer, resp, keep_alive)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("http %s: handshake refused from its request line → %d", peer, resp.status)
        return keep_alive

    def _prepare(self, raw_head: bytes, peer: str, host: str, direct: bool) -> tuple[HttpRequest, Route]:
        """A request head from ``peer`` (address ``host``; ``direct``: not a trusted proxy) → the
        request, with the client's address as its peer, and its route.  Raises HttpError."""
        if direct:
            req = parse_request_head(raw_head, host)
        else:
            req = parse_request_head(raw_head, peer)
            req = dataclasses.replace(req, peer=self.client_ip(req))  # the client, decided once
        route = resolve_route(req.path)
        check_method(req, route)
        return req, route

    async def _serve_request(self, raw_head: bytes, peer: str, host: str, direct: bool, held: HeldBytes,
                             reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read one request's body, answer it; True when the connection may carry another request."""
        started = time.perf_counter()
        try:
            req, route = self._prepare(raw_head, peer, host, direct)
            is_eio = route.kind is RouteKind.EIO
            limit = self.cfg.max_payload_bytes if is_eio else MAX_API_BODY_BYTES
            try:
                length = body_length(req, limit)
            except HttpError as exc:
                if exc.status != 413 or not is_eio:
                    raise
                # Engine.IO answers an oversized POST itself (413, no body; the session lives on).
                resp = await self.app.eio.handle_request(req, None, reader, writer)
                await self._finish(writer, req, route, resp or error_response(exc), False, started)
                return False
            if not held.hold(length):  # refused unread: reading it is the cost a flood of them imposes
                _log_held_refusal(held.budget, req.peer)
                raise HttpError(503, "server busy: too many large request bodies under way", [("Retry-After", "1")])
            body = await self._read_body(req, length, reader, writer, is_eio)
            if body is None:  # Engine.IO refused a POST overlapping another of its session
                return False
        except HttpError as exc:
            self.requests[("bad-request", exc.status)] += 1
            await self._send(writer, error_response(exc), False)
            return False
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, TimeoutError):
            return False
        # An upgrade answered with a plain response was refused: (ref: engine.io's abortUpgrade
        # and socket.io's destroyUpgrade) the connection closes after it.
        keep_alive = wants_keep_alive(req) and not is_upgrade(req)
        resp = await self.dispatch(req, route, body, reader, writer)
        if resp is None:  # Engine.IO took the connection (and reported its outcome)
            return False
        keep_alive = keep_alive and not self.closing  # says `Connection: close` during shutdown
        return await self._finish(writer, req, route, resp, keep_alive, started)

    async def _read_body(self, req: HttpRequest, length: int, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter, is_eio: bool) -> bytes | None:
        """The request body; an Engine.IO POST is announced to its session while it arrives (a
        second one meanwhile, or a client gone before the end, closes the session, as in engine.io)."""
        if not length:
            return b""
        if not (is_eio and req.method == "POST"):
            return await asyncio.wait_for(reader.readexactly(length), BODY_TIMEOUT_S)
        body = await self.app.eio.polling.read_body(req, length, reader, writer)
        if isinstance(body, HttpResponse):
            await self._finish(writer, req, EIO_ROUTE, body, False, time.perf_counter())
            return None
        return body

    async def _finish(self, writer: asyncio.StreamWriter, req: HttpRequest, route: Route, resp: HttpResponse,
                      keep_alive: bool, started: float) -> bool:
        """Send the response; True when the connection may carry another request."""
        if resp.stream is not None and req.version == "HTTP/1.0":
            keep_alive = False
        head = self._response_bytes(req, route, resp, keep_alive, writer.get_extra_info("sslcontext") is not None)
        self._served(req, route, resp.status, started)
        await self._send(writer, resp, keep_alive, req.method == "HEAD", req.version != "HTTP/1.0", head)
        return keep_alive

    async def dispatch(self, req: HttpRequest, route: Route, body: bytes, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> HttpResponse | None:
        if req.method == "OPTIONS":
            return preflight_response(req, self.cfg.cors_origins)
        if route.kind is RouteKind.EIO:
            return await self.app.eio.handle_request(req, body, reader, writer)
        if req.method == "POST":
            return error_response(HttpError(405, f"method POST not allowed on {req.path[:100]}",
                                            [("Allow", "GET, HEAD, OPTIONS")]))
        if route.kind is RouteKind.API:
            try:  # the one place REST authentication happens: by the route table's `auth`
                check_auth(req, route, self.cfg.auth_token, self.cfg.metrics_public)
            except HttpError as exc:
                return error_response(exc)
            return handle_api(req, self.app.api_context(), route)
        if route.kind is RouteKind.FAVICON:
            return HttpResponse(200, FAVICON_SVG, "image/svg+xml", [("Cache-Control", "max-age=86400")])
        if route.kind is RouteKind.STATIC:
            return static_response(req, self.static.lookup(route.static_name or req.path[len("/static/"):]))
        return error_response(HttpError(404, f"not found: {req.path[:100]}"))

# ###########################################################################
# §19 App lifecycle
# ###########################################################################
# Owns: every task.  Start order: cache load → TLS → HTTP → feed → persistence.  SIGINT/
# SIGTERM set the stop event; shutdown closes the listener, ends the sessions, stops the
# feed and writes the final flush, then main() returns 0.


def _make_self_signed(cert: Path, key: Path) -> None:
    """Write a self-signed certificate for localhost and its key with the `openssl` command.

    Raises:
        OSError: the folder cannot be written, or openssl is missing or failed (its own words).
    """
    cert.parent.mkdir(parents=True, exist_ok=True)
    key.parent.mkdir(parents=True, exist_ok=True)
    for folder in {cert.parent, key.parent}:
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder} is not writable by uid {os.getuid()}")
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(SELF_SIGNED_CERT_DAYS),
                        "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True, text=True, timeout=OPENSSL_TIMEOUT_S)
    except FileNotFoundError:
        raise FileNotFoundError("the openssl command is not installed") from None
    except subprocess.CalledProcessError as exc:
        raise OSError(f"openssl failed: {' '.join((exc.stderr or '').split())}") from None
    except subprocess.TimeoutExpired:
        raise OSError(f"openssl did not finish within {OPENSSL_TIMEOUT_S:g} s") from None
    with contextlib.suppress(OSError):
        key.chmod(0o600)


def ensure_certificate(cert_path: str, key_path: str) -> tuple[str, str] | None:
    """The certificate and key to serve HTTPS with: the configured files when both exist;
    else a self-signed pair made with `openssl` there; else, when that folder cannot be written
    (a bind mount owned by another user), a pair made for this run in a private temporary
    folder.  None when no pair can be had; every reason is logged whole."""
    cert, key = Path(cert_path), Path(key_path)
    if cert.exists() and key.exists():
        return cert_path, key_path
    if cert.exists() or key.exists():  # never overwrite half of a pair someone put there
        reason: str | OSError = f"only one of {cert} and {key} exists"
    else:
        try:
            _make_self_signed(cert, key)
            log.info("tls: generated a self-signed certificate %s (key %s) with openssl", cert, key)
            return cert_path, key_path
        except FileNotFoundError as exc:
            log.warning("tls: %s is missing and cannot be generated: %s", cert, exc)
            return None
        except OSError as exc:
            reason = exc
    folder = Path(tempfile.mkdtemp(prefix="bbo-stream-tls-"))  # mode 0700: the key stays private
    atexit.register(shutil.rmtree, folder, True)               # a key made for this run goes with it
    try:
        _make_self_signed(folder / "cert.pem", folder / "key.pem")
    except OSError as exc:
        log.warning("tls: no certificate at %s (%s), and none could be made in %s either: %s", cert, reason, folder, exc)
        return None
    log.warning("tls: no certificate at %s (%s): serving HTTPS with a self-signed certificate made for this run "
                "in %s; to keep one across restarts, put cert.pem and key.pem in %s, or make that folder writable "
                "by uid %d", cert, reason, folder, cert.parent, os.getuid())
    return str(folder / "cert.pem"), str(folder / "key.pem")


def raise_nofile_limit() -> tuple[int, int]:
    """Soft open-files limit → hard limit (each client is a socket)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def available_cpus() -> int:
    """CPUs this process may use: its affinity set (a container's cpuset), capped by its cgroup
    CPU quota (v2 ``cpu.max``, or v1's quota and period read as the same two numbers)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpu_max = None
    with contextlib.suppress(OSError):
        cpu_max = Path("/sys/fs/cgroup/cpu.max").read_text()
    if cpu_max is None:
        with contextlib.suppress(OSError):
            v1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            cpu_max = v1.replace("-1", "max") + " " + Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text()
    return cpus_allowed(affinity, cpu_max)


class App:
    """The running server: history, feed, persistence, HTTP and Socket.IO."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        raw_capacity = cfg.cache_max_items if cfg.cache_enabled else 1
        bars_capacity = cfg.bars_capacity if cfg.cache_enabled else 0
        self.history = BboHistory(raw_capacity, bars_capacity)
        self.history.clock.max_offset_ms = cfg.clock_max_offset_ms
        self.persistence = CachePersistence(cfg, self.history) if cfg.cache_enabled and cfg.cache_persist else None
        self.symbols_file = Path(cfg.cache_dir) / FEED_SYMBOLS_FILE if cfg.cache_enabled and cfg.cache_persist else None
        symbols = load_feed_symbols(self.symbols_file, cfg.symbols) if self.symbols_file else cfg.symbols
        self.feed = BinanceFeed(cfg, self.history, self._on_update, self._on_feed_status, symbols, self._save_symbols)
        self.hub = Hub(cfg.fanout_helper_threads(available_cpus()))  # fan-out to Socket.IO clients (§13)
        self.hub.on_emit = self.history.stamp_emit           # each pass's emit time goes into the history
        self.eio = EioServer.from_config(cfg)               # Engine.IO endpoint (§16)
        self.sio = SioServer(self.eio)                       # Socket.IO on top of it (§15)
        self.bbo_app = BboApp(self.sio, self.hub, lambda: self.history.latest().values(),
                              lambda: self.feed.status(now_ms()), symbols=lambda: self.feed.symbols,
                              auth_token=cfg.auth_token, feed=self.feed,
                              feed_edit=bool(cfg.auth_token) or cfg.feed_edit_allowed,
                              max_feed_symbols=cfg.feed_max_symbols, history=self.history,
                              recovery_s=cfg.recovery_seconds, recovery_max_updates=cfg.recovery_max_updates)
        self.replay_app = ReplayApp(self.sio, self.history, cfg.auth_token)  # the /replay namespace (§14)
        self.http: HttpServer | None = None
        self.stop_event = asyncio.Event()
        self.started_ms = now_ms()
        self.port = 0

    def _on_update(self, bbo: Bbo) -> None:
        self.hub.publish(bbo)

    async def _save_symbols(self, symbols: list[str]) -> None:
        """Remember the feed's symbols (changed by a client) for the next start."""
        if self.symbols_file is None:
            return
        try:
            await asyncio.to_thread(save_feed_symbols, self.symbols_file, self.cfg.symbols, symbols)
        except OSError as exc:
            log.error("feed: cannot remember the symbol list in %s (%s); it applies until the next start",
                      self.symbols_file, exc.strerror or exc)

    def _on_feed_status(self) -> None:
        self.hub.publish_feed_status(self.feed.status(now_ms()))

    def api_context(self) -> ApiContext:
        ctx = ApiContext(self.history, self.feed.status, now_ms(), self.metrics)
        if self.persistence is not None:
            ctx.persistence = self.persistence.status()
        elif not self.cfg.cache_enabled:
            ctx.persistence = {"state": "disabled", "reason": "CACHE_ENABLED=false"}
        return ctx

    def metrics(self, now_ms: int) -> list[MetricFamily]:
        """Every metric of the server, in the order /metrics lists them."""
        families = self.feed.metrics(now_ms) + history_metrics(self.history, now_ms)
        if self.persistence is not None:
            families += self.persistence.metrics()
        if self.http is not None:
            families += self.http.metrics()
        return families + self.hub.metrics() + self.eio.metrics()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.stop_event.set)
        soft, hard = raise_nofile_limit()
        log.info("bbo_stream %s: %s %s, %d symbol(s) on %d connection(s); open-files limit %d (hard %d); "
                 "%d fan-out writer thread(s) beside the event loop", __version__, self.cfg.market,
                 self.cfg.feed_base_url, len(self.feed.symbols), len(self.feed.shards), soft, hard,
                 self.hub.writer_threads)
        if self.persistence is not None:
            started = time.perf_counter()
            loaded = self.persistence.load(lock=True)
            if self.persistence.off_reason is None:
                self.persistence.mark_restart_outages(now_ms())
                log.info("cache: restored %d update(s) of %d symbol(s) from %s in %.2f s", sum(loaded.values()),
                         len(loaded), self.cfg.cache_dir, time.perf_counter() - started)
        # Everything alive now (modules, settings, the restored history) lives as long as the
        # process: keep it out of every later garbage collection, whose full passes would
        # otherwise rescan it and pause all clients' deliveries at once.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
        tasks = [asyncio.create_task(self.feed.run(), name="feed")]
        if self.cfg.clock_check_minutes > 0:
            clock = ExchangeClock(self.cfg, self.history.clock, self.feed.notify)
            tasks.append(asyncio.create_task(clock.run(), name="clock"))
        if self.persistence is not None and self.persistence.off_reason is None:
            tasks.append(asyncio.create_task(self.persistence.run(), name="persistence"))
        else:
            tasks.append(asyncio.create_task(self._flush_history(), name="history-flush"))
        try:
            if self.cfg.web_enabled:
                await self._start_http()
            await self.stop_event.wait()
            log.info("shutting down")
        finally:
            await self.shutdown(tasks)
        return 0

    async def _flush_history(self) -> None:
        """Without persistence, still move pending updates into numpy every second, so the
        Bbo tuples waiting for a batch stay bounded by one second of data."""
        while True:
            await asyncio.sleep(self.cfg.cache_flush_seconds)
            self.history.flush()

    async def _start_http(self) -> None:
        ssl_ctx = None
        if self.cfg.use_ssl:
            # (asyncio has no per-connection setting: the class's buffer size, for TLS connections from now on)
            asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER_BYTES
            pair = ensure_certificate(self.cfg.ssl_cert_path, self.cfg.ssl_key_path)
            if pair is not None:
                try:
                    ssl_ctx = make_server_ssl_context(*pair)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("tls: cannot use %s / %s (%s)", *pair, exc)
            if ssl_ctx is None:
                log.warning("tls: USE_SSL is on but no certificate is usable: serving plain HTTP only")
        self.http = HttpServer(self, ssl_ctx)
        self.port = await self.http.start()
        scheme = "https and http" if ssl_ctx else "http"
        log.info("listening on %s:%d (%s); dashboard at %s://localhost:%d/", self.cfg.web_host, self.port,
                 scheme, "https" if ssl_ctx else "http", self.port)

    async def shutdown(self, tasks: list[asyncio.Task]) -> None:
        if self.http is not None:
            await self.http.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.eio.close_all(), SHUTDOWN_GRACE_S / 2)
        if self.http is not None and self.http.connections:
            for task in list(self.http.idle):  # between requests: nothing is lost by ending them now
                task.cancel()
            _, pending = await asyncio.wait(set(self.http.connections), timeout=SHUTDOWN_GRACE_S / 2)
            await cancel_tasks(pending)
        await cancel_tasks(tasks)
        self.hub.close()
        if self.persistence is not None and self.persistence.off_reason is None:
            failure = self.persistence.flush_sync()
            if failure is None:
                log.info("cache: final flush written to %s", self.cfg.cache_dir)
            else:
                log.error("cache: final flush FAILED: %s; updates of the last %.1f s are not on disk",
                          failure, self.persistence.writer.lag_ms / 1000)
        if self.persistence is not None:
            self.persistence.unlock()


async def cancel_tasks(tasks: Iterable[asyncio.Task], timeout_s: float = SHUTDOWN_GRACE_S / 2) -> None:
    """Cancel tasks and wait until they end, cancelling again any that is still running: Python
    3.11's asyncio.wait_for loses a cancellation that races with its inner await finishing, and the
    task then went on (into a 30 s sleep) while shutdown waited for it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = set(tasks)
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=CANCEL_RETRY_S)
        for task in done:
            if not task.cancelled() and task.exception() is not None:  # (retrieved: ending anyway)
                log.debug("shutdown: task %s ended with %r", task.get_name(), task.exception())
    for task in pending:
        log.warning("shutdown: task %s did not end within %g s of being cancelled", task.get_name(), timeout_s)


# ###########################################################################
# §20 CLI
# ###########################################################################
# Owns: logging setup and the entry point.


class JsonLogFormatter(logging.Formatter):
    """LOG_FORMAT=json: one object per line: timestamp, level, logger, event, and extras."""

    _STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc = {"timestamp": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "event": record.getMessage()}
        doc.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)  # escapes every control character: nothing to add


# What a client sends (targets, headers, X-Forwarded-For, event names, reasons) reaches log lines:
# C0/C1 controls (CR/LF forge lines, ESC and CSI drive terminals), DEL, the Unicode line separators
# and the bidi overrides (they reorder what a reader sees) are written as escapes.  Tab is harmless.
_LOG_UNSAFE_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_LOG_ESCAPES = {"\n": "\\n", "\r": "\\r"}


def escape_log_text(text: str) -> str:
    """``text`` with every character of _LOG_UNSAFE_RE escaped: "a\\nb" for a, LF, b."""
    return _LOG_UNSAFE_RE.sub(lambda m: _LOG_ESCAPES.get(c := m.group(), f"\\x{ord(c):02x}" if ord(c) < 0x100
                                                         else f"\\u{ord(c):04x}"), text)


class TextLogFormatter(logging.Formatter):
    """LOG_FORMAT=text: one line per record, whatever its arguments hold (escape_log_text); a
    traceback, appended after the line by logging itself, keeps its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_log_text(super().formatMessage(record))


def setup_logging(cfg: Config) -> None:
    formatter: logging.Formatter
    if cfg.log_format == "json":
        formatter = JsonLogFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = TextLogFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    file_error = None
    if cfg.log_to_file:
        try:
            Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
            handlers.append(logging.handlers.RotatingFileHandler(
                Path(cfg.log_dir) / "bbo_stream.log", maxBytes=LOG_FILE_MAX_BYTES, backupCount=LOG_FILE_BACKUPS,
                encoding="utf-8"))
        except OSError as exc:  # e.g. a volume not writable by the container's user: log to stderr only
            file_error = exc
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if cfg.debug else logging.INFO)
    logging.getLogger("websockets").setLevel(logging.INFO if cfg.debug else logging.WARNING)
    # websockets' own lines carry no peer ("connection open") and, at DEBUG, every request
    # header (Cookie, Authorization): ours log connects with the client's address instead.
    _WS_LOG.setLevel(logging.WARNING)
    if file_error is not None:
        log.warning("LOG_DIR %s is not usable (%s): logging to stderr only", cfg.log_dir, file_error)


async def run_app(cfg: Config) -> int:
    """The CLI's coroutine: the App, then the process's way out."""
    code = await App(cfg).run()
    # Stopped.  What remains (closing the loop and its executor, the interpreter's teardown)
    # would meet a repeated SIGTERM with the default action and turn exit 0 into a kill.
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return code


def import_main(argv: Sequence[str]) -> int:
    """``bbo_stream.py import FILE [--symbol S] [--skip-bad] [--SETTING VALUE ...]``: exit 0 when
    imported, 1 when refused (nothing changed), 2 on bad arguments."""
    parser = argparse.ArgumentParser(
        prog="bbo_stream.py import", usage="%(prog)s FILE [--symbol SYMBOL] [--skip-bad] [--SETTING VALUE ...]",
        description="Load Binance's bookTicker CSV (update_id,best_bid_price,best_bid_qty,best_ask_price,"
                    "best_ask_qty,transaction_time,event_time; or the .zip holding it) into CACHE_DIR, "
                    "while no server runs on it. Other flags are the server's settings (--cache-dir, ...).")
    parser.add_argument("file", type=Path, metavar="FILE")
    parser.add_argument("--symbol", help="the file's symbol; default: the name's start (BTCUSDT-bookTicker-...)")
    parser.add_argument("--skip-bad", action="store_true", help="import the good rows of a file that has bad ones")
    args, rest = parser.parse_known_args(list(argv))
    try:
        cfg = Config.from_sources(rest)
        symbol = args.symbol or args.file.name.split("-")[0].split(".")[0]
        if not _SYMBOL_RE.match(symbol):
            raise ConfigError(f"invalid --symbol {symbol[:40]!r}: give the file's symbol with --symbol")
    except ConfigError as exc:
        print(f"bbo_stream import: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    started = time.perf_counter()
    try:
        report = import_binance_csv(cfg, args.file, symbol.upper(), args.skip_bad, now_ms())
    except ImportRefused as exc:
        print(f"bbo_stream import: refused: {exc}", file=sys.stderr)
        return 1
    parsed = report.parsed
    print(f"imported {report.imported} row(s) of {report.symbol} from {args.file} into {cfg.cache_dir} in "
          f"{time.perf_counter() - started:.1f} s: {parsed.rows} read, {parsed.duplicates} duplicate update_id(s) "
          f"in the file, {report.known} already in the cache, {parsed.bad} bad, {parsed.untimed} without times "
          f"(given the import time), {report.dropped} oldest beyond CACHE_MAX_ITEMS not kept; "
          f"{report.cached} row(s) of {report.symbol} cached")
    for line in parsed.bad_lines:
        print(f"  skipped {line}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: returns the process exit code (0 after a clean shutdown, 2 on bad config)."""
    if sys.version_info < (3, 11):  # pragma: no cover
        print("bbo_stream: Python 3.11 or newer is required", file=sys.stderr)
        return 2
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["import"]:
        return import_main(argv[1:])
    try:
        cfg = Config.from_sources(argv)
    except ConfigError as exc:
        print(f"bbo_stream: error: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg)
    try:
        return asyncio.run(run_app(cfg))
    except KeyboardInterrupt:  # pragma: no cover - a second Ctrl-C during shutdown
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
