"""`bnfold predict --ray` against the local Predictor loop, same model and inputs, one run.

    python benchmarks/ray_predict.py [--items 2560] [--batch-size 64] [--gpu] [--json out.json]

The model: a ResNet-18-shaped network (3x224x224, random weights), exported by bnfold. The
inputs: ``--items`` samples in .npy files of one batch each, written once to a temporary folder.

- local: a loop that reads each file (numpy.load) and runs Predictor.predict on it, in this
  process, the model already loaded (all cores: ONNX Runtime's default threads).
- ray, N actors (N = 1, 2): ``bnfold predict DIR --ray --actors N --batch-size B -o OUT.parquet`` in
  a subprocess. "job" is the time its summary line reports (write_predictions: actor start-up,
  the checks before the job, Ray's file reader, prediction, the parquet writer); "command" adds
  starting and stopping the local Ray instance and the Python process.
- steady state: the same pipeline (predict_dataset) consumed with iter_batches in this process:
  steady state is the rows after the first batch of predictions over the time from it to the
  last one; start-up the time to the first batch less what one batch takes in the steady state.

Ratios are throughputs (rows/s) over the local loop's, measured just before each variant (the
machine's speed drifts). ``--gpu``: also 1 actor with ``--gpus-per-actor 1`` against the local
loop on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def steady_state(model: Path, folder: Path, batch: int, actors: int, gpus: float) -> dict[str, float]:
    """Start-up (s to the first batch of predictions) and steady-state rows/s after it."""
    from bnfold.scale import predict_dataset, ray_instance

    with ray_instance(temp_dir=tempfile.mkdtemp(prefix="bnfold-ray-"), token_auth=False):
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        start = time.perf_counter()
        predictions = predict_dataset(model, folder, batch_size=batch, actors=actors, gpus_per_actor=gpus)
        arrivals, rows = [], []
        for part in predictions.iter_batches(batch_size=None):
            arrivals.append(time.perf_counter())
            rows.append(len(part["item"]))
    first, last = arrivals[0], arrivals[-1]
    steady = sum(rows[1:]) / (last - first)
    return {"startup_s": first - start - rows[0] / steady, "steady_rows_per_s": steady}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2560)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file in ~/.ray for a benchmark
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bnfold-ray-bench-") as tmp:
        folder, model = Path(tmp) / "inputs", Path(tmp) / "resnet18.onnx"
        folder.mkdir()
        files = write_inputs(folder, args.items, args.batch_size)
        bnfold.export(resnet18().eval(), (torch.randn(1, 3, 224, 224),), model, verify=False)
        runs = [("cpu", 1, 0.0), ("cpu", 2, 0.0)] + ([("cuda", 1, 1.0)] if args.gpu else [])
        print(f"{args.items} items, 3x224x224, batch {args.batch_size}", flush=True)
        for device, actors, gpus in runs:
            local = {device: args.items / local_loop(model, files, device)}
            options = ["--actors", str(actors), "--batch-size", str(args.batch_size)]
            options += ["--gpus-per-actor", str(gpus)] if gpus else []
            job, wall = ray_command(model, folder, Path(tmp) / f"out_{device}_{actors}.parquet", options)
            steady = steady_state(model, folder, args.batch_size, actors, gpus)
            name = f"{actors} actor(s), {device}"
            results[name] = {
                "local_rows_per_s": local[device],
                "job_s": job,
                "command_s": wall,
                "job_ratio": args.items / job / local[device],
                "command_ratio": args.items / wall / local[device],
                "startup_s": steady["startup_s"],
                "steady_ratio": steady["steady_rows_per_s"] / local[device],
                "steady_rows_per_s_per_actor": steady["steady_rows_per_s"] / actors,
            }
            r = results[name]
            print(
                f"{name}: local {local[device]:.1f} rows/s; "
                f"job {job:.1f} s ({r['job_ratio']:.2f}x), command {wall:.1f} s ({r['command_ratio']:.2f}x), "
                f"start-up {r['startup_s']:.1f} s, steady state {r['steady_ratio']:.2f}x "
                f"({r['steady_rows_per_s_per_actor']:.1f} rows/s per actor)",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
