"""Socket.IO v4 endpoint for BBO Stream (issue 3), written to be merged into bbo_stream.py.

Work in progress, kept outside bbo_stream.py until the lead merges it. Everything between
the "stand-ins" banners is a placeholder for what bbo_stream.py already defines (contract.md)
and is deleted at the merge. Every other section is pasted as it is, in this order.

Layers (EIO = Engine.IO v4, SIO = Socket.IO protocol v5, sid = Engine.IO session id)::

    HTTP layer (lead) --HttpRequest--> EioServer.handle_request(req, body, reader, writer)
        |  polling GET/POST -> HttpResponse          WebSocket -> takes the connection, returns None
        v
    EioServer: sessions (EioSession, pure) + transports    callbacks: on_open / on_message / on_close
        v
    SioServer: namespaces, on(event) handlers, acks        SioSocket.emit(...)
        v
    BboApp: welcome, ready, request_initial_data, ping, subscribe/unsubscribe, feed_status
    Hub: publish(bbo) encodes once (packet text + WebSocket frame) and fans out to every client

Engine.IO server API. ``eio = EioServer(ping_interval_ms=25000, ping_timeout_ms=20000,
max_payload=1_000_000, max_clients=10_000)`` (or ``EioServer.from_config(cfg)``). The layer
above sets ``eio.handler`` to an object with three plain (non-async, non-blocking) methods:
``on_open(conn)``, ``on_message(conn, data)`` where ``data`` is ``str`` for a text message and
``bytes`` for a binary one, and ``on_close(conn, reason)``. The HTTP layer calls
``await eio.handle_request(req, body, reader, writer)`` for every request under ``/socket.io/``.
An ``EioConnection`` offers ``send(text)``, ``send_binary(raw)``, ``close(reason)``,
``transport`` ("polling" or "websocket"), ``sid``, ``peer`` and a free slot ``upper`` for the
layer above. ``await eio.shutdown()`` closes every session.

Socket.IO server API. ``sio = SioServer(eio)`` installs itself as ``eio.handler``. Handlers are
plain functions, run on the event loop, that must not block::

    @sio.on("echo")                    # namespace="/" by default; any other name creates it
    def echo(sock, *args):             # sock: SioSocket; args: the event's JSON arguments
        return args                    # the return value is the ack: None -> [], tuple -> its items,
                                       # anything else -> [value]; sent only if the client asked
    @sio.on_connect()                  # handler(sock, auth); raise SioConnectRefused(msg, data)
    @sio.on_disconnect()               # handler(sock, reason)

``sock.emit(event, *args, callback=None)`` sends an event (``callback(*ack_args)`` runs when the
client acknowledges), ``sock.disconnect()`` leaves the namespace (sends DISCONNECT),
``sock.conn`` is its EioConnection, ``sock.data`` is a dict for the application.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import secrets
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, NamedTuple

from websockets.frames import CloseCode, Opcode
from websockets.http11 import Response as WsResponse
from websockets.protocol import State as WsState
from websockets.server import ServerProtocol

log = logging.getLogger("bbo_stream")

###############################################################################
# stand-ins, delete on merge ##################################################
###############################################################################
# Minimal copies of what bbo_stream.py defines per /work/contract.md, so this file runs alone.


@dataclass(frozen=True, slots=True)
class Bbo:
    """One accepted bookTicker update (stand-in; the real one lives in bbo_stream.py)."""

    symbol: str
    bid_price: str
    bid_qty: str
    ask_price: str
    ask_qty: str
    event_ms: int
    recv_ms: int
    latency_ms: int | None
    transaction_ms: int | None
    update_id: int


def bbo_json(bbo: Bbo) -> str:
    """Compact JSON object text with the public keys in contract order (stand-in)."""
    return json.dumps(
        {"symbol": bbo.symbol, "bidPrice": bbo.bid_price, "bidQty": bbo.bid_qty,
         "askPrice": bbo.ask_price, "askQty": bbo.ask_qty, "timestamp": bbo.event_ms,
         "serverTimestamp": bbo.recv_ms, "backendLatency": bbo.latency_ms,
         "updateId": bbo.update_id, "transactionTime": bbo.transaction_ms},
        separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """A parsed request head (stand-in)."""

    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    version: str
    headers: tuple[tuple[str, str], ...]
    raw_head: bytes
    peer: str

    def header(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return default


@dataclass(slots=True)
class HttpResponse:
    """A response for the HTTP layer to write (stand-in)."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


###############################################################################
# end of stand-ins ############################################################
###############################################################################

###############################################################################
# Engine.IO / Socket.IO limits ################################################
###############################################################################
# To merge into §1 (limits). Settings that have a flag (ping interval/timeout, max payload,
# max clients) come from Config; these are the fixed ones.

EIO_PROTOCOL = "4"                  # the only Engine.IO revision served; v3 gets error 5 as the reference does
EIO_SID_BYTES = 15                  # 15 random bytes -> 20 URL-safe characters, the length of engine.io's base64id
EIO_UPGRADE_TIMEOUT_S = 10.0        # engine.io `upgradeTimeout`: a probe not completed by `5` in this time is dropped
EIO_POLL_CLOSE_TIMEOUT_S = 30.0     # engine.io polling `closeTimeout`: how long a closing session waits for the GET carrying `1`
SIO_CONNECT_TIMEOUT_S = 45.0        # socket.io `connectTimeout`: a client that joins no namespace in this time is closed
SIO_MAX_ATTACHMENTS = 10            # socket.io-parser `maxAttachments`: binary attachments per packet
SIO_MAX_ACK_ID_DIGITS = 15          # ids below 10**15 stay exact as a JS Number (2**53 ~ 9.007e15); longer is refused
SIO_MAX_NAMESPACE_CHARS = 256       # the reference has no cap; this bounds what a CONNECT_ERROR echoes back
SIO_MAX_PENDING_ACKS = 256          # server->client acks awaiting an answer, per socket; the oldest is dropped beyond
OUTBOX_MAX_CONTROL_BYTES = 512 * 1024  # queued non-update packets of a client that does not read; beyond -> disconnect
OUTBOX_MAX_UPDATE_BYTES = 64 * 1024    # pending updates before they are compacted to the newest per symbol (~250 updates)
WS_HIGH_WATER_BYTES = 64 * 1024     # unsent bytes at which a WebSocket client counts as backed up (asyncio's default high mark)
WS_WRITE_TIMEOUT_S = 10.0           # a backed-up client whose socket does not drain in this time is disconnected
WS_READ_CHUNK_BYTES = 64 * 1024     # one read from a WebSocket peer; bounds the work done per read
WS_CLOSE_TIMEOUT_S = 10.0           # wait for the peer to finish the closing handshake (websockets' default close_timeout)
BBO_MAX_RATE_PER_S = 1000.0         # highest `maxRate` a client may ask for (updates per second per symbol)
BBO_MAX_SUBSCRIBE_SYMBOLS = 1000    # symbols in one subscription; bounds per-client state
BBO_MAX_SYMBOL_CHARS = 32           # longest symbol name accepted in subscribe/unsubscribe (Binance's are < 20)


class EioProtocolError(ValueError):
    """A peer sent something that is not Engine.IO v4. On merge: re-parent under BboStreamError (§2)."""


class SioProtocolError(ValueError):
    """A peer sent something that is not Socket.IO v5. On merge: re-parent under BboStreamError (§2)."""


def _json_dumps(value: Any) -> str:
    """JSON as the reference puts it on the wire: compact, non-ASCII kept, no NaN (JSON.stringify)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_loads(text: str) -> Any:
    """Parse JSON like JSON.parse: NaN/Infinity are refused (Python accepts them by default)."""
    return json.loads(text, parse_constant=_reject_constant)


###############################################################################
# § Engine.IO v4 codec ########################################################
###############################################################################
# pure: str/bytes in, values out; raises EioProtocolError. Spec: engine.io-protocol v4.
#
# Wire format of one packet: <type digit><data>, e.g. "0{...}" open, "2" ping, "3probe",
# "4hello" message. A binary message is a binary WebSocket frame, or over polling "b" + base64
# of the bytes. A polling payload joins packets with the record separator: "4hello\x1e2\x1e4world".


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
        EioProtocolError: empty text, an unknown type character or bad base64.
    """
    if not text:
        raise EioProtocolError("empty packet")
    head = text[0]
    if head == "b":
        try:
            return EioPacket(EioType.MESSAGE, base64.b64decode(text[1:], validate=True))
        except binascii.Error:
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
    for segment in body.split(EIO_SEPARATOR):
        yield decode_eio(segment)


###############################################################################
# § Socket.IO v5 codec ########################################################
###############################################################################
# pure: str/bytes in, values out; raises SioProtocolError. Spec: socket.io-protocol v5.
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


class SioDecoder:
    """Turns the Engine.IO messages of one client into complete Socket.IO packets.

    A BINARY_EVENT/BINARY_ACK text is held until its attachments (binary messages) arrive; the
    result is an EVENT/ACK whose data holds bytes, as the reference's Decoder does. Memory is
    bounded by SIO_MAX_ATTACHMENTS messages of at most maxPayload bytes each.
    """

    __slots__ = ("_pending", "_buffers", "max_attachments")

    def __init__(self, max_attachments: int = SIO_MAX_ATTACHMENTS) -> None:
        self._pending: SioPacket | None = None  # the binary packet being reassembled
        self._buffers: list[bytes] = []         # attachments received so far
        self.max_attachments = max_attachments  # refused beyond this many per packet

    def feed(self, data: str | bytes) -> SioPacket | None:
        """Add one Engine.IO message; return a packet once one is complete.

        Raises:
            SioProtocolError: a malformed packet, text while attachments are expected, or
                binary data nobody announced.
        """
        if isinstance(data, str):
            if self._pending is not None:
                raise SioProtocolError("got plaintext data when reconstructing a packet")
            pkt = decode_sio(data, self.max_attachments)
            if pkt.kind in _SIO_BINARY:
                self._pending, self._buffers = pkt, []
                return None
            return pkt
        if self._pending is None:
            raise SioProtocolError("got binary data when not reconstructing a packet")
        self._buffers.append(bytes(data))
        pending = self._pending
        if len(self._buffers) < pending.attachments:
            return None
        buffers, self._pending, self._buffers = self._buffers, None, []
        kind = SioType.EVENT if pending.kind is SioType.BINARY_EVENT else SioType.ACK
        return SioPacket(kind, pending.namespace, _sio_reconstruct(pending.data, buffers), pending.ack_id)


###############################################################################
# § Sessions ##################################################################
###############################################################################
# pure: state machines driven by (input, now); `now` is monotonic seconds passed in, never read.
# Effects come back as Actions (kind, payload) for the I/O shell to carry out.


class EioUpdate(NamedTuple):
    """A message that a newer one with the same key supersedes (a BBO for one symbol).

    Built once per update by the Hub and shared by every client's outbox.
    """

    key: str     # the symbol, or FEED_STATUS_KEY
    text: str    # the Engine.IO packet: '42["bbo_update",{...}]'
    frame: bytes  # the same packet as a ready unmasked WebSocket text frame


FEED_STATUS_KEY = "\x00feed_status"  # cannot collide with a symbol; never filtered or rate-limited


class EioOutbox:
    """A client's bounded outbox: a FIFO of control packets plus conflating updates.

    Control packets (open, ping, CONNECT answers, acks, events) are never dropped; past
    OUTBOX_MAX_CONTROL_BYTES the client is too slow and gets disconnected. Updates are kept in
    arrival order while they fit in OUTBOX_MAX_UPDATE_BYTES, then compacted to the newest per
    key; a client coming back from a backlog asks for the newest per key only. With a rate
    limit, an update that is not due yet waits in `held` (newest wins) until `release_due`.
    """

    __slots__ = ("control", "control_bytes", "updates", "update_bytes", "symbols", "interval_s",
                 "held", "due_at", "skipped", "sent")

    def __init__(self) -> None:
        self.control: deque[str | bytes] = deque()  # encoded packets, str = text, bytes = binary message
        self.control_bytes = 0                      # sum of len() of `control`
        self.updates: list[EioUpdate] = []          # pending updates, oldest first
        self.update_bytes = 0                       # sum of len(text) of `updates`
        self.symbols: frozenset[str] | None = None  # subscription filter; None = every symbol
        self.interval_s: float | None = None        # 1 / maxRate; None = every update
        self.held: dict[str, EioUpdate] = {}        # rate-limited: newest update not due yet, per key
        self.due_at: dict[str, float] = {}          # rate-limited: when the next update of a key may go
        self.skipped = 0                            # updates superseded before they were sent
        self.sent = 0                               # updates handed to the transport

    @property
    def passthrough(self) -> bool:
        """True when every update goes out as published (no filter, no rate limit)."""
        return self.symbols is None and self.interval_s is None

    def has_data(self) -> bool:
        return bool(self.control or self.updates)

    def push_control(self, item: str | bytes) -> bool:
        """Queue a control packet; False when the bound is exceeded (disconnect the client)."""
        self.control.append(item)
        self.control_bytes += len(item)
        return self.control_bytes <= OUTBOX_MAX_CONTROL_BYTES

    def wants(self, key: str) -> bool:
        return self.symbols is None or key in self.symbols or key == FEED_STATUS_KEY

    def push_update(self, update: EioUpdate, now: float) -> bool:
        """Offer an update; True when something new is ready to send now."""
        key = update.key
        if not self.wants(key):
            return False
        if self.interval_s is not None and key != FEED_STATUS_KEY:
            due = self.due_at.get(key)
            if due is not None and now < due:
                if key in self.held:
                    self.skipped += 1
                self.held[key] = update
                return False
            self.due_at[key] = now + self.interval_s
        self._append(update)
        return True

    def _append(self, update: EioUpdate) -> None:
        self.updates.append(update)
        self.update_bytes += len(update.text)
        if self.update_bytes > OUTBOX_MAX_UPDATE_BYTES:
            self._compact()

    def _compact(self) -> None:
        """Keep only the newest pending update per key, ordered by their last arrival."""
        newest: dict[str, EioUpdate] = {}
        for update in self.updates:
            newest.pop(update.key, None)
            newest[update.key] = update
        self.skipped += len(self.updates) - len(newest)
        self.updates = list(newest.values())
        self.update_bytes = sum(len(update.text) for update in self.updates)

    def release_due(self, now: float) -> bool:
        """Move held updates whose time has come to the send queue; True if any moved."""
        due = [key for key in self.held if self.due_at[key] <= now]
        for key in due:
            self.due_at[key] = now + (self.interval_s or 0.0)
            self._append(self.held.pop(key))
        return bool(due)

    def next_due_at(self) -> float | None:
        return min((self.due_at[key] for key in self.held), default=None)

    def set_subscription(self, symbols: frozenset[str] | None, max_rate: float | None) -> None:
        """Change the filter and rate; pending updates no longer wanted are dropped."""
        self.symbols = symbols
        self.interval_s = None if max_rate is None else 1.0 / max_rate
        self.updates = [update for update in self.updates if self.wants(update.key)]
        self.update_bytes = sum(len(update.text) for update in self.updates)
        held = {key: update for key, update in self.held.items() if self.wants(key)}
        self.held = {}
        if self.interval_s is None:
            self.due_at.clear()
            for update in held.values():
                self._append(update)
        else:
            self.held = held
            self.due_at = {key: due for key, due in self.due_at.items() if self.wants(key)}

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
        return updates

    def clear(self) -> None:
        self.take_control()
        self.skipped += len(self.updates) + len(self.held)
        self.updates, self.update_bytes, self.held = [], 0, {}


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
    REJECT_POLL = 3  # answer the GET being handled with 400 and an empty body (a second concurrent GET)
    PROBE_PONG = 4   # write `3probe` on the probing WebSocket
    UPGRADED = 5     # the probing WebSocket is now the session's transport
    CLOSE_PROBE = 6  # close the probing WebSocket; the session stays on polling


Action = tuple[Act, Any]
_FLUSH: Action = (Act.FLUSH, None)


class EioSession:
    """One Engine.IO v4 session as a pure state machine (engine.io's lib/socket.ts redone).

    Inputs are methods taking `now`; outputs are lists of Actions. The outbox holds what goes
    to the client; the shell drains it when it gets FLUSH: `take_poll_payload()` for a GET,
    or the outbox directly for a WebSocket.

    Heartbeat (spec §Heartbeat): the server queues `2` at `next_ping_at` and expects `3` by
    `pong_deadline`, on polling too; both are armed from the handshake, and `tick(now)` applies
    whatever has lapsed, so a late request sees an expired session as gone.
    """

    __slots__ = ("sid", "state", "outbox", "ping_interval_s", "ping_timeout_s", "next_ping_at",
                 "pong_deadline", "_ping_refreshed", "upgrade_deadline", "close_deadline",
                 "close_reason", "poll_parked", "_poll_final")

    def __init__(self, sid: str, *, websocket: bool, now: float, ping_interval_s: float,
                 ping_timeout_s: float, max_payload_bytes: int) -> None:
        self.sid = sid                                   # public session id (query `sid`)
        self.state = EioState.WEBSOCKET if websocket else EioState.POLLING
        self.outbox = EioOutbox()                        # what the client has yet to receive
        self.ping_interval_s = ping_interval_s           # server ping period
        self.ping_timeout_s = ping_timeout_s             # how long a pong may take
        self.next_ping_at: float | None = now + ping_interval_s  # None while a pong is awaited
        self.pong_deadline: float | None = None          # close at this time unless a pong came
        self._ping_refreshed = False                     # deadline already extended once for this ping
        self.upgrade_deadline: float | None = None       # PROBING/UPGRADING must end by then
        self.close_deadline: float | None = None         # CLOSING gives up waiting for a GET then
        self.close_reason: str | None = None             # why the session ended
        self.poll_parked = False                         # a GET is waiting for data
        self._poll_final: str | None = None              # appended to the parked GET's answer when closing
        # Exactly the five keys, compact (spec §Handshake; compared byte for byte with the reference).
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
        times = [t for t in (self.next_ping_at, self.pong_deadline, self.upgrade_deadline,
                             self.close_deadline, self.outbox.next_due_at()) if t is not None]
        return min(times, default=None)

    # -- time ------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Apply every deadline that has passed by `now`."""
        if self.state is EioState.CLOSED:
            return []
        if self.state is EioState.CLOSING:
            if self.close_deadline is not None and now >= self.close_deadline:
                self._end()
            return []
        if self.pong_deadline is not None and now >= self.pong_deadline:
            return self._abort("ping timeout", "1")
        actions: list[Action] = []
        if self.upgrade_deadline is not None and now >= self.upgrade_deadline:
            self.state, self.upgrade_deadline = EioState.POLLING, None
            actions.append((Act.CLOSE_PROBE, None))
        if self.next_ping_at is not None and now >= self.next_ping_at:
            self.next_ping_at, self.pong_deadline = None, now + self.ping_timeout_s
            self._ping_refreshed = False
            if not self.outbox.push_control(encode_eio(EioType.PING)):
                return self._abort("outbox overflow", "1")
            if self.can_transmit():
                actions.append(_FLUSH)
        if self.outbox.held and self.outbox.release_due(now) and self.can_transmit():
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

    def push_updates(self, updates: list[EioUpdate], now: float) -> list[Action]:
        """Offer a batch of conflatable updates (the Hub's slow path); at most one FLUSH."""
        if self.closed:
            return []
        ready = False
        for update in updates:
            ready = self.outbox.push_update(update, now) or ready
        return [_FLUSH] if ready and self.can_transmit() else []

    # -- polling ---------------------------------------------------------------

    def begin_poll(self, now: float) -> list[Action]:
        """A GET arrived. FLUSH means answer it now; otherwise it parks until a FLUSH."""
        if self.state is EioState.CLOSED:
            return []
        if self.poll_parked:
            # engine.io polling.ts onPollRequest: "overlap from client" -> transport error. Seen on the
            # reference: the parked GET gets `1`, this one 400 with no body, then the sid is unknown.
            return [(Act.REJECT_POLL, None), *self._abort("overlap from client", "1")]
        self.poll_parked = True
        if self.state is EioState.CLOSING:
            # The reference answers the GET after a server-side close with `6\x1e1` (noop + close).
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

    def abort_poll(self, now: float) -> list[Action]:
        """The client dropped the connection of its parked GET (engine.io: "poll connection closed prematurely")."""
        if not self.poll_parked or self.closed:
            return []
        self.poll_parked = False
        return self._abort("poll connection closed prematurely", None)

    def receive_post(self, body: str, now: float) -> list[Action]:
        """Packets from a POST body; those before an invalid one count, then the session closes."""
        if self.closed:
            return []  # engine.io ignores packets once the socket is not "open"; the POST still gets "ok"
        actions: list[Action] = []
        try:
            for pkt in iter_eio_payload(body):
                actions.extend(self.receive_packet(pkt, now))
                if self.closed:
                    break
        except EioProtocolError:
            actions.extend(self._abort("parse error", "1"))
        return actions

    # -- packets from the session's transport ------------------------------------

    def receive_packet(self, pkt: EioPacket, now: float) -> list[Action]:
        """One packet from the client on the session's own transport."""
        if self.closed:
            return []
        if self.pong_deadline is not None and pkt.kind is not EioType.PONG and not self._ping_refreshed:
            # engine.io socket.ts: any packet while a pong is awaited extends the deadline once, so
            # a busy client whose pong sits behind other data is not cut off.
            self.pong_deadline, self._ping_refreshed = now + self.ping_timeout_s, True
        kind = pkt.kind
        if kind is EioType.MESSAGE:
            return [(Act.DELIVER, pkt.data)]
        if kind is EioType.PONG:
            # engine.io clears the timeout and restarts the interval from the pong.
            self.pong_deadline, self.next_ping_at = None, now + self.ping_interval_s
            return []
        if kind is EioType.CLOSE:
            # Polling: the parked GET gets `6` (polling.ts onClose). Over WebSocket engine.io 6.6 ignores
            # `1` and waits for the socket to close; we follow the spec and close the session now.
            self.outbox.clear()
            return self._end_with("transport close", "6")
        if kind is EioType.PING:
            # v4 heartbeats go server -> client only; "invalid heartbeat direction" on the reference.
            return self._abort("transport error", "1")
        return []  # OPEN, UPGRADE, NOOP: ignored, as the reference does

    # -- upgrade (spec §Upgrade) ----------------------------------------------------

    def begin_upgrade(self, now: float) -> bool:
        """A WebSocket with this sid was accepted; False when it must be closed (not polling)."""
        if self.state is not EioState.POLLING:
            return False  # already probing/upgraded: the reference accepts the socket then closes it
        self.state, self.upgrade_deadline = EioState.PROBING, now + EIO_UPGRADE_TIMEOUT_S
        return True

    def receive_probe_packet(self, pkt: EioPacket, now: float) -> list[Action]:
        """One packet on the probing WebSocket: `2probe`, then `5`; anything else drops the probe."""
        if self.state not in (EioState.PROBING, EioState.UPGRADING):
            return [(Act.CLOSE_PROBE, None)]
        if pkt.kind is EioType.PING and pkt.data == "probe":
            self.state = EioState.UPGRADING
            # Release the parked GET so the client can pause polling (engine.io sends a noop).
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

    def end_probe(self, now: float) -> None:
        """The probing WebSocket went away before the upgrade finished."""
        if self.state in (EioState.PROBING, EioState.UPGRADING):
            self.state, self.upgrade_deadline = EioState.POLLING, None

    # -- closing -------------------------------------------------------------------

    def close(self, reason: str, now: float) -> list[Action]:
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
            self.state, self.close_deadline = EioState.CLOSING, now + EIO_POLL_CLOSE_TIMEOUT_S
            return [(Act.CLOSE, reason)]
        return self._end_with(reason, "1")

    def abort(self, reason: str, now: float) -> list[Action]:
        """Close at once, dropping the queue: protocol errors, slow clients, a lost transport."""
        if self.state is EioState.CLOSED:
            return []
        if self.state is EioState.CLOSING:
            self._end()
            return []
        return self._abort(reason, "1")

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
        self.outbox.held.clear()


class SioClientState:
    """Socket.IO state of one Engine.IO connection: decoder, joined namespaces, connect timeout.

    `receive` enforces the reference's rules (socket.io client.ts ondecoded): CONNECT only for a
    namespace not joined yet, every other packet only for a joined one, never CONNECT_ERROR from
    a client; a violation is a protocol error that closes the connection.
    """

    __slots__ = ("decoder", "namespaces", "connect_deadline")

    def __init__(self, now: float, connect_timeout_s: float = SIO_CONNECT_TIMEOUT_S) -> None:
        self.decoder = SioDecoder()                      # packet reassembly for this connection
        self.namespaces: dict[str, Any] = {}             # joined namespace -> the layer above's socket
        self.connect_deadline: float | None = now + connect_timeout_s  # None once a namespace is joined

    def receive(self, data: str | bytes) -> SioPacket | None:
        """Decode one Engine.IO message; a complete, allowed packet or None (attachments pending).

        Raises:
            SioProtocolError: malformed, or not allowed in the current state.
        """
        pkt = self.decoder.feed(data)
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

    def connect_expired(self, now: float) -> bool:
        return self.connect_deadline is not None and now >= self.connect_deadline and not self.namespaces


###############################################################################
# I/O below this line #########################################################
###############################################################################
