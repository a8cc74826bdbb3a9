"""Helpers for the hostile-input tests: malicious pickles, crafted torch.export archives, file
mutations for fuzzing, and a CLI runner that checks the one-line-error contract."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from bnfold.cli.main import main
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_models"
DIGITS = SAMPLES / "digits_cnn" / "model.pt"  # TorchScript
RESNET = SAMPLES / "shapes_resnet" / "model.pt2"  # torch.export
MOBILENET = SAMPLES / "shapes_mobilenet" / "model.pt"  # state_dict
SIGNAL = SAMPLES / "signal_cnn" / "model.pt"  # checkpoint dict with numpy scalars
SEGNET = SAMPLES / "shapes_segnet" / "model.pt"  # pickled nn.Module
DIGITS_ARCH = "sample_models.architectures:digits_cnn"

# (file, load_model keyword arguments) for every sample format.
SAMPLE_FILES: dict[str, tuple[Path, dict[str, Any]]] = {
    "torchscript": (DIGITS, {}),
    "pt2": (RESNET, {}),
    "state_dict": (
        MOBILENET,
        {"arch": "sample_models.architectures:mobilenet_tiny", "arch_kwargs": {"num_classes": 4}},
    ),
    "checkpoint_numpy": (SIGNAL, {"arch": "sample_models.architectures:signal_net"}),
    "pickled_module": (SEGNET, {}),
}


class RunsCommand:
    """Unpickling this runs ``touch <path>`` through ``os.system``: proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.path}",))


class OpensFile:
    """Unpickling this creates ``path`` through ``builtins.open``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def digits_net() -> torch.nn.Module:
    """A fresh digits CNN (the architecture of :data:`DIGITS`) in eval mode."""
    from sample_models.architectures import digits_cnn

    return digits_cnn().eval()


def digits_state_dict() -> dict[str, torch.Tensor]:
    return digits_net().state_dict()


def write_malicious(path: Path, marker: Path, container: str) -> Path:
    """A file that creates ``marker`` when unpickled, in one of several containers."""
    payload: Any = RunsCommand(marker) if container != "raw_open" else OpensFile(marker)
    if container == "zip":
        torch.save(payload, path)
    elif container == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    elif container == "checkpoint":  # a real checkpoint with the payload hidden among its entries
        torch.save({"state_dict": digits_state_dict(), "epoch": 3, "optimizer": {"hook": payload}}, path)
    elif container in ("raw_p2", "raw_open"):
        path.write_bytes(pickle.dumps(payload, protocol=2))
    elif container == "raw_p4":
        path.write_bytes(pickle.dumps({"state_dict": {}, "x": payload}, protocol=4))
    else:
        raise ValueError(container)
    return path


MALICIOUS_CONTAINERS = ("zip", "legacy", "checkpoint", "raw_p2", "raw_p4", "raw_open")


def rewrite_zip(source: Path, target: Path, change: Callable[[str, bytes], bytes | None]) -> Path:
    """Copy a zip archive, passing each member through ``change(name, data)`` (None drops it)."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for name in zin.namelist():
            data = change(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)
    return target


def rewrite_program_json(source: Path, target: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    """Copy a torch.export archive, editing its ``models/*.json`` document in place with ``change``."""

    def edit(name: str, data: bytes) -> bytes:
        if "/models/" in name and name.endswith(".json"):
            doc = json.loads(data)
            change(doc)
            return json.dumps(doc).encode()
        return data

    return rewrite_zip(source, target, edit)


def pickled(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# --------------------------------------------------------------------------------- the CLI
@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None


def run_cli(*args: Any) -> CliResult:
    """Run the click app in-process; stdout and stderr separately."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    exception = result.exception if not isinstance(result.exception, SystemExit) else None
    return CliResult(result.exit_code, result.stdout, result.stderr, exception)


def assert_one_line_error(result: CliResult, code: int, *fragments: str) -> str:
    """The CLI's error contract: exit ``code``, one ``bnfold: error:`` line naming ``fragments``, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnfold: error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` (hidden temporaries included) with its size."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
