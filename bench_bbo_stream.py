#!/usr/bin/env python3
"""Benchmarks of bbo_stream.py (figures for the README; not tests).

    python bench_bbo_stream.py data            # ingest, memory, queries, restart, loop stall
    python bench_bbo_stream.py data --quick    # smaller sizes, for a smoke run
    python bench_bbo_stream.py poll-cycle      # µs per long-polling GET cycle, no sockets (a repeat vs parsed whole)
    python bench_bbo_stream.py fanout          # Socket.IO fan-out vs python-socketio and node socket.io (~15 min)
    python bench_bbo_stream.py fanout --quick  # small sizes, short runs (smoke run)
    python bench_bbo_stream.py fanout --connections 10000 --only held   # just the held-connections run
    python bench_bbo_stream.py fanout --only tls-1000x100,sym50-1000x3 --compare-rev main   # + the code at main
    python bench_bbo_stream.py dashboard       # chart redraw, main-thread share, series size (Chromium)
    python bench_bbo_stream.py faults          # kill -9 loop, full disk, refusing exchange (~3 min; root for the disk)
    python bench_bbo_stream.py faults --quick  # 3 kills, shorter phases (smoke run, under a minute)
    python bench_bbo_stream.py hostile         # hostile clients beside 50 good ones (~3 min)
    python bench_bbo_stream.py hostile --quick # fewer clients, shorter windows (smoke run, under a minute)
    python bench_bbo_stream.py replay          # import 1,000,000 rows; /replay at speed 0 and 10x; ndjson export (~2 min)
    python bench_bbo_stream.py replay --quick  # 100,000 rows, one speed-0 run (smoke run, under a minute)

Every figure is printed with its baseline from the same run, because these machines are
noisy: ratios are what to compare across runs.

fanout: the fake exchange (fake_binance.py, in this process) feeds the server under test (a subprocess each:
the baseline, a python-socketio 5 AsyncServer on aiohttp that relays the same feed with `await sio.emit(...)`;
node socket.io 4.8 relaying it likewise (a script embedded below, run with the repository's node_modules, skipped
with its reason where `npm ci` has not installed them); with --compare-rev REV, bbo_stream.py as it was at REV
("ours@REV"); bbo_stream.py with FANOUT_THREADS=0 ("ours-1t", only where writer threads would be used); and
bbo_stream.py as configured by default ("ours")), which fans it out over loopback to N Socket.IO clients held by a
pool of load-client processes. Scenarios (--only picks some):
  100x100, 1000x100    100 or 1,000 WebSocket clients × 100 updates/s of one symbol
  tls-1000x100         the same over TLS (wss://, a self-signed certificate made with openssl)
  sym50-1000x3         50 symbols × 20 updates/s, each of 1,000 clients subscribed to 3 (the `subscribe` event;
                       rooms in node and python-socketio), counting only its own symbols
  poll-100x100         100 long-polling clients × 100 updates/s
  100x2000             100 clients × 2,000/s (saturation)
  idle, held           2,000 idle connections, and 10,000 held connections (`--connections`), which also
                       get SIGTERM while connected.
Per run: deliveries/s, the fraction of published updates delivered (of each client's own symbols),
exchange→client latency p50/p99 (matched by symbol and `u` against the fake's send time), how fresh the newest
price is, server CPU per 1,000 deliveries and RSS per connected client (from /proc, after the clients joined
minus before), the feed's own receive latency (the serverTimestamp of each update minus the fake's send time:
exchange → server read, apart from the fan-out) beside the load generators' CPU, and the CPU of everything else
on the machine (load clients, fake exchange, other processes, interrupts): client and server share the cores.
Each run measures 12 s; before each run the benchmark waits for other processes to quieten (--quiet-cores,
--max-wait) and repeats a disturbed load run (--retries), and every line says how busy the rest of the machine
was. The goals are printed at the end as ratios against the baselines of the same run.

faults: the real server (`python bbo_stream.py`, a subprocess: CACHE_PERSIST=true, CACHE_FLUSH_SECONDS=1, plain
HTTP on a free port) against the fake exchange sending a known sequence (200 updates/s, `u` strictly increasing,
every price distinct). Scenarios, one line each with its goal ("goal missed" does not fail the exit status):
- kill -9 loop: 20 times (--quick 3) the server records 1.5–4 s on one CACHE_DIR and is killed; a last start reads
  the history back through /api/history/updates. Rows lost that were sent more than the flush interval (+0.2 s for
  the write) before their kill (goal 0), rows lost within it (the documented loss window), duplicate, changed or
  never-sent rows (goal 0), leftover *.tmp files, quarantined *.corrupt-* files.
- full disk (root only, else skipped): CACHE_DIR on a 4 MiB tmpfs filled by a ballast file but 48 KiB; streams until
  a write fails, stays full a few seconds, then the ballast goes and it streams on; SIGTERM, restart, read back.
  Rows flushed before the disk filled and after space came back vs rows restored (goal: all), quarantined files,
  bbo_persist_errors_total, whether the server stayed up and answered every /healthz poll.
- refusing exchange: the fake refuses handshakes (429 with Retry-After where fake_binance's set_refuse takes a
  status and Retry-After, else its plain 503) for 30 s (--quick 5 s) after dropping the connection, then accepts.
  Handshake times and spacing as the fake saw them, attempts sooner than the Retry-After (goal 0), how long until
  /healthz says live after the fake accepted again, the outage /api/history/outages recorded.

hostile: the real server (as in faults) fed 100 updates/s by the fake exchange, 50 well-behaved WebSocket clients (the
fanout load client: latency from the fake's send to the client's socket), first alone (quiet, the baseline of the same
run), then beside 200 hostile clients (--quick: 20 good, 40 hostile, shorter windows) of one kind at a time, then of
every kind at once, then quiet again (how much the baseline itself moves; not in --quick): ping-no-read (WebSocket pings sent continuously, nothing read, SO_RCVBUF 4 KiB), partial-attachments
(`4510-` binary event announcing 10 attachments, 9 binary frames of 1 MB, then silence), bad-post (polling sessions,
each sent a 1 MB body of invalid packets, again and again), event-flood (joined "/", `42["subscribe",...]` up to
10,000/s each), handshake-squat (bare polling handshakes, ≤ 20/s each, never a namespace). Per scenario: server RSS
peak above its idle RSS (goal < 200 MiB), the good clients' p99 and its ratio to quiet (goal ≤ 2×), hostile clients cut
by the server as they saw it, /metrics bbo_eio_* counters, whether /metrics and a new handshake were answered. Before
each scenario it waits (up to 60 s) until other processes use at most 0.3 cores. Each hostile loop stops by itself;
goals missed do not fail the exit status, harness failures do.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import errno
import gc
import inspect
import io
import json
import math
import os
import random
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import statistics
import struct
import tarfile
import time
import tracemalloc
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

import bbo_stream as bs
import fake_binance


def make_messages(n: int, symbol: str = "BTCUSDT", seed: int = 1, t0: int = 1_725_955_336_476) -> list[str]:
    """Futures bookTicker frames in the combined-stream wrapper (~180 B, as on Binance)."""
    rng = random.Random(seed)
    bid, u, t = 5_723_150, 5_316_187_068_719, t0
    out = []
    for _ in range(n):
        bid += rng.choice((-10, 0, 0, 10))
        u += rng.randint(1, 900)
        t += rng.randint(0, 3)
        b = f"{bid // 100}.{bid % 100:02d}"
        a = f"{(bid + 10) // 100}.{(bid + 10) % 100:02d}"
        payload = (f'{{"e":"bookTicker","u":{u},"s":"{symbol}","b":"{b}","B":"{rng.randint(1, 20000) / 1000:.3f}",'
                   f'"a":"{a}","A":"{rng.randint(1, 20000) / 1000:.3f}","T":{t},"E":{t + 1}}}')
        out.append(f'{{"stream":"{symbol.lower()}@bookTicker","data":{payload}}}')
    return out


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_ingest(n: int) -> None:
    msgs = make_messages(n)
    recv = 1_725_955_336_480

    def loads_only() -> None:
        loads = json.loads
        for m in msgs:
            loads(m)

    def pipeline() -> None:
        history = bs.BboHistory(1_000_000, 7 * 86_400)
        parse, accept = bs.parse_feed_message, history.accept
        for m in msgs:
            accept(parse(m, recv))
        history.flush()

    base = best_of(loads_only)
    full = best_of(pipeline)
    print(f"ingest: json.loads only {n / base:,.0f} msg/s; parse→dedupe→cache append {n / full:,.0f} msg/s; "
          f"ratio {base / full:.2f} (goal ≥ 0.50)")


def filled_history(rows: int, symbol: str = "BTCUSDT") -> tuple[bs.BboHistory, int]:
    """A history with `rows` updates over the last `rows / 20` seconds plus one day of bars."""
    history = bs.BboHistory(rows, 7 * 86_400)
    hist = history.get(symbol)
    now = int(time.time() * 1000)
    # a day of 1 s bars first (older than the raw ring), then the raw rows
    day = 86_400
    t = np.arange(now - day * 1000 - rows * 50, now - rows * 50, 1000, dtype=np.int64)
    price = 5_723_150 + np.cumsum(np.random.default_rng(1).integers(-10, 11, len(t)))
    old = {"recv_ms": t, "latency_ms": np.random.default_rng(2).integers(1, 40, len(t)).astype(np.int32),
           "e_minus_t_ms": np.ones(len(t), np.int32), "update_id": np.arange(len(t), dtype=np.int64),
           "bid_m": price, "ask_m": price + 10, "bid_qty_m": np.full(len(t), 1234, np.int64),
           "ask_qty_m": np.full(len(t), 987, np.int64)}
    for c in ("bid_d", "ask_d"):
        old[c] = np.full(len(t), 2, np.uint8)
    for c in ("bid_qty_d", "ask_qty_d"):
        old[c] = np.full(len(t), 3, np.uint8)
    hist.append_columns(old)
    t = now - rows * 50 + np.arange(rows, dtype=np.int64) * 50
    price = 5_723_150 + np.cumsum(np.random.default_rng(3).integers(-10, 11, rows))
    raw = {"recv_ms": t, "latency_ms": np.random.default_rng(4).integers(1, 40, rows).astype(np.int32),
           "e_minus_t_ms": np.ones(rows, np.int32), "update_id": len(old["recv_ms"]) + np.arange(rows, dtype=np.int64),
           "bid_m": price, "ask_m": price + 10, "bid_qty_m": np.full(rows, 1234, np.int64),
           "ask_qty_m": np.full(rows, 987, np.int64)}
    for c in ("bid_d", "ask_d"):
        raw[c] = np.full(rows, 2, np.uint8)
    for c in ("bid_qty_d", "ask_qty_d"):
        raw[c] = np.full(rows, 3, np.uint8)
    for i in range(0, rows, 100_000):  # in chunks, as the feed would
        hist.append_columns({k: v[i:i + 100_000] for k, v in raw.items()})
    return history, now


def bench_memory(rows: int) -> None:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    history = bs.BboHistory(rows, 0)
    msgs = make_messages(rows)
    recv = 1_725_955_336_480
    for m in msgs:
        history.accept(bs.parse_feed_message(m, recv))
    history.flush()
    del msgs
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    ring = history.symbols["BTCUSDT"].raw
    print(f"memory: {ring.nbytes / len(ring):.1f} B per cached update in the ring (goal ≤ 64); "
          f"{(after - before) / rows:.1f} B per update measured by tracemalloc for {rows:,} updates")
    idle = bs.BboHistory(1_000_000, 7 * 86_400)
    for i in range(500):
        idle.get(f"SYM{i}USDT")
    total = sum(h.raw.nbytes + h.bars.nbytes for h in idle.symbols.values())
    print(f"memory: 500 symbols with no data yet reserve {total / 1e6:.1f} MB in total (rings grow lazily)")


def bench_queries(rows: int) -> None:
    history, now = filled_history(rows)
    ctx = bs.ApiContext(history, lambda now_ms: {"state": "live"}, now)

    def request(target: str) -> bs.HttpRequest:
        return bs.parse_request_head(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())

    updates = request("/api/history/updates?symbol=BTCUSDT&limit=1000")
    latency_day = request(f"/api/history/latency?symbol=BTCUSDT&start_time={now - 86_400_000}&end_time={now}")
    latency_raw = request(f"/api/history/latency?symbol=BTCUSDT&start_time={now - rows * 50}&end_time={now}")
    series_day = request(f"/api/history/series?symbol=BTCUSDT&start_time={now - 86_400_000}&end_time={now}&buckets=1000")
    for name, req, goal in (("updates limit=1000", updates, "≤ 5 ms"),
                            ("latency, full day (bars tier)", latency_day, "≤ 50 ms"),
                            (f"latency over all {rows:,} raw rows", latency_raw, "≤ 50 ms"),
                            ("series, 1 day in 1000 buckets", series_day, "")):
        resp = bs.handle_api(req, ctx)
        assert resp.status == 200, resp.body[:200]
        t = best_of(lambda: bs.handle_api(req, ctx), 5)
        print(f"query: {name}: {t * 1000:.2f} ms, {len(resp.body) / 1024:.1f} KiB response"
              + (f" (goal {goal})" if goal else ""))


def bench_restart(rows: int, symbols: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bbo-bench-"))
    try:
        cfg = bs.Config(cache_dir=str(tmp), cache_max_items=rows, symbol=tuple(f"S{i}USDT" for i in range(symbols)))
        history = bs.BboHistory(rows, cfg.bars_capacity)
        for i in range(symbols):
            src, _ = filled_history(rows, f"S{i}USDT")
            history.symbols[f"S{i}USDT"] = src.symbols[f"S{i}USDT"]
        persistence = bs.CachePersistence(cfg, history)
        start = time.perf_counter()
        persistence.flush_sync()
        written = time.perf_counter() - start
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        files = sum(1 for p in tmp.rglob("*") if p.is_file())
        restored = bs.BboHistory(rows, cfg.bars_capacity)
        start = time.perf_counter()
        loaded = bs.CachePersistence(cfg, restored).load()
        took = time.perf_counter() - start
        assert all(v == rows for v in loaded.values()), loaded
        print(f"restart: {symbols} symbol(s) × {rows:,} persisted updates (+1 day of bars): loaded in {took:.2f} s "
              f"(goal ≤ 3 s); {size / 1e6:.0f} MB in {files} files, first full write {written:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _stall_run(rows: int, rate: int, seconds: float) -> tuple[float, float, int]:
    tmp = Path(tempfile.mkdtemp(prefix="bbo-bench-"))
    try:
        cfg = bs.Config(cache_dir=str(tmp), cache_max_items=rows, cache_flush_seconds=1.0)
        history, _ = filled_history(rows)
        persistence = bs.CachePersistence(cfg, history)
        await asyncio.to_thread(persistence.flush_sync)  # the existing 1,000,000 rows are on disk
        segments_before = sum(1 for p in tmp.rglob("raw-*-*.json"))
        hist = history.symbols["BTCUSDT"]
        msgs = make_messages(int(rate * seconds) + rate, seed=7, t0=bs.now_ms())
        task = asyncio.create_task(persistence.run())
        worst, ticks = 0.0, 0
        sent = 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        last_u = hist.last_u
        while loop.time() - start < seconds:
            t0 = loop.time()
            await asyncio.sleep(0.001)
            worst = max(worst, loop.time() - t0 - 0.001)
            ticks += 1
            due = int((loop.time() - start) * rate)
            while sent < due:
                bbo = bs.parse_feed_message(msgs[sent], bs.now_ms())
                hist.accept(bbo._replace(update_id=last_u + 1 + sent))
                sent += 1
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        segments = sum(1 for p in tmp.rglob("raw-*-*.json")) - segments_before
        return worst, persistence.writer.lag_ms / 1000, segments
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_stall(rows: int, rate: int, seconds: float) -> None:
    worst, lag, segments = asyncio.run(_stall_run(rows, rate, seconds))
    print(f"persistence: longest event-loop stall {worst * 1000:.1f} ms (goal ≤ 50 ms) over {seconds:.0f} s of "
          f"{rate:,} updates/s into a {rows:,}-row cache, {segments} segment(s) compacted meanwhile")


class _NoSocket:
    """A transport that takes writes and sends nothing: the cycle below without the kernel's part."""

    def write(self, data: bytes) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


async def _poll_cycle_run(cycles: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="bbo-poll-cycle-"))
    try:
        cfg = bs.Config(symbol=("BTCUSDT",), use_ssl=False, cache_persist=False, cache_dir=str(tmp))
        app = bs.App(cfg)
        http = bs.HttpServer(app, None)
        loop = asyncio.get_running_loop()
        protocol = bs.HttpProtocol(asyncio.StreamReader(), loop, http, False)
        protocol.transport, protocol.peer, protocol.host = _NoSocket(), "127.0.0.1:1", "127.0.0.1"
        opened = app.eio.polling.open(bs.parse_request_head(b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n"
                                                            b"Host: 127.0.0.1\r\n\r\n", "127.0.0.1"))
        sid = json.loads(opened.body[1:])["sid"]
        conn = app.eio.connections[sid]
        # socket.io-client's GET in node: a new t= each time, the same headers
        heads = [(f"GET /socket.io/?EIO=4&transport=polling&t=P{i:07d}&sid={sid} HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                  "Accept: */*\r\nUser-Agent: node\r\nConnection: keep-alive\r\n\r\n").encode() for i in range(cycles + 1)]
        text = ('42["bbo_update",{"symbol":"BTCUSDT","bidPrice":"30000.01","bidQty":"1.5","askPrice":"30000.02",'
                '"askQty":"2.5","timestamp":1733333333333,"serverTimestamp":1733333333334,"backendLatency":1,'
                '"updateId":123456789,"transactionTime":1733333333333,"emitTimestamp":1733333333334}]')
        batch = [bs.EioUpdate("BTCUSDT", text, bs.encode_ws_frame(text.encode()))]
        assert http.offer_poll(protocol, heads[-1])
        results = {}
        for name, whole in (("repeat", False), ("parsed whole", True), ("repeat", False), ("parsed whole", True)):
            started = time.perf_counter()
            for head in heads[:cycles]:
                conn.deliver(batch, batch[0].frame, 0.0)   # the hub's pass answers the parked GET
                if whole:
                    protocol.repeat = None                  # as before RepeatedHead: parse and verify
                http.admission.light_left = bs.POLLS_IN_CALLBACK_PER_TURN   # (one turn per cycle)
                if not http.offer_poll(protocol, head):
                    raise RuntimeError("a GET was not taken by the callback path")
            per_cycle_us = (time.perf_counter() - started) / cycles * 1e6
            results[name] = min(results.get(name, math.inf), per_cycle_us)
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_poll_cycle(quick: bool) -> None:
    """One long-polling GET cycle on the callback path with no sockets: the fan-out's answer of a
    parked GET, then the next GET parked (HttpServer.offer_poll); a repeat of the GET before but
    for its t=, and the same GET parsed and verified whole."""
    cycles = 20_000 if quick else 200_000
    results = asyncio.run(_poll_cycle_run(cycles))
    print(f"poll-cycle: {results['repeat']:.1f} µs per GET cycle as a repeat (RepeatedHead), "
          f"{results['parsed whole']:.1f} µs parsed and verified whole ({results['repeat'] / results['parsed whole']:.2f}×); "
          f"best of 2 × {cycles:,} cycles, answer + next GET, no sockets")


# ---------------------------------------------------------------------------------------------
# fanout: fake exchange → server → N Socket.IO clients over loopback (WebSocket or long-polling, plain or TLS)
# ---------------------------------------------------------------------------------------------
# Each server runs as its own subprocess (so /proc gives its CPU and RSS alone): BBO Stream, the
# python-socketio relay below, and node socket.io relaying the same feed (a script embedded here,
# run with the repository's node_modules). The fake exchange runs in this process (its `sent_at`
# is the send time of every update, by symbol and `u`); the load clients run in a pool of client
# processes, each holding many connections on one epoll loop.
#
# The load client is deliberately minimal: websockets' sans-I/O ClientProtocol does the opening
# handshake and frames (masks) what the client sends, then server frames are split by hand and an
# update is recognised by its `42["bbo_update",` prefix and its "updateId" digits, without JSON.
# With websockets' asyncio client instead, the clients alone would need more CPU than this
# machine has at 100,000 messages/s; a plain epoll loop needs less than an asyncio Protocol.
# TLS runs through memory BIOs (ssl.SSLObject), so reads still come from recvmsg; long-polling
# clients hold one keep-alive connection for their GETs and one for their POSTs.
# Latency is taken at the client's socket: the kernel stamps each received segment
# (SO_TIMESTAMPNS, CLOCK_REALTIME, converted to perf_counter() at each poll), so the figure does
# not include how long the load-client process, which shares the cores, waited for the CPU; the
# time at which the process read the bytes is reported beside it. perf_counter() is
# CLOCK_MONOTONIC on Linux, shared by all processes, so client times and the fake's send times
# are on the same clock. The feed's own receive latency (exchange send → server read) comes from
# the serverTimestamp each server puts in its updates, read by a few clients per process.

FANOUT_SYMBOL = "btcusdt"
_BBO_PREFIX = b'42["bbo_update"'
_UID_KEY = b'"updateId":'
_SYMBOL_KEY = b'"symbol":'
_STAMP_KEY = b'"serverTimestamp":'
_STAMP_ROUND_S = 0.0005                # serverTimestamp is whole ms of the wall clock, floored: +½ ms centres it
_WARMUP_CLIENTS = 20                   # joined and closed before RSS is read: first-connection allocations are not per client
_JOIN_CONCURRENCY = 100                # clients of one process handshaking at once
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux's value; Python's socket module lacks the name
_TIMESPEC = struct.Struct("qq")                         # struct timespec of the SCM_TIMESTAMPNS message
_ANC_BYTES = socket.CMSG_SPACE(_TIMESPEC.size)
_RECV_BYTES = 1 << 18                                   # per read: a backlog of frames in one go
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_NOT_SEEN = 1e9                              # "never arrived" in latency arrays (seconds)
_PIN: dict[str, set[int]] = {"server": set()}  # --pin: CPUs of the server (the rest: clients, fake)


def _raise_nofile() -> int:
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _machine_busy_s() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat), not counting idle, iowait, irq, softirq."""
    return _stat_cpu()[0]


def _softirq_s() -> float:
    """CPU seconds of all CPUs in interrupts and softirqs (loopback TCP is largely softirq work)."""
    return _stat_cpu()[1]


def _stat_cpu() -> tuple[float, float]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    return (v[0] + v[1] + v[2] + v[7]) / _CLK_TCK, (v[5] + v[6]) / _CLK_TCK


async def _wait_quiet(pool: _ClientPool, max_cores: float, max_wait_s: float) -> tuple[float, float]:
    """Wait until the rest of the machine uses ≤ max_cores (shared machine); (waited s, last level)."""
    start = time.perf_counter()
    while True:
        b0, c0, s0, t0 = _machine_busy_s(), pool.cpu_s(), time.process_time(), time.perf_counter()
        await asyncio.sleep(1.0)
        dt = time.perf_counter() - t0
        others = (_machine_busy_s() - b0 - (pool.cpu_s() - c0) - (time.process_time() - s0)) / dt
        waited = time.perf_counter() - start
        if others <= max_cores or waited >= max_wait_s:
            return waited, others


def _proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class _Stream:
    """One non-blocking loopback TCP connection of a load client; each read carries the kernel's receive time.

    With a TLS context the bytes go through memory BIOs (ssl.SSLObject): reads still come from recvmsg, so
    the receive time is the ciphertext's arrival. ``on_ready`` is called once the connection (and its TLS
    handshake) is up. Failures raise OSError (ConnectionError at EOF) for the client to record.
    """

    def __init__(self, tls: ssl.SSLContext | None, on_ready: Callable[[], None]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        self.fd = self.sock.fileno()
        self.connecting = True                    # waiting for the TCP connect (EPOLLOUT)
        self.on_ready = on_ready
        self.tls: ssl.SSLObject | None = None
        if tls is not None:
            self.tls_in, self.tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = tls.wrap_bio(self.tls_in, self.tls_out, server_hostname="localhost")
        self.handshaken = tls is None

    def start(self, addr: tuple[str, int]) -> None:
        err = self.sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            raise ConnectionError(os.strerror(err))

    def connected(self) -> None:
        """The socket became writable: the TCP connect finished (or failed)."""
        self.connecting = False
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ConnectionError(os.strerror(err))
        if self.tls is None:
            self.on_ready()
        else:
            self._tls_handshake()

    def recv(self, clock_offset_s: float) -> tuple[bytes, float, float]:
        """(bytes read, kernel receive time, read time), times in perf_counter() s; b"" when nothing (yet).

        clock_offset_s = time.time() - perf_counter(), to convert the kernel's CLOCK_REALTIME stamp.
        """
        try:
            data, anc, _, _ = self.sock.recvmsg(_RECV_BYTES, _ANC_BYTES)
        except BlockingIOError:
            return b"", 0.0, 0.0
        t_read = time.perf_counter()
        if not data:
            raise ConnectionError("EOF")
        t_sock = t_read
        for level, kind, stamp in anc:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                sec, ns = _TIMESPEC.unpack(stamp)
                t_sock = sec + ns * 1e-9 - clock_offset_s
        tls = self.tls
        if tls is None:
            return data, t_sock, t_read
        self.tls_in.write(data)
        if not self.handshaken:
            self._tls_handshake()
            if not self.handshaken:
                return b"", t_sock, t_read
        parts = []
        while True:                               # one record per read(); stop without an exception when drained
            try:
                part = tls.read(_RECV_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                raise ConnectionError("EOF (TLS close_notify)") from None
            if not part:
                break
            parts.append(part)
            if not self.tls_in.pending and not tls.pending():
                break
        if self.tls_out.pending:                  # e.g. an answer to a key update
            self._send_raw(self.tls_out.read())
        return b"".join(parts), t_sock, time.perf_counter()

    def send(self, data: bytes) -> None:
        if self.tls is not None:
            self.tls.write(data)
            data = self.tls_out.read()
        self._send_raw(data)

    def _send_raw(self, data: bytes) -> None:
        if data and self.sock.send(data) != len(data):   # a few bytes into an idle socket: all or nothing
            raise ConnectionError("send buffer full")

    def _tls_handshake(self) -> None:
        assert self.tls is not None
        try:
            self.tls.do_handshake()
            self.handshaken = True
        except ssl.SSLWantReadError:
            pass
        self._send_raw(self.tls_out.read())
        if self.handshaken:
            self.on_ready()


class _SioClient:
    """The Socket.IO side of a load client, whichever its transport: answers pings, joins "/", subscribes
    when told to, and records each bbo_update: its updateId, symbol (with several symbols), when its bytes
    reached the socket and when this process read them, and (``stamp``) the server's serverTimestamp.

    Args:
        symbol_index: symbol name (bytes, upper case) → number, when the run has several symbols; else None.
        wanted: the numbers of the symbols this client should get (updates of others are counted apart).
        subscribe: the `subscribe` event to send once joined (its ack then completes the join), or b"".
        stamp: keep (symbol, updateId, serverTimestamp) of every update, for the feed's receive latency.
    """

    streams: tuple[_Stream, ...]
    # set by the session: swap a stream for a new one (the epoll registration and the connect follow)
    replace_stream: Callable[[_SioClient, _Stream, _Stream], None]

    def __init__(self, symbol_index: dict[bytes, int] | None, wanted: tuple[int, ...], subscribe: bytes,
                 stamp: bool) -> None:
        self.symbol_index, self.wanted, self.subscribe, self.stamp = symbol_index, wanted, subscribe, stamp
        self.detail = symbol_index is not None or stamp   # the full parse instead of updateId alone
        self.us = array.array("q")                # updateId of each bbo_update, in arrival order
        self.syms = array.array("h")              # its symbol's number (only with symbol_index)
        self.t_sock = array.array("d")            # perf_counter() domain: kernel receive time of the read
        self.t_read = array.array("d")            # perf_counter() when the read returned
        self.stamps = array.array("q")            # (symbol, updateId, serverTimestamp ms) triples, with stamp
        self.joined = False                       # Socket.IO CONNECT answered (and the subscription acked)
        self.closed = False
        self.error = ""
        self.others = 0                           # non-update messages (welcome, feed_status, ...)
        self.foreign = 0                          # updates of symbols this client did not subscribe to
        self.pings = 0

    def start(self, addr: tuple[str, int]) -> None:
        for stream in self.streams:
            stream.start(addr)

    def fail(self, error: str) -> None:
        self.error = self.error or error
        self.closed = True

    def _send_packet(self, packet: bytes) -> None:
        raise NotImplementedError

    def _on_open(self, packet: bytes) -> None:
        raise NotImplementedError

    def _record(self, data: bytes, start: int, end: int, t_sock: float, t_read: float) -> None:
        """One bbo_update packet at data[start:end] (keys in the order every server here sends them)."""
        i = data.find(_UID_KEY, start, end) + len(_UID_KEY)
        u = int(data[i:data.find(b",", i, end)])
        k = 0
        if self.symbol_index is not None:
            i = data.index(b'"', data.find(_SYMBOL_KEY, start, end) + len(_SYMBOL_KEY), end) + 1
            k = self.symbol_index.get(data[i:data.index(b'"', i, end)], -1)
            if k not in self.wanted:
                self.foreign += 1
                return
            self.syms.append(k)
        self.us.append(u)
        self.t_sock.append(t_sock)
        self.t_read.append(t_read)
        if self.stamp:
            i = data.find(_STAMP_KEY, start, end) + len(_STAMP_KEY)
            self.stamps.extend((k, u, int(data[i:data.find(b",", i, end)])))

    def _packet(self, packet: bytes, t_sock: float, t_read: float) -> None:
        """One Engine.IO text packet."""
        if packet == b"2":                        # Engine.IO ping
            self.pings += 1
            self._send_packet(b"3")
        elif packet.startswith(_BBO_PREFIX):
            self._record(packet, 0, len(packet), t_sock, t_read)
        elif packet[:1] == b"0":                  # Engine.IO open
            self._on_open(packet)
        elif packet[:2] == b"40":                 # namespace joined
            if self.subscribe:
                self._send_packet(self.subscribe)
            else:
                self.joined = True
        elif packet[:3] == b"430":                # the subscription's ack
            if b'"error"' in packet:
                self.fail(f"subscribe refused: {packet[:120]!r}")
            self.joined = True
        elif packet[:2] == b"41" or packet[:1] == b"1":
            self.error = f"closed by server: {packet[:40]!r}"
            self.others += 1
        elif packet != b"6":                      # 6: noop
            self.others += 1


class _LoadClient(_SioClient):
    """A Socket.IO client on a non-blocking WebSocket (ws:// or wss://), driven by `_client_session`'s epoll loop."""

    def __init__(self, url: str, tls: ssl.SSLContext | None, **sio: Any) -> None:
        from websockets.client import ClientProtocol
        from websockets.uri import parse_uri
        super().__init__(**sio)
        self.ws = ClientProtocol(parse_uri(url))  # handshake, then only used to frame what we send
        self.stream = _Stream(tls, self._ready)
        self.streams = (self.stream,)
        self.raw = False                          # past the handshake and the Engine.IO open packet
        self.buf = b""

    def _ready(self) -> None:
        self.ws.send_request(self.ws.connect())
        self._send_pending()

    def readable(self, stream: _Stream, clock_offset_s: float) -> None:
        data, t_sock, t_read = stream.recv(clock_offset_s)
        if not data:
            return
        if not self.raw:
            self._handshake_data(data, t_sock, t_read)
            return
        if self.buf:
            data = self.buf + data
        n, pos = len(data), 0
        us, ts, tr, detail = self.us, self.t_sock, self.t_read, self.detail
        while n - pos >= 2:
            length = data[pos + 1] & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length, start = (data[pos + 2] << 8) | data[pos + 3], pos + 4
            else:
                if n - pos < 10:
                    break
                length, start = int.from_bytes(data[pos + 2:pos + 10], "big"), pos + 10
            end = start + length
            if end > n:
                break
            opcode = data[pos] & 0x0F
            pos = end
            if opcode == 1 and data.startswith(_BBO_PREFIX, start):
                if detail:
                    self._record(data, start, end, t_sock, t_read)
                else:                             # the common case inline: updateId only
                    i = data.find(_UID_KEY, start, end) + 11
                    us.append(int(data[i:data.find(b",", i, end)]))
                    ts.append(t_sock)
                    tr.append(t_read)
            else:
                self._control(opcode, data[start:end], t_sock, t_read)
        self.buf = data[pos:] if pos < n else b""

    # -- helpers
    def _send_pending(self) -> None:
        data = b"".join(self.ws.data_to_send())
        if data and not self.closed:
            self.stream.send(data)

    def _send_packet(self, packet: bytes) -> None:
        self.ws.send_text(packet)
        self._send_pending()

    def _on_open(self, packet: bytes) -> None:
        self._send_packet(b"40")                  # join namespace "/"
        self.raw = True                           # the server sends nothing more until it answers 40

    def _handshake_data(self, data: bytes, t_sock: float, t_read: float) -> None:
        from websockets.frames import Frame
        from websockets.http11 import Response
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Response):
                if event.status_code != 101:
                    self.error = f"HTTP {event.status_code} {bytes(event.body[:80]).decode(errors='replace')}"
            elif isinstance(event, Frame):
                self._control(event.opcode.value, bytes(event.data), t_sock, t_read)
        if self.ws.handshake_exc is not None and not self.error:
            self.error = repr(self.ws.handshake_exc)
        if self.error:
            self.fail(self.error)

    def _control(self, opcode: int, payload: bytes, t_sock: float, t_read: float) -> None:
        if opcode == 1:
            self._packet(payload, t_sock, t_read)
        elif opcode == 9:                         # WebSocket ping
            self.ws.send_pong(payload)
            self._send_pending()
        elif opcode == 8:                         # close: just go
            self.fail(f"close frame {payload[:2].hex()}")


def _http_response(buf: bytes) -> tuple[int, bytes, bytes] | None:
    """(status, body, what follows) of the first complete HTTP/1.1 response in buf, or None if incomplete.

    Only Content-Length framing: every server measured here frames its polling answers that way.
    """
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    head = buf[:head_end].lower()
    i = head.find(b"\r\ncontent-length:")
    if i < 0:
        raise ValueError(f"response without Content-Length: {buf[:200]!r}")
    j = head.find(b"\r\n", i + 2)
    length = int(head[i + 17:j if j >= 0 else len(head)])
    end = head_end + 4 + length
    if len(buf) < end:
        return None
    return int(buf[9:12]), buf[head_end + 4:end], buf[end:]


class _PollClient(_SioClient):
    """A Socket.IO client over Engine.IO long-polling: one keep-alive connection carries its GETs (each
    answered when the server has packets; the next GET goes out as soon as the answer is read) and one its
    POSTs (join, subscription, pongs), as a browser's client does."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None, **sio: Any) -> None:
        super().__init__(**sio)
        self.tls = tls
        self.host_header = f"{host}:{port}".encode()
        self.get = _Stream(tls, self._get_ready)
        self.post = _Stream(tls, self._post_ready)
        self.streams = (self.get, self.post)
        self.sid = b""
        self.get_buf = self.post_buf = b""
        self.post_queue: list[bytes] = []
        self.post_up = self.post_busy = False
        self.requests_sent = 0

    def _request(self, stream: _Stream, method: bytes, body: bytes = b"") -> None:
        # A new t= each time, as socket.io-client's cache buster: no server may count on repeated targets.
        self.requests_sent += 1
        target = (b"/socket.io/?EIO=4&transport=polling&t=" + b"%x" % (0x1000000 + self.requests_sent)
                  + (b"&sid=" + self.sid if self.sid else b""))
        head = method + b" " + target + b" HTTP/1.1\r\nHost: " + self.host_header + b"\r\n"
        if method == b"POST":
            head += b"Content-Type: text/plain;charset=UTF-8\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
        stream.send(head + b"\r\n" + body)

    def _get_ready(self) -> None:
        self._request(self.get, b"GET")           # the handshake: no sid yet

    def _post_ready(self) -> None:
        self.post_up = True
        self._flush_posts()

    def _send_packet(self, packet: bytes) -> None:
        self.post_queue.append(packet)
        self._flush_posts()

    def _flush_posts(self) -> None:
        if self.post_up and self.sid and not self.post_busy and self.post_queue and not self.closed:
            body = b"\x1e".join(self.post_queue)
            self.post_queue.clear()
            self.post_busy = True
            self._request(self.post, b"POST", body)

    def _on_open(self, packet: bytes) -> None:
        self.sid = json.loads(packet[1:])["sid"].encode()
        self._send_packet(b"40")

    def readable(self, stream: _Stream, clock_offset_s: float) -> None:
        try:
            data, t_sock, t_read = stream.recv(clock_offset_s)
        except ConnectionError:
            if stream is not self.post or self.post_busy:
                raise
            # an idle keep-alive connection closed by the server (node's HTTP server does after 5 s):
            # the next POST goes on a new one, as a browser's would
            self.post, self.post_up = _Stream(self.tls, self._post_ready), False
            self.streams = (self.get, self.post)
            self.replace_stream(self, stream, self.post)
            return
        if not data:
            return
        if stream is self.post:
            self.post_buf += data
            while (resp := _http_response(self.post_buf)) is not None:
                status, body, self.post_buf = resp
                if status != 200:
                    self.fail(f"POST answered HTTP {status} {body[:80]!r}")
                    return
                self.post_busy = False
                self._flush_posts()
            return
        self.get_buf += data
        while (resp := _http_response(self.get_buf)) is not None:
            status, body, self.get_buf = resp
            if status != 200:
                self.fail(f"GET answered HTTP {status} {body[:80]!r}")
                return
            for packet in body.split(b"\x1e"):
                self._packet(packet, t_sock, t_read)
            if self.closed or self.error:
                self.closed = True
                return
            self._request(self.get, b"GET")


def _subscribe_packet(symbols: list[str]) -> bytes:
    """`subscribe` as BBO Stream documents it, with ack id 0."""
    return b'420["subscribe",' + json.dumps({"symbols": symbols}, separators=(",", ":")).encode() + b"]"


def _make_load_client(spec: dict[str, Any], host: str, port: int, i: int, tls: ssl.SSLContext | None) -> _SioClient:
    """Client number i of a process (``spec["first"] + i`` in the run): which symbols it wants follows from that."""
    names = spec.get("symbols") or ()
    per = spec.get("per_client", 0)
    g = spec.get("first", 0) + i
    # consecutive clients take consecutive symbols, so each symbol gets the same number of clients when
    # the number of symbols and per_client have no common factor (50 and 3)
    wanted = tuple((g * per + k) % len(names) for k in range(per)) if per else tuple(range(max(1, len(names))))
    # the first few clients of each process keep serverTimestamps; together they cover every symbol
    stampers = -(-len(names) // per) if per else 1
    sio = dict(symbol_index={n.encode(): k for k, n in enumerate(names)} if len(names) > 1 else None,
               wanted=wanted, subscribe=_subscribe_packet([names[k] for k in wanted]) if per else b"",
               stamp=i < stampers)
    if spec.get("transport", "websocket") == "polling":
        return _PollClient(host, port, tls, **sio)
    url = f"{'wss' if tls else 'ws'}://{host}:{port}/socket.io/?EIO=4&transport=websocket"
    return _LoadClient(url, tls, **sio)


def _client_session(pipe: Any, host: str, port: int, n: int, concurrency: int, timeout: float,
                    spec: dict[str, Any] | None = None) -> None:
    """Open n clients (at most `concurrency` joining at once), report, then read until "stop".

    ``spec``: transport ("websocket" or "polling"), tls, symbols (names, when several), per_client (symbols
    each client subscribes to; 0: none, it gets everything), first (this process's first client in the run).

    A plain epoll loop rather than asyncio: at 100,000 messages/s the load clients share the
    cores with the server under test, and every microsecond they spend per read is taken from it.
    """
    spec = spec or {}
    tls = None
    if spec.get("tls"):
        tls = ssl.create_default_context()
        tls.check_hostname = False                # the servers' certificate is self-signed
        tls.verify_mode = ssl.CERT_NONE
    ep = select.epoll()
    by_fd: dict[int, tuple[_SioClient, _Stream]] = {}
    clients = [_make_load_client(spec, host, port, i, tls) for i in range(n)]
    waiting = collections.deque(clients)
    joining: dict[_SioClient, float] = {}         # client → deadline (perf_counter s)
    started = time.perf_counter()

    def close_stream(s: _Stream) -> None:
        if s.fd in by_fd:
            del by_fd[s.fd]
            ep.unregister(s.fd)
        s.sock.close()

    def drop(c: _SioClient) -> None:
        for s in c.streams:
            close_stream(s)

    def replace_stream(c: _SioClient, old: _Stream, new: _Stream) -> None:
        close_stream(old)
        by_fd[new.fd] = (c, new)
        ep.register(new.fd, select.EPOLLOUT)
        new.start((host, port))

    for c in clients:
        c.replace_stream = replace_stream

    def handle(c: _SioClient, s: _Stream, events: int, clock_offset_s: float) -> None:
        try:
            if s.connecting:
                if events & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                    s.connected()
                    if not c.closed:
                        ep.modify(s.fd, select.EPOLLIN)
            else:
                c.readable(s, clock_offset_s)
        except ConnectionError as exc:
            c.fail(str(exc) or type(exc).__name__)
        except (OSError, ValueError) as exc:
            c.fail(f"{type(exc).__name__}: {exc}")
        if c.closed:
            drop(c)

    while waiting or joining:
        while waiting and len(joining) < concurrency:
            c = waiting.popleft()
            for s in c.streams:
                by_fd[s.fd] = (c, s)
                ep.register(s.fd, select.EPOLLOUT)
            joining[c] = time.perf_counter() + timeout
            try:
                c.start((host, port))
            except OSError as exc:
                c.fail(f"{type(exc).__name__}: {exc}")
            if c.closed:
                drop(c)
        events = ep.poll(0.1)
        offset = time.time() - time.perf_counter()
        for fd, ev in events:
            found = by_fd.get(fd)
            if found is not None:
                handle(*found, ev, offset)
        now = time.perf_counter()
        for c, deadline in list(joining.items()):
            if c.joined or c.closed:
                del joining[c]
            elif now > deadline:
                c.fail(f"TimeoutError: not joined within {timeout:.0f} s")
                drop(c)
                del joining[c]
    joined = [c for c in clients if c.joined]
    errors = collections.Counter(c.error.split(":")[0][:60] for c in clients if not c.joined)
    pipe.send(("ready", len(joined), n - len(joined), dict(errors), time.perf_counter() - started))
    ep.register(pipe.fileno(), select.EPOLLIN)
    pipe_fd = pipe.fileno()
    running = True
    while running:  # "status" → counts so far; "stop" → results, then close everything
        events = ep.poll()
        offset = time.time() - time.perf_counter()
        for fd, ev in events:
            if fd == pipe_fd:
                if pipe.recv()[0] != "status":
                    running = False
                    continue
                pipe.send(("status", sum(1 for c in joined if not c.closed and not c.error),
                           sum(c.pings for c in joined)))
                continue
            found = by_fd.get(fd)
            if found is not None:
                handle(*found, ev, offset)
    held = sum(1 for c in joined if not c.closed and not c.error)
    # every client, joined or not: one that never joined counts as having received nothing
    result = [(c.wanted, c.syms.tobytes(), c.us.tobytes(), c.t_sock.tobytes(), c.t_read.tobytes()) for c in clients]
    lost = collections.Counter(c.error.split(":")[0][:60] or "closed" for c in joined if c.closed or c.error)
    stamps = b"".join(c.stamps.tobytes() for c in clients)
    foreign = sum(c.foreign for c in clients)
    for c in clients:
        for s in c.streams:
            s.sock.close()
    ep.close()
    pipe.send(("result", result, held, dict(lost), sum(c.pings for c in joined), stamps, foreign))


def _client_worker(pipe: Any) -> None:
    """A load-client process: runs one session per "run" command until "exit"."""
    _raise_nofile()
    while True:
        cmd = pipe.recv()
        if cmd[0] == "exit":
            return
        _client_session(pipe, *cmd[1:])


class _ClientPool:
    """Persistent load-client processes (spawned before any event loop runs)."""

    def __init__(self, procs: int) -> None:
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        self.pipes, self.procs = [], []
        self.active: list[Any] = []
        for _ in range(procs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_worker, args=(child,), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def cpu_s(self) -> float:
        return sum(_proc_cpu_s(pid) for pid in self.pids())

    async def _ask(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send each active process its command; await every reply off the loop."""
        for pipe, command in zip(self.active, commands):
            pipe.send(command)
        return await asyncio.gather(*(asyncio.to_thread(pipe.recv) for pipe in self.active))

    async def start(self, host: str, port: int, n: int, timeout: float,
                    spec: dict[str, Any] | None = None) -> dict[str, Any]:
        """Open n connections spread over the processes (``spec``: see _client_session); wait until each reports."""
        shares = [n // len(self.pipes) + (i < n % len(self.pipes)) for i in range(len(self.pipes))]
        self.active = [pipe for pipe, k in zip(self.pipes, shares) if k]
        firsts = [sum(shares[:i]) for i in range(len(shares))]
        replies = await self._ask([("run", host, port, k, _JOIN_CONCURRENCY, timeout, {**(spec or {}), "first": first})
                                   for k, first in zip(shares, firsts) if k])
        errors: collections.Counter[str] = collections.Counter()
        for r in replies:
            errors.update(r[3])
        return {"joined": sum(r[1] for r in replies), "failed": sum(r[2] for r in replies),
                "errors": dict(errors), "connect_s": max(r[4] for r in replies)}

    async def status(self) -> tuple[int, int]:
        """(connections still open, Engine.IO pings answered) across the processes."""
        replies = await self._ask([("status",)] * len(self.active))
        return sum(r[1] for r in replies), sum(r[2] for r in replies)

    async def stop(self) -> dict[str, Any]:
        """What the clients received: ``received`` is one (wanted symbol numbers, symbol numbers, updateIds,
        socket times, read times) per client; ``stamps`` rows of (symbol, updateId, serverTimestamp ms)."""
        replies = await self._ask([("stop",)] * len(self.active))
        lost: collections.Counter[str] = collections.Counter()
        for r in replies:
            lost.update(r[3])
        received = [(wanted, np.frombuffer(s, np.int16), np.frombuffer(u, np.int64), np.frombuffer(ts, np.float64),
                     np.frombuffer(tr, np.float64)) for r in replies for wanted, s, u, ts, tr in r[1]]
        stamps = np.frombuffer(b"".join(r[5] for r in replies), np.int64).reshape(-1, 3)
        return {"received": received, "held": sum(r[2] for r in replies), "lost": dict(lost),
                "pings": sum(r[4] for r in replies), "stamps": stamps, "foreign": sum(r[6] for r in replies)}

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("exit",))
            except OSError:
                pass
        for proc in self.procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()


# -- the baselines: python-socketio AsyncServer on aiohttp, and node socket.io, relaying the fake feed ------

async def _baseline_server(port: int, feed_url: str, rooms: bool = False, certfile: str = "", keyfile: str = "") -> None:
    """The python-socketio relay. ``rooms``: a client gets only the symbols it subscribed to (a room per
    symbol, as python-socketio does per-topic delivery); else every client gets every update."""
    import socketio
    import websockets
    from aiohttp import web
    _raise_nofile()
    sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*", logger=False,
                               engineio_logger=False)
    app = web.Application()
    sio.attach(app)

    @sio.event
    async def connect(sid: str, environ: dict, auth: Any = None) -> None:
        await sio.emit("welcome", {"message": "Welcome to BBO Stream"}, to=sid)

    @sio.event
    async def subscribe(sid: str, request: Any = None) -> dict[str, Any]:
        symbols = sorted({str(s).upper() for s in (request or {}).get("symbols") or []})
        for symbol in symbols:
            await sio.enter_room(sid, symbol)
        return {"symbols": symbols, "maxRate": None}

    async def relay() -> None:
        loads = json.loads
        while True:
            try:
                async with websockets.connect(feed_url, max_size=None) as ws:
                    async for message in ws:
                        recv = time.time_ns() // 1_000_000
                        d = loads(message)
                        if "u" not in d:
                            continue
                        # the same keys, in the same order, as our bbo_update
                        await sio.emit("bbo_update", {
                            "symbol": d["s"], "bidPrice": d["b"], "bidQty": d["B"], "askPrice": d["a"],
                            "askQty": d["A"], "timestamp": d["E"], "serverTimestamp": recv,
                            "backendLatency": recv - d["E"], "updateId": d["u"], "transactionTime": d["T"]},
                            to=d["s"] if rooms else None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep relaying, as a server would
                print(f"baseline relay: {exc!r}", file=sys.stderr, flush=True)
                await asyncio.sleep(0.5)

    tls = None
    if certfile:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(certfile, keyfile)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024, ssl_context=tls).start()
    print(f"listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    task = asyncio.create_task(relay())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    task.cancel()
    await runner.cleanup()


# node socket.io 4.8 relaying the same feed, with the same payload; `ws` (a dependency of engine.io) reads the
# exchange. Arguments: node_modules folder, port, feed URL, "rooms" or "all", and for TLS the certificate and key.
# With "rooms" a client gets only the symbols it subscribed to (socket.join per symbol, io.to(symbol).emit),
# the way socket.io delivers per topic; with "all", io.emit to every client.
_NODE_RELAY_JS = r"""
"use strict";
const [modules, port, feedUrl, mode, certPath, keyPath] = process.argv.slice(2);
const fromModules = require("module").createRequire(modules + "/");
const { Server } = fromModules("socket.io");
const WebSocket = fromModules("ws");
const fs = require("fs");
const server = certPath
  ? require("https").createServer({ cert: fs.readFileSync(certPath), key: fs.readFileSync(keyPath) })
  : require("http").createServer();
const io = new Server(server, { cors: { origin: "*" } });
const rooms = mode === "rooms";
io.on("connection", (socket) => {
  socket.emit("welcome", { message: "Welcome to BBO Stream" });
  socket.on("subscribe", (request, ack) => {
    const symbols = request && Array.isArray(request.symbols) ? [...new Set(request.symbols.map((s) => String(s).toUpperCase()))].sort() : [];
    socket.join(symbols);
    if (typeof ack === "function") ack({ symbols, maxRate: null });
  });
});
function relay() {
  const ws = new WebSocket(feedUrl);
  ws.on("message", (data) => {
    const recv = Date.now();
    const d = JSON.parse(data);
    if (d.u === undefined) return;
    const update = { symbol: d.s, bidPrice: d.b, bidQty: d.B, askPrice: d.a, askQty: d.A, timestamp: d.E,
                     serverTimestamp: recv, backendLatency: recv - d.E, updateId: d.u, transactionTime: d.T };
    (rooms ? io.to(d.s) : io).emit("bbo_update", update);
  });
  ws.on("error", (err) => console.error("node relay:", err.message));
  ws.on("close", () => setTimeout(relay, 500));
}
server.listen(Number(port), "127.0.0.1", 1024, () => {
  console.error(`listening on 127.0.0.1:${port}`);
  relay();
});
for (const sig of ["SIGTERM", "SIGINT"]) process.on(sig, () => process.exit(0));
"""
_NODE: dict[str, Path] = {}      # "script" and "modules" once _fanout has found node and written the relay
_REV_DIRS: dict[str, Path] = {}  # "ours@REV" → a folder holding bbo_stream.py as it was at REV (--compare-rev)


def _node_relay(logdir: Path) -> str:
    """Write the node relay next to the logs and remember it; "" when usable, else why node is skipped."""
    modules = Path(__file__).resolve().parent / "node_modules"
    if shutil.which("node") is None:
        return "no node command on PATH"
    missing = [m for m in ("socket.io", "ws") if not (modules / m / "package.json").exists()]
    if missing:
        return f"{', '.join(missing)} missing from {modules.name}/ (run npm ci)"
    script = logdir / "node_relay.js"
    script.write_text(_NODE_RELAY_JS)
    _NODE.update(script=script, modules=modules)
    return ""


def _node_versions() -> str:
    try:
        node = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
        sio = json.loads((_NODE["modules"] / "socket.io" / "package.json").read_text())["version"]
    except (OSError, KeyError, ValueError, subprocess.SubprocessError):
        return "node socket.io ?"
    return f"node socket.io {sio} (node {node})"


def _checkout_rev(rev: str, into: Path) -> str:
    """The repository's tree at git revision rev, extracted into `into`; returns the revision's short name."""
    here = Path(__file__).resolve().parent
    short = subprocess.run(["git", "rev-parse", "--short", rev], cwd=here, capture_output=True, text=True,
                           timeout=30, check=True).stdout.strip()
    tar = subprocess.run(["git", "archive", "--format=tar", short], cwd=here, capture_output=True, timeout=120,
                         check=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    if not (into / "bbo_stream.py").exists():
        raise RuntimeError(f"{rev} has no bbo_stream.py")
    return short


def _make_certificate(folder: Path) -> tuple[str, str]:
    """A self-signed certificate for localhost and its key, made as BBO Stream makes its own."""
    pair = bs.ensure_certificate(str(folder / "cert.pem"), str(folder / "key.pem"))
    if pair is None:
        raise RuntimeError("no certificate could be made (is openssl installed?)")
    return pair


# -- orchestration ------------------------------------------------------------------------------------

class _Scenario(NamedTuple):
    name: str
    clients: int
    rate: float          # updates per second of each symbol (0: idle connections)
    hold_s: float = 0.0  # idle scenarios: how long to hold the connections
    tls: bool = False    # wss:// (https for polling), with a self-signed certificate
    transport: str = "websocket"  # or "polling"
    symbols: int = 1     # symbols the fake exchange sends
    per_client: int = 0  # symbols each client subscribes to (0: none; it gets every update)


def _symbols_of(sc: _Scenario) -> tuple[str, ...]:
    return (FANOUT_SYMBOL,) if sc.symbols == 1 else tuple(f"sym{i:02d}usdt" for i in range(sc.symbols))


class _ServerProc:
    """One server under test as a subprocess, its log in a file."""

    def __init__(self, kind: str, feed_base_url: str, logdir: Path, settings: dict[str, str] | None = None, *,
                 symbols: tuple[str, ...] = (FANOUT_SYMBOL,), tls: tuple[str, str] | None = None,
                 rooms: bool = False) -> None:
        """``kind``: "ours" (this bbo_stream.py), "ours-1t" (FANOUT_THREADS=0), "ours@REV" (--compare-rev),
        "node" or "baseline" (python-socketio). ``settings`` (ours only): more settings by name, e.g.
        {"CACHE_DIR": ...}; they win over the defaults here. ``tls``: (certificate, key) to serve TLS with;
        ``rooms`` (relays): per-symbol delivery to the clients that subscribed."""
        self.kind = kind
        self.port = fake_binance.free_port()
        self.log_path = logdir / f"{kind}-{self.port}.log"
        here = Path(__file__).resolve().parent
        feed_url = f"{feed_base_url}/" + "/".join(f"{s}@bookTicker" for s in symbols)
        env = dict(os.environ)
        cwd = here
        if kind.startswith("ours"):
            cwd = _REV_DIRS.get(kind, here)
            # Every load client connects from 127.0.0.1: no per-address limits (MAX_CLIENTS still applies).
            cmd = [sys.executable, str(cwd / "bbo_stream.py"), "--symbol", ",".join(symbols),
                   "--use-ssl", "true" if tls else "false", "--web-host", "127.0.0.1", "--web-port", str(self.port),
                   "--cache-persist", "false", "--max-sessions-per-address", "1000000",
                   "--max-new-sessions-per-address-per-s", "1000000"]
            if tls:
                cmd += ["--ssl-cert-path", tls[0], "--ssl-key-path", tls[1]]
            if kind == "ours-1t":                           # the event loop's thread writes alone
                cmd += ["--fanout-threads", "0"]
            for name, value in (settings or {}).items():     # a later flag wins
                cmd += ["--" + name.lower().replace("_", "-"), value]
            env["WEBSOCKET_BASE_URL"] = feed_base_url
            # The fake serves serverTime on the same port (the clock check; older revisions ignore it).
            env["EXCHANGE_REST_URL"] = "http://" + feed_base_url.split("://", 1)[1].split("/", 1)[0]
        elif kind == "node":
            cmd = ["node", str(_NODE["script"]), str(_NODE["modules"]), str(self.port), feed_url,
                   "rooms" if rooms else "all", *(tls or ())]
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "baseline-server", "--port", str(self.port),
                   "--feed", feed_url]
            if rooms:
                cmd.append("--rooms")
            if tls:
                cmd += ["--certfile", tls[0], "--keyfile", tls[1]]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - the subprocess writes to it until stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.pid = self.proc.pid
        if _PIN["server"]:
            os.sched_setaffinity(self.pid, _PIN["server"])

    async def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.kind} server not listening after {timeout} s: {self.log_tail()}")

    def metrics(self, prefix: str = "sio_", timeout: float = 5.0) -> dict[str, float]:
        """Our /metrics samples whose name starts with ``prefix`` (ours only)."""
        import urllib.request
        out: dict[str, float] = {}
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=timeout) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(prefix) and " " in line:
                    name, value = line.rsplit(" ", 1)
                    out[name] = float(value)
        return out

    def log_tail(self, n: int = 15) -> str:
        if not self.log.closed:
            self.log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def warnings(self) -> list[str]:
        if not self.log.closed:
            self.log.flush()
        return [line for line in self.log_path.read_text(errors="replace").splitlines()
                if any(w in line for w in ("WARNING", "ERROR", "Traceback", "Exception", "relay:"))]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.log.closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def _nearest_rank(sorted_values: np.ndarray, q: float) -> float:
    if len(sorted_values) == 0:
        return float("nan")
    return float(sorted_values[min(len(sorted_values) - 1, max(0, int(np.ceil(q * len(sorted_values))) - 1))])


def _analyse(received: list[tuple[Any, ...]], sent_at: dict[tuple[str, int], float], n_clients: int,
             t0: float, t1: float, t_end: float, symbols: tuple[str, ...] = (FANOUT_SYMBOL,)) -> dict[str, float]:
    """Figures from the clients' records (see _ClientPool.stop) and the fake's send times.

    - deliveries: updates of a client's own symbols that reached its socket in [t0, t1] (any u), per second;
    - latency p50/p99: socket time - send time of those deliveries (a backlog shows up here);
      read latency: the same to when the load-client process read them (adds its own CPU waits);
    - delivered: of the updates of each client's symbols published in [t0, t1], the fraction it got by t_end;
    - fresh p50/p99: for each client, each of its symbols and each update published in [t0, t1], the time
      until the client held that price or a newer one (what "sees the newest price" means when updates
      are conflated); never by t_end counts as infinite.
    """
    by_symbol: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for (name, u), s in sent_at.items():
        by_symbol[name].append((u, s))
    pubs = []                                     # per symbol number: (pub_u, pub_s, win_u, win_s)
    for name in symbols:
        items = sorted(by_symbol.get(name.upper(), ()))
        pub_u = np.fromiter((u for u, _ in items), np.int64, len(items))
        pub_s = np.fromiter((s for _, s in items), np.float64, len(items))
        window = (pub_s >= t0) & (pub_s <= t1)
        pubs.append((pub_u, pub_s, pub_u[window], pub_s[window]))
    lat_parts, read_parts, fresh_parts = [], [], []
    deliveries = delivered_pairs = unmatched = expected = 0
    for wanted, syms, ru_all, rt_all, rr_all in received:
        for k in wanted:
            pub_u, pub_s, win_u, win_s = pubs[k]
            expected += len(win_u)
            if len(symbols) > 1:
                mine = syms == k
                ru, rt, rr = ru_all[mine], rt_all[mine], rr_all[mine]
            else:
                ru, rt, rr = ru_all, rt_all, rr_all
            if len(ru) == 0:
                fresh_parts.append(np.full(len(win_u), _NOT_SEEN))
                continue
            idx = np.minimum(np.searchsorted(pub_u, ru), max(0, len(pub_u) - 1))
            matched = pub_u[idx] == ru if len(pub_u) else np.zeros(len(ru), bool)
            unmatched += int((~matched).sum())
            in_win = (rt >= t0) & (rt <= t1)
            deliveries += int(in_win.sum())
            sel = in_win & matched
            lat_parts.append(rt[sel] - pub_s[idx[sel]])
            read_parts.append(rr[sel] - pub_s[idx[sel]])
            ok = rt <= t_end
            delivered_pairs += int(np.isin(ru[ok], win_u).sum())
            seen_u = np.maximum.accumulate(ru)
            j = np.searchsorted(seen_u, win_u, side="left")
            has = j < len(seen_u)
            fresh = np.full(len(win_u), _NOT_SEEN)
            fresh[has] = rt[j[has]] - win_s[has]
            fresh[has & (rt[np.minimum(j, len(rt) - 1)] > t_end)] = _NOT_SEEN
            fresh_parts.append(fresh)
    for _ in range(n_clients - len(received)):  # clients that reported nothing (every client reports now)
        expected += len(pubs[0][2])
        fresh_parts.append(np.full(len(pubs[0][2]), _NOT_SEEN))
    lat = np.sort(np.concatenate(lat_parts)) if lat_parts else np.array([])
    read = np.sort(np.concatenate(read_parts)) if read_parts else np.array([])
    fresh = np.sort(np.concatenate(fresh_parts)) if fresh_parts else np.array([])
    published = sum(len(p[2]) for p in pubs)
    return {"published": float(published), "published_per_s": published / (t1 - t0),
            "deliveries": float(deliveries), "deliveries_per_s": deliveries / (t1 - t0),
            "delivered_frac": delivered_pairs / expected if expected else float("nan"),
            "missed": float(expected - delivered_pairs), "expected": float(expected),
            "lat_p50": _nearest_rank(lat, 0.50), "lat_p99": _nearest_rank(lat, 0.99),
            "lat_max": float(lat[-1]) if len(lat) else float("nan"),
            "read_p50": _nearest_rank(read, 0.50), "read_p99": _nearest_rank(read, 0.99),
            "fresh_p50": _nearest_rank(fresh, 0.50), "fresh_p99": _nearest_rank(fresh, 0.99),
            "unmatched": float(unmatched)}


def _feed_latency(stamps: np.ndarray, sent_at: dict[tuple[str, int], float], symbols: tuple[str, ...],
                  t0: float, t1: float) -> dict[str, float]:
    """The server's receive latency, apart from the fan-out: serverTimestamp (when it read the update from
    the exchange; whole ms of the wall clock) minus the fake's send time of the same update, for the
    updates sent in [t0, t1]. ``stamps``: (symbol number, updateId, serverTimestamp ms) rows, as several
    clients saw them."""
    names = [s.upper() for s in symbols]
    offset = time.time() - time.perf_counter()    # wall clock → perf_counter(); both tick system-wide
    lat = []
    for k, u, ms in np.unique(stamps, axis=0) if len(stamps) else ():
        sent = sent_at.get((names[k], int(u)))
        if sent is not None and t0 <= sent <= t1:
            lat.append(ms / 1000 + _STAMP_ROUND_S - offset - sent)
    lat_sorted = np.sort(np.array(lat))
    return {"feed_p50": _nearest_rank(lat_sorted, 0.50), "feed_p99": _nearest_rank(lat_sorted, 0.99),
            "feed_n": float(len(lat_sorted))}


async def _run_one(kind: str, sc: _Scenario, pool: _ClientPool, measure_s: float, logdir: Path,
                   problems: list[str], quiet_cores: float, max_wait_s: float,
                   tls_pair: tuple[str, str] | None = None) -> dict[str, Any]:
    from fake_binance import FakeBinance
    res: dict[str, Any] = {"kind": kind}
    symbols = _symbols_of(sc)
    spec = {"transport": sc.transport, "tls": sc.tls, "per_client": sc.per_client,
            "symbols": [s.upper() for s in symbols] if len(symbols) > 1 else []}
    res["waited_s"], res["others_before"] = await _wait_quiet(pool, quiet_cores, max_wait_s)
    async with FakeBinance(market="futures", port=0, record_send_times=True) as fake:
        server = _ServerProc(kind, fake.base_url, logdir, symbols=symbols, tls=tls_pair if sc.tls else None,
                             rooms=sc.per_client > 0)
        try:
            await server.wait_listening()
            for symbol in symbols:
                await fake.wait_for_subscribed(symbol, timeout=20)
            await asyncio.sleep(0.5)
            # warm-up: first-connection allocations (and TLS's), then RSS with no client connected
            await pool.start("127.0.0.1", server.port, _WARMUP_CLIENTS, 30, spec)
            await pool.stop()
            await asyncio.sleep(1.0)
            rss0 = _proc_rss_kb(server.pid)
            if sc.rate == 0:                              # idle: RSS before/after connecting
                conn = await pool.start("127.0.0.1", server.port, sc.clients, 120, spec)
                await asyncio.sleep(1.0)                  # settle: handshakes and welcome messages done
                rss1 = _proc_rss_kb(server.pid)
                cpu0, t0 = _proc_cpu_s(server.pid), time.perf_counter()
                await asyncio.sleep(max(0.0, sc.hold_s - 1.0))
                cpu1, t1 = _proc_cpu_s(server.pid), time.perf_counter()
                rss2 = _proc_rss_kb(server.pid)
                held, pings = await pool.status()
                if sc.name == "held":                     # SIGTERM with every client still connected
                    started = time.perf_counter()
                    res["sigterm_rc"] = await asyncio.to_thread(server.stop)
                    res["sigterm_s"] = time.perf_counter() - started
                    await asyncio.sleep(0.5)
                out = await pool.stop()
                res.update(conn, held=held, lost=out["lost"], pings=pings, rss0_kb=rss0,
                           rss1_kb=rss1, rss2_kb=rss2, kb_per_conn=(rss1 - rss0) / max(1, conn["joined"]),
                           idle_cpu_cores=(cpu1 - cpu0) / (t1 - t0))
            else:
                conn = await pool.start("127.0.0.1", server.port, sc.clients, 60, spec)
                await asyncio.sleep(1.0)                  # settle: handshakes and welcome messages done
                rss1 = _proc_rss_kb(server.pid)
                res.update(conn, rss0_kb=rss0, kb_per_conn=(rss1 - rss0) / max(1, conn["joined"]))
                metrics0 = server.metrics() if kind.startswith("ours") else {}
                fake.start_generator(list(symbols), sc.rate)
                await asyncio.sleep(1.0)                  # warm-up
                self_cpu0, busy0, irq0 = time.process_time(), _machine_busy_s(), _softirq_s()
                srv0, cli0, t0 = _proc_cpu_s(server.pid), pool.cpu_s(), time.perf_counter()
                await asyncio.sleep(measure_s)
                srv1, cli1, t1 = _proc_cpu_s(server.pid), pool.cpu_s(), time.perf_counter()
                self_cpu1, busy1, irq1 = time.process_time(), _machine_busy_s(), _softirq_s()
                metrics1 = server.metrics() if kind.startswith("ours") else {}
                await asyncio.sleep(1.0)                  # grace: in-flight updates of the window
                t_end = time.perf_counter()
                fake.stop_generator()
                out = await pool.stop()
                res.update(_analyse(out["received"], fake.sent_at, sc.clients, t0, t1, t_end, symbols))
                res.update(_feed_latency(out["stamps"], fake.sent_at, symbols, t0, t1))
                res.update(held=out["held"], lost=out["lost"], server_cpu_s=srv1 - srv0, foreign=out["foreign"],
                           client_cpu_cores=(cli1 - cli0) / (t1 - t0), fake_cpu_cores=(self_cpu1 - self_cpu0) / (t1 - t0),
                           server_cpu_cores=(srv1 - srv0) / (t1 - t0), rss_kb=_proc_rss_kb(server.pid),
                           others_cores=((busy1 - busy0) - (srv1 - srv0) - (cli1 - cli0) - (self_cpu1 - self_cpu0))
                           / (t1 - t0), irq_cores=(irq1 - irq0) / (t1 - t0))
                res["cpu_ms_per_1000"] = (1e6 * res["server_cpu_s"] / res["deliveries"]) if res["deliveries"] else float("nan")
                if metrics1:
                    res["server_skipped"] = metrics1.get("sio_skipped_total", 0) - metrics0.get("sio_skipped_total", 0)
                    res["server_published"] = (metrics1.get("sio_updates_published_total", 0)
                                               - metrics0.get("sio_updates_published_total", 0))
                if res["unmatched"]:
                    problems.append(f"{sc.name} {kind}: {res['unmatched']:.0f} received updateIds the fake never sent")
                if res["foreign"]:
                    problems.append(f"{sc.name} {kind}: {res['foreign']:,} updates of symbols the clients did not "
                                    "subscribe to")
            if server.proc.poll() is not None and "sigterm_s" not in res:
                problems.append(f"{sc.name} {kind}: server exited with {server.proc.returncode}")
        finally:
            rc = server.stop()
            warnings = server.warnings()
            if warnings:
                problems.append(f"{sc.name} {kind}: {len(warnings)} warning/error line(s) in {server.log_path}, "
                                f"first: {warnings[0][:300]}")
            if rc not in (0, -15, None) and "sigterm_s" not in res:
                problems.append(f"{sc.name} {kind}: exit status {rc} after SIGTERM; log tail:\n{server.log_tail(8)}")
    return res


def _ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    if seconds >= _NOT_SEEN / 2:
        return "never"
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _fmt_rate(sc: _Scenario) -> str:
    if not sc.rate:
        return f"{sc.clients:,} idle connections"
    how = {(False, "websocket"): "", (True, "websocket"): " wss", (False, "polling"): " polling",
           (True, "polling"): " polling https"}[sc.tls, sc.transport]
    if sc.per_client:
        return f"{sc.clients:,} clients × {sc.per_client} of {sc.symbols} symbols × {sc.rate:,.0f}/s{how}"
    return f"{sc.clients:,} clients × {sc.rate:,.0f}/s{how}"


def _line(sc: _Scenario, r: dict[str, Any], refs: dict[str, dict[str, Any]]) -> str:
    """One run's figures; ``refs``: the baselines' results of the same scenario, for ours/baseline ratios."""
    head = f"{sc.name:<12} {_fmt_rate(sc):<26} {r['kind']:<8}"
    joined = f"{r['joined']:,}/{sc.clients:,} joined"
    if r.get("failed"):
        joined += f" ({r['failed']:,} failed: {r['errors']})"
    if sc.rate == 0:
        s = (f"{head} {joined} in {r['connect_s']:.1f} s, {r['held']:,} still open after {sc.hold_s:.0f} s "
             f"({r['pings']:,} Engine.IO pings answered); RSS {r['rss0_kb'] / 1024:.1f} → {r['rss1_kb'] / 1024:.1f} MB "
             f"= {r['kb_per_conn']:.1f} KB per connection")
        base = refs.get("baseline")
        if base and base.get("kb_per_conn"):
            s += f" (ratio ours/baseline {r['kb_per_conn'] / base['kb_per_conn']:.2f})"
        s += f", {r['rss2_kb'] / 1024:.1f} MB at the end; server CPU while idle {r['idle_cpu_cores']:.3f} cores"
        if r["held"] < r["joined"]:
            s += f"; lost: {r['lost']}"
        if "sigterm_s" in r:
            how = (f"not exited after {r['sigterm_s']:.0f} s, killed" if r["sigterm_rc"] == -signal.SIGKILL
                   else f"exit status {r['sigterm_rc']} after {r['sigterm_s']:.1f} s")
            s += f"; SIGTERM with them connected: {how}, clients saw {r['lost']}"
        return s + _quiet_note(r)
    s = (f"{head} {joined}; {r['deliveries_per_s']:,.0f} deliveries/s; delivered {100 * r['delivered_frac']:.1f}% "
         f"of {r['expected']:,.0f} ({r['published']:,.0f} updates published); latency p50 {_ms(r['lat_p50'])} "
         f"p99 {_ms(r['lat_p99'])} (max {_ms(r['lat_max'])}), as read by the load client p50 {_ms(r['read_p50'])} "
         f"p99 {_ms(r['read_p99'])}; newest price p50 {_ms(r['fresh_p50'])} p99 {_ms(r['fresh_p99'])}; "
         f"skipped {r['missed']:,.0f}")
    if "server_skipped" in r:
        s += f" (server counted {r['server_skipped']:,.0f})"
    s += f"; server CPU {r['cpu_ms_per_1000']:.1f} ms per 1,000 deliveries ({r['server_cpu_cores']:.2f} cores)"
    for ref in ("baseline", "node"):
        base = refs.get(ref)
        if base and base.get("cpu_ms_per_1000") and not math.isnan(base["cpu_ms_per_1000"]):
            s += f", ratio {r['kind']}/{ref} {r['cpu_ms_per_1000'] / base['cpu_ms_per_1000']:.2f}"
    s += (f"; server RSS {r['rss_kb'] / 1024:.0f} MB at the end, {r['kb_per_conn']:.1f} KiB per connected client; "
          f"feed receive latency (exchange send → server read, serverTimestamp) p50 {_ms(r['feed_p50'])} "
          f"p99 {_ms(r['feed_p99'])} of {r['feed_n']:,.0f} updates, with the load generators at: fake exchange "
          f"{r['fake_cpu_cores']:.2f} cores, load clients {r['client_cpu_cores']:.2f} cores; other processes "
          f"{r['others_cores']:.2f} cores, interrupts {r['irq_cores']:.2f} cores")
    if r["held"] < r["joined"]:
        s += f"; {r['joined'] - r['held']:,} connection(s) lost: {r['lost']}"
    return s + _quiet_note(r)


def _quiet_note(r: dict[str, Any]) -> str:
    note = ""
    if r.get("attempt", 1) > 1:
        note += f" [attempt {r['attempt']}: the earlier one(s) had more load from other processes]"
    if r.get("waited_s", 0) < 1.5:
        return note
    return note + f" [waited {r['waited_s']:.0f} s for the machine to quieten; other load then {r['others_before']:.2f} cores]"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


# The fan-out goals were set from measurements made earlier on this kind of 2-core machine: server CPU per
# 1,000 deliveries of node socket.io (13–15 ms at 100 clients × 100/s, 9.8 ms at 1,000 × 100/s) and of
# python-socketio (40 ms at 100 × 100/s). Node now also runs beside them (where node_modules is installed).
_GOAL_BASELINE_CPU_MS = {"100x100": 40.0}  # python-socketio's CPU per 1,000 deliveries when the goals were set
_FULL_DELIVERY = 0.9995                    # "100 % delivered": at most 1 in 2,000 missed (a window's edge)
_TLS_KIB_PER_CLIENT = 64                   # goal: memory per TLS WebSocket client (node: 61 KiB)


def _cpu(r: dict[str, Any] | None) -> float:
    return r["cpu_ms_per_1000"] if r and "cpu_ms_per_1000" in r else float("nan")


def _ratio_goal(what: str, ours: float, ref: float, limit: float) -> tuple[str, bool | None]:
    """"what 0.42× (goal ≤ 0.6×)" and whether it holds (None when the reference was not measured)."""
    if math.isnan(ours) or math.isnan(ref) or not ref:
        return f"{what} not measured", None
    ratio = ours / ref
    return f"{what} {ratio:.2f}× (goal ≤ {limit:g}×)", ratio <= limit


def _goal_line(name: str, parts: list[tuple[str, bool | None]]) -> str:
    measured = [ok for _, ok in parts if ok is not None]
    verdict = _verdict(all(measured)) if measured else "not judged"
    return f"  {name}: " + "; ".join(text for text, _ in parts) + f" → {verdict}"


def _goals(results: dict[str, dict[str, dict[str, Any]]], scenarios: dict[str, _Scenario], quick: bool) -> list[str]:
    out = ["goals, ours:" + (" (--quick sizes: NOT comparable with the goals, smoke run only)" if quick else "")]
    for name, node_lo, node_hi in (("100x100", 13.0, 15.0), ("1000x100", 9.8, 9.8)):
        r = results.get(name, {}).get("ours")
        if not r:
            continue
        cpu = r["cpu_ms_per_1000"]
        where = "below node's" if cpu < node_lo else ("within node's range" if cpu <= node_hi else "above node's")
        node = f"{node_lo:g}–{node_hi:g}" if node_lo != node_hi else f"{node_lo:g}"
        line = f"  {name}: CPU {cpu:.1f} ms per 1,000 deliveries vs node socket.io {node} ms: {where}"
        ok = cpu <= node_hi
        base = results.get(name, {}).get("baseline")
        if name in _GOAL_BASELINE_CPU_MS and base and base.get("cpu_ms_per_1000"):
            # node and python-socketio were measured for the goals at another time; the machine's
            # speed drifts between runs, the ratio to the baseline run beside ours does not.
            ratio, node_hi_ratio = cpu / base["cpu_ms_per_1000"], node_hi / _GOAL_BASELINE_CPU_MS[name]
            line += (f"; {ratio:.2f}× python-socketio in this run, node {node_lo / _GOAL_BASELINE_CPU_MS[name]:.2f}–"
                     f"{node_hi_ratio:.2f}× when the goals were set")
            ok = ratio <= node_hi_ratio
        node_now = results.get(name, {}).get("node")
        if node_now:
            line += f" (node in this run: {_cpu(node_now):.1f} ms, ours {cpu / _cpu(node_now):.2f}×)"
        out.append(f"{line} → {_verdict(ok)}")
    r = results.get("1000x100", {}).get("ours")
    if r:
        full = r["delivered_frac"] >= _FULL_DELIVERY
        out.append(f"  1000x100: delivered {100 * r['delivered_frac']:.2f}% (goal 100%), p99 {_ms(r['lat_p99'])} "
                   f"(goal ≤ 20 ms) → {_verdict(full and r['lat_p99'] <= 0.020)}")
    r = results.get("100x2000", {}).get("ours")
    if r:
        out.append(f"  100x2000 (saturation): newest price p99 {_ms(r['fresh_p99'])}, latency p99 {_ms(r['lat_p99'])} "
                   f"(goal ≤ 50 ms, no backlog), {r['missed']:,.0f} skipped of {r['published'] * scenarios['100x2000'].clients:,.0f} "
                   f"→ {_verdict(r['fresh_p99'] <= 0.050 and r['lat_p99'] <= 0.050)}")
    sym = results.get("sym50-1000x3", {})
    if sym.get("ours"):
        r = sym["ours"]
        out.append(_goal_line("sym50-1000x3", [
            (f"CPU {_cpu(r):.1f} ms per 1,000 deliveries", None),
            _ratio_goal("vs node socket.io (rooms)", _cpu(r), _cpu(sym.get("node")), 0.6),
            _ratio_goal("vs python-socketio", _cpu(r), _cpu(sym.get("baseline")), 0.15),
            (f"delivered {100 * r['delivered_frac']:.2f}% (goal 100%)", r["delivered_frac"] >= _FULL_DELIVERY)]))
    tls = results.get("tls-1000x100", {})
    if tls.get("ours"):
        r, node = tls["ours"], tls.get("node")
        plain = results.get("1000x100", {}).get("ours")
        parts = [(f"CPU {_cpu(r):.1f} ms per 1,000 deliveries", None),
                 _ratio_goal("vs ours over plain WebSocket (1000x100) in this run", _cpu(r), _cpu(plain), 1.3)]
        if node:
            parts.append((f"latency p50 {_ms(r['lat_p50'])} vs node's {_ms(node['lat_p50'])} (goal ≤ node's)",
                          r["lat_p50"] <= node["lat_p50"]))
        else:
            parts.append((f"latency p50 {_ms(r['lat_p50'])}, node not measured", None))
        parts.append((f"{r['kb_per_conn']:.1f} KiB per TLS client (goal ≤ {_TLS_KIB_PER_CLIENT}"
                      + (f"; node {node['kb_per_conn']:.1f}" if node else "") + ")",
                      r["kb_per_conn"] <= _TLS_KIB_PER_CLIENT))
        out.append(_goal_line("tls-1000x100", parts))
    poll = results.get("poll-100x100", {})
    if poll.get("ours"):
        r, node = poll["ours"], poll.get("node")
        parts = [(f"CPU {_cpu(r):.1f} ms per 1,000 deliveries", None),
                 _ratio_goal("vs node socket.io", _cpu(r), _cpu(node), 0.8)]
        if node:
            parts.append((f"latency p50 {_ms(r['lat_p50'])} vs node's {_ms(node['lat_p50'])} (goal ≤ node's)",
                          r["lat_p50"] <= node["lat_p50"]))
        out.append(_goal_line("poll-100x100", parts))
    plain = results.get("1000x100", {})
    if plain.get("ours"):
        r = plain["ours"]
        rev = next((k for k in plain if k.startswith("ours@")), "")
        load = (f" (fake exchange {r['fake_cpu_cores']:.2f} cores, load clients {r['client_cpu_cores']:.2f} cores)")
        if rev:
            text, ok = _ratio_goal(f"vs {rev}'s {_ms(plain[rev]['feed_p99'])}", r["feed_p99"], plain[rev]["feed_p99"], 0.25)
        else:
            text, ok = "no --compare-rev to judge it against (goal ≤ 0.25× the earlier code's, measured in the same run)", None
        out.append(_goal_line("1000x100 feed receive latency", [(f"p99 {_ms(r['feed_p99'])}{load}", None), (text, ok)]))
    for name, by_kind in results.items():          # the earlier code beside the new, where both ran
        rev = next((k for k in by_kind if k.startswith("ours@")), "")
        r, old = by_kind.get("ours"), by_kind.get(rev)
        if not (rev and r and old):
            continue
        if scenarios[name].rate == 0:
            out.append(f"  {name} vs {rev}: {r['kb_per_conn']:.1f} vs {old['kb_per_conn']:.1f} KB per connection")
            continue
        out.append(f"  {name} vs {rev}: CPU {_cpu(r):.1f} vs {_cpu(old):.1f} ms per 1,000 deliveries "
                   f"({_cpu(r) / _cpu(old):.2f}×); delivered {100 * r['delivered_frac']:.1f} vs "
                   f"{100 * old['delivered_frac']:.1f}%; p50 {_ms(r['lat_p50'])} vs {_ms(old['lat_p50'])}, "
                   f"p99 {_ms(r['lat_p99'])} vs {_ms(old['lat_p99'])}; feed p99 {_ms(r['feed_p99'])} vs "
                   f"{_ms(old['feed_p99'])}; {r['kb_per_conn']:.1f} vs {old['kb_per_conn']:.1f} KiB per client")
    r = results.get("idle", {}).get("ours")
    if r:
        out.append(f"  idle {r['joined']:,}: {r['kb_per_conn']:.1f} KB per idle connection (goal ≤ 25 KB) → "
                   f"{_verdict(r['kb_per_conn'] <= 25 and r['joined'] == scenarios['idle'].clients)}")
    r = results.get("held", {}).get("ours")
    if r:
        n = scenarios["held"].clients
        out.append(f"  held: {r['joined']:,}/{n:,} joined, {r['held']:,} still open after {scenarios['held'].hold_s:.0f} s "
                   f"({r['pings']:,} pings answered), RSS {r['rss1_kb'] / 1024:.0f} MB ({r['kb_per_conn']:.1f} KB per "
                   f"connection) → {_verdict(r['joined'] == n and r['held'] == n)}")
    return out


async def _fanout(args: argparse.Namespace, pool: _ClientPool, out: Any) -> int:
    quick = args.quick
    measure_s = 3.0 if quick else args.seconds
    scenarios = {
        "100x100": _Scenario("100x100", 20 if quick else 100, 50 if quick else 100),
        "1000x100": _Scenario("1000x100", 200 if quick else 1000, 50 if quick else 100),
        "tls-1000x100": _Scenario("tls-1000x100", 200 if quick else 1000, 50 if quick else 100, tls=True),
        "sym50-1000x3": _Scenario("sym50-1000x3", 200 if quick else 1000, 10 if quick else 20, symbols=50, per_client=3),
        "poll-100x100": _Scenario("poll-100x100", 20 if quick else 100, 50 if quick else 100, transport="polling"),
        "100x2000": _Scenario("100x2000", 20 if quick else 100, 500 if quick else 2000),
        "idle": _Scenario("idle", 200 if quick else 2000, 0, 3.0),
        "held": _Scenario("held", args.connections or (1000 if quick else 10_000), 0, 3.0 if quick else 30.0),
    }
    if args.connections == 0:
        del scenarios["held"]
    if args.only:
        wanted = args.only.split(",")
        unknown = [name for name in wanted if name not in scenarios]
        if unknown:
            print(f"fanout: unknown scenario(s) {', '.join(unknown)}; known: {', '.join(scenarios)}", file=sys.stderr)
            return 2
        scenarios = {k: v for k, v in scenarios.items() if k in wanted}
    logdir = Path(tempfile.mkdtemp(prefix="bbo-fanout-"))
    asked = args.servers.split(",")
    notes = []
    if "node" in asked:
        why = _node_relay(logdir)
        if why:
            asked.remove("node")
            notes.append(f"# node socket.io: skipped: {why}")
    rev_kinds = []
    if args.compare_rev:
        short = _checkout_rev(args.compare_rev, logdir / "rev")
        _REV_DIRS[f"ours@{short}"] = logdir / "rev"
        rev_kinds.append(f"ours@{short}")
    kinds = [k for k in ("baseline", "node") if k in asked] + rev_kinds + [k for k in ("ours-1t", "ours") if k in asked]
    tls_pair = _make_certificate(logdir) if any(sc.tls for sc in scenarios.values()) else None

    def say(text: str) -> None:
        print(text, flush=True)
        if out is not None:
            out.write(text + "\n")
            out.flush()
    say(f"# fanout: bbo_stream {bs.__version__} vs python-socketio {_version('python-socketio')} "
        f"(python-engineio {_version('python-engineio')}, aiohttp {_version('aiohttp')})"
        + (f" and {_node_versions()}" if "node" in kinds else "") + f"; Python "
        f"{sys.version.split()[0]}, websockets {_version('websockets')}; {os.cpu_count()} CPUs shared by server, "
        f"{len(pool.procs)} load-client processes and the fake exchange; loopback; "
        f"{measure_s:.0f} s measured per run after 1 s warm-up; server logs in {logdir}")
    for note in notes:
        say(note)
    if _PIN["server"]:
        say(f"# --pin: server on CPU {sorted(_PIN['server'])}, load clients and fake exchange on the other CPU(s)")
    say(f"# bbo_stream.py at {_git_state()}"
        + (f"; {', '.join(rev_kinds)} = bbo_stream.py at that revision (git archive)" if rev_kinds else "")
        + f"; before each run, waits (≤ {args.max_wait:.0f} s) until the rest of the machine uses "
        f"≤ {args.quiet_cores:.2f} cores")
    say("# deliveries = bbo_update messages received by clients in the window (of their own symbols); latency = "
        "arrival at the client's socket (kernel receive timestamp) − fake send (same symbol and u), and to when the "
        "load client read it; newest price = time until a client holds a price at least as new as each published one; "
        "skipped = expected − delivered; CPU = server process utime+stime from /proc; KiB per connected client = "
        "server RSS after the clients joined − before (after 20 warm-up clients had come and gone); feed receive "
        "latency = serverTimestamp − fake send (1 ms resolution); ours-1t = bbo_stream.py with FANOUT_THREADS=0 "
        "(the event loop's thread writes alone); baseline = python-socketio; node relays with rooms where clients "
        "subscribe, python-socketio too")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    problems: list[str] = []
    for name, sc in scenarios.items():
        results[name] = {}
        for kind in kinds:
            if kind == "ours-1t" and (sc.rate == 0 or sc.clients < bs.FANOUT_PARALLEL_MIN_LINKS or sc.tls
                                      or sc.transport != "websocket"):
                continue                                    # no writer threads there: same as ours
            try:
                # On a shared machine, a run that other processes disturbed is repeated (best kept).
                attempts = 1 if quick or sc.rate == 0 else 1 + args.retries
                for attempt in range(1, attempts + 1):
                    r = await _run_one(kind, sc, pool, measure_s, logdir, problems,
                                       args.quiet_cores, 0.0 if quick else args.max_wait, tls_pair)
                    r["attempt"] = attempt
                    best = results[name].get(kind)
                    if best is None or r.get("others_cores", 0) < best.get("others_cores", 0):
                        results[name][kind] = r
                    if r.get("others_cores", 0) <= 2 * args.quiet_cores:
                        break
            except Exception as exc:  # noqa: BLE001 - report, go on with the next run
                problems.append(f"{name} {kind}: run failed: {type(exc).__name__}: {exc}")
                if kind not in results[name]:
                    say(f"{name:<12} {_fmt_rate(sc):<26} {kind:<8} FAILED: {type(exc).__name__}: {exc}")
                    continue
            refs = {k: v for k, v in results[name].items() if k in ("baseline", "node")} if kind.startswith("ours") else {}
            say(_line(sc, results[name][kind], refs))
    for line in _goals(results, scenarios, quick):
        say(line)
    if problems:
        say("problems seen:")
        for p in problems:
            say("  " + p)
    return 0


def _git_state() -> str:
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "bbo_stream.py"], cwd=here, capture_output=True,
                               text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown commit"
    return f"commit {head or '?'}" + (" with uncommitted changes" if dirty else "")


def _version(dist: str) -> str:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def bench_fanout(args: argparse.Namespace) -> int:
    _raise_nofile()
    pool = _ClientPool(args.client_procs or os.cpu_count() or 2)
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        _PIN["server"] = {cpus[0]}
        rest = set(cpus[1:]) or {cpus[0]}
        for pid in [*pool.pids(), os.getpid()]:
            os.sched_setaffinity(pid, rest)
    out = None
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        out = open(args.output, "w")  # noqa: SIM115 - closed in the finally below
    try:
        return asyncio.run(_fanout(args, pool, out))
    finally:
        pool.close()
        if out is not None:
            out.close()


# ---- dashboard: headless Chromium against a server on a pre-filled cache ----------

DASH_CHROMIUM = "/usr/bin/chromium"
DASH_CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync",
                      "--disable-dev-shm-usage"]


def _dash_feed_rate(feed: fake_binance.FakeBinanceThread, per_symbol: float) -> None:
    """Generator rate per symbol (two symbols: the total is twice this)."""
    feed.call(feed.fake.start_generator, ["btcusdt", "ethusdt"], per_symbol, decimals=(2, 3))


def _dash_prefilled_cache(cache_dir: Path, rows: int) -> int:
    """CACHE_DIR with `rows` raw BTCUSDT updates (the last rows/20 s) and a day of 1 s bars before them,
    written by bbo_stream's own classes.  Returns the number of bars written."""
    cfg = bs.Config(cache_dir=str(cache_dir), cache_max_items=rows, symbol=("BTCUSDT", "ETHUSDT"))
    src, _ = filled_history(rows, "BTCUSDT")
    history = bs.BboHistory(rows, cfg.bars_capacity)
    history.symbols["BTCUSDT"] = src.symbols["BTCUSDT"]
    history.get("ETHUSDT")
    bs.CachePersistence(cfg, history).flush_sync()
    return len(src.symbols["BTCUSDT"].bars)


def _dash_metrics(cdp: Any) -> dict[str, float]:
    return {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}


def _dash_main_thread(page: Any, seconds: float, domain: str = "timeTicks") -> dict[str, float]:
    """Main-thread busy fractions over `seconds` (CDP Performance metrics), messages and redraws per second.
    timeTicks: wall time of main-thread tasks; threadTicks: CPU time the main thread actually got."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable", {"timeDomain": domain})
    m0, p0 = _dash_metrics(cdp), page.evaluate("[bboDebug.state.stats.bboMessages, bboDebug.chart.drawCount()]")
    t0 = time.perf_counter()
    time.sleep(seconds)
    m1, p1 = _dash_metrics(cdp), page.evaluate("[bboDebug.state.stats.bboMessages, bboDebug.chart.drawCount()]")
    wall = time.perf_counter() - t0
    cdp.detach()
    out = {k: (m1[k] - m0[k]) / wall for k in ("TaskDuration", "ScriptDuration", "LayoutDuration",
                                                  "RecalcStyleDuration")}
    out["msgs"] = (p1[0] - p0[0]) / wall
    out["draws"] = (p1[1] - p0[1]) / wall
    return out


def bench_dashboard(quick: bool) -> None:
    """Dashboard figures in headless Chromium: chart redraw with 1,000,000 points, main-thread time at
    1,000 updates/s, size of the decimated series for a 1-day view."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("dashboard: SKIPPED: the playwright package is missing (pip install playwright==1.65.2)")
        return
    if not os.path.exists(DASH_CHROMIUM):
        print(f"dashboard: SKIPPED: {DASH_CHROMIUM} not found (apt-get install chromium)")
        return
    rows = 100_000 if quick else 1_000_000
    measure_s = 3.0 if quick else 5.0
    repeats = 3 if quick else 5
    tmp = Path(tempfile.mkdtemp(prefix="bbo-bench-dash-"))
    # the generator's random walk starts near the prefilled history's price, so the day view is one line
    fake_binance.START_PRICES["btc"] = 57_231.50
    # Playwright's sync API refuses a running event loop in this thread: the fake gets its own.
    feed = fake_binance.FakeBinanceThread(market="futures", seed=7, name="bench-fake-exchange", timeout=30.0)
    proc = None
    log = open(tmp / "server.log", "wb")  # noqa: SIM115 - the subprocess writes to it until the end
    try:
        t = time.perf_counter()
        bars = _dash_prefilled_cache(tmp / "cache", rows)
        prefill_s = time.perf_counter() - t
        port = fake_binance.free_port()
        proc = subprocess.Popen(
            [sys.executable, str(Path(bs.__file__).resolve()), "--symbol", "btcusdt,ethusdt", "--use-ssl", "false",
             "--web-host", "127.0.0.1", "--web-port", str(port), "--cache-dir", str(tmp / "cache"),
             "--cache-max-items", str(rows), "--websocket-base-url", feed.fake.base_url],
            stdout=log, stderr=subprocess.STDOUT, cwd=Path(bs.__file__).resolve().parent)
        url = f"http://127.0.0.1:{port}"
        deadline = time.perf_counter() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.perf_counter() > deadline:
                    raise RuntimeError(f"server did not start:\n{(tmp / 'server.log').read_text()[-2000:]}") from None
                time.sleep(0.1)
        feed.run(feed.fake.wait_for_subscribed("btcusdt"))
        _dash_feed_rate(feed, 5)                       # a quiet live feed (10 updates/s in total)
        print(f"dashboard: server restored {rows:,} raw updates + {bars:,} 1 s bars of BTCUSDT "
              f"(cache written in {prefill_s:.1f} s); headless Chromium, {os.cpu_count()} CPUs, no GPU "
              f"(software raster); load average {os.getloadavg()[0]:.1f} at the start")

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=DASH_CHROMIUM, args=DASH_CHROMIUM_ARGS)
            version = browser.version
            try:
                # --- 1. size of the decimated series for a 1-day view (the request the page itself makes)
                ctx = browser.new_context(viewport={"width": 1440, "height": 900})
                page = ctx.new_page()
                responses: list[Any] = []
                page.on("response", lambda r: responses.append(r) if "/api/history/series" in r.url else None)
                page.goto(url + "/?tf=1d&store=0")
                page.wait_for_function("() => { const b = window.bboDebug && bboDebug.chart.backfill(); "
                                       "return b && b.tier === 'bars' && b.n > 0; }", timeout=30_000)
                page.wait_for_timeout(300)
                series = [(r.url, len(r.body())) for r in responses if r.status == 200]
                def span_ms(u: str) -> int:
                    q = urllib.parse.parse_qs(urllib.parse.urlsplit(u).query)
                    return int(q["end_time"][0]) - int(q["start_time"][0])
                day = [(u, n) for u, n in series if span_ms(u) >= 86_000_000]
                if not day:
                    raise RuntimeError(f"the page made no 1-day series request: {series}")
                req_url, size = day[0]
                q = urllib.parse.parse_qs(urllib.parse.urlsplit(req_url).query)
                bf = page.evaluate("(() => { const b = bboDebug.chart.backfill(); "
                                   "return {n: b.n, bucket_ms: b.bucket_ms, tier: b.tier}; })()")
                print(f"dashboard: decimated series for a 1-day view (1440×900, as the page asks: "
                      f"buckets={q['buckets'][0]}): {size / 1000:.1f} kB JSON, {bf['n']} buckets of "
                      f"{bf['bucket_ms'] / 1000:g} s from the {bf['tier']} tier (goal ≤ 100 kB) "
                      f"{'OK' if size <= 100_000 else 'OVER'}")
                with urllib.request.urlopen(url + "/api/history/series?" + urllib.parse.urlencode(
                        {"symbol": "BTCUSDT", "start_time": q["start_time"][0], "end_time": q["end_time"][0],
                         "buckets": 1000}), timeout=10) as r:
                    big = len(r.read())
                print(f"dashboard:   for comparison, the largest request the page makes (1000 buckets, "
                      f"a plot 1000 px or wider): {big / 1000:.1f} kB")
                ctx.close()

                # --- 2. redraw with 1,000,000 points (median of 5 redraws incl. rasterisation, per call)
                views: tuple[tuple[str, Any, int], ...] = (
                    ("1440×900 @1x", {"width": 1440, "height": 900}, 1),
                    ("1440×900 @2x", {"width": 1440, "height": 900}, 2),
                    ("375×667 @2x", {"width": 375, "height": 667}, 2))
                for label, vp, dpr in views:
                    ctx = browser.new_context(viewport=vp, device_scale_factor=dpr)
                    page = ctx.new_page()
                    page.goto(url + "/?store=0")
                    page.wait_for_function("() => window.bboDebug && bboDebug.connection().state === 'connected' "
                                           "&& bboDebug.chart.pointCount() > 0", timeout=20_000)
                    page.wait_for_timeout(500)
                    normal = page.evaluate("(() => { const t = []; for (let i = 0; i < 9; i++) t.push(bboDebug.chart.redraw()); "
                                           "t.sort((a, b) => a - b); return [t[4], bboDebug.chart.pointCount()]; })()")
                    # the point count is read in the same task: the next live update finds the buffer full
                    # and drops its oldest tenth (PointBuffer._grow at MAX_POINTS)
                    runs = [page.evaluate("[bboDebug.loadSyntheticPoints(1_000_000), bboDebug.chart.pointCount()]")
                            for _ in range(repeats)]
                    ms = [r[0] for r in runs]
                    n = min(r[1] for r in runs)
                    ok = statistics.median(ms) <= 16
                    goal = f" (goal ≤ 16 ms) {'OK' if ok else 'OVER'}" if dpr == 1 and vp["width"] == 1440 else ""
                    print(f"dashboard: chart redraw with {n:,} points, {label}: median {statistics.median(ms):.1f} ms, "
                          f"range {min(ms):.1f}–{max(ms):.1f} ms over {repeats}×5 redraws{goal}; baseline: the live "
                          f"chart ({normal[1]:,} points) {normal[0]:.1f} ms")
                    ctx.close()

                # --- 3. main-thread time per second at 1,000 updates/s (and a quiet baseline)
                ctx = browser.new_context(viewport={"width": 1440, "height": 900})
                page = ctx.new_page()
                page.goto(url + "/?store=0")
                page.wait_for_function("() => window.bboDebug && bboDebug.connection().state === 'connected' "
                                       "&& bboDebug.transport() === 'websocket'", timeout=20_000)
                page.wait_for_timeout(2000)
                # interleaved windows (quiet, busy, busy CPU time) x rounds, medians: this machine is shared
                rounds = 1 if quick else 3
                quiet_w, busy_w, busy_c = [], [], []
                for _ in range(rounds):
                    _dash_feed_rate(feed, 5)
                    page.wait_for_timeout(1500)
                    quiet_w.append(_dash_main_thread(page, measure_s))
                    _dash_feed_rate(feed, 500)                     # 2 symbols × 500/s = 1,000 updates/s
                    page.wait_for_timeout(1500)
                    busy_w.append(_dash_main_thread(page, measure_s))
                    busy_c.append(_dash_main_thread(page, measure_s, "threadTicks"))
                _dash_feed_rate(feed, 5)

                def med(runs: list[dict[str, float]]) -> dict[str, float]:
                    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}

                def spread(runs: list[dict[str, float]]) -> str:
                    v = sorted(r["TaskDuration"] * 100 for r in runs)
                    return f" (range {v[0]:.1f}–{v[-1]:.1f}%)" if len(v) > 1 else ""
                busy, quiet, cpu = med(busy_w), med(quiet_w), med(busy_c)
                what = f"median of {rounds} × {measure_s:g} s" if rounds > 1 else f"{measure_s:g} s"
                for name, r, runs in (("1,000 updates/s", busy, busy_w), ("baseline, 10 updates/s", quiet, quiet_w)):
                    goal = f" (goal ≤ 20%) {'OK' if r['TaskDuration'] <= 0.20 else 'OVER'}" if r is busy else ""
                    print(f"dashboard: main thread at {name}, {what} (1440×900, 1m view): "
                          f"{r['TaskDuration'] * 100:.1f}% of wall time in tasks{spread(runs)}{goal} — script "
                          f"{r['ScriptDuration'] * 100:.1f}%, layout {r['LayoutDuration'] * 100:.1f}%, style "
                          f"{r['RecalcStyleDuration'] * 100:.1f}%; {r['msgs']:,.0f} bbo_update/s received, "
                          f"{r['draws']:.1f} chart redraws/s")
                print(f"dashboard:   at 1,000 updates/s in main-thread CPU time (threadTicks): "
                      f"{cpu['TaskDuration'] * 100:.1f}%{spread(busy_c)} (script {cpu['ScriptDuration'] * 100:.1f}%)")
                ctx.close()
            finally:
                browser.close()
        print(f"dashboard: Chromium {version} headless, Playwright sync API; CDP Performance.getMetrics "
              f"TaskDuration = main-thread task time (raster runs on other threads)")
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        feed.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ---- faults: kill -9 loop, full disk, refusing exchange (the real server as a subprocess) ----------

FAULT_FLUSH_S = 1.0             # CACHE_FLUSH_SECONDS of the server under test: the documented loss window
FAULT_WRITE_MARGIN_S = 0.2      # a flush's write + fsync and the timer's drift: a row this much older than the
                                # flush interval before a kill must be on disk
FAULT_RETRY_AFTER_S = 5         # Retry-After the refusing fake sends, where it can


class _FaultFeed:
    """The fake exchange (in a thread) sending a known sequence to FANOUT_SYMBOL at ``rate`` updates/s: ``u``
    strictly increasing, every price and quantity distinct. ``sent`` holds what reached a subscriber:
    (u, (bid, bidQty, ask, askQty) as the exact strings sent, wall time). ``handshakes``: (monotonic time,
    HTTP status answered, host) of every WebSocket handshake, from the fake's own record where it keeps one."""

    def __init__(self, rate: float) -> None:
        self.feed = fake_binance.FakeBinanceThread(market="futures", name="bench-fake-exchange", timeout=30.0)
        self.fake = self.feed.fake
        self.rate = rate
        self.paused = False
        self.sent: list[tuple[int, tuple[str, str, str, str], float]] = []
        self.handshakes_from = "the fake's handshake record"
        if not hasattr(self.fake, "handshakes"):           # older fake_binance: wrap its handshake hook
            self.handshakes_from = "handshakes recorded by the benchmark around the fake's process_request"
            self.fake.handshakes = []
            hook = self.fake._process_request

            def recording(ws: Any, request: Any) -> Any:
                response = hook(ws, request)
                self.fake.handshakes.append((time.monotonic(), response.status_code if response else 101, "?"))
                return response
            self.feed.run(self.fake.stop())                # serve() took the hook at start: restart on the port
            self.fake._process_request = recording
            self.feed.run(self.fake.start())
        self._task = self.feed.call(lambda: asyncio.get_running_loop().create_task(self._send()))

    async def _send(self) -> None:
        start, due_done, k = time.perf_counter(), 0, 0
        while True:
            due = int((time.perf_counter() - start) * self.rate)
            due_done = max(due_done, due - int(self.rate))      # a stalled loop replays at most 1 s
            for _ in range(due - due_done):
                if self.paused or not self.fake.subscribers(FANOUT_SYMBOL):
                    continue                                   # nobody would receive it: not part of the sequence
                k += 1
                bid = 2_000_000 + k                            # cents: 20000.01, 20000.02, ... never repeat
                prices = (f"{bid // 100}.{bid % 100:02d}", f"{k / 1000:.3f}",
                          f"{(bid + 7) // 100}.{(bid + 7) % 100:02d}", f"{k / 1000 + 1:.3f}")
                u = 1_000_000 + 3 * k
                self.fake.send_bbo(FANOUT_SYMBOL, *prices, u=u)
                self.sent.append((u, prices, time.time()))
            due_done = due
            await asyncio.sleep(0.005)

    def snapshot(self, start: int = 0) -> list[tuple[int, tuple[str, str, str, str], float]]:
        """``sent[start:]`` (``start``: an earlier ``len(snapshot())``, to see one scenario's rows)."""
        return self.feed.call(lambda: self.sent[start:])

    def wait_subscribed(self, timeout: float = 20.0) -> None:
        self.feed.run(self.fake.wait_for_subscribed(FANOUT_SYMBOL, timeout), timeout + 5)

    def wait_unsubscribed(self, timeout: float = 10.0) -> None:
        self.feed.run(self.fake.wait_for_connections(0, timeout), timeout + 5)

    def close(self) -> None:
        self.feed.call(self._task.cancel)
        self.feed.close()


def _get_json(port: int, path: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return json.loads(resp.read())


def _fault_server(feed: _FaultFeed, cache_dir: Path, logdir: Path) -> _ServerProc:
    """``python bbo_stream.py`` on ``cache_dir`` (persisting, flushing every FAULT_FLUSH_S), listening."""
    srv = _ServerProc("ours", feed.fake.base_url, logdir, {
        "CACHE_PERSIST": "true", "CACHE_DIR": str(cache_dir), "CACHE_FLUSH_SECONDS": f"{FAULT_FLUSH_S:g}"})
    try:
        asyncio.run(srv.wait_listening())
    except BaseException:
        srv.stop(signal.SIGKILL)
        raise
    return srv


def _read_history(port: int) -> list[dict[str, Any]]:
    """Every raw row of FANOUT_SYMBOL through /api/history/updates, oldest first: pages of 10,000 back in time
    by end_time (inclusive), so the rows of the boundary millisecond that the newer page has are cut off."""
    rows: list[dict[str, Any]] = []
    end, cut = 4_102_444_800_000, 0                          # 2100-01-01; rows of `end` already in `rows`
    for _ in range(1000):
        page = _get_json(port, f"/api/history/updates?symbol={FANOUT_SYMBOL.upper()}&start_time=0"
                               f"&end_time={end}&limit=10000", 30)["updates"]
        full = len(page) == 10_000
        page = page[:len(page) - cut]
        rows[:0] = page
        if not full or not page:
            return rows
        end = page[0]["serverTimestamp"]
        cut = sum(1 for r in rows if r["serverTimestamp"] == end)
    raise RuntimeError("history paging did not end after 1000 pages")


def _files(root: Path, pattern: str) -> tuple[int, int]:
    found = [p for p in root.rglob(pattern) if p.is_file()]
    return len(found), sum(p.stat().st_size for p in found)


def _disk_rows(root: Path) -> set[int]:
    """updateIds in the whole JSON lines of every raw cache file (what a loader could restore)."""
    ids: set[int] = set()
    for path in root.rglob("raw-*.json*"):
        for line in path.read_bytes().splitlines():
            try:
                ids.update(json.loads(line)["cols"]["updateId"])
            except (ValueError, KeyError, TypeError):
                pass
    return ids


def _compare(sent: list[tuple[int, tuple[str, str, str, str], float]],
             rows: list[dict[str, Any]]) -> tuple[set[int], int, int, int]:
    """(u sent and not restored, duplicate rows, rows whose strings differ from what was sent, rows never sent)."""
    by_u = {u: prices for u, prices, _ in sent}
    seen: set[int] = set()
    dup = changed = unknown = 0
    for r in rows:
        u = r["updateId"]
        if u in seen:
            dup += 1
        seen.add(u)
        if u not in by_u:
            unknown += 1
        elif (r["bidPrice"], r["bidQty"], r["askPrice"], r["askQty"]) != by_u[u]:
            changed += 1
    return set(by_u) - seen, dup, changed, unknown


def _goal(ok: bool) -> str:
    return "OK" if ok else "goal missed"


def _fault_kill_loop(feed: _FaultFeed, tmp: Path, runs: int, rng: random.Random) -> str:
    cache = tmp / "kill-cache"
    kills: list[float] = []                                  # wall time of each kill -9
    gone: list[float] = []                                   # ... and when the fake saw the connection close
    for _ in range(runs):
        srv = _fault_server(feed, cache, tmp)
        try:
            feed.wait_subscribed()
            time.sleep(rng.uniform(1.5, 4.0))
            kills.append(time.time())
            srv.stop(signal.SIGKILL)
        finally:
            srv.stop(signal.SIGKILL)
        feed.wait_unsubscribed()
        gone.append(time.time())
    feed.paused = True                                       # the last instance only reads back
    sent = feed.snapshot()
    tmp_files, tmp_bytes = _files(cache, "*.tmp")
    srv = _fault_server(feed, cache, tmp)
    try:
        rows = _read_history(srv.port)
    finally:
        srv.stop()
    feed.paused = False
    lost, dup, changed, unknown = _compare(sent, rows)
    window = FAULT_FLUSH_S + FAULT_WRITE_MARGIN_S
    old = late = 0
    for u, _, t in sent:
        if u in lost:
            kill = kills[next(i for i, g in enumerate(gone) if g >= t)]   # of the instance it was sent to
            if kill - t > window:
                old += 1
            else:
                late += 1
    quarantined = _files(cache, "*.corrupt-*")[0]
    bad = dup + changed + unknown
    return (f"faults: kill -9 ×{runs} (each after 1.5–4 s of recording): {len(sent):,} rows sent, "
            f"{len(rows):,} restored; lost older than {window:g} s before their kill (flush interval + "
            f"{FAULT_WRITE_MARGIN_S:g} s write margin): {old} (goal 0) {_goal(old == 0)}; lost within the last "
            f"{window:g} s: {late} (expected, the loss window; ≈{late / runs:.0f} per kill); duplicate/changed/"
            f"never-sent rows: {dup}/{changed}/{unknown} (goal 0) {_goal(bad == 0)}; leftover *.tmp: {tmp_files} "
            f"({tmp_bytes:,} B); quarantined *.corrupt-*: {quarantined} (goal 0) {_goal(quarantined == 0)}")


def _fault_full_disk(feed: _FaultFeed, tmp: Path, quick: bool) -> str:
    if os.geteuid() != 0:
        return "faults: full disk: SKIPPED: not root (mounting a tmpfs needs root)"
    disk = tmp / "disk"
    disk.mkdir()
    size_mib = 4
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "none", str(disk)],
                             capture_output=True, text=True, timeout=30, check=False)
    if mounted.returncode != 0:
        return f"faults: full disk: SKIPPED: mount -t tmpfs failed: {mounted.stderr.strip() or mounted.returncode}"
    srv: _ServerProc | None = None
    try:
        st = os.statvfs(disk)
        free_left = 48 * 1024                                   # ~5 s of journal at 200 updates/s
        ballast = disk / "ballast"
        with open(ballast, "wb") as fh:
            fh.write(b"\0" * (st.f_bavail * st.f_frsize - free_left))
        cache = disk / "cache"
        first = len(feed.snapshot())
        srv = _fault_server(feed, cache, tmp)
        feed.wait_subscribed()
        health_ok = health_fail = 0

        def health() -> bool:
            nonlocal health_ok, health_fail
            try:
                _get_json(srv.port, "/healthz", 2)
                health_ok += 1
                return True
            except (OSError, ValueError):
                health_fail += 1
                return False

        def errors() -> float:
            return srv.metrics("bbo_persist_errors_total").get("bbo_persist_errors_total", math.nan)

        deadline = time.monotonic() + (30 if quick else 60)
        while errors() == 0 and time.monotonic() < deadline and srv.proc.poll() is None:
            health()
            time.sleep(0.2)
        if not errors() > 0:
            raise RuntimeError(f"the disk did not fill within {30 if quick else 60} s (bbo_persist_errors_total "
                               f"{errors()}, server {'running' if srv.proc.poll() is None else 'exited'})")
        t_full = time.monotonic()
        before = _disk_rows(cache)                              # whole lines on disk when the first write failed
        full_s, after_s = (3, 4) if quick else (8, 8)
        while time.monotonic() < t_full + full_s:
            health()
            time.sleep(0.2)
        errors_full = errors()
        ballast.unlink()
        t_free = time.monotonic()
        while time.monotonic() < t_free + after_s:
            health()
            time.sleep(0.2)
        errors_total = errors()
        alive = srv.proc.poll() is None
        rc = srv.stop()
        on_disk = _disk_rows(cache)                             # after the final flush
        feed.paused = True                                   # the restarted server only reads back
        sent = {u for u, _, _ in feed.snapshot(first)}
        srv = _fault_server(feed, cache, tmp)
        try:
            restored = {r["updateId"] for r in _read_history(srv.port)}
        finally:
            srv.stop()
            srv = None
            feed.paused = False
        quarantined, q_bytes = _files(cache, "*.corrupt-*")
        after = on_disk - before
        ok = before <= restored and after <= restored
        return (f"faults: full disk (tmpfs {size_mib} MiB, {free_left // 1024} KiB left beside a ballast file; "
                f"{feed.rate:g} updates/s; full for {full_s} s, then the ballast deleted and {after_s} s more; SIGTERM): "
                f"rows flushed before the disk filled {len(before):,}, restored {len(before & restored):,}; rows "
                f"on disk from after it ({len(after):,}), restored {len(after & restored):,}; of {len(sent):,} sent "
                f"{len(restored & sent):,} restored (goal: every flushed row) {_goal(ok)}; quarantined *.corrupt-*: "
                f"{quarantined} ({q_bytes:,} B); bbo_persist_errors_total {errors_full:g} while full, "
                f"{errors_total:g} at the end; server {'stayed up' if alive else 'DIED'} (exit {rc} on SIGTERM), "
                f"/healthz answered {health_ok}/{health_ok + health_fail} polls "
                f"{_goal(alive and health_fail == 0 and rc == 0)}")
    finally:
        if srv is not None:
            srv.stop(signal.SIGKILL)
        for args in (["umount", str(disk)], ["umount", "-l", str(disk)]):
            if subprocess.run(args, capture_output=True, timeout=30, check=False).returncode == 0:
                break


def _fault_refusing(feed: _FaultFeed, tmp: Path, quick: bool) -> str:
    fake = feed.fake
    params = inspect.signature(fake.set_refuse).parameters
    if "status" in params and "retry_after" in params:
        how, retry_after = f"HTTP 429 with Retry-After: {FAULT_RETRY_AFTER_S}", float(FAULT_RETRY_AFTER_S)
        refuse: dict[str, Any] = {"status": 429, "retry_after": FAULT_RETRY_AFTER_S}
    else:
        how, retry_after, refuse = "HTTP 503 without Retry-After (this fake_binance cannot send 429/Retry-After)", \
            None, {}
    refuse_s = 5.0 if quick else 30.0
    srv = _fault_server(feed, tmp / "refuse-cache", tmp)
    try:
        def state() -> str:
            return _get_json(srv.port, "/healthz", 5)["feed"]["state"]
        deadline = time.monotonic() + 20
        while state() != "live":
            if time.monotonic() > deadline:
                raise RuntimeError("server not live within 20 s of starting")
            time.sleep(0.1)
        feed.feed.call(fake.set_refuse, True, **refuse)
        t_refuse = time.monotonic()
        feed.feed.run(fake.drop_all())
        time.sleep(refuse_s)
        feed.feed.call(fake.set_refuse, False)
        t_accept = time.monotonic()
        wait_s = 360.0                                        # longer than the backoff cap after repeated failures
        live_after = None
        while time.monotonic() < t_accept + wait_s:
            if state() == "live":
                live_after = time.monotonic() - t_accept
                break
            time.sleep(0.1)
        hs = [h for h in feed.feed.call(lambda: list(fake.handshakes)) if h[0] >= t_refuse]
        outages = _get_json(srv.port, f"/api/history/outages?symbol={FANOUT_SYMBOL.upper()}")["outages"]
    finally:
        srv.stop()
    times = [h[0] - t_refuse for h in hs]
    gaps = [b - a for a, b in zip(times, times[1:])]
    refused = [h for h in hs if h[1] != 101]
    early = (sum(1 for (a, b) in zip(hs, hs[1:]) if a[1] != 101 and b[0] - a[0] < retry_after - 0.05)
             if retry_after is not None else None)
    early_txt = (f"{early} sooner than the Retry-After (goal 0) {_goal(early == 0)}" if early is not None
                 else "no Retry-After sent, so none can come too soon")
    out = [f"{(o['end'] - o['start']) / 1000:.1f} s ({o['reason']})" if o["end"] else f"open ({o['reason']})"
           for o in outages]
    live_txt = f"{live_after:.1f} s" if live_after is not None else f"not within {wait_s:g} s (goal missed)"
    down_txt = f"{refuse_s + live_after:.1f} s" if live_after is not None else "-"
    return (f"faults: refusing exchange ({how}) for {refuse_s:g} s after dropping the connection: "
            f"{len(refused)} refused handshake(s) then {len(hs) - len(refused)} accepted, at "
            f"{', '.join(f'{t:.1f}' for t in times)} s; spacing {', '.join(f'{g:.1f}' for g in gaps) or '-'} s; "
            f"{early_txt}; live {live_txt} after the fake accepted again; outages recorded: "
            f"{'; '.join(out) or 'none (goal: one) goal missed'} (from the drop to live again: {down_txt})")


def bench_faults(quick: bool) -> int:
    """Faults against the real server: kill -9 loop, full disk, refusing exchange (see the module docstring)."""
    runs = 3 if quick else 20
    rate = 200.0
    print(f"# faults: bbo_stream {bs.__version__} at {_git_state()}, Python {sys.version.split()[0]}; "
          f"{Path(sys.executable).name} {' '.join(sys.argv)}; fake exchange {rate:g} updates/s of {FANOUT_SYMBOL} "
          f"(u strictly increasing, distinct exact prices); CACHE_FLUSH_SECONDS={FAULT_FLUSH_S:g}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bbo-bench-faults-"))
    feed = _FaultFeed(rate)
    scenarios: list[tuple[str, Callable[[], str]]] = [
        ("kill -9 loop", lambda: _fault_kill_loop(feed, tmp, runs, random.Random(1))),
        ("full disk", lambda: _fault_full_disk(feed, tmp, quick)),
        ("refusing exchange", lambda: _fault_refusing(feed, tmp, quick))]
    rc = 0
    try:
        for name, run in scenarios:
            t = time.perf_counter()
            try:
                line = run()
            except Exception as exc:  # a harness failure: say so, run the other scenarios, exit non-zero
                line, rc = f"faults: {name}: HARNESS FAILURE: {type(exc).__name__}: {exc}", 1
            print(f"{line} [{time.perf_counter() - t:.0f} s]", flush=True)
    finally:
        feed.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


# ---- hostile: misbehaving clients beside well-behaved ones, against the real server ----------------
#
# Each hostile kind runs in its own process (asyncio on raw non-blocking sockets, so that nothing reads a
# socket unless the kind says so), a bounded loop that stops at its deadline. Frames are masked with the
# all-zero key (valid per RFC 6455: the payload goes out unchanged, so 1 MB frames cost no Python work).

HOSTILE_KINDS = ("ping-no-read", "partial-attachments", "bad-post", "event-flood", "handshake-squat")
HOSTILE_RSS_GOAL_MIB = 200.0
HOSTILE_P99_GOAL_RATIO = 2.0
HOSTILE_RATE = 100.0              # updates/s from the fake exchange
HOSTILE_QUIET_CORES = 0.3         # before each scenario, wait until other processes use at most this...
HOSTILE_QUIET_MAX_WAIT_S = 60.0   # ...for at most this long (the machine is shared)
_MB = 1_000_000                   # "1 MB": MAX_PAYLOAD's default, the largest message the server accepts
_EIO_PATH = "/socket.io/?EIO=4&transport="
_CUT_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_DEFAULT_PER_ADDRESS = bs.SETTINGS_BY_NAME["MAX_SESSIONS_PER_ADDRESS"].default
_DEFAULT_NEW_PER_ADDRESS = bs.SETTINGS_BY_NAME["MAX_NEW_SESSIONS_PER_ADDRESS_PER_S"].default


def _ws_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


class _HostileConn:
    """One raw client socket of a hostile client: HTTP requests, the WebSocket upgrade, server frames."""

    def __init__(self, port: int, rcvbuf: int = 0, source: str = "127.0.0.1") -> None:
        self.port, self.rcvbuf, self.source = port, rcvbuf, source
        self.loop = asyncio.get_running_loop()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.buf = bytearray()

    async def connect(self) -> None:
        self.sock.setblocking(False)
        if self.rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        self.sock.bind((self.source, 0))
        await self.loop.sock_connect(self.sock, ("127.0.0.1", self.port))

    async def reconnect(self) -> None:
        """A new connection in place of one the server closed."""
        self.sock.close()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.buf.clear()
        await self.connect()

    async def _more(self) -> None:
        data = await self.loop.sock_recv(self.sock, 65536)
        if not data:
            raise ConnectionResetError("EOF")
        self.buf += data

    async def request(self, head: str, body: bytes = b"") -> tuple[int, bytes]:
        """Send one HTTP/1.1 request; (status, body) of the answer (101: no body, frames follow in buf)."""
        await self.loop.sock_sendall(self.sock, head.encode() + body)
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            await self._more()
        lines = bytes(self.buf[:end]).split(b"\r\n")
        del self.buf[:end + 4]
        status = int(lines[0].split(b" ", 2)[1])
        if status == 101:
            return status, b""
        length = next((int(v) for k, _, v in (ln.partition(b":") for ln in lines[1:])
                       if k.strip().lower() == b"content-length"), 0)
        while len(self.buf) < length:
            await self._more()
        out = bytes(self.buf[:length])
        del self.buf[:length]
        return status, out

    async def upgrade(self) -> int:
        key = __import__("base64").b64encode(os.urandom(16)).decode()
        status, _ = await self.request(
            f"GET {_EIO_PATH}websocket HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        return status

    async def frame(self) -> tuple[int, bytes]:
        """The next server frame (unmasked, unfragmented as this server sends them)."""
        while True:
            if len(self.buf) >= 2:
                n, start = self.buf[1] & 0x7F, 2
                if n == 126:
                    n, start = int.from_bytes(self.buf[2:4], "big"), 4
                elif n == 127:
                    n, start = int.from_bytes(self.buf[2:10], "big"), 10
                if len(self.buf) >= start + n and len(self.buf) >= start:
                    opcode, payload = self.buf[0] & 0x0F, bytes(self.buf[start:start + n])
                    del self.buf[:start + n]
                    return opcode, payload
            await self._more()

    async def join(self) -> None:
        """Socket.IO over the WebSocket: the Engine.IO open packet, then CONNECT "/" until answered."""
        if (status := await self.upgrade()) != 101:
            raise ConnectionRefusedError(f"upgrade answered {status}")
        sent = False
        for _ in range(100):
            opcode, payload = await self.frame()
            if opcode == 8:
                raise ConnectionResetError("close frame")
            if payload[:1] == b"0" and not sent:
                await self.send(_ws_frame(1, b"40"))
                sent = True
            elif payload[:2] == b"40":
                return
        raise ConnectionRefusedError("no CONNECT answer")

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def discard_until(self, deadline: float) -> bool:
        """Read and drop everything until the deadline; True when the server closed the connection."""
        try:
            while (left := deadline - time.perf_counter()) > 0:
                opcode, _ = await asyncio.wait_for(self.frame(), left)
                self.buf.clear() if len(self.buf) > 1 << 22 else None
                if opcode == 8:
                    return True
        except (asyncio.TimeoutError, TimeoutError):
            return False
        except (OSError, ValueError):
            return True
        return False

    async def closed_by_server(self, wait_s: float = 1.0) -> bool:
        """At the end: drain what waits (bounded); EOF, a reset or a close frame means the server cut it."""
        self.buf.clear()
        return await self.discard_until(time.perf_counter() + wait_s)

    def close(self) -> None:
        self.sock.close()


def _hostile_source(kind: str) -> str:
    """Each hostile kind is one attacker: its own loopback address (127.0.0.2, .3, ...), apart from the
    well-behaved clients on 127.0.0.1, so that MAX_SESSIONS_PER_ADDRESS applies as it would on a network."""
    return f"127.0.0.{2 + HOSTILE_KINDS.index(kind)}"


async def _hostile_client(kind: str, port: int, deadline: float, stats: collections.Counter) -> None:
    """One hostile client of `kind` until `deadline`; counts what happened in `stats`."""
    c = _HostileConn(port, rcvbuf=4096 if kind == "ping-no-read" else 0, source=_hostile_source(kind))
    cut = False
    try:
        await c.connect()
        if kind == "ping-no-read":                    # upgrade, then pings only; nothing is read again
            if await c.upgrade() != 101:
                stats["refused"] += 1
                return
            stats["connected"] += 1
            batch = _ws_frame(9, b"p" * 16) * 256
            try:
                while (left := deadline - time.perf_counter()) > 0:
                    await asyncio.wait_for(c.send(batch), left)
                    stats["pings sent"] += 256
            except (asyncio.TimeoutError, TimeoutError):
                stats["send blocked at the end"] += 1
            except _CUT_ERRORS:
                cut = True
            cut = cut or await c.closed_by_server()
        elif kind == "partial-attachments":           # 10 attachments announced, 9 sent, then silence
            await c.join()
            stats["connected"] += 1
            placeholders = ",".join(f'{{"_placeholder":true,"num":{i}}}' for i in range(10))
            await c.send(_ws_frame(1, f'4510-["x",{placeholders}]'.encode()))
            blob = _ws_frame(2, b"\xab" * _MB)
            try:
                for _ in range(9):
                    await asyncio.wait_for(c.send(blob), max(0.01, deadline - time.perf_counter()))
                    stats["1 MB attachments sent"] += 1
            except (asyncio.TimeoutError, TimeoutError):
                stats["send blocked at the end"] += 1
            cut = await c.discard_until(deadline) or await c.closed_by_server()
        elif kind == "event-flood":                   # joined "/", subscribe events as fast as it can
            await c.join()
            stats["connected"] += 1
            per_batch = 100
            batch = _ws_frame(1, b'42["subscribe",{"symbols":["BTCUSDT"]}]') * per_batch
            reader = asyncio.ensure_future(c.discard_until(deadline))
            start, sent = time.perf_counter(), 0
            try:
                while (left := deadline - time.perf_counter()) > 0 and not reader.done():
                    await asyncio.wait_for(c.send(batch), left)
                    sent += per_batch
                    ahead = sent / 10_000 - (time.perf_counter() - start)   # at most 10,000/s
                    await asyncio.sleep(ahead if ahead > 0 else 0)
            except (asyncio.TimeoutError, TimeoutError):
                stats["send blocked at the end"] += 1
            except _CUT_ERRORS:
                cut = True
            stats["events sent"] += sent
            stats["_events_per_s_sum"] += round(sent / max(1e-3, time.perf_counter() - start))
            cut = await reader or cut or await c.closed_by_server()
        elif kind in ("bad-post", "handshake-squat"):  # polling: 1 MB of invalid packets / bare handshakes
            body = (b"9not-a-packet\x1e" * (_MB // 14 + 1))[:_MB]
            host = f"Host: 127.0.0.1:{port}\r\n"
            while deadline - time.perf_counter() > 0:
                t = time.perf_counter()
                try:
                    status, text = await asyncio.wait_for(c.request(f"GET {_EIO_PATH}polling HTTP/1.1\r\n{host}\r\n"),
                                                          max(0.01, deadline - t))
                    stats[f"handshake {status}"] += 1
                    stats["connected"] += status == 200
                    if kind == "bad-post" and status == 200:
                        sid = json.loads(text[1:])["sid"]
                        status, _ = await asyncio.wait_for(c.request(
                            f"POST {_EIO_PATH}polling&sid={sid} HTTP/1.1\r\n{host}Content-Type: text/plain;charset=UTF-8"
                            f"\r\nContent-Length: {len(body)}\r\n\r\n", body), max(0.01, deadline - time.perf_counter()))
                        stats[f"1 MB POST answered {status}"] += 1
                        continue
                except (asyncio.TimeoutError, TimeoutError):
                    stats["request unanswered at the end"] += 1
                    break
                except (OSError, ValueError):
                    stats["connections closed by the server"] += 1
                    cut = True
                    await c.reconnect()
                    continue
                pause = 0.1 if kind == "bad-post" else 0.05   # bad-post: after a refusal; squat: ≤ 20/s each
                await asyncio.sleep(max(0.0, pause - (time.perf_counter() - t)))
        else:
            raise ValueError(kind)
    except _CUT_ERRORS:
        cut = True
    except (OSError, ValueError, asyncio.TimeoutError, TimeoutError) as exc:
        stats[f"error {type(exc).__name__}: {exc}"[:80]] += 1
    finally:
        stats["cut"] += cut
        c.close()


async def _hostile_main(kind: str, n: int, port: int, seconds: float) -> dict[str, int]:
    stats: collections.Counter[str] = collections.Counter()
    deadline = time.perf_counter() + seconds
    await asyncio.wait_for(asyncio.gather(*(_hostile_client(kind, port, deadline, stats) for _ in range(n))),
                           seconds + 30)
    if "_events_per_s_sum" in stats:
        stats["events/s per client (mean)"] = stats.pop("_events_per_s_sum") // max(1, stats["connected"])
    return dict(stats)


def _hostile_worker(pipe: Any, kind: str, n: int, port: int, seconds: float) -> None:
    """A hostile-client process: n clients of one kind for `seconds`, then its counts through the pipe."""
    _raise_nofile()
    try:
        pipe.send(asyncio.run(_hostile_main(kind, n, port, seconds)))
    except Exception as exc:  # noqa: BLE001 - reported by the parent as a harness failure
        pipe.send({"harness error": f"{type(exc).__name__}: {exc}"})


class _HostileProcs:
    """One process per hostile kind, started together, each stopping by itself."""

    def __init__(self, kinds: list[str], n: int, port: int, seconds: float) -> None:
        import multiprocessing
        ctx = multiprocessing.get_context("spawn")
        self.seconds = seconds
        self.items: list[tuple[str, Any, Any]] = []
        for kind in kinds:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_hostile_worker, args=(child, kind, n, port, seconds), daemon=True)
            proc.start()
            self.items.append((kind, parent, proc))

    def cpu_s(self) -> float:
        total = 0.0
        for _, _, proc in self.items:
            try:
                total += _proc_cpu_s(proc.pid)
            except OSError:
                pass
        return total

    async def results(self) -> dict[str, dict[str, int]]:
        out = {}
        for kind, pipe, _ in self.items:
            ready = await asyncio.to_thread(pipe.poll, self.seconds + 40)
            out[kind] = pipe.recv() if ready else {"harness error": "no result in time"}
        return out

    def close(self) -> None:
        for _, pipe, proc in self.items:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            pipe.close()


def _eio_counters(server: _ServerProc, timeout: float = 5.0) -> dict[str, float]:
    """The server's bbo_eio_* samples; {} when /metrics does not answer within `timeout`."""
    try:
        return server.metrics("bbo_eio_", timeout)
    except OSError:
        return {}


async def _hostile_run(kinds: list[str], good: int, per_kind: int, ramp_s: float, measure_s: float,
                       pool: _ClientPool, logdir: Path) -> dict[str, Any]:
    """One scenario: the server, `good` load clients, the hostile kinds (none: the quiet baseline)."""
    from fake_binance import FakeBinance
    res: dict[str, Any] = {}
    res["waited_s"], res["others_before"] = await _wait_quiet(pool, HOSTILE_QUIET_CORES, HOSTILE_QUIET_MAX_WAIT_S)
    async with FakeBinance(market="futures", port=0, record_send_times=True) as fake:
        # The default per-address limits: the hostile kinds come from addresses of their own.
        server = _ServerProc("ours", fake.base_url, logdir, {"MAX_SESSIONS_PER_ADDRESS": _DEFAULT_PER_ADDRESS,
                                                             "MAX_NEW_SESSIONS_PER_ADDRESS_PER_S": _DEFAULT_NEW_PER_ADDRESS})
        hostile: _HostileProcs | None = None
        try:
            await server.wait_listening()
            await fake.wait_for_subscribed(FANOUT_SYMBOL, timeout=20)
            await asyncio.sleep(0.5)
            res["rss_idle_kb"] = _proc_rss_kb(server.pid)
            res.update(await pool.start("127.0.0.1", server.port, good, 60))
            metrics0 = _eio_counters(server)
            fake.start_generator([FANOUT_SYMBOL], HOSTILE_RATE)
            await asyncio.sleep(1.0)                          # the good clients' warm-up
            if kinds:
                hostile = _HostileProcs(kinds, per_kind, server.port, ramp_s + measure_s + 1.0)
            h_cpu0, srv0 = (hostile.cpu_s() if hostile else 0.0), _proc_cpu_s(server.pid)
            busy0, pool0, self0 = _machine_busy_s(), pool.cpu_s(), time.process_time()
            t_ramp = time.perf_counter()
            t0 = t_ramp + ramp_s
            t1 = t0 + measure_s
            polls = {"ok": 0, "failed": 0, "sessions_peak": 0.0}

            async def poll_metrics() -> None:                 # off the RSS sampling: /metrics may stall
                while time.perf_counter() < t1:
                    t = time.perf_counter()
                    m = await asyncio.to_thread(_eio_counters, server, 2.0)
                    if m:
                        polls["ok"] += 1
                        polls["sessions_peak"] = max(polls["sessions_peak"], sum(
                            v for k, v in m.items() if k.startswith("bbo_eio_sessions")))
                    else:
                        polls["failed"] += 1
                    await asyncio.sleep(max(0.0, 0.5 - (time.perf_counter() - t)))
            poller = asyncio.ensure_future(poll_metrics())
            peak = res["rss_idle_kb"]
            while (now := time.perf_counter()) < t1:
                peak = max(peak, _proc_rss_kb(server.pid))
                await asyncio.sleep(min(0.25, max(0.0, t1 - now)))
            t1 = time.perf_counter()
            res["rss_end_kb"] = _proc_rss_kb(server.pid)
            res["rss_peak_kb"] = max(peak, res["rss_end_kb"])
            res["server_cores"] = (_proc_cpu_s(server.pid) - srv0) / (t1 - t_ramp)
            res["hostile_cores"] = ((hostile.cpu_s() - h_cpu0) / (t1 - t_ramp)) if hostile else 0.0
            res["others_cores"] = ((_machine_busy_s() - busy0 - (pool.cpu_s() - pool0) - (time.process_time() - self0))
                                   / (t1 - t_ramp) - res["server_cores"] - res["hostile_cores"])
            await poller
            res["polls"] = polls
            try:                                              # can a new client still open a session now?
                res["newcomer"] = await asyncio.wait_for(asyncio.to_thread(
                    lambda: urllib.request.urlopen(f"http://127.0.0.1:{server.port}{_EIO_PATH}polling",
                                                   timeout=3).status), 4)
            except urllib.error.HTTPError as exc:
                res["newcomer"] = exc.code
            except (OSError, asyncio.TimeoutError, TimeoutError) as exc:
                res["newcomer"] = type(exc).__name__
            await asyncio.sleep(1.0)                          # grace: in-flight updates of the window
            t_end = time.perf_counter()
            fake.stop_generator()
            out = await pool.stop()
            res.update(_analyse(out["received"], fake.sent_at, good, t0, t1, t_end))
            res.update(held=out["held"], lost=out["lost"])
            res["hostile"] = await hostile.results() if hostile else {}
            res["server_alive"] = server.proc.poll() is None
            for _ in range(3):                                # the hostile clients have stopped; a backlog may remain
                metrics1 = await asyncio.to_thread(_eio_counters, server, 10.0)
                if metrics1:
                    break
            res["counters"] = ({k[4:]: metrics1[k] - metrics0.get(k, 0.0) for k in metrics1
                                if k.endswith("_total") and metrics1[k] != metrics0.get(k, 0.0)}
                               if metrics1 else None)
        finally:
            if hostile is not None:
                hostile.close()
            server.stop()
            res["log_warnings"] = len(server.warnings())
    return res


def _hostile_line(name: str, r: dict[str, Any], quiet: dict[str, Any] | None, per_kind: int) -> str:
    above = (r["rss_peak_kb"] - r["rss_idle_kb"]) / 1024
    s = (f"hostile: {name:<19} RSS idle {r['rss_idle_kb'] / 1024:.0f} MiB, peak {above:+.0f} MiB above idle "
         f"({(r['rss_end_kb'] - r['rss_idle_kb']) / 1024:+.0f} at the window's end)")
    if not name.startswith("quiet"):
        s += f" (goal < {HOSTILE_RSS_GOAL_MIB:.0f}) {_goal(above < HOSTILE_RSS_GOAL_MIB)}"
    s += f"; good clients {r['held']}/{r['joined']} still connected, delivered {100 * r['delivered_frac']:.1f}%, "
    if math.isnan(r["lat_p99"]):
        s += "no update reached a good client's socket within the window"
    else:
        s += f"latency p50 {_ms(r['lat_p50'])} p99 {_ms(r['lat_p99'])}"
    if quiet is not None and r is not quiet:
        ratio = r["lat_p99"] / quiet["lat_p99"] if quiet.get("lat_p99") else math.nan
        s += f" = {ratio:.2f}× quiet" if not math.isnan(ratio) else " (p99 ratio: none)"
        if not name.startswith("quiet"):
            s += f" (goal ≤ {HOSTILE_P99_GOAL_RATIO:g}×) {_goal(ratio <= HOSTILE_P99_GOAL_RATIO)}"
    s += f"; newest price held p99 {_ms(r['fresh_p99'])} after each update sent in the window (not held ≥ 1 s after the window: never)"
    if r["lost"]:
        s += f", lost {r['lost']}"
    for kind, st in r["hostile"].items():
        st = dict(st)
        if "harness error" in st:
            s += f"; {kind}: HARNESS ERROR {st['harness error']}"
            continue
        cut, connected = st.pop("cut", 0), st.pop("connected", 0)
        rest = ", ".join(f"{k} {v:,}" for k, v in sorted(st.items()))
        s += f"; {kind}: {cut}/{per_kind} cut by the server (client side), sessions opened {connected:,}, {rest}"
    counters = ("/metrics did not answer" if r["counters"] is None else
                ", ".join(f"{k} {v:,.0f}" for k, v in sorted(r["counters"].items())) or "no change")
    polls = r["polls"]
    s += (f"; server counters from before the hostile clients to after they stopped: {counters}; Engine.IO "
          f"sessions peak {polls['sessions_peak']:,.0f} (/metrics answered {polls['ok']}/{polls['ok'] + polls['failed']} "
          f"polls within 2 s); a new polling handshake at the window's end: {r['newcomer']}; server CPU "
          f"{r['server_cores']:.2f} cores, hostile clients {r['hostile_cores']:.2f} cores, other processes "
          f"{r['others_cores']:.2f} cores (before the scenario: {r['others_before']:.2f}, after waiting "
          f"{r['waited_s']:.0f} s); "
          f"server {'up' if r['server_alive'] else 'EXITED'}; {r['log_warnings']} warning lines in its log")
    return s


def bench_hostile(quick: bool, kinds: list[str]) -> int:
    """Hostile clients beside well-behaved ones (see `python bench_bbo_stream.py hostile`); exit 1 on a harness failure."""
    _raise_nofile()
    good, per_kind = (20, 40) if quick else (50, 200)
    ramp_s, measure_s = (1.0, 2.5) if quick else (4.0, 12.0)
    pool = _ClientPool(1)
    logdir = Path(tempfile.mkdtemp(prefix="bbo-hostile-"))
    print(f"# hostile: bbo_stream {bs.__version__} at {_git_state()}, Python {sys.version.split()[0]}; "
          f"{Path(sys.executable).name} {' '.join(sys.argv)}; {os.cpu_count()} CPUs shared by the server, load "
          f"clients, hostile clients and the fake exchange ({HOSTILE_RATE:g} updates/s of {FANOUT_SYMBOL}); "
          f"server with its default settings (MAX_SESSIONS_PER_ADDRESS {_DEFAULT_PER_ADDRESS}, "
          f"MAX_NEW_SESSIONS_PER_ADDRESS_PER_S {_DEFAULT_NEW_PER_ADDRESS}); {good} well-behaved "
          f"WebSocket clients on 127.0.0.1; {per_kind} hostile clients per kind, each kind from an address of its own "
          f"(127.0.0.2 ...); each scenario a fresh server; hostile clients start 1 s after the feed, "
          f"{ramp_s:g} s ramp, then {measure_s:g} s measured; server logs in {logdir}", flush=True)
    print("# RSS = server VmRSS peak (sampled every 0.25 s) − its RSS before any client; latency = fake send → "
          "good client's socket (kernel timestamp); cut = hostile clients that saw EOF, a reset or a close frame; "
          "counters = /metrics bbo_eio_*_total from before the hostile clients start to after they stop (the probe "
          "handshake at the window's end is one of them)", flush=True)
    unknown = set(kinds) - set(HOSTILE_KINDS)
    if unknown:
        raise SystemExit(f"unknown hostile kinds: {', '.join(sorted(unknown))} (known: {', '.join(HOSTILE_KINDS)})")
    scenarios: list[tuple[str, list[str]]] = [("quiet", []), *((k, [k]) for k in kinds)]
    if not quick and len(kinds) > 1:
        scenarios += [("all-at-once", kinds), ("quiet-again", [])]   # the noise of the baseline
    rc, runs = 0, []
    try:
        for name, kinds in scenarios:
            t = time.perf_counter()
            try:
                r: dict[str, Any] | str = asyncio.run(_hostile_run(kinds, good, per_kind, ramp_s, measure_s, pool, logdir))
                if any("harness error" in st for st in r["hostile"].values()) or r["joined"] < good:
                    rc = 1
            except Exception as exc:  # a harness failure: say so, go on with the next scenario
                r, rc = f"hostile: {name}: HARNESS FAILURE: {type(exc).__name__}: {exc}", 1
            runs.append((name, r, time.perf_counter() - t))
            print(f"# {name} done [{runs[-1][2]:.0f} s]", file=sys.stderr, flush=True)
    finally:
        pool.close()
    # The reference is the quiet run with the lower p99: a quiet run disturbed by other processes must not
    # make the hostile runs look better than they are.
    quiet = min((r for name, r, _ in runs if name.startswith("quiet") and isinstance(r, dict)
                 and not math.isnan(r["lat_p99"])), key=lambda r: r["lat_p99"], default=None)
    print(f"# p99 ratios are to the quiet run with the lower p99 ({_ms(quiet['lat_p99']) if quiet else 'none'})",
          flush=True)
    for name, r, seconds in runs:
        line = r if isinstance(r, str) else _hostile_line(name, r, quiet, per_kind)
        print(f"{line} [{seconds:.0f} s]", flush=True)
    return rc



# ---- replay: import, /replay at speed 0 and paced, the ndjson export, against the real server --------
#
# One CSV in Binance's bookTicker schema (header, rows shuffled, prices and quantities as exact decimal
# strings) goes through `python bbo_stream.py import` into a fresh CACHE_DIR; the real server (a subprocess)
# then serves it. The clients run in another process (spawned): a raw WebSocket client that does the
# Engine.IO/Socket.IO handshake for /replay itself and counts bbo_update packets frame by frame, and an
# http.client reader of the ndjson export that counts lines. The server's RSS is sampled from /proc every
# few ms by a thread of this process.

REPLAY_SYMBOL = "BTCUSDT"
REPLAY_LIVE_SYMBOL = "ethusdt"          # the live feed's symbol (silent fake): nothing live mixes with the replay
REPLAY_T0_MS = 1_711_843_200_000        # 2024-03-31 00:00 UTC, the last day of Binance's bookTicker dumps
REPLAY_IMPORT_GOAL_S = 10.0             # goal: a 1,000,000-row import
REPLAY_RATE_GOAL = 200_000.0            # goal: updates/s at speed 0 to one raw WebSocket client
REPLAY_PACED_SPEED = 10.0
REPLAY_PACED_RANGE_MS = 60_000          # a minute of recording: 6 s at 10×
REPLAY_PACED_TOLERANCE = 0.01           # goal: the paced wall time within 1 % of range / speed
REPLAY_RSS_GOAL_MB = 20.0               # goal: RSS added by replaying 1,000,000 rows (MB = 10**6 bytes)
REPLAY_SHORT_ROWS = 10_000              # the short replay: its RSS growth is the long one's baseline
REPLAY_CLIENT_TIMEOUT_S = 300.0         # longest silence a client waits for (a stuck server fails the run)
REPLAY_QUIET_CORES = 0.3                # before each measured step, wait until other processes use at most this...
REPLAY_QUIET_MAX_WAIT_S = 60.0          # ...for at most this long (the machine is shared)
_REPLAY_UPDATE = b'42/replay,["bbo_update",'
_REPLAY_STATUS = b'42/replay,["replay_status",'


def _replay_csv(path: Path, n: int, seed: int = 7) -> tuple[np.ndarray, list[tuple[str, ...]]]:
    """Write n rows of Binance's bookTicker CSV (header first, rows shuffled) like a USD-M BTCUSDT day:
    prices in 0.1 ticks, quantities with 3 decimals (trailing zeros kept), T a few ms before E, about one
    row per ms (several in some ms). Returns every row's event time in time order (the import's order:
    serverTimestamp = E, ties by update_id) and the rows as strings, in that order."""
    rng = random.Random(seed)
    bid, uid, event = 700_000, 4_200_000_000_000, REPLAY_T0_MS
    rows: list[tuple[str, ...]] = []
    for _ in range(n):
        bid += rng.choice((-1, 0, 0, 1))
        uid += rng.randint(1, 40)
        event += rng.choice((0, 1, 1, 2))
        ask = bid + rng.choice((1, 1, 1, 2))
        rows.append((str(uid), f"{bid // 10}.{bid % 10}", f"{rng.randint(1, 20_000) / 1000:.3f}",
                     f"{ask // 10}.{ask % 10}", f"{rng.randint(1, 20_000) / 1000:.3f}",
                     str(event - rng.randint(0, 4)), str(event)))
    times = np.array([int(r[6]) for r in rows], np.int64)
    lines = [",".join(r) for r in rows]
    rng.shuffle(lines)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(bs.BINANCE_CSV_HEADER + "\n")
        f.write("\n".join(lines))
        f.write("\n")
    return times, rows


def _read_split_s(path: Path) -> float:
    """The baseline of the import: seconds Python takes to read the same file and split each line."""
    t = time.perf_counter()
    with open(path, encoding="utf-8", newline="") as f:
        for line in f:
            line.rstrip("\r\n").split(",")
    return time.perf_counter() - t


def _replay_count(port: int, auth: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """One /replay client over a raw WebSocket: upgrade, Engine.IO open, CONNECT /replay with ``auth``,
    then count bbo_update packets (frame by frame, never decoding their JSON) until replay_status "done".
    Times are perf_counter() s of this process; "connect" is when the CONNECT packet went out."""
    import base64
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {_EIO_PATH}websocket HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("EOF before the upgrade answer")
        buf += data
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"upgrade answered {head.splitlines()[0]!r}")
    buf = bytearray(rest)
    r: dict[str, Any] = {"count": 0, "bytes": len(rest), "other_events": 0, "statuses": [], "first": b"",
                         "last": b"", "connect": 0.0, "first_t": 0.0, "last_t": 0.0, "done": 0.0}
    count, other, nbytes, t_recv = 0, 0, len(rest), time.perf_counter()
    cpu0 = time.process_time()
    prefix = _REPLAY_UPDATE
    done = False
    while True:
        n, i, last_at = len(buf), 0, -1
        while n - i >= 2:                            # server frames: unmasked, unfragmented
            size = buf[i + 1] & 0x7F
            start = i + 2
            if size == 126:
                if n - i < 4:
                    break
                size, start = (buf[i + 2] << 8) | buf[i + 3], i + 4
            elif size == 127:
                if n - i < 10:
                    break
                size, start = int.from_bytes(buf[i + 2:i + 10], "big"), i + 10
            end = start + size
            if end > n:
                break
            if buf.startswith(prefix, start, end):
                if not count:
                    r["first"], r["first_t"] = bytes(buf[start:end]), t_recv
                count += 1
                last_at, last_end = start, end
            else:
                opcode, payload = buf[i] & 0x0F, bytes(buf[start:end])
                if opcode == 8:
                    raise ConnectionError(f"close frame {payload[:2].hex()} after {count} updates")
                if payload.startswith(b"0{"):        # Engine.IO open: join /replay
                    sock.sendall(_ws_frame(1, b"40/replay," + json.dumps(auth).encode()))
                    r["connect"] = time.perf_counter()
                    cpu0 = time.process_time()
                elif payload == b"2":                # Engine.IO ping
                    sock.sendall(_ws_frame(1, b"3"))
                elif payload.startswith(b"44/replay"):
                    raise ConnectionRefusedError(payload.decode(errors="replace")[:300])
                elif payload.startswith(_REPLAY_STATUS):
                    status = json.loads(payload[len(b"42/replay,"):])[1]
                    r["statuses"].append((time.perf_counter(), status["state"], status["position"]))
                    if status["state"] == "done":
                        r["done"] = time.perf_counter()
                        done = True
                elif payload.startswith(b"42/replay,"):
                    other += 1                       # outage events
            i = end
        if last_at >= 0:
            r["last"], r["last_t"] = bytes(buf[last_at:last_end]), t_recv
        del buf[:i]
        if done:
            break
        data = sock.recv(1 << 20)
        t_recv = time.perf_counter()
        if not data:
            raise ConnectionError(f"EOF after {count} updates")
        nbytes += len(data)
        buf += data
    r.update(count=count, other_events=other, bytes=nbytes, cpu_s=time.process_time() - cpu0)
    sock.close()
    return r


def _ndjson_count(port: int, target: str, timeout_s: float) -> dict[str, Any]:
    """GET ``target`` with http.client (HTTP/1.1, chunked) and count its lines; the first and last line."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    t0, cpu0 = time.perf_counter(), time.process_time()
    conn.request("GET", target)
    resp = conn.getresponse()
    lines = nbytes = 0
    first, tail = b"", b""
    while data := resp.read(1 << 20):
        if not first:
            first = data[:data.find(b"\n")]
        lines += data.count(b"\n")
        nbytes += len(data)
        tail = (tail + data[-4096:])[-4096:]
    conn.close()
    return {"status": resp.status, "type": resp.getheader("Content-Type"), "lines": lines, "bytes": nbytes,
            "first": first, "last": tail.rstrip(b"\n").rsplit(b"\n", 1)[-1], "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - cpu0}


def _replay_client_worker(pipe: Any) -> None:
    """The client process: runs ("replay", port, auth, timeout) and ("ndjson", port, target, timeout)
    until ("exit",); an exception goes back as {"error": ...}."""
    while (cmd := pipe.recv())[0] != "exit":
        try:
            pipe.send((_replay_count if cmd[0] == "replay" else _ndjson_count)(*cmd[1:]))
        except Exception as exc:  # noqa: BLE001 - reported by the parent as a harness failure
            pipe.send({"error": f"{type(exc).__name__}: {exc}"})


class _RssSampler:
    """A process's peak VmRSS (KiB), read from /proc every ``interval_s`` by a thread while in ``with``."""

    def __init__(self, pid: int, interval_s: float = 0.005) -> None:
        import threading
        self.pid, self.interval_s = pid, interval_s
        self.peak_kb = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak_kb = max(self.peak_kb, _proc_rss_kb(self.pid))
            self.samples += 1
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, _proc_rss_kb(self.pid))


class _ReplayBench:
    """The server under test, the client process, and the measurement of one client command at a time."""

    def __init__(self, server: _ServerProc, client_pipe: Any, client_pid: int) -> None:
        self.server, self.pipe, self.client_pid = server, client_pipe, client_pid

    def rss_kb(self, settle_s: float = 1.0) -> int:
        """The server's RSS once it settled: the highest of ``settle_s`` of samples."""
        with _RssSampler(self.server.pid, 0.05) as s:
            time.sleep(settle_s)
        return s.peak_kb

    def measure(self, *command: Any) -> dict[str, Any]:
        """Run one client command; its result with the server's peak RSS during it, the CPU seconds of the
        server, of the client and of the rest of the machine, and the wall time."""
        busy0, srv0, cli0, me0 = (_machine_busy_s(), _proc_cpu_s(self.server.pid), _proc_cpu_s(self.client_pid),
                                  time.process_time())
        t0 = time.perf_counter()
        with _RssSampler(self.server.pid) as rss:
            self.pipe.send(command)
            if not self.pipe.poll(REPLAY_CLIENT_TIMEOUT_S + 30):
                raise RuntimeError(f"no answer from the client process to {command[0]}")
            r = self.pipe.recv()
        wall = time.perf_counter() - t0
        if "error" in r:
            raise RuntimeError(f"{command[0]}: {r['error']}; server log: {self.server.log_tail(5)}")
        srv, cli = _proc_cpu_s(self.server.pid) - srv0, _proc_cpu_s(self.client_pid) - cli0
        others = _machine_busy_s() - busy0 - srv - cli - (time.process_time() - me0)
        r.update(peak_kb=rss.peak_kb, rss_samples=rss.samples, server_cpu_s=srv, client_proc_cpu_s=cli,
                 others_cores=others / wall, server_cores=srv / wall, wall=wall)
        return r


def _replay_wait_quiet(pids: list[int]) -> str:
    """Wait until the processes other than ``pids`` and this one use at most REPLAY_QUIET_CORES (at most
    REPLAY_QUIET_MAX_WAIT_S); how long it waited and how busy the rest of the machine was in the last second."""
    start = time.perf_counter()
    while True:
        b0, c0, s0, t0 = _machine_busy_s(), sum(_proc_cpu_s(p) for p in pids), time.process_time(), time.perf_counter()
        time.sleep(1.0)
        others = (_machine_busy_s() - b0 - (sum(_proc_cpu_s(p) for p in pids) - c0) - (time.process_time() - s0)) \
            / (time.perf_counter() - t0)
        waited = time.perf_counter() - start
        if others <= REPLAY_QUIET_CORES or waited >= REPLAY_QUIET_MAX_WAIT_S:
            return f"waited {waited:.0f} s for the machine to quieten: {others:.2f} cores busy in the last second"


def _mb(kb: float) -> str:
    return f"{kb * 1024 / 1e6:.1f} MB"


def _replay_row_check(packet: bytes, row: tuple[str, ...], skip: int) -> str:
    """'' when the packet (or ndjson line, after ``skip`` bytes) carries the CSV row digit for digit."""
    obj = json.loads(packet[skip:])
    obj = obj[1] if isinstance(obj, list) else obj
    got = (str(obj["updateId"]), obj["bidPrice"], obj["bidQty"], obj["askPrice"], obj["askQty"],
           str(obj["transactionTime"]), str(obj["timestamp"]))
    return "" if got == row else f"expected {row}, got {got}"


def _replay_update_line(name: str, r: dict[str, Any], expect: int, rows: list[tuple[str, ...]],
                        first: int, last: int) -> tuple[str, bool, float]:
    """One speed-0 replay: its line, whether every row arrived exactly, and updates/s (CONNECT → done)."""
    rate = r["count"] / (r["done"] - r["connect"])
    stream_rate = r["count"] / max(1e-9, r["last_t"] - r["first_t"])
    checks = [f"{r['count']:,} bbo_update packets of {expect:,} rows in the range"]
    exact = r["count"] == expect
    for label, packet, row in (("first", r["first"], rows[first]), ("last", r["last"], rows[last])):
        bad = _replay_row_check(packet, row, len(b"42/replay,"))
        exact = exact and not bad
        checks.append(f"{label} row {'exact' if not bad else 'WRONG: ' + bad}")
    line = (f"replay: {name}: {rate:,.0f} updates/s from CONNECT to 'done' ({r['done'] - r['connect']:.2f} s; "
            f"first → last update {stream_rate:,.0f}/s; {r['bytes'] / 1e6:.0f} MB over the WebSocket); "
            f"{', '.join(checks)}; server CPU {1e6 * r['server_cpu_s'] / r['count']:.2f} µs per update "
            f"({r['server_cores']:.2f} cores), counting client {r['client_proc_cpu_s'] / r['wall']:.2f} cores, rest of "
            f"the machine {r['others_cores']:.2f} cores")
    return line, exact, rate


def _replay_goal(ok: bool) -> str:
    return "met" if ok else "MISSED"


def bench_replay(quick: bool) -> int:
    """Import, /replay at speed 0 and at 10×, the ndjson export (see `python bench_bbo_stream.py replay`);
    exit 1 on a harness failure or a count that does not match (goals missed do not change it)."""
    import multiprocessing
    import re
    import resource
    n = 100_000 if quick else 1_000_000
    repeats = 1 if quick else 2
    here = Path(__file__).resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix="bbo-bench-replay-"))
    print(f"# replay: bbo_stream {bs.__version__} at {_git_state()}, Python {sys.version.split()[0]}; "
          f"{Path(sys.executable).name} {' '.join(sys.argv)}; {os.cpu_count()} CPUs shared by the server, the "
          f"client process and whatever else runs; {n:,} rows of {REPLAY_SYMBOL}; logs in {tmp}", flush=True)
    b0, t0 = _machine_busy_s(), time.perf_counter()
    time.sleep(2.0)
    print(f"# before the run, other processes used {(_machine_busy_s() - b0) / (time.perf_counter() - t0):.2f} "
          f"of {os.cpu_count()} cores (2 s); load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    client = ctx.Process(target=_replay_client_worker, args=(child,), daemon=True)
    client.start()
    feed = fake_binance.FakeBinanceThread(market="futures", name="bench-fake-exchange", timeout=30.0)
    server: _ServerProc | None = None
    goals: list[tuple[str, bool]] = []
    rc = 0
    try:
        # -- the CSV and its import ------------------------------------------------------------------
        csv_path = tmp / f"{REPLAY_SYMBOL}-bookTicker-2024-03-31.csv"
        t = time.perf_counter()
        times, rows = _replay_csv(csv_path, n)
        print(f"# CSV: {n:,} rows, {csv_path.stat().st_size / 1e6:.1f} MB, {(times[-1] - times[0]) / 1000:.0f} s "
              f"of exchange time, made in {time.perf_counter() - t:.1f} s", flush=True)
        split_s = _read_split_s(csv_path)
        cache_dir = tmp / "cache"
        print(f"# {_replay_wait_quiet([])}", flush=True)
        max_items = max(2 * n, 1_000_000)
        cmd = [sys.executable, str(here / "bbo_stream.py"), "import", str(csv_path), "--symbol", REPLAY_SYMBOL,
               "--cache-dir", str(cache_dir), "--cache-max-items", str(max_items)]
        ru0, busy0, t = resource.getrusage(resource.RUSAGE_CHILDREN), _machine_busy_s(), time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        import_s = time.perf_counter() - t
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        import_cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
        others = (_machine_busy_s() - busy0 - import_cpu) / import_s
        if done.returncode != 0:
            raise RuntimeError(f"import exited {done.returncode}: {done.stderr.strip()[-500:]}")
        goal_s = REPLAY_IMPORT_GOAL_S * n / 1_000_000
        said = re.search(r" in ([0-9.]+) s:", done.stdout)
        ok = import_s <= goal_s
        goals.append((f"import of {n:,} rows ≤ {goal_s:g} s", ok))
        print(f"replay: import of {n:,} rows (`bbo_stream.py import`, the whole command: interpreter start, "
              f"parse, sort, segments, bars): {import_s:.2f} s = {n / import_s:,.0f} rows/s = "
              f"{import_s / goal_s:.2f} × the goal of {goal_s:g} s → {_replay_goal(ok)} (the import's own time, as it "
              f"reports it: {said.group(1) if said else '?'} s); baseline: Python reading "
              f"and splitting the same file's lines {split_s:.2f} s (import = {import_s / split_s:.1f} ×); import "
              f"{import_cpu / import_s:.2f} cores, rest of the machine {others:.2f} cores; it said: "
              f"{done.stdout.strip()}", flush=True)

        # -- the server on that cache -------------------------------------------------------------------
        server = _ServerProc("ours", feed.fake.base_url, tmp, {
            "CACHE_PERSIST": "true", "CACHE_DIR": str(cache_dir), "CACHE_MAX_ITEMS": str(max_items)},
            symbols=(REPLAY_LIVE_SYMBOL,))
        asyncio.run(server.wait_listening(60))
        deadline = time.perf_counter() + 60
        while REPLAY_SYMBOL not in _get_json(server.port, "/api/history/symbols")["symbols"]:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"the server has no {REPLAY_SYMBOL} after 60 s: {server.log_tail(5)}")
            time.sleep(0.2)
        bench = _ReplayBench(server, parent, client.pid)
        idle_kb = bench.rss_kb()
        print(f"# server: RSS {_mb(idle_kb)} idle with the {n:,} rows loaded (CACHE_MAX_ITEMS {max_items:,})",
              flush=True)
        first_ms, last_ms = int(times[0]), int(times[-1])

        def replay(from_ms: int, to_ms: int, speed: float) -> tuple[dict[str, Any], int, int, int]:
            """Replay [from_ms, to_ms]; (result, expected rows, index of the first and last row)."""
            print(f"# {_replay_wait_quiet([server.pid, client.pid])}", flush=True)
            a, b = int(np.searchsorted(times, from_ms, "left")), int(np.searchsorted(times, to_ms, "right"))
            auth = {"symbols": [REPLAY_SYMBOL], "from": from_ms, "to": to_ms, "speed": speed}
            return bench.measure("replay", server.port, auth, REPLAY_CLIENT_TIMEOUT_S), b - a, a, b - 1

        # -- (a) speed 0, and (c) the server's memory while it replays --------------------------------------
        short_to = int(times[min(REPLAY_SHORT_ROWS, n) - 1])
        r, expect, a, b = replay(first_ms, short_to, 0)
        line, exact, _ = _replay_update_line(f"speed 0, short range ({expect:,} rows)", r, expect, rows, a, b)
        rc |= 0 if exact else 1
        short_growth_kb = r["peak_kb"] - idle_kb
        print(f"{line}; server RSS peak {_mb(r['peak_kb'])} ({_mb(short_growth_kb)} above idle)", flush=True)
        rates, growths = [], []
        for k in range(repeats):
            before_kb = bench.rss_kb(0.5)
            r, expect, a, b = replay(first_ms, last_ms, 0)
            line, exact, rate = _replay_update_line(f"speed 0, whole range, run {k + 1} of {repeats}", r, expect,
                                                   rows, a, b)
            rc |= 0 if exact else 1
            rates.append(rate)
            growths.append(r["peak_kb"] - idle_kb)
            print(f"{line}; server RSS peak {_mb(r['peak_kb'])}: {_mb(r['peak_kb'] - before_kb)} above the RSS "
                  f"before this run, {_mb(r['peak_kb'] - idle_kb)} above idle before any replay "
                  f"({r['rss_samples']} samples)", flush=True)
        after_kb = bench.rss_kb()
        ok = max(rates) >= REPLAY_RATE_GOAL
        goals.append((f"speed 0 ≥ {REPLAY_RATE_GOAL:,.0f} updates/s to one raw WebSocket client", ok))
        print(f"replay: speed 0 → best {max(rates):,.0f} updates/s (runs: {', '.join(f'{x:,.0f}' for x in rates)}) "
              f"= {max(rates) / REPLAY_RATE_GOAL:.2f} × the goal of {REPLAY_RATE_GOAL:,.0f}/s → {_replay_goal(ok)}",
              flush=True)
        worst_mb = max(growths) * 1024 / 1e6
        ok = worst_mb < REPLAY_RSS_GOAL_MB
        goals.append((f"RSS added by replaying {n:,} rows < {REPLAY_RSS_GOAL_MB:g} MB", ok))
        print(f"replay: memory → replaying {n:,} rows added at most {_mb(max(growths))} to the server's RSS "
              f"(peak over idle before any replay; baseline: {_mb(short_growth_kb)} for {REPLAY_SHORT_ROWS:,} rows); "
              f"idle {_mb(idle_kb)}, after the replays {_mb(after_kb)}; goal < {REPLAY_RSS_GOAL_MB:g} MB → "
              f"{_replay_goal(ok)}", flush=True)

        # -- (b) paced at 10× over a minute -------------------------------------------------------------
        span = last_ms - first_ms
        from_ms = first_ms + max(0, (span - REPLAY_PACED_RANGE_MS) // 2)
        to_ms = from_ms + REPLAY_PACED_RANGE_MS
        r, expect, a, b = replay(from_ms, to_ms, REPLAY_PACED_SPEED)
        target_s = REPLAY_PACED_RANGE_MS / 1000 / REPLAY_PACED_SPEED
        wall = r["done"] - r["connect"]
        error = (wall - target_s) / target_s
        exact = r["count"] == expect and not _replay_row_check(r["first"], rows[a], 10) \
            and not _replay_row_check(r["last"], rows[b], 10)
        rc |= 0 if exact else 1
        ok = abs(error) <= REPLAY_PACED_TOLERANCE
        goals.append((f"paced {REPLAY_PACED_SPEED:g}× over {REPLAY_PACED_RANGE_MS // 1000} s within "
                      f"{REPLAY_PACED_TOLERANCE:.0%} of {target_s:g} s", ok))
        playing = next((ts for ts, state, _ in r["statuses"] if state == "playing"), r["connect"])
        print(f"replay: paced {REPLAY_PACED_SPEED:g}× over {REPLAY_PACED_RANGE_MS / 1000:g} s ({expect:,} rows): "
              f"{wall:.3f} s from CONNECT to 'done' (the 'playing' status came {1000 * (playing - r['connect']):.1f} "
              f"ms after CONNECT, the last update {wall - (r['done'] - r['last_t']):.3f} s after it) against "
              f"{target_s:g} s: error {error:+.2%} → {_replay_goal(ok)}; {r['count']:,} updates "
              f"({'all, first and last exact' if exact else 'NOT all or not exact'}, {r['count'] / wall:,.0f}/s); server CPU "
              f"{1e6 * r['server_cpu_s'] / max(1, r['count']):.1f} µs per update ({r['server_cores']:.2f} cores), rest "
              f"of the machine {r['others_cores']:.2f} cores", flush=True)

        # -- (d) the ndjson export of the whole range ---------------------------------------------------------
        print(f"# {_replay_wait_quiet([server.pid, client.pid])}", flush=True)
        before_kb = bench.rss_kb(0.5)
        target = f"/api/history/updates?symbol={REPLAY_SYMBOL}&format=ndjson&start_time={first_ms}&end_time={last_ms}"
        r = bench.measure("ndjson", server.port, target, REPLAY_CLIENT_TIMEOUT_S)
        checks = [_replay_row_check(r["first"], rows[0], 0), _replay_row_check(r["last"], rows[-1], 0)]
        exact = r["status"] == 200 and r["lines"] == n and not any(checks)
        rc |= 0 if exact else 1
        growth_kb = r["peak_kb"] - before_kb
        ok = growth_kb * 1024 / 1e6 < REPLAY_RSS_GOAL_MB
        goals.append((f"ndjson export: RSS added < {REPLAY_RSS_GOAL_MB:g} MB (the replay's bound; the export "
                      f"streams in chunks)", ok))
        print(f"replay: ndjson export of the whole range: {r['lines'] / r['wall_s']:,.0f} rows/s ({r['lines']:,} "
              f"lines of {n:,} rows, {r['bytes'] / 1e6:.0f} MB in {r['wall_s']:.2f} s, HTTP {r['status']} "
              f"{r['type']}; {'first and last line exact' if not any(checks) else 'WRONG: ' + '; '.join(checks)}); "
              f"server RSS peak {_mb(r['peak_kb'])}, {_mb(growth_kb)} above before → {_replay_goal(ok)}; server "
              f"{r['server_cores']:.2f} cores, reading client {r['client_proc_cpu_s'] / r['wall']:.2f} cores, rest of the "
              f"machine {r['others_cores']:.2f} cores (no speed goal)", flush=True)
        warnings = server.warnings()
        if warnings:
            print(f"# server warnings ({len(warnings)}): " + " | ".join(w[-160:] for w in warnings[:5]), flush=True)
    except Exception as exc:  # a harness failure: say so, exit non-zero
        print(f"replay: HARNESS FAILURE: {type(exc).__name__}: {exc}", flush=True)
        rc = 1
    finally:
        if server is not None:
            server.stop()
        feed.close()
        try:
            parent.send(("exit",))
        except OSError:
            pass
        client.join(5)
        if client.is_alive():
            client.kill()
    print("# goals: " + "; ".join(f"{what}: {_replay_goal(ok)}" for what, ok in goals), flush=True)
    if rc == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    return rc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["data", "poll-cycle", "fanout", "dashboard", "faults", "hostile", "replay",
                                         "baseline-server"],
                        help="which benchmarks (baseline-server: the python-socketio relay fanout starts)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    fan = parser.add_argument_group("fanout")
    fan.add_argument("--connections", type=int, default=None,
                     help="connections of the 'held' scenario (default 10000; --quick 1000; 0 skips it)")
    fan.add_argument("--only", default="", help="comma-separated scenarios: 100x100,1000x100,tls-1000x100,"
                     "sym50-1000x3,poll-100x100,100x2000,idle,held")
    fan.add_argument("--servers", default="baseline,node,ours-1t,ours",
                     help="which servers to run: baseline (python-socketio), node (node socket.io, where npm ci "
                     "installed it), ours-1t (FANOUT_THREADS=0), ours")
    fan.add_argument("--compare-rev", default="", metavar="REV",
                     help="also run bbo_stream.py as it was at git revision REV (column ours@REV)")
    fan.add_argument("--seconds", type=float, default=12.0, help="measured seconds per run (default 12)")
    fan.add_argument("--client-procs", type=int, default=0, help="load-client processes (default: one per CPU)")
    fan.add_argument("--pin", action="store_true",
                     help="diagnosis: server alone on the first CPU, load clients and fake exchange on the others")
    fan.add_argument("--output", default="", help="also write the report to this file")
    fan.add_argument("--quiet-cores", type=float, default=0.3,
                     help="before each run, wait until other processes use at most this many cores")
    fan.add_argument("--max-wait", type=float, default=60.0, help="longest wait for that, in seconds")
    fan.add_argument("--retries", type=int, default=2,
                     help="repeat a load run whose window saw more than twice that other load (best kept)")
    hostile = parser.add_argument_group("hostile")
    hostile.add_argument("--kinds", default=",".join(HOSTILE_KINDS),
                         help="comma-separated hostile kinds, each run alone (all-at-once: all of them together)")
    fan.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    fan.add_argument("--feed", default="", help=argparse.SUPPRESS)
    fan.add_argument("--rooms", action="store_true", help=argparse.SUPPRESS)
    fan.add_argument("--certfile", default="", help=argparse.SUPPRESS)
    fan.add_argument("--keyfile", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.what == "baseline-server":
        asyncio.run(_baseline_server(args.port, args.feed, args.rooms, args.certfile, args.keyfile))
        return 0
    if args.what == "dashboard":
        bench_dashboard(args.quick)
        return 0
    if args.what == "fanout":
        return bench_fanout(args)
    if args.what == "faults":
        return bench_faults(args.quick)
    if args.what == "hostile":
        return bench_hostile(args.quick, [k for k in args.kinds.split(",") if k])
    if args.what == "replay":
        return bench_replay(args.quick)
    if args.what == "poll-cycle":
        bench_poll_cycle(args.quick)
        return 0
    rows = 100_000 if args.quick else 1_000_000
    print(f"# bbo_stream {bs.__version__}, Python {sys.version.split()[0]}, numpy {np.__version__}, "
          f"{os.cpu_count()} CPUs")
    bench_ingest(50_000 if args.quick else 200_000)
    bench_memory(rows // 4)
    bench_queries(rows)
    bench_restart(rows, 1)
    bench_stall(rows, 2_000, 5 if args.quick else 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
