"""The dynamic batcher on its own (in-process, a plain Python forward stage): token-budget
batches in arrival order, back-pressure, per-request failure isolation, the stuck heartbeat."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from bgekit.serve.batcher import Batcher, ModelFailure, Overloaded, Work, WorkerUnavailable


class Recorder:
    """A forward stage that records each batch's requests and can be held or made to fail."""

    def __init__(self):
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.release.set()

    def forward(self, works: list[Work], beat) -> list[str]:
        self.release.wait(timeout=10)
        names = [w.payload for w in works]
        self.batches.append(names)
        if any(name.startswith("bad") for name in names):
            raise RuntimeError(f"cannot run {names}")
        return [name.upper() for name in names]


def make(recorder: Recorder, **options) -> Batcher:
    settings = {"max_batch_tokens": 100, "max_queue": 100, "stuck_after": 5.0}
    settings.update(options)
    return Batcher("m", recorder.forward, tokenize_pool=ThreadPoolExecutor(2), **settings)


def work(name: str, length: int, items: int = 1) -> Work:
    return Work([length] * items, name, length * items)


async def until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.001)


async def hold_and_queue(batcher: Batcher, recorder: Recorder, requests: list[tuple[str, int]]):
    """Occupy the worker, queue ``requests`` behind it, then let everything run."""
    recorder.release.clear()
    try:
        first = asyncio.ensure_future(batcher.submit(work, "first", 1))
        await until(lambda: batcher.status() == "busy")  # the first request is in the (held) forward
        rest = [asyncio.ensure_future(batcher.submit(work, name, length)) for name, length in requests]
        await until(lambda: batcher.waiting == len(requests))  # tokenized and queued, not just admitted
    finally:
        recorder.release.set()
    return await asyncio.wait_for(asyncio.gather(first, *rest, return_exceptions=True), timeout=10)


def test_batches_follow_arrival_order_within_the_token_budget():
    async def main():
        recorder = Recorder()
        batcher = make(recorder, max_batch_tokens=100)
        batcher.start()
        try:
            # padded tokens = items x longest: a(10) b(20) c(30) fit as 3 x 30 = 90; d(40) would make 4 x 40
            results = await hold_and_queue(batcher, recorder, [("a", 10), ("b", 20), ("c", 30), ("d", 40), ("e", 5)])
        finally:
            await batcher.stop()
        return recorder.batches, results

    batches, results = asyncio.run(main())
    assert [r[1] for r in results] == ["FIRST", "A", "B", "C", "D", "E"]
    assert batches == [["first"], ["a", "b", "c"], ["d", "e"]]


def slow_work(name: str, length: int, seconds: float) -> Work:
    """A request whose tokenization takes ``seconds``."""
    time.sleep(seconds)
    return work(name, length)


def test_a_request_tokenized_late_keeps_its_place_in_the_queue():
    async def main():
        recorder = Recorder()
        batcher = make(recorder)
        batcher.start()
        recorder.release.clear()
        try:
            first = asyncio.ensure_future(batcher.submit(work, "first", 1))
            await until(lambda: batcher.status() == "busy")
            late = asyncio.ensure_future(batcher.submit(slow_work, "early", 5, 0.3))
            await asyncio.sleep(0.01)  # admitted first, tokenized last
            quick = asyncio.ensure_future(batcher.submit(slow_work, "later", 5, 0.0))
            await until(lambda: batcher.waiting == 2)
        finally:
            recorder.release.set()
        await asyncio.gather(first, late, quick)
        await batcher.stop()
        return recorder.batches

    assert asyncio.run(main()) == [["first"], ["early", "later"]]


def test_a_lone_request_runs_at_once():
    async def main():
        recorder = Recorder()
        batcher = make(recorder)
        batcher.start()
        try:
            started = time.perf_counter()
            _, result = await batcher.submit(work, "solo", 3)
            return result, time.perf_counter() - started
        finally:
            await batcher.stop()

    result, seconds = asyncio.run(main())
    assert result == "SOLO" and seconds < 1.0


def test_a_full_queue_refuses_with_retry_after():
    async def main():
        recorder = Recorder()
        batcher = make(recorder, max_queue=2)
        batcher.start()
        recorder.release.clear()
        try:
            running = asyncio.ensure_future(batcher.submit(work, "first", 1))
            await until(lambda: batcher.status() == "busy")
            queued = [asyncio.ensure_future(batcher.submit(work, n, 1)) for n in ("q1", "q2")]
            await until(lambda: batcher.queued == 2)
            with pytest.raises(Overloaded) as refused:
                await batcher.submit(work, "q3", 1)
            recorder.release.set()
            done = await asyncio.gather(running, *queued)
            return refused.value.retry_after, [r[1] for r in done]
        finally:
            recorder.release.set()
            await batcher.stop()

    retry_after, done = asyncio.run(main())
    assert retry_after >= 1 and done == ["FIRST", "Q1", "Q2"]


def test_a_failing_request_fails_alone():
    async def main():
        recorder = Recorder()
        batcher = make(recorder)
        batcher.start()
        try:
            return await hold_and_queue(batcher, recorder, [("ok1", 1), ("bad", 1), ("ok2", 1)]), recorder.batches
        finally:
            await batcher.stop()

    results, batches = asyncio.run(main())
    assert [r[1] for r in (results[0], results[1], results[3])] == ["FIRST", "OK1", "OK2"]
    assert isinstance(results[2], ModelFailure) and "cannot run ['bad']" in str(results[2])
    assert batches[1] == ["ok1", "bad", "ok2"]  # tried together first, then one by one
    assert batches[2:] == [["ok1"], ["bad"], ["ok2"]]


def test_a_batch_without_progress_marks_the_worker_stuck():
    async def main():
        recorder = Recorder()
        batcher = make(recorder, stuck_after=0.2)
        batcher.start()
        recorder.release.clear()
        try:
            running = asyncio.ensure_future(batcher.submit(work, "slow", 1))
            await asyncio.sleep(0.4)
            status = batcher.status()
            with pytest.raises(WorkerUnavailable, match="no progress"):
                await batcher.submit(work, "next", 1)
            recorder.release.set()
            await running
            return status, batcher.status()
        finally:
            recorder.release.set()
            await batcher.stop()

    stuck, after = asyncio.run(main())
    assert stuck == "stuck" and after == "ok"
