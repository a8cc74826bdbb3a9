"""What reading `.npy` inputs costs in a `bnfold predict --ray` job, before any prediction.

    python benchmarks/ray_read_cost.py [--files 40] [--rounds 3]

The inputs of `benchmarks/ray_predict.py`: ``--files`` files of 64 samples of 3x224x224 float32
(38 MB each).

1. One file, in this process, each file of the set read once per round (fresh memory every time,
   as in a read task): CPU milliseconds per file for ``numpy.load`` of its path (what the local
   loop does), for its bytes read from a pyarrow stream then ``numpy.load`` on them (how bnfold
   read them before), and for ``bnfold.arrays.stream_arrays`` on the stream (how it reads them now).
2. On a local Ray instance, a job that only reads the files (bnfold's datasource, then a step
   that counts rows in batches of 64): the CPU seconds of every process on the machine, with Ray's
   own choice of blocks (what `read_inputs` does: with fewer files than its minimum of 200 blocks,
   Ray splits each file's rows into several) and with a read task per file, whole files as
   blocks. Alternating, medians.

Linux only (it reads /proc).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ray_cpu_share import cpu_seconds
from ray_predict import write_inputs

from bnfold.arrays import load_arrays, stream_arrays
from bnfold.predictor import TensorSpec

INPUT = TensorSpec("input", ("batch", 3, 224, 224), np.dtype(np.float32))


def per_file_ms(files: list[Path], read) -> float:
    """CPU milliseconds per file of ``read(path)``, each result kept until the end (no memory
    reused between files, as in a read task's worker)."""
    kept, start = [], time.process_time()
    for file in files:
        kept.append(read(file))
    return (time.process_time() - start) / len(files) * 1000


def via_bytes(file: Path) -> np.ndarray:
    with pafs.LocalFileSystem().open_input_stream(str(file)) as stream:
        return load_arrays(io.BytesIO(stream.readall()), file.name)[""]


def via_stream(file: Path) -> np.ndarray:
    with pafs.LocalFileSystem().open_input_stream(str(file)) as stream:
        return stream_arrays(stream, file.name)[""]


def read_job_cpu(folder: Path, per_file: bool) -> float:
    """CPU seconds of every process while a Ray Data job reads ``folder`` and counts its rows."""
    from ray.data import read_datasource

    from bnfold.on_ray.sources import ArrayFiles

    files = len(list(folder.iterdir()))
    source = ArrayFiles([str(folder)], [INPUT])
    dataset = read_datasource(source, num_cpus=0, concurrency=2, override_num_blocks=files if per_file else None)
    counts = dataset.map_batches(lambda b: {"rows": np.array([len(b["item"])])}, batch_size=64, zero_copy_batch=True)
    before = cpu_seconds()
    rows = sum(int(batch["rows"].sum()) for batch in counts.iter_batches(batch_size=None))
    after = cpu_seconds()
    assert rows == 64 * files
    return sum(spent - before.get(key, (0.0, ""))[0] for key, (spent, _) in after.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bnfold-read-") as tmp:
        folder = Path(tmp) / "inputs"
        folder.mkdir()
        files = write_inputs(folder, 64 * args.files, 64)
        reads = {"numpy.load(path)": np.load, "stream bytes + numpy.load": via_bytes, "stream_arrays": via_stream}
        for name, read in reads.items():
            times = [per_file_ms(files, read) for _ in range(args.rounds)]
            print(f"{name}: {statistics.median(times):.1f} ms CPU per file ({min(times):.1f}-{max(times):.1f})")
        from bnfold.on_ray import ray_instance

        with ray_instance(temp_dir=tempfile.mkdtemp(prefix="bnfold-ray-"), token_auth=False):
            from ray.data import DataContext

            DataContext.get_current().enable_progress_bars = False
            read_job_cpu(folder, True)  # the first job starts Ray Data's own actors
            jobs: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.rounds):
                for per_file in jobs:
                    jobs[per_file].append(read_job_cpu(folder, per_file))
        for per_file, cpu in jobs.items():
            name = "a read task per file" if per_file else "Ray's split blocks"
            print(
                f"read job, {name}: {statistics.median(cpu):.2f} CPU-s, all processes ({min(cpu):.2f}-{max(cpu):.2f})"
            )


if __name__ == "__main__":
    main()
