"""The run queue: one run at a time, waiting chunks joined up to the row limit, each chunk its own rows."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from bnfold.on_ray.run_queue import RunQueue


def chunk(first: int, rows: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(first, first + rows, dtype=np.float32).reshape(rows, 1)}


class Model:
    """Doubles its input; the first run waits until released, so that others queue behind it."""

    def __init__(self, fail_on: float | None = None) -> None:
        self.release = threading.Event()
        self.runs: list[int] = []
        self.fail_on = fail_on

    def __call__(self, feeds):
        self.release.wait(timeout=10)
        x = feeds["x"]
        self.runs.append(len(x))
        if self.fail_on is not None and self.fail_on in x:
            raise RuntimeError("bad row")
        return [x * 2, x + 100]


async def outputs(queue: RunQueue, chunks: list[dict]) -> list:
    return list(await asyncio.gather(*queue.submit(chunks)))


async def run_while_first_waits(queue: RunQueue, model: Model, batches: list[list[dict]]) -> list:
    first = asyncio.ensure_future(outputs(queue, batches[0]))
    await asyncio.sleep(0.05)  # the first run has started and waits for release
    rest = [asyncio.ensure_future(outputs(queue, b)) for b in batches[1:]]
    await asyncio.sleep(0.05)
    model.release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def test_chunks_that_wait_are_joined_up_to_the_row_limit_and_each_gets_its_rows():
    model = Model()
    queue = RunQueue(model, max_rows=4)
    batches = [[chunk(0, 1)], [chunk(10, 2), chunk(20, 1)], [chunk(30, 1)], [chunk(40, 3)], [chunk(50, 5)]]
    answers = asyncio.run(run_while_first_waits(queue, model, batches))
    assert model.runs == [1, 4, 3, 5]  # 2+1+1 joined; 3 alone (4+3 > 4); a chunk over the limit alone
    for batch, answer in zip(batches, answers):
        for sent, (doubled, shifted) in zip(batch, answer):
            np.testing.assert_array_equal(doubled, sent["x"] * 2)
            np.testing.assert_array_equal(shifted, sent["x"] + 100)
    assert queue.stats.summary() == {"runs": 4, "rows": 13, "largest_run_rows": 5, "largest_run_chunks": 3}


def test_an_error_reaches_every_chunk_of_its_run_and_the_next_run_works():
    model = Model(fail_on=20)
    queue = RunQueue(model, max_rows=8)
    answers = asyncio.run(
        run_while_first_waits(queue, model, [[chunk(0, 1)], [chunk(10, 1)], [chunk(20, 1)], [chunk(30, 9)]])
    )
    assert isinstance(answers[1], RuntimeError) and isinstance(answers[2], RuntimeError)
    np.testing.assert_array_equal(answers[0][0][0], [[0.0]])
    np.testing.assert_array_equal(answers[3][0][1][:, 0], np.arange(30, 39) + 100)


@pytest.mark.parametrize("rows", [1, 3])
def test_a_lone_chunk_runs_at_once(rows):
    model = Model()
    model.release.set()
    (answer,) = asyncio.run(outputs(RunQueue(model, max_rows=2), [chunk(7, rows)]))
    np.testing.assert_array_equal(answer[0][:, 0], np.arange(7, 7 + rows) * 2)


def test_chunks_are_grouped_by_sample_shape_in_order_and_each_gets_its_rows():
    model = Model()
    queue = RunQueue(model, max_rows=8)
    wide = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    batches = [[chunk(0, 1)], [chunk(10, 1)], [wide], [chunk(20, 1), chunk(30, 1)]]
    answers = asyncio.run(run_while_first_waits(queue, model, batches))
    assert model.runs == [1, 3, 2]  # the narrow chunks behind the wide one join the first; the wide one runs next
    for batch, answer in zip(batches, answers):
        for sent, (doubled, _) in zip(batch, answer):
            np.testing.assert_array_equal(doubled, sent["x"] * 2)
