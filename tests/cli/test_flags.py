"""The CLI's one map from library parameters to flags: every entry names a real parameter and a
real flag (or argument), and errors reach the user with the flag."""

from __future__ import annotations

import inspect
import re

import click
import pytest
import torch
from bnfold.cli.flags import PARAMETER_FLAGS, cli_message
from bnfold.cli.main import main
from click.testing import CliRunner
from torch import nn

import bnfold
from bnfold.bench import bench
from bnfold.loading import LoadedModel
from bnfold.predictor import top_k
from bnfold.scale import predict_dataset, ray_instance, write_predictions
from bnfold.scale.auth import read_token
from bnfold.scale.serve import model_server
from bnfold.scale.serve_options import ServeOptions

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


def _cli_flags() -> set[str]:
    """Every option's flags, and every argument's name as the help shows it (``INPUTS``)."""
    return {
        opt
        for command in main.commands.values()
        for param in command.params
        for opt in (param.opts if isinstance(param, click.Option) else [param.human_readable_name])
    }


def test_every_mapped_name_is_a_library_parameter_or_call():
    names = {name for call in LIBRARY_CALLS for name in inspect.signature(call).parameters}
    names |= {call.__name__ for call in LIBRARY_CALLS}  # `recalibrate` names the call itself
    for key in PARAMETER_FLAGS:
        parameter = re.findall(r"\w+", key)[-1 if "(" in key else 0]  # `recalibrate(batch_size)`: batch_size
        assert parameter in names, f"{key!r} is no parameter of bnfold's public calls"


def test_every_mapped_flag_is_a_cli_option():
    flags = _cli_flags()
    for key, flag in PARAMETER_FLAGS.items():
        for option in flag.split("/"):  # "--device cuda": the option and its value
            assert option.split()[0] in flags, f"{key!r} maps to {flag!r}, which no command has"


def test_backticked_parameters_become_flags_and_other_code_stays():
    message = "the model fixes its batch; re-run with `dynamic_batch=False` (see `torch.export`)"
    assert cli_message(message) == "the model fixes its batch; re-run with --static-batch (see `torch.export`)"


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
