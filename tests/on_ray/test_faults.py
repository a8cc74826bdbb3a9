"""Faults during a Ray job: a prediction actor killed mid-job loses no row and duplicates none."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from bnfold.on_ray import predict_dataset


def prediction_actor_pids(ray_temp_dir: str) -> set[int]:
    """The processes of this test session's Ray instance that run a PredictionActor (their
    parent is the raylet whose session files are in ``ray_temp_dir``)."""
    pids = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().decode(errors="replace")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            raylet = Path(f"/proc/{parent}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if title.startswith("ray::") and "PredictionActor" in title and ray_temp_dir in raylet:
            pids.add(int(proc.name))
    return pids


def test_a_prediction_actor_killed_mid_job_loses_and_repeats_no_row(ray_cluster, ray_temp_dir, shapes_onnx, shapes_x):
    import ray.data

    def slowly(batch: dict) -> dict:
        """An upstream step that makes the job last a few seconds (a local function: Ray's
        workers cannot import this test module, so it travels by value)."""
        time.sleep(0.2)
        return batch

    items = [f"s{i}" for i in range(len(shapes_x))]
    inputs = ray.data.from_items(
        [{"item": item, "data": x} for item, x in zip(items, shapes_x)], override_num_blocks=12
    )
    predictions = predict_dataset(
        shapes_onnx, inputs.map_batches(slowly, batch_size=2), batch_size=2, actors=1, cpus_per_actor=1
    )
    seen, killed, later = [], set(), set()
    for row in predictions.iter_rows():
        seen.append(row["item"])
        assert row["error"] is None
        if not killed:
            killed = prediction_actor_pids(ray_temp_dir)
            assert len(killed) == 1
            os.kill(next(iter(killed)), signal.SIGKILL)
        else:
            later |= prediction_actor_pids(ray_temp_dir)
    assert len(seen) == len(items) and sorted(seen) == sorted(items)
    assert later - killed, "no new actor took over from the killed one"
