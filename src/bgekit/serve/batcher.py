"""Dynamic batching: an async queue in front of one model, joining requests into batches
by token budget.

A request moves through three stages joined by small queues:

1. **tokenize** in a thread pool, off the event loop (the Rust tokenizer releases the
   GIL, so this overlaps with the forward pass of the batch in flight);
2. **forward** in the model's own thread: the worker takes queued requests in arrival order
   (of those already tokenized: one still in the pool is not waited for) until the next one
   would push the padded batch (items x longest) past
   ``max_batch_tokens``, and runs them as one batch. It never waits for a batch to fill:
   an idle server runs a lone request at once, and under load every request that arrived
   during one forward joins the next;
3. **post-process** back in the request's handler (the app renders JSON in a thread pool).

Back-pressure: with ``max_queue`` requests waiting, :meth:`Batcher.submit` refuses new ones
with :class:`Overloaded` (HTTP 429 + Retry-After). Health: the forward thread beats a
heartbeat after every chunk it runs; a batch in flight with no beat for ``stuck_after``
seconds marks the worker *stuck* (``/health`` turns red, new requests get 503), and
``failing_after`` consecutive failed batches mark it *failing*. A batch that raises is
re-run request by request, so only the request that breaks the model gets the error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

#: beat(): the forward stage calls it after each chunk so a long but progressing batch is not "stuck"
Beat = Callable[[], None]


class Overloaded(Exception):
    """The queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class WorkerUnavailable(Exception):
    """The model worker is stuck or stopped; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = retry_after


class ModelFailure(Exception):
    """The model raised while running this request."""


@dataclass
class Work:
    """One request's inputs after tokenization, waiting for the forward stage.

    ``lengths`` are the token counts of its items (texts or pairs), ``payload`` whatever the
    forward stage needs (token ids, options), ``n_tokens`` the usage to report, ``truncated``
    how many items were cut to the model's limit.
    """

    lengths: list[int]
    payload: Any
    n_tokens: int
    truncated: int = 0
    future: asyncio.Future | None = None
    enqueued_at: float = 0.0
    arrival: int = 0  # admission order, which the queue keeps (tokenization may finish out of order)
    dispatched: bool = False
    abandoned: bool = False

    @property
    def n_items(self) -> int:
        return len(self.lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths, default=1)


class _ForwardThread:
    """One daemon thread that runs the forward stage. A daemon, unlike a ThreadPoolExecutor
    worker, never holds up interpreter exit, so a server whose model is wedged still stops."""

    def __init__(self, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((future, fn, args))
        return future

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    def shutdown(self) -> None:
        self._queue.put(None)


class _Failed:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


@dataclass
class BatchStats:
    """What one forward batch did, for metrics."""

    requests: int
    items: int
    padded_tokens: int
    seconds: float
    queue_wait: list[float] = field(default_factory=list)
    failed: bool = False


class Batcher:
    """The queue and forward worker of one served model.

    ``forward(works, beat)`` runs in the worker thread and returns one result per work, in
    order; it may call ``beat()`` between chunks. Use :meth:`submit` from the event loop.
    """

    def __init__(
        self,
        name: str,
        forward: Callable[[list[Work], Beat], list[Any]],
        *,
        tokenize_pool: Executor,
        max_batch_tokens: int,
        max_queue: int,
        stuck_after: float,
        failing_after: int = 3,
        batch_wait: float = 0.0,
        on_batch: Callable[[str, BatchStats], None] | None = None,
    ):
        if max_batch_tokens < 1 or max_queue < 1 or stuck_after <= 0 or failing_after < 1 or batch_wait < 0:
            raise ValueError("max_batch_tokens, max_queue, stuck_after and failing_after must be positive")
        self.name = name
        self._forward = forward
        self._tokenize_pool = tokenize_pool
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.stuck_after = stuck_after
        self.failing_after = failing_after
        self.batch_wait = batch_wait
        self._on_batch = on_batch
        self._pending: deque[Work] = deque()
        self._queued = 0  # admitted and not yet dispatched (tokenizing or waiting)
        self._admitted = 0  # requests admitted so far: the next one's arrival number
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._forward_thread: _ForwardThread | None = None
        self._busy_since: float | None = None
        self._last_beat = 0.0
        self._lock = threading.Lock()
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self._items_per_second = 0.0  # moving average, for Retry-After
        self._running: list[Work] = []  # the batch the forward thread has now
        self.draining = False  # shutdown began: no new requests, admitted ones still run
        self._given_up: str | None = None  # shutdown's deadline passed: why unanswered requests fail

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._wake = asyncio.Event()
        self._forward_thread = _ForwardThread(f"bgekit-forward-{self.name}")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"bgekit-batcher-{self.name}")

    async def stop(self) -> None:
        """Stop taking work, fail what is queued, and let the forward thread go."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            work = self._pending.popleft()
            if work.future is not None and not work.future.done():
                work.future.set_exception(WorkerUnavailable("the server is shutting down"))
        if self._forward_thread is not None:
            self._forward_thread.shutdown()

    def drain(self) -> None:
        """Shutdown began: refuse new requests (503, and /health turns red so balancers move on);
        what was admitted still runs."""
        self.draining = True

    def fail_unfinished(self, reason: str) -> int:
        """Answer every admitted request not answered yet (queued, or in the running batch) with a
        503 saying ``reason``, so clients get a reply before the server cancels their handlers; also
        any request still tokenizing. Returns how many were failed."""
        self._given_up = reason
        failed = 0
        for work in [*self._running, *self._pending]:
            if work.future is not None and not work.future.done():
                work.future.set_exception(WorkerUnavailable(reason))
                failed += 1
        self._pending.clear()
        return failed

    # -- state ----------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Requests admitted and not yet dispatched: tokenizing, or waiting for the forward."""
        return self._queued

    @property
    def waiting(self) -> int:
        """Requests tokenized and waiting for the forward (``queued`` less those still tokenizing)."""
        return len(self._pending)

    def busy_seconds(self) -> float:
        """Seconds since the batch in flight last made progress; 0 when idle."""
        with self._lock:
            if self._busy_since is None:
                return 0.0
            return max(0.0, time.monotonic() - self._last_beat)

    def status(self) -> str:
        if self._task is None or self._task.done():
            return "stopped"
        if self.draining:
            return "stopping"
        if self.busy_seconds() > self.stuck_after:
            return "stuck"
        if self.consecutive_failures >= self.failing_after:
            return "failing"
        return "busy" if self._busy_since is not None else "ok"

    def healthy(self) -> bool:
        return self.status() in ("ok", "busy")

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained, from recent throughput (1 to 60)."""
        waiting = sum(w.n_items for w in self._pending) or self._queued
        if self._items_per_second <= 0:
            return 1
        return int(min(60, max(1, math.ceil(waiting / self._items_per_second))))

    # -- the request side -----------------------------------------------------------------
    async def submit(self, prepare: Callable[..., Work], *args: Any) -> tuple[Work, Any]:
        """Tokenize (``prepare(*args)`` in the tokenizer pool), queue, wait for the forward.

        Returns ``(work, result)``. Raises :class:`Overloaded` when the queue is full,
        :class:`WorkerUnavailable` when the worker is stuck or stopped, whatever ``prepare``
        raises (bad or too-long input), or :class:`ModelFailure` when the model raised.
        """
        if self.draining:
            raise WorkerUnavailable("the server is shutting down; retry on another instance")
        if self._queued >= self.max_queue:
            raise Overloaded(
                f"model {self.name!r} has {self._queued} requests waiting (the limit is --max-queue "
                f"{self.max_queue}); retry later",
                self.retry_after(),
            )
        status = self.status()
        if status in ("stuck", "stopped"):
            raise WorkerUnavailable(
                f"the worker of model {self.name!r} is {status}"
                + (f": its batch has made no progress for {self.busy_seconds():.0f} s" if status == "stuck" else "")
            )
        loop = asyncio.get_running_loop()
        self._queued += 1
        arrival = self._admitted
        self._admitted += 1
        work: Work | None = None
        try:
            work = await loop.run_in_executor(self._tokenize_pool, prepare, *args)
            if self._given_up is not None:
                raise WorkerUnavailable(self._given_up)
            work.future = loop.create_future()
            work.enqueued_at = time.monotonic()
            work.arrival = arrival
            self._queue_in_order(work)
            assert self._wake is not None, "Batcher.start() was not called"
            self._wake.set()
            return work, await work.future
        finally:
            if work is None or not work.dispatched:
                self._queued -= 1  # tokenization failed, or the client went away while queued
                if work is not None:
                    work.abandoned = True

    def _queue_in_order(self, work: Work) -> None:
        """Queue ``work`` behind every waiting work admitted before it: the tokenizer pool's threads
        may finish a later request first (almost always this is an append)."""
        index = len(self._pending)
        while index and self._pending[index - 1].arrival > work.arrival:
            index -= 1
        self._pending.insert(index, work)

    # -- the worker side ------------------------------------------------------------------
    def _take(self) -> list[Work]:
        """Queued works in arrival order while the padded batch stays within the token budget."""
        batch: list[Work] = []
        longest = items = 0
        while self._pending:
            work = self._pending[0]
            if work.abandoned or (work.future is not None and work.future.done()):
                self._pending.popleft()
                continue
            new_longest, new_items = max(longest, work.longest), items + work.n_items
            if batch and new_longest * new_items > self.max_batch_tokens:
                break
            self._pending.popleft()
            work.dispatched = True
            self._queued -= 1
            batch.append(work)
            longest, items = new_longest, new_items
        return batch

    def _beat(self) -> None:
        with self._lock:
            self._last_beat = time.monotonic()

    def _forward_isolated(self, batch: list[Work]) -> list[Any]:
        """Run the batch; if it raises, run each work alone so one bad request fails alone."""
        try:
            results = self._forward(batch, self._beat)
            if len(results) != len(batch):
                raise RuntimeError(f"forward returned {len(results)} results for {len(batch)} requests")
            return results
        except Exception as exc:
            if len(batch) == 1:
                logger.warning("model %s failed on a request: %s: %s", self.name, type(exc).__name__, exc)
                return [_Failed(exc)]
        logger.warning("model %s failed on a batch of %d requests; retrying them one by one", self.name, len(batch))
        out: list[Any] = []
        for work in batch:
            self._beat()
            try:
                out.append(self._forward([work], self._beat)[0])
            except Exception as exc:
                logger.warning("model %s failed on a request: %s: %s", self.name, type(exc).__name__, exc)
                out.append(_Failed(exc))
        return out

    async def _run(self) -> None:
        assert self._wake is not None and self._forward_thread is not None
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.batch_wait > 0 and sum(w.n_items * w.longest for w in self._pending) < self.max_batch_tokens:
                await asyncio.sleep(self.batch_wait)
            batch = self._take()
            if not batch:
                continue
            started = time.monotonic()
            with self._lock:
                self._busy_since = self._last_beat = started
            self._running = batch
            try:
                outcomes = await asyncio.wrap_future(self._forward_thread.submit(self._forward_isolated, batch))
            except Exception as exc:  # the stage itself failed: fail the batch
                outcomes = [_Failed(exc)] * len(batch)
            finally:
                self._running = []
                with self._lock:
                    self._busy_since = None
            elapsed = time.monotonic() - started
            failed = all(isinstance(o, _Failed) for o in outcomes)
            self._record(batch, outcomes, started, elapsed, failed)
            for work, outcome in zip(batch, outcomes, strict=True):
                if work.future is None or work.future.done():
                    continue  # the client went away
                if isinstance(outcome, _Failed):
                    error = outcome.error
                    work.future.set_exception(ModelFailure(f"{type(error).__name__}: {error}"))
                else:
                    work.future.set_result(outcome)

    def _record(self, batch: list[Work], outcomes: list[Any], started: float, elapsed: float, failed: bool) -> None:
        items = sum(w.n_items for w in batch)
        if failed:
            self.consecutive_failures += 1
            error = next(o.error for o in outcomes if isinstance(o, _Failed))
            self.last_error = f"{type(error).__name__}: {error}"[:500]
        else:
            self.consecutive_failures = 0
            rate = items / max(elapsed, 1e-6)
            self._items_per_second = rate if self._items_per_second <= 0 else 0.8 * self._items_per_second + 0.2 * rate
        if self._on_batch is not None:
            stats = BatchStats(
                requests=len(batch),
                items=items,
                padded_tokens=items * max(w.longest for w in batch),
                seconds=elapsed,
                queue_wait=[max(0.0, started - w.enqueued_at) for w in batch],
                failed=failed,
            )
            try:
                self._on_batch(self.name, stats)
            except Exception:  # metrics must never break serving
                logger.exception("recording batch metrics failed")
