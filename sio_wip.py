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
                 "max_rate", "held", "due_at", "skipped", "sent")

    def __init__(self) -> None:
        self.control: deque[str | bytes] = deque()  # encoded packets, str = text, bytes = binary message
        self.control_bytes = 0                      # sum of len() of `control`
        self.updates: list[EioUpdate] = []          # pending updates, oldest first
        self.update_bytes = 0                       # sum of len(text) of `updates`
        self.symbols: frozenset[str] | None = None  # subscription filter; None = every symbol
        self.max_rate: float | None = None          # updates per second per symbol, as the client gave it
        self.interval_s: float | None = None        # 1 / max_rate; None = every update
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
        self.symbols, self.max_rate = symbols, max_rate
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

    def end_probe(self, now: float) -> list[Action]:
        """Give up the probe (it closed, or sent garbage); the session stays on polling."""
        if self.state not in (EioState.PROBING, EioState.UPGRADING):
            return []
        self.state, self.upgrade_deadline = EioState.POLLING, None
        return [(Act.CLOSE_PROBE, None)]

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

_logged_once: set[str] = set()


def _log_once(kind: str, message: str, *args: Any) -> None:
    """Log a client-caused problem at WARNING the first time per kind, then at DEBUG (engineio's idea)."""
    if kind in _logged_once:
        log.debug(message, *args)
    else:
        _logged_once.add(kind)
        log.warning(message + " (further ones of this kind at DEBUG)", *args)


###############################################################################
# § WebSocket transport #######################################################
###############################################################################
# I/O: websockets' sans-I/O ServerProtocol driven from our own StreamReader/StreamWriter
# (style-examples §2.B, option A: replay the head our HTTP layer read). No write awaits, so a
# frame, ours or the protocol's, always lands in the transport whole: writes never interleave.


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


class WsLink:
    """One accepted WebSocket: the protocol object plus the streams it is driven over."""

    __slots__ = ("proto", "reader", "writer", "transport", "writable", "backed_up", "_abort_timer")

    def __init__(self, proto: ServerProtocol, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.proto = proto                  # websockets' sans-I/O state machine
        self.reader = reader                # bytes from the peer
        self.writer = writer                # only for drain() and close(); writes go to `transport`
        self.transport = writer.transport   # synchronous writes, whole frames only
        self.writable = True                # protocol OPEN and no close frame sent: data frames allowed
        self.backed_up = False              # unsent bytes passed WS_HIGH_WATER_BYTES; a drain task owns writing
        self._abort_timer: asyncio.TimerHandle | None = None  # ends a closing handshake the peer ignores

    def write(self, data: bytes) -> None:
        """Write whole frames; notes when the peer stops keeping up."""
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
        self.writable = False
        if self._abort_timer is None and not self.transport.is_closing():
            loop = asyncio.get_running_loop()
            self._abort_timer = loop.call_later(WS_CLOSE_TIMEOUT_S, self.transport.abort)

    def abort(self) -> None:
        """Drop the TCP connection now (a stuck client)."""
        self.writable = False
        self.transport.abort()

    def finished(self) -> None:
        if self._abort_timer is not None:
            self._abort_timer.cancel()
            self._abort_timer = None


async def serve_ws_link(link: WsLink, on_message: Callable[[WsLink, str | bytes], None]) -> None:
    """Read frames until the connection ends, handing each complete message to `on_message`.

    Text messages arrive as str, binary ones as bytes (Socket.IO attachments). Control frames
    are answered by the protocol object itself. Returns when the TCP connection is done.
    """
    proto, parts, kind = link.proto, [], Opcode.TEXT
    try:
        while True:
            try:
                data = await link.reader.read(WS_READ_CHUNK_BYTES)
            except (ConnectionError, OSError):
                data = b""
            if data:
                proto.receive_data(data)
            else:
                proto.receive_eof()
            link.write_pending()  # automatic pongs and close echoes
            for frame in proto.events_received():
                if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                    kind, parts = frame.opcode, [frame.data]
                elif frame.opcode is Opcode.CONT:
                    parts.append(frame.data)
                else:
                    continue
                if not frame.fin:
                    continue
                payload, parts = b"".join(parts), []
                if kind is Opcode.TEXT:
                    try:
                        message: str | bytes = payload.decode()
                    except UnicodeDecodeError:
                        proto.fail(CloseCode.INVALID_DATA, "invalid UTF-8")
                        link.write_pending()
                        break
                else:
                    message = payload
                if link.writable:
                    on_message(link, message)
            if not data or proto.state is WsState.CLOSED:
                return
            if proto.close_expected():  # the closing handshake is done: give the peer a moment to FIN
                with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError):
                    await asyncio.wait_for(link.reader.read(), WS_CLOSE_TIMEOUT_S)
                return
    finally:
        link.writable = False
        link.finished()
        link.writer.close()


###############################################################################
# § Engine.IO server ##########################################################
###############################################################################
# I/O: session registry, polling GET/POST, WebSocket sessions and upgrades, heartbeat timers.
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


def _is_upgrade(req: HttpRequest) -> bool:
    """Node's rule for an "upgrade" request: an Upgrade header and the upgrade token in Connection."""
    connection = req.header("connection") or ""
    return req.header("upgrade") is not None and any(
        token.strip().lower() == "upgrade" for token in connection.split(","))


def _bad_header_value(value: str) -> bool:
    """engine.io's checkInvalidHeaderChar on Origin: control characters, DEL or non-Latin-1."""
    return any((ord(ch) < 32 and ch != "\t") or ord(ch) == 127 or ord(ch) > 255 for ch in value)


class EioConnection:
    """The I/O side of one Engine.IO session: transport(s), timers, the parked GET.

    The layer above uses `send`, `send_binary`, `close`, `transport`, `sid`, `peer`, `upper`.
    """

    __slots__ = ("server", "session", "sid", "peer", "upper", "ws", "probe", "_poll_waiter",
                 "_timer", "_timer_at", "_drain_task", "_close_notified", "_close_code")

    def __init__(self, server: EioServer, session: EioSession, peer: str) -> None:
        self.server = server                 # owner: registry, handler, settings
        self.session = session               # the pure state machine
        self.sid = session.sid               # public session id
        self.peer = peer                     # "ip:port", for logs
        self.upper: Any = None               # slot for the layer above (Socket.IO client state)
        self.ws: WsLink | None = None        # the WebSocket once it is the session's transport
        self.probe: WsLink | None = None     # a WebSocket probing for an upgrade
        self._poll_waiter: asyncio.Future[str] | None = None  # resolved with the parked GET's body
        self._timer: asyncio.TimerHandle | None = None        # fires at the session's next deadline
        self._timer_at = 0.0                 # when `_timer` fires (loop time)
        self._drain_task: asyncio.Task[None] | None = None    # owns writing while the WebSocket is backed up
        self._close_notified = False         # on_close was called
        self._close_code: int | None = None  # WebSocket close code to use (None -> empty close frame)

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
        self._apply(self.session.close(reason, self.server.now()))

    def abort(self, reason: str) -> None:
        """Close at once, dropping what is queued."""
        self._apply(self.session.abort(reason, self.server.now()))

    def flush(self) -> None:
        """Transmit the outbox if the transport can take it now (after changing the subscription)."""
        self._apply([_FLUSH] if self.session.can_transmit() else [])

    # -- the Hub's hot path --------------------------------------------------------------

    def deliver(self, batch: list[EioUpdate], joined_frames: bytes, now: float) -> None:
        """Hand a batch of updates to this client.

        Fast path: a WebSocket client that keeps up, has nothing queued and takes every update
        gets the batch's pre-built frames, the same bytes as every other client, in one write.
        Everyone else goes through the conflating outbox.
        """
        link, outbox = self.ws, self.session.outbox
        if (link is not None and link.writable and not link.backed_up and outbox.passthrough
                and not outbox.control and not outbox.updates):
            link.write(joined_frames)
            outbox.sent += len(batch)
            if link.backed_up:
                self._start_drain(link)
            return
        self._apply(self.session.push_updates(batch, now))

    # -- carrying out the session's actions ------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for kind, payload in actions:
            if kind is Act.DELIVER:
                if not self.session.closed:
                    self.server.deliver(self, payload)
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
            self.server.forget(self)
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
            return
        waiter = self._poll_waiter
        if waiter is not None and not waiter.done() and self.session.poll_parked:
            self._poll_waiter = None
            waiter.set_result(self.session.take_poll_payload())

    def _on_session_closed(self, reason: str) -> None:
        if self._close_notified:
            return
        self._close_notified = True
        log.debug("eio %s closed: %s", self.sid, reason)
        if self.probe is not None:
            probe, self.probe = self.probe, None
            probe.close()
        link = self.ws
        if link is not None:
            if link.backed_up:
                link.abort()  # it cannot take more bytes; nothing graceful is possible
            else:
                self._flush(conflate=True)
                link.close(self._close_code)
        self.server.notify_close(self, reason)

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
        self._apply(self.session.tick(max(self.server.now(), self._timer_at)))

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
        except asyncio.TimeoutError:
            self.server.slow_disconnects += 1
            _log_once("slow", "eio %s: peer %s did not read for %.0f s, disconnecting",
                      self.sid, self.peer, WS_WRITE_TIMEOUT_S)
            self.abort("write timeout")
            link.abort()
        except (ConnectionError, OSError):
            link.abort()  # the read loop sees the end and closes the session

    # -- WebSocket messages --------------------------------------------------------------------

    def on_ws_message(self, link: WsLink, message: str | bytes) -> None:
        now = self.server.now()
        try:
            pkt = decode_eio(message) if isinstance(message, str) else EioPacket(EioType.MESSAGE, message)
        except EioProtocolError as exc:
            _log_once("eio-parse", "eio %s: invalid packet from %s: %s", self.sid, self.peer, exc)
            pkt = None
        if link is self.probe:
            self._apply(self.session.receive_probe_packet(pkt, now) if pkt else self.session.end_probe(now))
        elif link is self.ws:
            self._apply(self.session.receive_packet(pkt, now) if pkt else self.session.abort("parse error", now))

    def on_ws_closed(self, link: WsLink) -> None:
        now = self.server.now()
        if link is self.ws:
            self._apply(self.session.abort("transport close", now))
        elif link is self.probe:
            self._apply(self.session.end_probe(now))


class EioServer:
    """Engine.IO v4 server on our own HTTP layer (see the module docstring for the API).

    Args:
        ping_interval_ms, ping_timeout_ms: heartbeat, sent in the open packet.
        max_payload: bytes; the largest POST body and WebSocket message accepted.
        max_clients: sessions held at once; a handshake beyond gets 503.
        handler: the layer above (on_open / on_message / on_close); settable later.
    """

    def __init__(self, *, ping_interval_ms: int = 25000, ping_timeout_ms: int = 20000,
                 max_payload: int = 1_000_000, max_clients: int = 10_000, handler: Any = None) -> None:
        self.ping_interval_s = ping_interval_ms / 1000
        self.ping_timeout_s = ping_timeout_ms / 1000
        self.max_payload = max_payload
        self.max_clients = max_clients
        self.handler = handler                       # on_open / on_message / on_close
        self.connections: dict[str, EioConnection] = {}  # sid -> live (or closing) connection
        self.handshakes = 0                          # sessions opened
        self.upgrades = 0                            # polling sessions moved to WebSocket
        self.slow_disconnects = 0                    # clients cut off for not reading
        self.refused_full = 0                        # handshakes refused by max_clients

    @classmethod
    def from_config(cls, cfg: Any, handler: Any = None) -> EioServer:
        return cls(ping_interval_ms=cfg.ping_interval_ms, ping_timeout_ms=cfg.ping_timeout_ms,
                   max_payload=cfg.max_payload, max_clients=cfg.max_clients, handler=handler)

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    # -- calls from connections -------------------------------------------------------------

    def deliver(self, conn: EioConnection, data: str | bytes) -> None:
        if self.handler is not None:
            self.handler.on_message(conn, data)

    def notify_close(self, conn: EioConnection, reason: str) -> None:
        if self.handler is not None:
            self.handler.on_close(conn, reason)

    def forget(self, conn: EioConnection) -> None:
        if self.connections.get(conn.sid) is conn:
            del self.connections[conn.sid]

    # -- requests ---------------------------------------------------------------------------

    async def handle_request(self, req: HttpRequest, body: bytes, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> HttpResponse | None:
        """Serve one request under /socket.io/ (contract.md).

        Returns the response for polling, the handshake and errors, or None once a WebSocket
        took over the connection (the HTTP layer then leaves reader and writer alone).
        """
        query = {key: values[-1] for key, values in req.query.items() if values}  # node: last one wins
        upgrade = _is_upgrade(req)
        refused = self._verify(req, query, upgrade)
        if refused is not None:
            return refused
        sid = query.get("sid") or None
        if upgrade:
            await self._serve_websocket(req, query, reader, writer)
            return None
        if sid is None:
            return self._open_polling(req)
        conn = self.connections[sid]
        if req.method == "GET":
            return await self._poll(conn, reader, writer)
        if req.method == "POST":
            return self._post(conn, req, body)
        return HttpResponse(500, b"", content_type="")  # polling.ts onRequest: other methods, no body

    def _error(self, code: int, upgrade: bool) -> HttpResponse:
        message = EIO_ERROR_MESSAGES[code]
        if upgrade:  # server.ts abortUpgrade: plain text, always 400
            return HttpResponse(400, message.encode(), "text/html")
        return HttpResponse(403 if code == 4 else 400, _json_dumps({"code": code, "message": message}).encode())

    def _verify(self, req: HttpRequest, query: dict[str, str], upgrade: bool) -> HttpResponse | None:
        """The checks of engine.io server.ts verify() + handshake(), in the same order."""
        transport = query.get("transport")
        if transport not in ("polling", "websocket"):
            return self._error(0, upgrade)
        origin = req.header("origin")
        if origin is not None and _bad_header_value(origin):
            return self._error(3, upgrade)
        sid = query.get("sid") or None  # an empty sid counts as none, as in JS
        if sid is not None:
            conn = self._live(sid)
            if conn is None:
                return self._error(1, upgrade)
            if not upgrade and conn.transport != transport:
                return self._error(3, upgrade)  # TRANSPORT_MISMATCH, e.g. polling after the upgrade
            if query.get("EIO") != EIO_PROTOCOL:
                return self._error(3, upgrade)  # PROTOCOL_MISMATCH
            return None
        if req.method != "GET":
            return self._error(2, upgrade)
        if transport == "websocket" and not upgrade:
            return self._error(3, upgrade)
        if query.get("EIO") != EIO_PROTOCOL:
            # EIO=3, missing or anything else: engine.io without allowEIO3 answers code 5.
            return self._error(5, upgrade)
        if len(self.connections) >= self.max_clients:
            self.refused_full += 1
            # Not in the reference; shaped like its allowRequest refusals (code 4, own message).
            if upgrade:
                return HttpResponse(503, b"Too many clients", "text/html")
            return HttpResponse(503, _json_dumps({"code": 4, "message": "Too many clients"}).encode())
        return None

    def _live(self, sid: str) -> EioConnection | None:
        """The connection for `sid` after applying its lapsed deadlines (a timer may be late)."""
        conn = self.connections.get(sid)
        if conn is not None:
            conn._apply(conn.session.tick(self.now()))
            conn = self.connections.get(sid)
        if conn is None or conn.session.state is EioState.CLOSED:
            return None
        return conn

    def _create(self, req: HttpRequest, now: float, link: WsLink | None) -> EioConnection:
        sid = secrets.token_urlsafe(EIO_SID_BYTES)
        session = EioSession(sid, websocket=link is not None, now=now, ping_interval_s=self.ping_interval_s,
                             ping_timeout_s=self.ping_timeout_s, max_payload_bytes=self.max_payload)
        conn = EioConnection(self, session, req.peer)
        conn.ws = link
        self.connections[sid] = conn
        self.handshakes += 1
        if self.handler is not None:
            self.handler.on_open(conn)
        conn._arm_timer()
        return conn

    def _open_polling(self, req: HttpRequest) -> HttpResponse:
        now = self.now()
        conn = self._create(req, now, None)
        conn.session.begin_poll(now)  # the open packet is queued, so this GET is answered at once
        return HttpResponse(200, conn.session.take_poll_payload().encode(), "text/plain; charset=UTF-8",
                            list(_POLL_HEADERS))

    async def _poll(self, conn: EioConnection, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> HttpResponse | None:
        actions = conn.session.begin_poll(self.now())
        if actions and actions[0][0] is Act.REJECT_POLL:
            conn._apply(actions[1:])  # the parked GET gets `1`, the session ends
            return HttpResponse(400, b"", content_type="")
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        conn._poll_waiter = waiter
        conn._apply(actions)
        if not waiter.done() and not await self._park(conn, waiter, reader):
            writer.close()
            return None
        return HttpResponse(200, waiter.result().encode(), "text/plain; charset=UTF-8", list(_POLL_HEADERS))

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
            conn._apply(conn.session.abort_poll(self.now()))
            raise
        finally:
            if not watch.done():
                watch.cancel()
            elif not watch.cancelled():
                watch.exception()  # retrieved: a reset here just means the client left
        if waiter.done():
            return True
        conn._poll_waiter = None
        conn._apply(conn.session.abort_poll(self.now()))
        return False

    def _post(self, conn: EioConnection, req: HttpRequest, body: bytes) -> HttpResponse:
        if len(body) > self.max_payload:
            return HttpResponse(413, b"", content_type="")  # polling.ts: 413, no body, session kept
        if req.header("content-type") == "application/octet-stream":
            conn.abort("invalid content")  # polling.ts refuses binary bodies in v4
            return HttpResponse(400, b"", content_type="")
        # node decodes the body with setEncoding("utf8"), which replaces bad sequences too.
        conn._apply(conn.session.receive_post(body.decode("utf-8", "replace"), self.now()))
        return HttpResponse(200, b"ok", "text/html", list(_POLL_HEADERS))

    # -- WebSocket ---------------------------------------------------------------------------

    async def _serve_websocket(self, req: HttpRequest, query: dict[str, str],
                               reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Handshake with websockets, then run the link: a new session, or a probe for one."""
        proto = ServerProtocol(max_size=self.max_payload)  # an oversized message closes with 1009, like ws
        proto.receive_data(req.raw_head)
        events = proto.events_received()
        link = WsLink(proto, reader, writer)
        if events:
            proto.send_response(proto.accept(events[0]))
        link.write_pending()  # the 101, or websockets' own 4xx (a parse failure queues a 400 itself)
        if proto.handshake_exc is not None or not events:
            link.finished()
            writer.close()
            return
        writer.transport.set_write_buffer_limits(high=WS_HIGH_WATER_BYTES)  # drain() resumes at a quarter
        now = self.now()
        sid = query.get("sid") or None
        if sid is None:
            conn = self._create(req, now, link)
            conn._flush(conflate=False)  # the open packet
        else:
            conn = self.connections.get(sid)
            # engine.io accepts the WebSocket, then closes it when it cannot be an upgrade: a
            # transport=polling upgrade, a session already probing or upgraded (seen: 101 then an
            # empty close frame, i.e. 1005, while the first WebSocket stays fine).
            if conn is None or query.get("transport") != "websocket" or not conn.session.begin_upgrade(now):
                link.close()
                await serve_ws_link(link, lambda _link, _msg: None)
                return
            conn.probe = link
            conn._arm_timer()
        try:
            await serve_ws_link(link, conn.on_ws_message)
        finally:
            conn.on_ws_closed(link)

    async def shutdown(self) -> None:
        """Close every session: polling clients get `1`, WebSocket clients a 1001 close frame."""
        for conn in list(self.connections.values()):
            conn.close("server shutdown", CloseCode.GOING_AWAY)
            if conn.session.state is EioState.CLOSING:
                conn.abort("server shutdown")  # no GET will come for it now
        await asyncio.sleep(0)


###############################################################################
# § Socket.IO server ##########################################################
###############################################################################
# I/O: namespaces, on(event) handlers, acks both ways, on top of EioServer (module docstring).


class SioConnectRefused(Exception):
    """Raise in a connect handler to refuse: the client gets CONNECT_ERROR {"message", "data"}."""

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class SioSocket:
    """A client's membership of one namespace (the reference's server-side Socket)."""

    __slots__ = ("server", "conn", "namespace", "sid", "data", "connected", "_acks", "_next_ack_id",
                 "_held")

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
        self._send(SioPacket(SioType.EVENT, self.namespace, [event, *args], ack_id))

    def emit_json(self, event: str, json_arg: str) -> None:
        """Send an event whose single argument is JSON text already encoded (no re-encoding)."""
        prefix = "" if self.namespace == "/" else self.namespace + ","
        text = f"2{prefix}[{_json_dumps(event)},{json_arg}]"
        if self._held is not None:
            self._held.append(SioPacket(SioType.EVENT, self.namespace, [event, _json_loads(json_arg)]))
        elif self.connected:
            self.conn.send(text)

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


def _ack_args(result: Any) -> list[Any]:
    """A handler's return value as ack arguments (python-socketio's convention)."""
    if result is None:
        return []
    if isinstance(result, tuple):
        return list(result)
    return [result]


class SioServer:
    """Socket.IO v5 server on top of an EioServer (see the module docstring for the API)."""

    def __init__(self, eio: EioServer, connect_timeout_s: float = SIO_CONNECT_TIMEOUT_S) -> None:
        self.eio = eio
        eio.handler = self
        self.connect_timeout_s = connect_timeout_s
        self.namespaces: dict[str, _SioNamespace] = {"/": _SioNamespace("/")}  # "/" always exists
        self._connect_timers: dict[EioConnection, asyncio.TimerHandle] = {}
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
        conn.upper = SioClientState(loop.time(), self.connect_timeout_s)
        self._connect_timers[conn] = loop.call_later(self.connect_timeout_s, self._check_connected, conn)

    def on_message(self, conn: EioConnection, data: str | bytes) -> None:
        client: SioClientState = conn.upper
        try:
            pkt = client.receive(data)
        except SioProtocolError as exc:
            # socket.io client.ts: a decode error or a packet in the wrong state closes the connection.
            self.protocol_errors += 1
            _log_once("sio-parse", "sio %s: closing %s: %s", conn.sid, conn.peer, exc)
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
        for sock in list(client.namespaces.values()):
            self._leave(sock, reason)

    # -- packets ------------------------------------------------------------------------------

    def _check_connected(self, conn: EioConnection) -> None:
        self._connect_timers.pop(conn, None)
        client: SioClientState | None = conn.upper
        if client is not None and client.connect_expired(self.eio.now()):
            conn.close("connect timeout")

    def _connect(self, conn: EioConnection, client: SioClientState, pkt: SioPacket) -> None:
        namespace = self.namespaces.get(pkt.namespace)
        if namespace is None:
            # Byte for byte the reference: 44/<ns>,{"message":"Invalid namespace"}; the connection stays.
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
        # The CONNECT answer first, then whatever the connect handler emitted (issue 3).
        self._send(conn, SioPacket(SioType.CONNECT, pkt.namespace, {"sid": sock.sid}))
        for packet in held:
            self._send(conn, packet)

    def _dispatch(self, sock: SioSocket, pkt: SioPacket) -> None:
        if not pkt.data:
            return  # "42" alone decodes on the reference and does nothing
        event, args = pkt.data[0], pkt.data[1:]
        handler = self.namespaces[sock.namespace].events.get(event) if isinstance(event, str) else None
        if handler is None:
            return
        try:
            result = handler(sock, *args)
        except Exception:
            log.exception("handler for %r failed", event)
            return
        if pkt.ack_id is not None and sock.connected:
            self._send(sock.conn, SioPacket(SioType.ACK, sock.namespace, _ack_args(result), pkt.ack_id))

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
            conn.send(encode_sio(pkt))
        except TypeError:
            # bytes somewhere in the data: BINARY_EVENT/BINARY_ACK + one binary message per attachment.
            data, buffers = sio_deconstruct(pkt.data)
            kind = SioType.BINARY_EVENT if pkt.kind is SioType.EVENT else SioType.BINARY_ACK
            conn.send(encode_sio(SioPacket(kind, pkt.namespace, data, pkt.ack_id, len(buffers))))
            for raw in buffers:
                conn.send_binary(raw)


###############################################################################
# § Fan-out hub ###############################################################
###############################################################################
# I/O: one encoding per update (packet text + WebSocket frame), the same bytes to every client.


class Hub:
    """Fans BBO updates and feed status out to the attached Engine.IO connections.

    `publish(bbo)` encodes the update once, as the `42["bbo_update",{...}]` packet and as its
    WebSocket text frame, and queues it; once per event-loop pass every attached client gets
    the pass's updates in one write (WebSocket clients that keep up: the same joined bytes;
    others: through their conflating outbox, see EioOutbox). Nothing here awaits, so a slow
    client never delays a publish or another client. Call from the event loop's thread.
    """

    def __init__(self) -> None:
        self._conns: dict[EioConnection, None] = {}      # attached, in attach order
        self._snapshot: tuple[EioConnection, ...] = ()   # `_conns` frozen for iteration
        self._batch: list[EioUpdate] = []                # published since the last flush
        self._flush_handle: asyncio.Handle | None = None  # the pending flush callback
        self.published = 0                               # updates published
        self._gone_sent = 0                              # deliveries counted for detached clients
        self._gone_skipped = 0                           # conflated updates of detached clients

    def attach(self, conn: EioConnection) -> None:
        self._conns[conn] = None
        self._snapshot = tuple(self._conns)

    def detach(self, conn: EioConnection) -> None:
        if self._conns.pop(conn, 0) is None:
            self._snapshot = tuple(self._conns)
            self._gone_sent += conn.session.outbox.sent
            self._gone_skipped += conn.session.outbox.skipped

    def subscribe(self, conn: EioConnection, symbols: frozenset[str] | None, max_rate: float | None) -> None:
        """Set a client's symbol filter (None = all) and per-symbol rate (None = every update)."""
        conn.session.outbox.set_subscription(symbols, max_rate)
        conn.flush()

    def publish(self, bbo: Bbo) -> None:
        """Queue one BBO update for every attached client."""
        self._queue(bbo.symbol, '42["bbo_update",' + bbo_json(bbo) + "]")

    def publish_feed_status(self, status: dict[str, Any]) -> None:
        """Queue a feed status change; like an update, only the newest one waits for a slow client."""
        self._queue(FEED_STATUS_KEY, '42["feed_status",' + _json_dumps(status) + "]")

    def _queue(self, key: str, text: str) -> None:
        self._batch.append(EioUpdate(key, text, encode_ws_frame(text.encode())))
        self.published += 1
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        joined = batch[0].frame if len(batch) == 1 else b"".join(update.frame for update in batch)
        now = asyncio.get_running_loop().time()
        for conn in self._snapshot:
            conn.deliver(batch, joined, now)

    def stats(self) -> dict[str, int]:
        """Counters for /metrics: clients, published, delivered, skipped (conflated)."""
        outboxes = [conn.session.outbox for conn in self._conns]
        return {"clients": len(outboxes), "published": self.published,
                "delivered": self._gone_sent + sum(outbox.sent for outbox in outboxes),
                "skipped": self._gone_skipped + sum(outbox.skipped for outbox in outboxes)}


###############################################################################
# § BBO application ###########################################################
###############################################################################
# I/O: the Socket.IO handlers of BBO Stream on namespace "/" (original-design.md, issue 3).


class BboApp:
    """The BBO Stream Socket.IO application: a set of handlers on "/".

    Args:
        sio: the Socket.IO server to register on.
        hub: the fan-out hub the feed publishes to.
        latest_bbos: returns the current Bbo of every symbol (for request_initial_data).
        feed_status: returns the feed status object (contract.md), sent on connect.
        now_ms: wall clock in ms for `pong` (injectable for tests).
    """

    def __init__(self, sio: SioServer, hub: Hub, latest_bbos: Callable[[], Iterable[Bbo]],
                 feed_status: Callable[[], dict[str, Any]],
                 now_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.hub = hub
        self.latest_bbos = latest_bbos
        self.feed_status = feed_status
        self.now_ms = now_ms
        sio.on_connect()(self.on_connect)
        sio.on_disconnect()(self.on_disconnect)
        sio.on("ready")(self.on_ready)
        sio.on("request_initial_data")(self.on_request_initial_data)
        sio.on("ping")(self.on_ping)
        sio.on("subscribe")(self.on_subscribe)
        sio.on("unsubscribe")(self.on_unsubscribe)

    def on_connect(self, sock: SioSocket, auth: Any) -> None:
        sock.emit("welcome", {"message": "Welcome to BBO Stream"})
        sock.emit("feed_status", self.feed_status())
        self.hub.attach(sock.conn)

    def on_disconnect(self, sock: SioSocket, reason: str) -> None:
        self.hub.detach(sock.conn)

    def on_ready(self, sock: SioSocket, *args: Any) -> None:
        return None  # accepted and harmless (the seed's clients send it)

    def on_request_initial_data(self, sock: SioSocket, *args: Any) -> None:
        outbox = sock.conn.session.outbox
        for bbo in self.latest_bbos():
            if outbox.wants(bbo.symbol):
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
        current = sock.conn.session.outbox.symbols
        if symbols is not None:
            current = symbols if current is None else current | symbols
            if len(current) > BBO_MAX_SUBSCRIBE_SYMBOLS:
                return {"error": f"at most {BBO_MAX_SUBSCRIBE_SYMBOLS} symbols"}
        self.hub.subscribe(sock.conn, current, max_rate)
        return self._subscription(sock)

    def on_unsubscribe(self, sock: SioSocket, request: Any = None, *args: Any) -> dict[str, Any]:
        """`{"symbols": [...]}`: stop those symbols; the rate stays."""
        if not isinstance(request, dict):
            return {"error": "unsubscribe expects an object"}
        try:
            symbols = self._parse_symbols(request.get("symbols")) or frozenset()
        except ValueError as exc:
            return {"error": str(exc)}
        outbox = sock.conn.session.outbox
        current = outbox.symbols if outbox.symbols is not None else self._known_symbols()
        self.hub.subscribe(sock.conn, current - symbols, outbox.max_rate)
        return self._subscription(sock)

    def _known_symbols(self) -> frozenset[str]:
        return frozenset(bbo.symbol for bbo in self.latest_bbos())

    def _subscription(self, sock: SioSocket) -> dict[str, Any]:
        outbox = sock.conn.session.outbox
        symbols = outbox.symbols if outbox.symbols is not None else self._known_symbols()
        return {"symbols": sorted(symbols), "maxRate": outbox.max_rate}

    @staticmethod
    def _parse_symbols(raw: Any) -> frozenset[str] | None:
        if raw is None:
            return None
        if not isinstance(raw, list) or len(raw) > BBO_MAX_SUBSCRIBE_SYMBOLS:
            raise ValueError(f"symbols must be a list of at most {BBO_MAX_SUBSCRIBE_SYMBOLS} names")
        if not all(isinstance(name, str) and 0 < len(name) <= BBO_MAX_SYMBOL_CHARS for name in raw):
            raise ValueError("each symbol must be a non-empty string")
        return frozenset(name.upper() for name in raw)

    @staticmethod
    def _parse_rate(raw: Any) -> float | None:
        if raw is None:
            return None  # omitted or null: every update
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0 < raw <= BBO_MAX_RATE_PER_S:
            raise ValueError(f"maxRate must be a number in (0, {BBO_MAX_RATE_PER_S:g}]")
        return raw
