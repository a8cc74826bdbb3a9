"""Where the CPU goes while `bnfold predict --ray` runs, and what that much CPU taken costs the
local loop: why the Ray job's steady state trails the local `Predictor` loop on a small machine.

    python benchmarks/ray_cpu_share.py [--items 2560] [--actors 1]

1. The local loop (as in `benchmarks/ray_predict.py`) over half the files.
2. On a local Ray instance, `predict_dataset` over every file, twice (the first run starts Ray
   Data's own actors); in the second, the CPU time of every process of this machine
   (`/proc/PID/stat`) between the first and the last batch: the prediction actors, and the rest
   (Ray's own processes and this driver), in cores.
3. The local loop again, then the local loop beside busy-loop processes that take the same share
   of the CPU as that rest (a 2 ms duty cycle each), and the local loop alone once more.

Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from models import resnet18
from ray_predict import local_loop, write_inputs

import bnfold

TICKS = os.sysconf("SC_CLK_TCK")
BUSY_LOOP = """
import sys, time
share, period = float(sys.argv[1]), 0.002
while True:
    start = time.perf_counter()
    while time.perf_counter() - start < period * share:
        pass
    time.sleep(period * (1 - share))
"""


def cpu_seconds() -> dict[tuple[str, str], tuple[float, str]]:
    """CPU seconds so far of every process: (pid, start time) -> (user + system time, command
    line). Ray renames its workers (after the task or method they run), so the name is no key."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            name = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()[:70]
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[(pid, fields[19])] = ((int(fields[11]) + int(fields[12])) / TICKS, name)
    return out


def ray_steady(model: Path, folder: Path, actors: int) -> tuple[float, dict[tuple[str, str], float]]:
    """Steady-state rows/s of one predict_dataset run, and each process's cores over it, by
    (pid, command line at the end)."""
    from bnfold.on_ray import predict_dataset

    rows, before, first = 0, None, 0.0
    for part in predict_dataset(model, folder, batch_size=64, actors=actors).iter_batches(batch_size=None):
        rows += len(part["item"])
        if before is None:
            before, first, first_rows = cpu_seconds(), time.perf_counter(), rows
    after, wall = cpu_seconds(), time.perf_counter() - first
    cores = {(key[0], name): (spent - before.get(key, (0.0, ""))[0]) / wall for key, (spent, name) in after.items()}
    return (rows - first_rows) / wall, {key: c for key, c in cores.items() if c > 0.002}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=2560)
    parser.add_argument("--actors", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bnfold-ray-cpu-") as tmp:
        folder, model = Path(tmp) / "inputs", Path(tmp) / "resnet18.onnx"
        folder.mkdir()
        files = write_inputs(folder, args.items, 64)[: max(1, args.items // 128)]
        bnfold.export(resnet18().eval(), (torch.randn(1, 3, 224, 224),), model, verify=False)
        items = 64 * len(files)
        print(f"local loop: {items / local_loop(model, files, 'cpu'):.1f} rows/s", flush=True)
        from bnfold.on_ray import ray_instance

        with ray_instance(temp_dir=tempfile.mkdtemp(prefix="bnfold-ray-"), token_auth=False):
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False
            ray_steady(model, folder, args.actors)
            steady, cores = ray_steady(model, folder, args.actors)
        actor_cores = sum(c for (_, name), c in cores.items() if "MapWorker" in name)
        rest = sum(cores.values()) - actor_cores
        print(
            f"ray, {args.actors} actor(s): steady state {steady:.1f} rows/s; actors {actor_cores:.2f} cores, rest {rest:.2f}"
        )
        for (pid, name), c in sorted(cores.items(), key=lambda kv: -kv[1])[:12]:
            print(f"  {c:5.3f} cores  {pid:>7}  {name}")
        for share in (0.0, rest, 0.0):
            count = math.ceil(share)  # each busy loop takes at most one core
            busy = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(share / count)]) for _ in range(count)]
            try:
                rate = items / local_loop(model, files, "cpu")
            finally:
                for process in busy:
                    process.kill()
                    process.wait()
            print(f"local loop beside a busy loop of {share:.2f} cores: {rate:.1f} rows/s", flush=True)


if __name__ == "__main__":
    main()
