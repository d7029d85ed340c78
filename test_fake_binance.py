"""Tests for the fake Binance server (fake_binance.py), using a plain websockets client."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any, Awaitable, Callable

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus
from websockets.sync.client import connect as connect_sync

from fake_binance import FakeBinance, FakeBinanceThread, free_port

TEST_TIMEOUT_S = 10.0   # a hung test fails instead of blocking the suite
RECV_TIMEOUT_S = 2.0


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), TEST_TIMEOUT_S))


async def recv_json(ws: Any) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S))


def test_raw_stream_futures_payload_exact() -> None:
    async def t() -> None:
        async with FakeBinance(market="futures") as fake:
            assert fake.base_url == f"ws://127.0.0.1:{fake.port}/ws"
            async with connect(f"{fake.base_url}/btcusdt@bookTicker") as ws:
                await fake.wait_for_subscribed("BTCUSDT")
                sent = fake.send_bbo("btcusdt", "28750.10", "1.500", "28750.20", "0.250", E=1700000000002, T=1700000000001)
                raw = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)
                assert raw == ('{"e":"bookTicker","u":1,"s":"BTCUSDT","b":"28750.10","B":"1.500","a":"28750.20",'
                               '"A":"0.250","T":1700000000001,"E":1700000000002}')
                assert json.loads(raw) == sent
                assert fake.send_bbo("btcusdt", "1.0", "1", "2.0", "1")["u"] == 2   # u auto-increments per symbol
            assert fake.total_connections == 1
    run(t)


def test_combined_stream_wrapper_with_prefix_and_coinm_flavour() -> None:
    async def t() -> None:
        async with FakeBinance(market="coinm") as fake:
            url = f"{fake.url_root}/public/stream?streams=btcusd_perp@bookTicker/ethusd_perp@bookTicker"
            async with connect(url) as ws:
                await fake.wait_for_subscribed("ETHUSD_PERP")
                fake.send_bbo("ETHUSD_PERP", "2000.1", "10", "2000.2", "7")
                msg = await recv_json(ws)
                assert msg["stream"] == "ethusd_perp@bookTicker"
                assert list(msg["data"]) == ["e", "u", "s", "ps", "b", "B", "a", "A", "T", "E"]
                assert (msg["data"]["s"], msg["data"]["ps"]) == ("ETHUSD_PERP", "ETHUSD")
                fake.send_server_shutdown()
                assert (await recv_json(ws))["stream"] == "!serverShutdown"
    run(t)


def test_spot_flavour_has_no_event_or_transaction_time() -> None:
    async def t() -> None:
        async with FakeBinance(market="spot") as fake:
            async with connect(f"{fake.base_url}/bnbusdt@bookTicker") as ws:
                await fake.wait_for_subscribed("bnbusdt")
                fake.send_bbo("BNBUSDT", "25.35190000", "31.21000000", "25.36520000", "40.66000000", u=400900217)
                assert await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S) == (
                    '{"u":400900217,"s":"BNBUSDT","b":"25.35190000","B":"31.21000000",'
                    '"a":"25.36520000","A":"40.66000000"}')
    run(t)


def test_live_subscribe_ack_list_errors_then_data() -> None:
    async def t() -> None:
        async with FakeBinance() as fake:
            async with connect(fake.base_url) as ws:
                await ws.send("{not json")
                assert (await recv_json(ws))["code"] == 3
                await ws.send(json.dumps({"method": "FOO", "params": [], "id": 9}))
                assert (await recv_json(ws))["code"] == 2
                await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["btcusdt@bookTicker", "ETHUSDT@bookTicker"],
                                          "id": 1}))
                assert await recv_json(ws) == {"result": None, "id": 1}
                await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 3}))
                assert await recv_json(ws) == {"result": ["btcusdt@bookTicker", "ETHUSDT@bookTicker"], "id": 3}
                (conn,) = await fake.wait_for_subscribed("btcusdt")
                assert conn.path == "/ws" and len(conn.received) == 4
                fake.send_bbo("ethusdt", "1.00", "1", "1.01", "1")    # upper-case subscription: silently nothing
                fake.send_bbo("btcusdt", "2.00", "1", "2.01", "1")
                assert (await recv_json(ws))["s"] == "BTCUSDT"
                await ws.send(json.dumps({"method": "UNSUBSCRIBE", "params": ["btcusdt@bookTicker"], "id": 4}))
                assert await recv_json(ws) == {"result": None, "id": 4}
                assert fake.subscribers("btcusdt") == []
    run(t)


def test_stall_sends_nothing_until_resume() -> None:
    async def t() -> None:
        async with FakeBinance() as fake:
            async with connect(f"{fake.base_url}/btcusdt@bookTicker") as ws:
                await fake.wait_for_subscribed("btcusdt")
                fake.stall()
                fake.send_bbo("btcusdt", "1.00", "1", "1.01", "1", u=10)
                pong_waiter = await ws.ping()                           # connection stays alive while stalled
                await asyncio.wait_for(pong_waiter, RECV_TIMEOUT_S)
                fake.resume()
                fake.send_bbo("btcusdt", "1.00", "1", "1.01", "1", u=11)
                assert (await recv_json(ws))["u"] == 11                # frames are ordered: u=10 was never sent
    run(t)


def test_drop_all_closes_without_close_frame_and_close_all_is_clean() -> None:
    async def t() -> None:
        async with FakeBinance() as fake:
            async with connect(f"{fake.base_url}/btcusdt@bookTicker") as ws:
                await fake.wait_for_connections(1)
                await fake.drop_all()
                with pytest.raises(ConnectionClosedError) as info:
                    await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)
                assert info.value.rcvd is None                          # no close frame arrived
            await fake.wait_for_connections(0)
            async with connect(fake.base_url) as ws:
                await fake.wait_for_connections(1)
                await fake.close_all(1001, "bye")
                with pytest.raises(ConnectionClosedOK) as ok:
                    await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)
                assert ok.value.rcvd is not None and ok.value.rcvd.code == 1001
            assert fake.total_connections == 2
    run(t)


def test_refuse_rejects_handshake_with_503() -> None:
    async def t() -> None:
        async with FakeBinance() as fake:
            fake.set_refuse(True)
            with pytest.raises(InvalidStatus) as info:
                async with connect(f"{fake.base_url}/btcusdt@bookTicker"):
                    pass
            assert info.value.response.status_code == 503
            assert fake.total_connections == 0 and fake.refused_connections == 1
            fake.set_refuse(False)
            async with connect(f"{fake.base_url}/btcusdt@bookTicker"):
                await fake.wait_for_connections(1)
    run(t)


def test_refuse_with_a_chosen_status_and_retry_after_header() -> None:
    async def t() -> None:
        async with FakeBinance() as fake:
            fake.set_refuse(True, 429, 20)
            with pytest.raises(InvalidStatus) as info:
                async with connect(f"{fake.base_url}/btcusdt@bookTicker"):
                    pass
            assert info.value.response.status_code == 429
            assert info.value.response.headers["Retry-After"] == "20"
            fake.set_refuse(True, 418, "Fri, 04 Dec 2026 10:00:00 GMT")     # an HTTP date works too
            with pytest.raises(InvalidStatus) as info:
                async with connect(f"{fake.base_url}/btcusdt@bookTicker"):
                    pass
            assert (info.value.response.status_code, info.value.response.headers["Retry-After"]) == (
                418, "Fri, 04 Dec 2026 10:00:00 GMT")
            assert [status for _, status, _ in fake.handshakes] == [429, 418] and fake.refused_connections == 2
    run(t)


def test_more_than_1024_streams_closes_the_connection_with_1008() -> None:
    async def t() -> None:
        streams = [f"s{i}usdt@bookTicker" for i in range(1025)]
        async with FakeBinance() as fake:
            async with connect(f"{fake.url_root}/stream?streams=" + "/".join(streams)) as ws:
                with pytest.raises(ConnectionClosedError) as info:
                    await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1008
            async with connect(f"{fake.url_root}/stream?streams=" + "/".join(streams[:1024])) as ws:
                await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 1}))
                assert len((await recv_json(ws))["result"]) == 1024                 # exactly 1024 is fine
                await ws.send(json.dumps({"method": "SUBSCRIBE", "params": [streams[1024]], "id": 2}))
                with pytest.raises(ConnectionClosedError) as info:                  # the 1025th: the whole connection
                    await asyncio.wait_for(ws.recv(), RECV_TIMEOUT_S)
                assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    run(t)


def test_connection_rate_limit_refuses_a_second_connection_within_a_second_with_429() -> None:
    async def t() -> None:
        async with FakeBinance(limit_connection_rate=True) as fake:
            async with connect(f"{fake.base_url}/btcusdt@bookTicker"):
                with pytest.raises(InvalidStatus) as info:
                    async with connect(f"{fake.base_url}/ethusdt@bookTicker"):
                        pass
                assert info.value.response.status_code == 429
                assert info.value.response.headers["Retry-After"] == "1"
                await asyncio.sleep(1.0 - (time.monotonic() - fake.handshakes[0][0]) + 0.01)  # the limit is time itself
                async with connect(f"{fake.base_url}/ethusdt@bookTicker"):
                    await fake.wait_for_connections(2)
            assert [status for _, status, _ in fake.handshakes] == [101, 429, 101]
    run(t)


def test_subscribe_error_reply_and_u_reset() -> None:
    async def t() -> None:
        async with FakeBinance() as fake:
            async with connect(fake.base_url) as ws:
                fake.subscribe_error = (-1121, "Invalid symbol.")
                await ws.send(json.dumps({"method": "SUBSCRIBE", "params": ["btcusdx@bookTicker"], "id": 5}))
                assert await recv_json(ws) == {"error": {"code": -1121, "msg": "Invalid symbol."}, "id": 5}
                assert fake.subscribers("btcusdx") == []
            async with connect(f"{fake.base_url}/btcusdt@bookTicker") as ws:
                await fake.wait_for_subscribed("btcusdt")
                fake.send_bbo("btcusdt", "1.00", "1", "1.01", "1", u=500)
                fake.reset_u("btcusdt")
                fake.send_bbo("btcusdt", "1.00", "1", "1.01", "1")
                assert [(await recv_json(ws))["u"] for _ in range(2)] == [500, 1]
    run(t)


def test_freeze_leaves_pings_unanswered() -> None:
    async def t() -> None:
        async with FakeBinance() as fake:
            async with connect(f"{fake.base_url}/btcusdt@bookTicker", ping_interval=None, close_timeout=0.1) as ws:
                await fake.wait_for_connections(1)
                fake.freeze()
                pong = await ws.ping()
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(pong, 0.3)
    run(t)


def test_generator_random_walk_increasing_u() -> None:
    async def t() -> None:
        async with FakeBinance(seed=7, record_send_times=True) as fake:
            async with connect(f"{fake.url_root}/stream?streams=btcusdt@bookTicker/ethusdt@bookTicker") as ws:
                await fake.wait_for_subscribed("ethusdt")
                fake.start_generator(["btcusdt", "ethusdt"], 1000, decimals=(2, 3))
                msgs = [await recv_json(ws) for _ in range(200)]
                fake.stop_generator()
        last_u: dict[str, int] = {}
        for m in msgs:
            d = m["data"]
            assert d["u"] > last_u.get(d["s"], 0)
            last_u[d["s"]] = d["u"]
            assert float(d["b"]) < float(d["a"])
            assert len(d["b"].split(".")[1]) == 2 and len(d["B"].split(".")[1]) == 3
            assert (d["s"], d["u"]) in fake.sent_at
        assert set(last_u) == {"BTCUSDT", "ETHUSDT"}
    run(t)


def test_thread_helper_serves_blocking_clients_and_stops_cleanly() -> None:
    with FakeBinanceThread(name="fake-under-test") as feed:
        assert feed.thread.is_alive() and feed.thread is not threading.current_thread()
        with connect_sync(f"{feed.fake.base_url}/btcusdt@bookTicker") as ws:
            (conn,) = feed.run(feed.fake.wait_for_subscribed("btcusdt"))
            assert conn.path == "/ws/btcusdt@bookTicker"
            sent = feed.call(feed.fake.send_bbo, "btcusdt", "28750.10", "1.500", "28750.20", "0.250")
            assert json.loads(ws.recv(timeout=RECV_TIMEOUT_S)) == sent
            with pytest.raises(TimeoutError, match="2 open connections"):    # errors reach the caller
                feed.run(feed.fake.wait_for_connections(2, timeout=0.05))
            feed.close()
            with pytest.raises(ConnectionClosedOK) as closed:                  # the fake said goodbye
                ws.recv(timeout=RECV_TIMEOUT_S)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert not feed.thread.is_alive() and feed.loop.is_closed()
    feed.close()                                                               # a second close is harmless


def test_thread_helper_that_cannot_start_leaves_no_thread_behind() -> None:
    with pytest.raises(ValueError, match="market must be one of"):
        FakeBinanceThread(market="options", name="fake-that-fails")    # type: ignore[arg-type]
    assert "fake-that-fails" not in [t.name for t in threading.enumerate()]


def test_free_port_can_be_bound_by_a_server() -> None:
    port = free_port()
    with socket.socket() as other:
        other.bind(("127.0.0.1", port))                  # nothing kept it: a second bind works
    async def t() -> None:
        async with FakeBinance(port=port) as fake:
            assert fake.port == port and fake.base_url == f"ws://127.0.0.1:{port}/ws"
    run(t)


def _http_get(port: int, target: str) -> tuple[int, dict[str, str], Any]:
    """A plain HTTP/1.1 GET (what a REST client sends) → (status, lower-case headers, JSON body)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=RECV_TIMEOUT_S)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, json.loads(resp.read())
    finally:
        conn.close()


@pytest.mark.parametrize("market, path", [("futures", "/fapi/v1/time"), ("spot", "/api/v3/time"),
                                          ("coinm", "/dapi/v1/time")])
def test_rest_server_time_runs_ahead_by_the_skew_on_each_markets_path(market: str, path: str) -> None:
    async def t() -> None:
        async with FakeBinance(market=market, clock_skew_ms=-8_000) as fake:
            assert fake.rest_url == f"http://127.0.0.1:{fake.port}"
            before = time.time_ns() // 1_000_000
            status, headers, body = await asyncio.to_thread(_http_get, fake.port, path)
            after = time.time_ns() // 1_000_000
            assert status == 200 and headers["content-type"] == "application/json"
            assert before - 8_000 <= body["serverTime"] <= after - 8_000      # 8 s behind this machine
            fake.clock_skew_ms = 250.5
            fake.start_generator(["btcusdt"], 200)
            async with connect(f"{fake.base_url}/btcusdt@bookTicker") as ws:
                update = await recv_json(ws)
                received = time.time_ns() // 1_000_000
                if market != "spot":                                       # E and T follow the exchange's clock
                    assert 0 <= update["E"] - received - 250 <= 50 and update["T"] == update["E"]
            assert fake.rest_requests == [path] and fake.total_connections == 1   # REST is not a stream connection
            assert (await asyncio.to_thread(_http_get, fake.port, "/api/v3/klines"))[0] == 404
    run(t)


def test_rest_exchange_info_lists_the_listed_symbols_and_spot_refuses_an_unlisted_one() -> None:
    async def t() -> None:
        async with FakeBinance(market="futures") as fake:
            fake.listed = {"BTCUSDT": "TRADING", "ETHUSDT": "SETTLING"}
            status, _, body = await asyncio.to_thread(_http_get, fake.port, "/fapi/v1/exchangeInfo")
            assert status == 200 and [(s["symbol"], s["status"]) for s in body["symbols"]] == [
                ("BTCUSDT", "TRADING"), ("ETHUSDT", "SETTLING")]
        async with FakeBinance(market="spot") as fake:
            status, _, body = await asyncio.to_thread(_http_get, fake.port, "/api/v3/exchangeInfo?symbol=ETHBTC")
            assert status == 200 and [s["symbol"] for s in body["symbols"]] == ["ETHBTC"]
            status, _, body = await asyncio.to_thread(_http_get, fake.port, "/api/v3/exchangeInfo?symbol=NOPEUSDT")
            assert (status, body) == (400, {"code": -1121, "msg": "Invalid symbol."})
    run(t)
