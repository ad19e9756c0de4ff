"""Micro-batching: images of concurrent requests scored together, each request answered with
its own rows.

:class:`MicroBatcher` admits a request's images only while fewer than ``queue_size`` images are
admitted and unanswered (:meth:`~MicroBatcher.admit`, else :class:`QueueFull`), and a worker
thread (its own, or one lent by the caller) scores the queued images in batches of up to
``batch_size``; ``helpers`` further workers each take a batch only while every worker before
them is scoring one, so that under load batches overlap. A batch that was all the admitted
work when taken is scored *alone*: no helper starts before it ends (one request at a time gets
the whole machine). After a batch's first
image it takes the images already queued and, while admitted images are still on their way
(their requests decoding them), waits for them up to ``max_wait_s``; with nothing on its way it
does not wait. Each image carries its own future, resolved with the row the scoring function
gave for it, so that a batch mixing several requests answers each with its own results.
Imports nothing of knnad or of the web framework.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from typing import Any, Callable, Deque, Iterator, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The request's images would exceed the batcher's ``queue_size``: try again later."""


class Admission:
    """The places of one request's images (see :meth:`MicroBatcher.admit`)."""

    def __init__(self, batcher: "MicroBatcher", count: int):
        self.batcher, self.coming = batcher, count

    async def score(self, items: Sequence[Any]) -> List[Any]:
        """The results of ``items`` (at most the admitted count), in their order, once the
        worker has scored them in whatever batches they fell in."""
        if len(items) > self.coming:
            raise ValueError(f"{len(items)} items for {self.coming} admitted places")
        futures: List[Future] = [Future() for _ in items]
        self.coming -= len(items)
        self.batcher._enqueue(list(zip(items, futures)))
        return list(await asyncio.gather(*map(asyncio.wrap_future, futures)))


class MicroBatcher:
    """Score items of concurrent requests in batches on a worker thread (and its helpers).

    Parameters
    ----------
    score
        Called on a worker thread with a list of up to ``batch_size`` items, the worker's
        number (0: the first; helpers 1, 2 ...) and whether the batch is scored alone (see
        above); returns one result per item, in their order. An exception fails every item of
        that batch.
    batch_size
        Most items per call of ``score``.
    queue_size
        Most items admitted at once (see :meth:`admit`).
    max_wait_s
        Most seconds a batch waits, after its first item, for admitted items on their way.
    helpers
        Further workers, each on a thread of its own, that take a batch only while every worker
        before them is scoring one.
    """

    def __init__(self, score: Callable[[List[Any], int, bool], Sequence[Any]], batch_size: int,
                 queue_size: int, max_wait_s: float, helpers: int = 0):
        self._score, self.batch_size = score, batch_size
        self.queue_size, self.max_wait_s = queue_size, max_wait_s
        self._busy = [False] * (1 + helpers)  # per worker: scoring a batch
        self._alone = False  # the first worker scores a batch alone: helpers wait
        self._ready = threading.Condition()
        self._queue: Deque[Tuple[Any, Future]] = deque()
        self._depth = 0  # admitted and not answered
        self._coming = 0  # admitted and not queued yet
        self._stopping = False
        self._threads: List[threading.Thread] = []
        self._lent: Optional[Future] = None  # the first worker on a thread of the caller's

    @property
    def depth(self) -> int:
        """Items admitted and not yet answered."""
        return self._depth

    @contextmanager
    def admit(self, count: int) -> Iterator[Admission]:
        """``with batcher.admit(count) as admission:`` reserves ``count`` places for the whole
        request (its decoding, waiting and scoring: ``await admission.score(items)``), and frees
        them when it ends; raises :class:`QueueFull` when fewer are free."""
        with self._ready:
            if self._depth + count > self.queue_size:
                raise QueueFull(f"{self._depth} images are waiting (at most {self.queue_size}); "
                                f"this request brings {count} more")
            self._depth += count
            self._coming += count
        admission = Admission(self, count)
        try:
            yield admission
        finally:
            with self._ready:
                self._depth -= count
                self._coming -= admission.coming  # never queued: a batch waits no more for them
                self._ready.notify_all()

    def _enqueue(self, pairs: List[Tuple[Any, Future]]) -> None:
        with self._ready:
            self._queue.extend(pairs)
            self._coming -= len(pairs)
            self._ready.notify_all()

    def start(self, executor: Optional[Executor] = None) -> None:
        """Start scoring: the first worker on a thread of its own, or on one of ``executor``'s,
        which it then holds until :meth:`close` (lend it a one-thread executor that has already
        done the scoring function's set-up, when that must happen on the thread that scores);
        each helper on a thread of its own."""
        self._stopping = False
        if executor is not None:
            self._lent = executor.submit(self._run, 0)
        self._threads = [threading.Thread(target=self._run, args=(worker,), daemon=True,
                                          name=f"knnad-batcher-{worker}")
                         for worker in range(0 if executor is None else 1, len(self._busy))]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Score what is queued, then stop the workers (blocks until they have)."""
        with self._ready:
            self._stopping = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join()
        if self._lent is not None:
            self._lent.result()
        self._threads, self._lent = [], None

    def _run(self, worker: int) -> None:
        while True:
            batch, alone = self._next_batch(worker)
            if not batch:
                return
            live = [(item, future) for item, future in batch
                    if future.set_running_or_notify_cancel()]  # a request gone: its items too
            self._answer(live, worker, alone)

    def _may_take(self, worker: int) -> bool:
        return bool(self._queue) and (worker == 0 or (all(self._busy[:worker])
                                                      and not self._alone))

    def _next_batch(self, worker: int) -> Tuple[List[Tuple[Any, Future]], bool]:
        """Up to ``batch_size`` queued items for ``worker`` once it may take them (see the
        class docstring): the first as soon as there is one, then those queued and, while
        admitted items are on their way, those that come within ``max_wait_s``; none once
        stopping with nothing it may take (the first worker takes what is left). And whether
        the batch is scored alone (decided here, under the lock: a helper's never is)."""
        with self._ready:
            while not self._may_take(worker) and not self._stopping:
                self._ready.wait()
            if not self._may_take(worker):
                return [], False
            batch: List[Tuple[Any, Future]] = []
            deadline = time.monotonic() + self.max_wait_s
            while self._queue and len(batch) < self.batch_size:
                batch.append(self._queue.popleft())
                while not self._queue and self._coming and not self._stopping \
                        and len(batch) < self.batch_size:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._ready.wait(remaining)
            self._busy[worker] = True  # only now: while this one gathers, later ones wait
            alone = worker == 0 and self._depth == len(batch)
            if worker == 0:
                self._alone = alone
            return batch, alone

    def _answer(self, batch: List[Tuple[Any, Future]], worker: int, alone: bool) -> None:
        """Score ``batch`` on ``worker`` (``alone``: see the class docstring), mark the worker
        free, then resolve the futures: a request answered finds its worker free (one client's
        next request goes to the first worker again, not to a helper)."""
        error: Optional[Exception] = None
        results: Sequence[Any] = []
        try:
            if batch:
                results = self._score([item for item, _ in batch], worker, alone)
                if len(results) != len(batch):
                    raise RuntimeError(f"scoring gave {len(results)} results for "
                                       f"{len(batch)} items")
        except Exception as failure:  # every request of the batch learns of it
            logger.exception("scoring a batch of %d images failed", len(batch))
            error = failure
        with self._ready:
            self._busy[worker] = False
            if worker == 0:
                self._alone = False
            self._ready.notify_all()
        for number, (_, future) in enumerate(batch):
            if error is None:
                future.set_result(results[number])
            else:
                future.set_exception(error)
