"""Tests of sio_wip.py (issue 3): pure codecs and session machines, then interop over real sockets.

Run: python -m pytest -q test_sio_wip.py
The pure tests use a fake clock. The integration tests (marked below by their `srv` fixture)
stand up the endpoint on 127.0.0.1:0 behind a throwaway HTTP harness (this file only: the real
HTTP layer is the lead's) and talk to it with python-socketio (sync and asyncio clients), raw
sockets, websockets' client and, when node and socket.io-client 4.x are found, the JS client.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sio_wip as m
from sio_wip import (Act, Bbo, EioOutbox, EioPacket, EioSession, EioState, EioType, EioUpdate,
                     HttpRequest, HttpResponse, SioClientState, SioDecoder, SioPacket,
                     SioProtocolError, SioType, EioProtocolError, bbo_json)

# ---- Helpers ---------------------------------------------------------------------------------


def make_bbo(symbol: str = "BTCUSDT", update_id: int = 1, **overrides: Any) -> Bbo:
    fields = dict(symbol=symbol, bid_price="28750.10", bid_qty="1.5", ask_price="28750.20",
                  ask_qty="0.25", event_ms=1_700_000_000_000 + update_id, recv_ms=1_700_000_000_050 + update_id,
                  latency_ms=50, transaction_ms=1_700_000_000_000 + update_id - 1, update_id=update_id)
    fields.update(overrides)
    return Bbo(**fields)


def update(key: str, n: int = 0) -> EioUpdate:
    text = f'42["bbo_update",{{"symbol":"{key}","n":{n}}}]'
    return EioUpdate(key, text, m.encode_ws_frame(text.encode()))


def new_session(websocket: bool = False, now: float = 0.0, interval: float = 25.0,
                timeout: float = 20.0) -> EioSession:
    return EioSession("SID", websocket=websocket, now=now, ping_interval_s=interval,
                      ping_timeout_s=timeout, max_payload_bytes=1_000_000)


def kinds(actions: list[tuple[Act, Any]]) -> list[Act]:
    return [kind for kind, _ in actions]


OPEN_POLLING = '0{"sid":"SID","upgrades":["websocket"],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}'
OPEN_WS = '0{"sid":"SID","upgrades":[],"pingInterval":25000,"pingTimeout":20000,"maxPayload":1000000}'


# ---- § Engine.IO v4 codec --------------------------------------------------------------------


def test_eio_encode_golden() -> None:
    assert m.encode_eio(EioType.MESSAGE, "hello") == "4hello"
    assert m.encode_eio(EioType.PING) == "2"
    assert m.encode_eio(EioType.PONG, "probe") == "3probe"
    assert m.encode_eio_binary(b"\x01\x02\x03\x04") == "bAQIDBA=="
    assert m.encode_eio_payload(["4hello", "2", "4world"]) == "4hello\x1e2\x1e4world"


def test_eio_decode_golden() -> None:
    assert m.decode_eio("4hello") == EioPacket(EioType.MESSAGE, "hello")
    assert m.decode_eio("2probe") == EioPacket(EioType.PING, "probe")
    assert m.decode_eio("6") == EioPacket(EioType.NOOP, "")
    assert m.decode_eio("bAQIDBA==") == EioPacket(EioType.MESSAGE, b"\x01\x02\x03\x04")
    assert list(m.iter_eio_payload("4hello\x1e2\x1e4world")) == [
        EioPacket(EioType.MESSAGE, "hello"), EioPacket(EioType.PING, ""), EioPacket(EioType.MESSAGE, "world")]


@pytest.mark.parametrize("text", ["", "9", "x", "b!!notbase64"])
def test_eio_decode_rejects(text: str) -> None:
    with pytest.raises(EioProtocolError):
        m.decode_eio(text)


def test_eio_payload_yields_packets_before_the_bad_one() -> None:
    got = []
    with pytest.raises(EioProtocolError):
        for pkt in m.iter_eio_payload("4a\x1e4b\x1e9\x1e4c"):
            got.append(pkt.data)
    assert got == ["a", "b"]


# ---- § Socket.IO v5 codec --------------------------------------------------------------------

SIO_GOLDEN = [
    ("0", SioPacket(SioType.CONNECT)),
    ('0/admin,{"token":"x"}', SioPacket(SioType.CONNECT, "/admin", {"token": "x"})),
    ('0{"sid":"abc"}', SioPacket(SioType.CONNECT, data={"sid": "abc"})),
    ("1", SioPacket(SioType.DISCONNECT)),
    ("1/admin,", SioPacket(SioType.DISCONNECT, "/admin")),
    ('2["bbo_update",{"a":1}]', SioPacket(SioType.EVENT, data=["bbo_update", {"a": 1}])),
    ('212["ping"]', SioPacket(SioType.EVENT, data=["ping"], ack_id=12)),
    ('312[{"time":1}]', SioPacket(SioType.ACK, data=[{"time": 1}], ack_id=12)),
    ('4/admin,{"message":"Invalid namespace"}', SioPacket(SioType.CONNECT_ERROR, "/admin", {"message": "Invalid namespace"})),
    ('51-["e",{"_placeholder":true,"num":0}]',
     SioPacket(SioType.BINARY_EVENT, data=["e", {"_placeholder": True, "num": 0}], attachments=1)),
    ('61-/admin,3[{"_placeholder":true,"num":0}]',
     SioPacket(SioType.BINARY_ACK, "/admin", [{"_placeholder": True, "num": 0}], 3, 1)),
    ('2["caf\u00e9"]', SioPacket(SioType.EVENT, data=["caf\u00e9"])),
]


@pytest.mark.parametrize(("text", "pkt"), SIO_GOLDEN)
def test_sio_golden_round_trip(text: str, pkt: SioPacket) -> None:
    assert m.decode_sio(text) == pkt
    assert m.encode_sio(pkt) == text


def test_sio_decode_quirks_like_the_reference() -> None:
    assert m.decode_sio("0/admin") == SioPacket(SioType.CONNECT, "/admin")  # no comma needed at the end
    assert m.decode_sio("2") == SioPacket(SioType.EVENT)                      # valid, does nothing
    assert m.decode_sio("2[1,2]").data == [1, 2]                              # numeric event names decode
    assert m.decode_sio('2["echo",1]  ').data == ["echo", 1]                  # trailing blanks, as JSON.parse
    assert m.decode_sio("3").ack_id is None


@pytest.mark.parametrize("text", [
    "", "7", "a", "2{}", '2["x"', "2[]", "2[null]", "2[true]", '2["disconnect"]', '2["newListener"]',
    "1{}", "0[1]", '0"x"', "3{}", '2["x",NaN]', '2["x"]x', "51[\"e\"]", "50-[\"e\"]", "511-[\"e\"]",
    "5-[\"e\"]", "5a-[\"e\"]", "2" + "1" * 16 + '["x"]', "0/" + "a" * 300 + ",", "2" + "[" * 5000,
])
def test_sio_decode_rejects(text: str) -> None:
    with pytest.raises(SioProtocolError):
        m.decode_sio(text)


def test_sio_ack_id_cap_is_inclusive() -> None:
    assert m.decode_sio("2" + "9" * 15 + '["x"]').ack_id == 10**15 - 1


def test_sio_decoder_reassembles_attachments() -> None:
    dec = SioDecoder()
    assert dec.feed('52-["up",{"a":{"_placeholder":true,"num":0}},{"_placeholder":true,"num":1}]') is None
    assert dec.feed(b"\x01") is None
    pkt = dec.feed(b"\x02\x03")
    assert pkt == SioPacket(SioType.EVENT, data=["up", {"a": b"\x01"}, b"\x02\x03"])
    assert dec.feed('2["after"]').data == ["after"]


@pytest.mark.parametrize("sequence", [
    [b"\x00"],                                                    # binary nobody announced
    ['51-["e",{"_placeholder":true,"num":0}]', '2["x"]'],         # text while reassembling
    ['51-["e",{"_placeholder":true,"num":3}]', b"\x00"],          # placeholder out of range
])
def test_sio_decoder_rejects(sequence: list[str | bytes]) -> None:
    dec = SioDecoder()
    with pytest.raises(SioProtocolError):
        for item in sequence:
            dec.feed(item)


def test_sio_deconstruct() -> None:
    data, buffers = m.sio_deconstruct(["e", {"x": b"ab"}, b"c"])
    assert data == ["e", {"x": {"_placeholder": True, "num": 0}}, {"_placeholder": True, "num": 1}]
    assert buffers == [b"ab", b"c"]


# ---- § Sessions: Engine.IO ------------------------------------------------------------------


def test_session_handshake_polling_and_websocket() -> None:
    s = new_session()
    assert kinds(s.begin_poll(0.0)) == [Act.FLUSH]
    assert s.take_poll_payload() == OPEN_POLLING
    ws = new_session(websocket=True)
    assert ws.outbox.take_control() == [OPEN_WS]
    assert ws.transport == "websocket" and s.transport == "polling"


def test_session_ping_timeline_on_polling() -> None:
    s = new_session(interval=25.0, timeout=20.0)
    s.begin_poll(0.0), s.take_poll_payload()
    assert s.begin_poll(1.0) == []                 # parks: nothing to say yet
    assert s.next_deadline() == 25.0
    assert s.tick(24.999) == []
    assert kinds(s.tick(25.0)) == [Act.FLUSH]      # the ping answers the parked GET
    assert s.take_poll_payload() == "2"
    assert s.pong_deadline == 45.0 and s.next_ping_at is None
    assert s.receive_post("3", 30.0) == []
    assert s.pong_deadline is None and s.next_ping_at == 55.0  # interval restarts at the pong


def test_session_ping_timeout_closes_and_answers_parked_get() -> None:
    s = new_session()
    s.begin_poll(0.0), s.take_poll_payload()
    s.tick(25.0)                                   # ping queued, nobody polls
    assert s.begin_poll(30.0) == [(Act.FLUSH, None)] and s.take_poll_payload() == "2"
    assert s.begin_poll(31.0) == []
    assert s.tick(44.9) == []
    actions = s.tick(45.0)
    assert kinds(actions) == [Act.FLUSH, Act.CLOSE] and actions[1][1] == "ping timeout"
    assert s.take_poll_payload() == "1" and s.state is EioState.CLOSED


def test_session_deadline_counts_from_handshake_without_any_request() -> None:
    s = new_session()
    s.begin_poll(0.0), s.take_poll_payload()
    # No timer ran and the client never came back: the first look, at t=45, finds it expired.
    assert kinds(s.tick(45.0)) == [Act.CLOSE]
    assert s.state is EioState.CLOSED and s.close_reason == "ping timeout"


def test_session_any_packet_extends_the_pong_deadline_once() -> None:
    s = new_session(websocket=True)
    s.tick(25.0)
    assert s.pong_deadline == 45.0
    assert kinds(s.receive_packet(EioPacket(EioType.MESSAGE, "x"), 40.0)) == [Act.DELIVER]
    assert s.pong_deadline == 60.0
    s.receive_packet(EioPacket(EioType.MESSAGE, "x"), 50.0)
    assert s.pong_deadline == 60.0                  # only once per ping
    assert kinds(s.tick(60.0)) == [Act.CLOSE]


def test_session_websocket_ping_and_pong() -> None:
    s = new_session(websocket=True)
    s.outbox.take_control()
    assert kinds(s.tick(25.0)) == [Act.FLUSH]
    assert s.outbox.take_control() == ["2"]
    assert s.receive_packet(EioPacket(EioType.PONG), 26.0) == []
    assert s.next_deadline() == 51.0


def test_session_duplicate_get_closes_session() -> None:
    s = new_session()
    s.begin_poll(0.0), s.take_poll_payload()
    assert s.begin_poll(1.0) == []
    actions = s.begin_poll(1.5)
    assert kinds(actions) == [Act.REJECT_POLL, Act.FLUSH, Act.CLOSE]
    assert actions[2][1] == "overlap from client"
    assert s.take_poll_payload() == "1" and s.state is EioState.CLOSED


def test_session_post_messages_and_bad_packet() -> None:
    s = new_session()
    s.begin_poll(0.0), s.take_poll_payload()
    actions = s.receive_post("4a\x1e4b\x1e9\x1e4c", 1.0)
    assert actions == [(Act.DELIVER, "a"), (Act.DELIVER, "b"), (Act.CLOSE, "parse error")]
    assert s.state is EioState.CLOSED


def test_session_client_close_answers_parked_get_with_noop() -> None:
    s = new_session()
    s.begin_poll(0.0), s.take_poll_payload()
    s.begin_poll(1.0)
    assert kinds(s.receive_post("1", 2.0)) == [Act.FLUSH, Act.CLOSE]
    assert s.take_poll_payload() == "6"


def test_session_client_ping_is_invalid_heartbeat_direction() -> None:
    s = new_session(websocket=True)
    assert kinds(s.receive_packet(EioPacket(EioType.PING), 1.0)) == [Act.CLOSE]


def test_session_server_close_polling_waits_for_next_get() -> None:
    s = new_session()
    s.begin_poll(0.0), s.take_poll_payload()
    s.send("42[\"bye\"]")
    assert kinds(s.close("forced close", 1.0)) == [Act.CLOSE]
    assert s.state is EioState.CLOSING
    assert kinds(s.begin_poll(2.0)) == [Act.FLUSH]
    assert s.take_poll_payload() == '42["bye"]\x1e1' and s.state is EioState.CLOSED
    s2 = new_session()
    s2.begin_poll(0.0), s2.take_poll_payload()
    s2.close("forced close", 1.0)
    s2.begin_poll(2.0)
    assert s2.take_poll_payload() == "6\x1e1"       # what the reference answers
    s3 = new_session()
    s3.begin_poll(0.0), s3.take_poll_payload()
    s3.close("forced close", 1.0)
    assert s3.tick(1.0 + m.EIO_POLL_CLOSE_TIMEOUT_S) == [] and s3.state is EioState.CLOSED


def test_session_server_close_with_parked_get() -> None:
    s = new_session()
    s.begin_poll(0.0), s.take_poll_payload()
    s.begin_poll(1.0)
    s.send("42[\"bye\"]")
    assert s.take_poll_payload() == '42["bye"]'
    s.begin_poll(1.5)
    assert kinds(s.close("forced close", 2.0)) == [Act.FLUSH, Act.CLOSE]
    assert s.take_poll_payload() == "1"


def test_session_upgrade_sequence() -> None:
    s = new_session()
    s.begin_poll(0.0), s.take_poll_payload()
    s.send("42[\"queued\"]")
    s.begin_poll(0.5)                                 # answered at once with the queued event
    assert s.take_poll_payload() == '42["queued"]'
    assert s.begin_poll(1.0) == []                    # parked
    assert s.begin_upgrade(1.1) and s.state is EioState.PROBING
    assert not s.begin_upgrade(1.2)                   # a second WebSocket is refused
    assert s.transport == "polling"
    actions = s.receive_probe_packet(EioPacket(EioType.PING, "probe"), 1.3)
    assert kinds(actions) == [Act.PROBE_PONG, Act.FLUSH] and s.state is EioState.UPGRADING
    assert s.take_poll_payload() == "6"               # the parked GET is released with a noop
    assert kinds(s.begin_poll(1.4)) == [Act.FLUSH]    # while upgrading a GET never parks
    assert s.take_poll_payload() == "6"
    s.send("42[\"after\"]")                           # no GET parked: waits for the WebSocket
    assert kinds(s.receive_probe_packet(EioPacket(EioType.UPGRADE), 1.5)) == [Act.UPGRADED]
    assert s.state is EioState.WEBSOCKET and s.transport == "websocket"
    assert s.outbox.take_control() == ['42["after"]']


def test_session_upgrade_timeout_and_bad_probe() -> None:
    s = new_session()
    s.begin_poll(0.0), s.take_poll_payload()
    s.begin_upgrade(1.0)
    assert kinds(s.tick(1.0 + m.EIO_UPGRADE_TIMEOUT_S)) == [Act.CLOSE_PROBE]
    assert s.state is EioState.POLLING
    s.begin_upgrade(12.0)
    assert kinds(s.receive_probe_packet(EioPacket(EioType.MESSAGE, "x"), 12.1)) == [Act.CLOSE_PROBE]
    assert s.state is EioState.POLLING


def test_session_outbox_overflow_disconnects() -> None:
    s = new_session(websocket=True)
    big = "4" + "x" * 1000
    actions: list[tuple[Act, Any]] = []
    for _ in range(m.OUTBOX_MAX_CONTROL_BYTES // len(big) + 1):
        actions = s.send(big)
    assert kinds(actions) == [Act.CLOSE] and actions[0][1] == "outbox overflow"
    assert not s.outbox.has_data()


# ---- § Sessions: outbox conflation ----------------------------------------------------------


def test_outbox_keeps_order_then_compacts_to_newest_per_symbol() -> None:
    ob = EioOutbox()
    for n in range(3):
        ob.push_update(update("BTC", n), 0.0)
        ob.push_update(update("ETH", n), 0.0)
    assert [(u.key, u.text[-3]) for u in ob.updates] == [
        ("BTC", "0"), ("ETH", "0"), ("BTC", "1"), ("ETH", "1"), ("BTC", "2"), ("ETH", "2")]
    taken = ob.take_updates(conflate=True)
    assert [u.text for u in taken] == [update("BTC", 2).text, update("ETH", 2).text]
    assert ob.skipped == 4 and ob.sent == 2 and not ob.updates


def test_outbox_update_bytes_are_bounded() -> None:
    ob = EioOutbox()
    for n in range(10_000):
        ob.push_update(update(f"S{n % 5}", n), 0.0)
    assert ob.update_bytes <= m.OUTBOX_MAX_UPDATE_BYTES
    newest = {u.key: u for u in ob.take_updates(conflate=True)}
    assert newest["S4"].text == update("S4", 9999).text


def test_outbox_max_rate_conflates_to_newest() -> None:
    ob = EioOutbox()
    ob.set_subscription(None, 10)                    # 10 per second per symbol
    assert ob.push_update(update("BTC", 1), 0.00)
    assert not ob.push_update(update("BTC", 2), 0.03)
    assert not ob.push_update(update("BTC", 3), 0.06)
    assert ob.push_update(update("ETH", 1), 0.06)    # other symbols have their own clock
    assert ob.next_due_at() == pytest.approx(0.1)
    assert not ob.release_due(0.09)
    assert ob.release_due(0.1)
    assert [u.text for u in ob.take_updates(conflate=False)] == [
        update("BTC", 1).text, update("ETH", 1).text, update("BTC", 3).text]
    assert ob.skipped == 1


def test_outbox_subscription_filters_and_feed_status_always_passes() -> None:
    ob = EioOutbox()
    ob.set_subscription(frozenset({"BTC"}), None)
    assert ob.push_update(update("BTC"), 0.0)
    assert not ob.push_update(update("ETH"), 0.0)
    assert ob.push_update(update(m.FEED_STATUS_KEY), 0.0)
    ob.set_subscription(frozenset({"ETH"}), None)   # pending BTC dropped
    assert [u.key for u in ob.updates] == [m.FEED_STATUS_KEY]


def test_session_max_rate_via_tick() -> None:
    s = new_session(websocket=True)
    s.outbox.take_control()
    s.outbox.set_subscription(None, 2)
    assert kinds(s.push_updates([update("BTC", 1), update("BTC", 2)], 0.0)) == [Act.FLUSH]
    assert [u.text for u in s.outbox.take_updates(False)] == [update("BTC", 1).text]
    assert s.next_deadline() == 0.5
    assert kinds(s.tick(0.5)) == [Act.FLUSH]
    assert [u.text for u in s.outbox.take_updates(False)] == [update("BTC", 2).text]


# ---- § Sessions: Socket.IO client state ------------------------------------------------------


def test_sio_client_state_rules_and_connect_timeout() -> None:
    c = SioClientState(now=0.0, connect_timeout_s=45.0)
    with pytest.raises(SioProtocolError):
        c.receive('2["x"]')                            # event before CONNECT
    c2 = SioClientState(now=0.0, connect_timeout_s=45.0)
    assert c2.receive("0").kind is SioType.CONNECT
    assert not c2.connect_expired(44.0) and c2.connect_expired(45.0)
    c2.joined("/", object())
    assert not c2.connect_expired(100.0)
    with pytest.raises(SioProtocolError):
        c2.receive("0")                                # second CONNECT to the same namespace
    assert c2.receive('2["x"]').data == ["x"]
    with pytest.raises(SioProtocolError):
        c2.receive('4{"message":"x"}')                 # CONNECT_ERROR never comes from a client
    with pytest.raises(SioProtocolError):
        c2.receive('2/other,["x"]')                    # namespace not joined


# ---- § WebSocket frame -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
def test_ws_frame_matches_websockets(size: int) -> None:
    from websockets.frames import Frame, Opcode
    payload = b"x" * size
    assert m.encode_ws_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


def test_bbo_json_golden() -> None:
    assert bbo_json(make_bbo()) == (
        '{"symbol":"BTCUSDT","bidPrice":"28750.10","bidQty":"1.5","askPrice":"28750.20","askQty":"0.25",'
        '"timestamp":1700000000001,"serverTimestamp":1700000000051,"backendLatency":50,"updateId":1,'
        '"transactionTime":1700000000000}')
