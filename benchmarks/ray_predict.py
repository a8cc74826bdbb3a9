"""`bnfold predict --ray` against the local Predictor loop, same model and inputs, one run.

    python benchmarks/ray_predict.py [--items 2560] [--batch-size 64] [--rounds 3] [--gpu] [--json out.json]

The model: a ResNet-18-shaped network (3x224x224, random weights), exported by bnfold. The
inputs: ``--items`` samples in .npy files of one batch each, written once to a temporary folder.

- local: a loop that reads each file (numpy.load) and runs Predictor.predict on it, in this
  process, the model already loaded (all cores: ONNX Runtime's default threads), over half the
  files.
- ray, N actors (N = 1, 2), in this process on a local Ray instance started once per N: the
  pipeline of ``bnfold predict --ray`` (predict_dataset: the checks before the job, Ray's file
  reader, the actors) over all the files, consumed with iter_batches. "job": from the call to the
  last batch (actor start-up included); "start-up": to the first batch, less what one batch takes
  in the steady state; "steady": the rows after the first batch over the time from it to the
  last one.
- The machine's speed drifts by tens of percent over minutes, so the local loop runs before and
  after each Ray round (L R L R L R L) and each round is compared with the mean of its two
  neighbours; the figures are the medians over ``--rounds`` rounds.
- command: ``bnfold predict DIR --ray --actors N --batch-size B -o OUT.parquet`` once, in a
  subprocess: its summary line's time (write_predictions: the job with the parquet writer) and
  the whole command (also starting Python, bnfold's CLI and a local Ray instance, and stopping it),
  against the last local rate.

``--gpu``: also 1 actor with ``--gpus-per-actor 1`` against the local loop on CUDA.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from models import resnet18

import bnfold

SUMMARY = re.compile(r"^(\d+) rows, (\d+) failed, in ([\d.]+) s")


def write_inputs(folder: Path, items: int, batch: int) -> list[Path]:
    """``items`` random 3x224x224 samples, a file per ``batch`` of them."""
    rng = np.random.default_rng(0)
    files = []
    for start in range(0, items, batch):
        files.append(folder / f"x_{start:06d}.npy")
        np.save(files[-1], rng.standard_normal((min(batch, items - start), 3, 224, 224), dtype=np.float32))
    return files


def local_loop(model: Path, files: list[Path], device: str) -> float:
    """Seconds to read every file and predict it with one Predictor (loaded beforehand)."""
    predictor = bnfold.Predictor(model, device=device)
    predictor.predict(np.load(files[0])[:2])  # warm-up: the first run allocates
    start = time.perf_counter()
    for file in files:
        predictor.predict(np.load(file))
    return time.perf_counter() - start


def ray_command(model: Path, folder: Path, out: Path, options: list[str]) -> tuple[float, float]:
    """(seconds of the job by its summary line, seconds of the whole command)."""
    command = [sys.executable, "-m", "bnfold.cli.main", "predict", str(model), str(folder), "--ray", "-o", str(out)]
    start = time.perf_counter()
    result = subprocess.run([*command, *options], capture_output=True, text=True)
    wall = time.perf_counter() - start
    match = SUMMARY.match(result.stdout)
    if result.returncode != 0 or match is None:
        raise SystemExit(f"bnfold predict --ray failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return float(match.group(3)), wall


def ray_round(model: Path, folder: Path, batch: int, actors: int, gpus: float) -> dict[str, float]:
    """One Ray job over every file in ``folder``: job and start-up seconds, steady-state rows/s."""
    from bnfold.on_ray import predict_dataset

    start = time.perf_counter()
    predictions = predict_dataset(model, folder, batch_size=batch, actors=actors, gpus_per_actor=gpus)
    arrivals, rows = [], []
    for part in predictions.iter_batches(batch_size=None):
        arrivals.append(time.perf_counter())
        rows.append(len(part["item"]))
    first, last = arrivals[0], arrivals[-1]
    steady = sum(rows[1:]) / (last - first)
    return {"rows": sum(rows), "job_s": last - start, "startup_s": first - start - rows[0] / steady, "steady": steady}


def variant(
    model: Path, folder: Path, files: list[Path], args: argparse.Namespace, device: str, actors: int, gpus: float
) -> dict[str, float]:
    """The medians over the rounds of one variant, then the command once."""
    from bnfold.on_ray import ray_instance

    local_files = files[: max(1, len(files) // 2)]
    local_items = sum(np.load(f, mmap_mode="r").shape[0] for f in local_files)
    locals_ = [local_items / local_loop(model, local_files, device)]
    rounds = []
    with ray_instance(temp_dir=tempfile.mkdtemp(prefix="bnfold-ray-"), token_auth=False):
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        for _ in range(args.rounds):
            rounds.append(ray_round(model, folder, args.batch_size, actors, gpus))
            locals_.append(local_items / local_loop(model, local_files, device))
    neighbours = [(a + b) / 2 for a, b in itertools.pairwise(locals_)]
    assert all(r["rows"] == args.items for r in rounds)
    options = ["--actors", str(actors), "--batch-size", str(args.batch_size)]
    options += ["--gpus-per-actor", str(gpus)] if gpus else []
    job, wall = ray_command(model, folder, folder.parent / f"out_{device}_{actors}.parquet", options)
    return {
        "local_rows_per_s": statistics.median(neighbours),
        "job_ratio": statistics.median(args.items / r["job_s"] / n for r, n in zip(rounds, neighbours)),
        "steady_ratio": statistics.median(r["steady"] / n for r, n in zip(rounds, neighbours)),
        "startup_s": statistics.median(r["startup_s"] for r in rounds),
        "steady_rows_per_s_per_actor": statistics.median(r["steady"] for r in rounds) / actors,
        "command_job_s": job,
        "command_s": wall,
        "command_job_ratio": args.items / job / locals_[-1],
        "command_ratio": args.items / wall / locals_[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2560)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file in ~/.ray for a benchmark
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bnfold-ray-bench-") as tmp:
        folder, model = Path(tmp) / "inputs", Path(tmp) / "resnet18.onnx"
        folder.mkdir()
        files = write_inputs(folder, args.items, args.batch_size)
        bnfold.export(resnet18().eval(), (torch.randn(1, 3, 224, 224),), model, verify=False)
        runs = [("cpu", 1, 0.0), ("cpu", 2, 0.0)] + ([("cuda", 1, 1.0)] if args.gpu else [])
        print(f"{args.items} items, 3x224x224, batch {args.batch_size}, {args.rounds} rounds", flush=True)
        for device, actors, gpus in runs:
            name = f"{actors} actor(s), {device}"
            r = results[name] = variant(model, folder, files, args, device, actors, gpus)
            print(
                f"{name}: local {r['local_rows_per_s']:.1f} rows/s; job {r['job_ratio']:.2f}x, steady state "
                f"{r['steady_ratio']:.2f}x ({r['steady_rows_per_s_per_actor']:.1f} rows/s per actor), start-up "
                f"{r['startup_s']:.1f} s; command: job {r['command_job_s']:.1f} s ({r['command_job_ratio']:.2f}x), "
                f"all {r['command_s']:.1f} s ({r['command_ratio']:.2f}x)",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
