"""`bnfold predict --ray`: the same predictions as `bnfold predict`, a summary line, exit code 6
when some rows failed, and one-line usage errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from bnfold.cli.main import main
from click.testing import CliRunner
from helpers import write_pngs


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_ray_predictions_equal_bnfold_predict(ray_cluster, shapes_onnx, shapes_x, tmp_path):
    np.savez(tmp_path / "x.npz", x=shapes_x)
    local = invoke("predict", shapes_onnx, tmp_path / "x.npz", "--json", "--top-k", "2", "--device", "cpu")
    assert local.exit_code == 0, local.stderr
    result = invoke(
        "predict",
        shapes_onnx,
        tmp_path / "x.npz",
        "--ray",
        "--top-k",
        "2",
        "--batch-size",
        "5",
        "-o",
        tmp_path / "p.parquet",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"{len(shapes_x)} rows, 0 failed, in ")
    assert result.stdout.rstrip().endswith(f"rows/s) on 1 actor(s), cpu; wrote {tmp_path / 'p.parquet'}")
    rows = {row["item"]: row for row in pq.read_table(tmp_path / "p.parquet").to_pylist()}
    for line in local.stdout.splitlines():
        expected = json.loads(line)
        row = rows.pop(f"{tmp_path / 'x.npz'}:{expected['sample']}")
        assert row["top_k_labels"] == [best["label"] for best in expected["top_k"]]
        assert row["top_k_indices"] == [best["class"] for best in expected["top_k"]]
        np.testing.assert_allclose(row["top_k_scores"], [best["score"] for best in expected["top_k"]], rtol=1e-5)
    assert rows == {}


def test_6_some_rows_failed_the_rest_is_written(ray_cluster, shapes_onnx, shapes_x, tmp_path):
    write_pngs(shapes_x[:3], tmp_path / "images")
    (tmp_path / "images" / "zz.jpg").write_bytes(b"not a jpeg")
    result = invoke(
        "predict", shapes_onnx, tmp_path / "images", "--ray", "--actors", "1,1", "-o", tmp_path / "p.parquet"
    )
    assert result.exit_code == 6, result.stderr
    assert result.stdout.startswith("4 rows, 1 failed, in ")
    assert result.stderr.strip().splitlines()[-1] == (
        f"bnfold: error: 1 of 4 rows failed: their 'error' column in {tmp_path / 'p.parquet'} says why"
    )
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.num_rows == 4 and table.column("error").null_count == 3


def test_a_folder_is_read_the_same_way_locally_and_on_ray(ray_cluster, shapes_onnx, shapes_x, tmp_path):
    folder = tmp_path / "photos"
    write_pngs(shapes_x[:2], folder)
    write_pngs(shapes_x[2:3], folder / "more" / "deeper")  # read at any depth
    write_pngs(shapes_x[3:4], folder / "_skipped")  # names starting with _ or . are skipped
    (folder / ".hidden.png").write_bytes(b"not read")
    (folder / "notes.txt").write_text("not an input")
    local = invoke("predict", shapes_onnx, folder, "--json", "--device", "cpu")
    assert local.exit_code == 0, local.stderr
    on_ray = invoke("predict", shapes_onnx, folder, "--ray", "-o", tmp_path / "p.parquet")
    assert on_ray.exit_code == 0, on_ray.stderr
    items = sorted(row["item"] for row in pq.read_table(tmp_path / "p.parquet").to_pylist())
    assert items == [json.loads(line)["sample"] for line in local.stdout.splitlines()]
    assert items == [str(folder / "img_000.png"), str(folder / "img_001.png"), str(folder / "more/deeper/img_000.png")]


def test_a_folder_mixing_kinds_is_a_usage_error_naming_both_locally_and_on_ray(ray_cluster, shapes_onnx, tmp_path):
    write_pngs(np.zeros((1, 3, 16, 16)), tmp_path / "mixed")
    np.save(tmp_path / "mixed" / "x.npy", np.zeros((1, 3, 16, 16), np.float32))
    for ray_args in ([], ["--ray", "-o", tmp_path / "p.parquet"]):
        result = invoke("predict", shapes_onnx, tmp_path / "mixed", *ray_args)
        assert result.exit_code == 2, result.stderr
        assert "mixes arrays (" in result.stderr and "x.npy) and images (" in result.stderr
    assert not (tmp_path / "p.parquet").exists()


USAGE_ERRORS = {
    "ray-option-without-ray": (["--actors", "2"], 2, "--actors needs --ray"),
    "verbose-without-ray": (["--verbose"], 2, "--verbose needs --ray"),
    "no-output": (["--ray"], 2, "--ray writes its predictions to a parquet folder: give -o OUT.parquet"),
    "json": (["--ray", "--json", "-o", "{tmp}/p.parquet"], 2, "--json does not apply to --ray"),
    "device": (["--ray", "--device", "cpu", "-o", "{tmp}/p.parquet"], 2, "--device does not apply to --ray"),
    "actors-syntax": (
        ["--ray", "--actors", "two", "-o", "{tmp}/p.parquet"],
        2,
        "--actors 'two': expected N or MIN,MAX",
    ),
    "actors-range": (["--ray", "--actors", "3,1", "-o", "{tmp}/p.parquet"], 2, "--actors must be"),
    "top-k": (["--ray", "--top-k", "0", "-o", "{tmp}/p.parquet"], 2, "--top-k must be at least 1 (got 0)"),
    "gpus": (
        ["--ray", "--gpus-per-actor", "64", "-o", "{tmp}/p.parquet"],
        3,
        "lower --cpus-per-actor or --gpus-per-actor",
    ),
    "output-exists": (["--ray", "-o", "{tmp}"], 2, "exists; remove it or choose another --output"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS), ids=list(USAGE_ERRORS))
def test_ray_usage_errors_are_one_line(case, ray_cluster, shapes_onnx, shapes_x, tmp_path):
    options, code, message = USAGE_ERRORS[case]
    np.save(tmp_path / "x.npy", shapes_x[:2])
    result = invoke("predict", shapes_onnx, tmp_path / "x.npy", *[o.format(tmp=tmp_path) for o in options])
    assert result.exit_code == code, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("bnfold: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy"]


def test_ray_without_the_extra_installed_names_it(shapes_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    result = invoke("predict", shapes_onnx, tmp_path, "--ray", "-o", tmp_path / "p.parquet")
    assert result.exit_code == 2
    assert result.stderr == (
        "bnfold: error: running on Ray needs Ray Data, which is not installed: pip install 'bnfold[ray]'\n"
    )


def test_a_ray_run_prints_its_summary_and_the_actors_reports_and_none_of_rays_noise(shapes_onnx, shapes_x, tmp_path):
    """A local instance as a user starts it (token authentication on, a HOME of its own): no Ray
    log line, no core-worker error about actor arguments, no token notice."""
    np.save(tmp_path / "x.npy", shapes_x[:4])
    command = ["predict", shapes_onnx, tmp_path / "x.npy", "--ray", "-o", tmp_path / "p.parquet"]
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("RAY_AUTH_MODE", None)
    result = subprocess.run(
        [sys.executable, "-m", "bnfold.cli.main", *map(str, command)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("4 rows, 0 failed") and len(result.stdout.splitlines()) == 1
    lines = result.stderr.splitlines()
    assert lines and all("bnfold: prediction actor on " in line for line in lines), result.stderr


def test_sigterm_during_a_ray_job_exits_130_and_leaves_no_output(shapes_onnx, shapes_x, tmp_path):
    """SIGTERM (a service manager's stop) is Ctrl-C: once the job writes into its temporary folder,
    the run stops with 130 and the one-line message, and nothing is left beside -o."""
    out = tmp_path / "out"
    out.mkdir()
    np.save(tmp_path / "x.npy", np.repeat(shapes_x, 200, axis=0))  # long enough to be interrupted
    command = ["predict", shapes_onnx, tmp_path / "x.npy", "--ray", "-o", out / "p.parquet"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnfold.cli.main", *map(str, command)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not any(p.name.endswith(".tmp") for p in out.iterdir()):  # the job is writing
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the job never started writing"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "bnfold: error: interrupted; nothing was written"
    assert list(out.iterdir()) == []


# A Ray instance of 1 CPU in its own process, as a cluster to join: prints its address, stops when
# its stdin closes.
HEAD = """
import sys, ray
ray.init(num_cpus=1, include_dashboard=False, _temp_dir=sys.argv[1])
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()
ray.shutdown()
"""


def test_ray_address_joins_that_cluster_and_each_actor_reports_its_provider(shapes_onnx, shapes_x, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    folder = tempfile.mkdtemp(prefix="bnfold-head-")
    head = subprocess.Popen(
        [sys.executable, "-c", HEAD, folder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        address = head.stdout.readline().strip()
        np.save(tmp_path / "x.npy", shapes_x[:4])
        command = ["predict", shapes_onnx, tmp_path / "x.npy", "--ray", "--ray-address", address]
        result = subprocess.run(
            [sys.executable, "-m", "bnfold.cli.main", *map(str, command), "-o", str(tmp_path / "p.parquet")],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("4 rows, 0 failed")
        # The cluster's one CPU is the actor's one ONNX Runtime thread; Ray forwards the actor's report.
        assert "bnfold: prediction actor on " in result.stderr
        assert ": CPUExecutionProvider, 1 ONNX Runtime thread(s)" in result.stderr
    finally:
        head.stdin.close()
        head.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
