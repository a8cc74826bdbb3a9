"""One model run at a time, in a thread, for a replica's event loop; the chunks that arrive while
a run is going wait and are joined into the next run, up to a row limit.

``@serve.batch`` forms a batch from what arrives within its wait window, and keeps forming the
next ones while the model runs: under load, if each of its batches were one run, runs would take
a few rows each however many requests wait. Handed to this queue instead, the batches that form
during a run are joined: the model always runs everything waiting, up to ``max_rows`` rows.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

Feeds = dict[str, np.ndarray]


@dataclass
class RunStats:
    """What the queue has run so far."""

    runs: int = 0
    rows: int = 0
    largest_run_rows: int = 0
    largest_run_chunks: int = 0

    def record(self, chunks: int, rows: int) -> None:
        self.runs += 1
        self.rows += rows
        self.largest_run_rows = max(self.largest_run_rows, rows)
        self.largest_run_chunks = max(self.largest_run_chunks, chunks)

    def summary(self) -> dict[str, int]:
        return asdict(self)


def rows_of(feeds: Feeds) -> int:
    """The rows (samples) of a chunk: the length of its arrays' first axis."""
    return next(iter(feeds.values())).shape[0]


def joinable(a: Feeds, b: Feeds) -> bool:
    """Whether two chunks can run as one batch: the same inputs, of the same sample shapes and
    dtypes (a model with free spatial axes takes requests of several sizes)."""
    return a.keys() == b.keys() and all(
        a[name].shape[1:] == b[name].shape[1:] and a[name].dtype == b[name].dtype for name in a
    )


class RunQueue:
    """Runs chunks of feeds through ``run`` (feeds -> outputs, model order) one call at a time in
    a worker thread, joining the chunks that wait, in order, into one call of at most ``max_rows``
    rows of one sample shape (a larger chunk runs alone): the oldest chunk with the chunks of its
    shape behind it (a dynamic-size model's requests of one size), the others in a later call.
    Each chunk gets its own rows of the outputs."""

    def __init__(self, run: Callable[[Feeds], list[np.ndarray]], max_rows: int) -> None:
        self._run = run
        self._max_rows = max_rows
        self._waiting: deque[tuple[Feeds, asyncio.Future[list[np.ndarray]]]] = deque()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bnfold-run")
        self._draining: asyncio.Task[None] | None = None
        self.stats = RunStats()

    @property
    def idle(self) -> bool:
        """Whether no run is going and no chunk waits for one."""
        return self._draining is None

    def submit(self, chunks: list[Feeds]) -> list[asyncio.Future[list[np.ndarray]]]:
        """Queue ``chunks`` (from the event loop); the future outputs (model order) of each."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in chunks]
        self._waiting.extend(zip(chunks, futures))
        if self._draining is None:
            self._draining = loop.create_task(self._drain())
        return futures

    async def _drain(self) -> None:
        """Run what waits, as long as something does."""
        try:
            while self._waiting:
                taken = [self._waiting.popleft()]
                rows = rows_of(taken[0][0])
                others: deque[tuple[Feeds, asyncio.Future[list[np.ndarray]]]] = deque()
                while self._waiting:  # the others of its shape, in order, up to the limit; the rest wait
                    waiting = self._waiting.popleft()
                    if not joinable(taken[0][0], waiting[0]):
                        others.append(waiting)
                    elif rows + rows_of(waiting[0]) <= self._max_rows:
                        rows += rows_of(waiting[0])
                        taken.append(waiting)
                    else:
                        others.append(waiting)
                        break
                self._waiting.extendleft(reversed(others))
                await self._run_taken(taken, rows)
        finally:
            self._draining = None

    async def _run_taken(self, taken: list[tuple[Feeds, asyncio.Future[list[np.ndarray]]]], rows: int) -> None:
        chunks = [chunk for chunk, _ in taken]
        self.stats.record(len(chunks), rows)
        try:
            feeds = chunks[0] if len(chunks) == 1 else {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
            outputs = await asyncio.get_running_loop().run_in_executor(self._worker, self._run, feeds)
        except Exception as exc:  # every request of this run gets the error (the run is shared)
            for _, future in taken:
                if not future.done():
                    future.set_exception(exc)
            return
        bounds = itertools.accumulate((rows_of(chunk) for chunk in chunks), initial=0)
        for (_, future), (start, stop) in zip(taken, itertools.pairwise(bounds)):
            if not future.done():  # a request whose client went away is cancelled
                future.set_result([out[start:stop] for out in outputs])
