#!/usr/bin/env python3
"""Benchmarks of bbo_stream.py (figures for the README; not tests).

    python bench_bbo_stream.py data          # ingest, memory, queries, restart, loop stall
    python bench_bbo_stream.py data --quick  # smaller sizes, for a smoke run

Every figure is printed with its baseline from the same run, because these machines are
noisy: ratios are what to compare across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

import bbo_stream as bs


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
        return worst, persistence.lag_ms / 1000, segments
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_stall(rows: int, rate: int, seconds: float) -> None:
    worst, lag, segments = asyncio.run(_stall_run(rows, rate, seconds))
    print(f"persistence: longest event-loop stall {worst * 1000:.1f} ms (goal ≤ 50 ms) over {seconds:.0f} s of "
          f"{rate:,} updates/s into a {rows:,}-row cache, {segments} segment(s) compacted meanwhile")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["data"], help="which benchmarks")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (smoke run)")
    args = parser.parse_args()
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
