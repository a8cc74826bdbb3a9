"""How errors reach the CLI: every parameter the library names in an error is set by some
command's option, which declares it (``bnfold.cli.flags``), and errors reach the user with the flag."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import click
import pytest
import torch
from bnfold.cli.commands.export import export_command
from bnfold.cli.flags import LibraryOption, cli_message, flag_for
from bnfold.cli.main import main
from click.testing import CliRunner
from torch import nn

import bnfold
from bnfold.bench import bench
from bnfold.errors import Param, UsageError
from bnfold.export_options import ExportOptions
from bnfold.loading import LoadedModel
from bnfold.metadata import Preprocess
from bnfold.on_ray import predict_dataset, ray_instance, write_predictions
from bnfold.on_ray.auth import read_token
from bnfold.on_ray.serve import model_server
from bnfold.on_ray.serve_options import ServeOptions
from bnfold.predictor import top_k

PACKAGE = Path(bnfold.__file__).parent

LIBRARY_CALLS = [
    bnfold.export,
    bnfold.verify,
    bnfold.fold,
    bnfold.load_model,
    bnfold.recalibrate,
    bnfold.Predictor.__init__,
    LoadedModel.example_inputs,
    bench,
    top_k,
    predict_dataset,
    write_predictions,
    ray_instance,
    model_server,
    ServeOptions,
    read_token,
]


def _library_names() -> set[str]:
    """Parameters of the public calls, ExportOptions' fields, `preprocess.<field>`, and
    `recalibrate` (the export step whose data `--recalibrate` gives)."""
    names = {name for call in LIBRARY_CALLS for name in inspect.signature(call).parameters}
    names |= {field.name for field in dataclasses.fields(ExportOptions)}
    names |= {f"preprocess.{field.name}" for field in dataclasses.fields(Preprocess)}
    return names | {"recalibrate"}


def _named_params() -> set[str]:
    """The names of every ``Param("...")`` the library writes with a literal name."""
    found = set()
    for file in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            call = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Param" and node.args
            if call and isinstance(node.args[0], ast.Constant):
                found.add(node.args[0].value)
    return found


def _declared() -> list[tuple[click.Command, click.Parameter]]:
    return [(command, param) for command in main.commands.values() for param in command.params]


def test_the_library_names_parameters_in_errors():
    assert {"rtol", "arch", "trust_pickle", "data", "path", "preprocess.size"} <= _named_params()


def test_every_parameter_an_error_names_is_a_library_parameter_with_a_flag():
    names, declared = _library_names(), {getattr(p, "parameter", p.name) for _, p in _declared()}
    for name in sorted(_named_params()):
        assert name in names, f"errors name `{name}`, which is no parameter of bnfold's public calls"
        assert name in declared, f"no CLI option sets `{name}`: errors would show it raw"


def test_every_declared_parameter_is_a_library_parameter():
    names = _library_names()
    for command, param in _declared():
        if isinstance(param, LibraryOption) or hasattr(param, "parameter"):
            assert param.parameter in names, f"{command.name} {param.name} declares unknown `{param.parameter}`"


def test_every_export_option_has_a_flag_of_bnfold_export():
    """An export option is added as an ExportOptions field and a flag in its option group."""
    declared = {getattr(p, "parameter", p.name) for p in export_command.params}
    for field in dataclasses.fields(ExportOptions):
        assert field.name in declared or any(d.startswith(f"{field.name}.") for d in declared), field.name


def _command(*params: click.Parameter) -> click.Command:
    return click.Command("c", params=list(params))


def test_flag_for_spells_parameters_settings_and_arguments():
    command = _command(
        click.Option(["--rtol"], type=float),
        LibraryOption(["--no-verify"], is_flag=True, parameter="verify", setting=False),
        click.Option(["--fp16"], is_flag=True),
        click.Option(["-d", "--device"]),
        LibraryOption(["-o", "--output"], parameter="path"),
        click.Argument(["inputs"], nargs=-1),
    )
    assert flag_for(Param("rtol"), command) == "--rtol"
    assert flag_for(Param("verify", False), command) == "--no-verify"
    assert flag_for(Param("verify", True), command) is None  # the flag cannot set it so
    assert flag_for(Param("fp16", True), command) == "--fp16"
    assert flag_for(Param("device", "cuda"), command) == "--device cuda"
    assert flag_for(Param("path"), command) == "--output"
    assert flag_for(Param("inputs"), command) == "INPUTS"
    assert flag_for(Param("atol"), command) is None


def test_cli_message_writes_flags_and_keeps_other_text():
    command = _command(LibraryOption(["--static-batch"], is_flag=True, parameter="dynamic_batch", setting=False))
    error = UsageError(
        "the model fixes its batch; re-run with ", Param("dynamic_batch", False), " (see `torch.export`)"
    )
    assert str(error) == "the model fixes its batch; re-run with `dynamic_batch=False` (see `torch.export`)"
    assert cli_message(error, command) == "the model fixes its batch; re-run with --static-batch (see `torch.export`)"
    assert cli_message(UsageError(Param("rtol"), " is odd"), command) == "`rtol` is odd"  # no flag: Python's name


class FixedBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).reshape(2, -1)  # only batch size 2 fits


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_a_library_error_reaches_the_cli_with_the_flag(tmp_path, static):
    path = tmp_path / "m.pt"
    torch.jit.save(torch.jit.trace(FixedBatch().eval(), torch.zeros(2, 3, 8, 8)), str(path))
    args = ["export", str(path), "--input-shape", "2x3x8x8", "--no-verify"] + (["--static-batch"] if static else [])
    result = CliRunner().invoke(main, args, obj={})
    if static:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 3
        assert "--static-batch" in result.output and "dynamic_batch" not in result.output


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--rtol", "-1"], "--rtol must be non-negative"),
        (["--keep-io-types"], "--keep-io-types only applies with --fp16"),
        (["--opset", "0"], "--opset must be a positive opset version"),
        (["--rules", "nonesuch"], "--rules: unknown fold rule(s) nonesuch"),
        (["--int8", "--fp16"], "--int8 and --fp16 exclude each other"),
        (["--int8"], "--int8 needs --calibration"),
        (["--calibration-samples", "10"], "--calibration-samples only applies with --int8"),
        (["--int8", "--calibration", "nonesuch.npz"], "--calibration nonesuch.npz: no such file or folder"),
    ],
)
def test_export_option_errors_name_the_flag_before_loading(tmp_path, args, flag):
    result = CliRunner().invoke(main, ["export", str(tmp_path / "missing.pt"), *args], obj={})
    assert result.exit_code == 2, result.output
    assert flag in result.output and "missing.pt" not in result.output  # checked before the model is read
