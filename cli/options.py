"""Option groups, each a decorator, and what their values mean to the library.

A group adds its click options to a command and hands the command their values as one object
(e.g. ``loading: ModelOptions``) instead of one argument per option: a frozen dataclass that turns
them into library arguments, or, for :func:`library_options`, the library parameters themselves.
The library checks the values and names its parameters in errors; each option declares the
parameter it sets (see ``bnfold.cli.flags``), so errors name these flags.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click
from bnfold.cli.flags import LibraryOption

from bnfold.defaults import (
    CALIBRATION_METHODS,
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    FP16_ATOL,
    FP16_RTOL,
    INT8_MAX_FLOAT_LAYERS,
    INT8_MIN_AGREEMENT,
    INT8_MIN_SQNR_DB,
    REFERENCES,
)
from bnfold.errors import UsageError
from bnfold.metadata import CHANNEL_ORDERS, DYNAMIC, Preprocess, parse_floats, preprocess_for, read_labels
from bnfold.shapes import parse_shape

if TYPE_CHECKING:  # torch (3 s to import) only for the commands that load a PyTorch model
    import torch

    from bnfold.loading import LoadedModel

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def option_group(keyword: str, values: type, options: Sequence[Decorator]) -> Decorator:
    """A decorator that adds ``options`` to a click command and passes their values to it as
    one ``values`` dataclass (whose fields are the options' parameter names) named ``keyword``."""
    fields = [field.name for field in dataclasses.fields(values)]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def grouped(*args: Any, **kwargs: Any) -> Any:
            group = values(**{name: kwargs.pop(name) for name in fields})
            return command(*args, **{keyword: group}, **kwargs)

        for option in reversed(options):
            grouped = option(grouped)
        return grouped

    return decorate


def library_options(keyword: str, options: Sequence[Decorator]) -> Decorator:
    """A decorator that adds ``options`` (each with ``cls=LibraryOption``) to a click command
    and passes the library parameters they set to it as one dict named ``keyword``: a flag that
    is given sets its parameter to its ``setting``, an option with a value sets it to the value,
    and an option not given leaves its parameter out (the library's default holds)."""

    def probe() -> None: ...

    for option in options:
        option(probe)
    declared: list[click.Parameter] = probe.__click_params__  # type: ignore[attr-defined]
    for option in declared:
        if not isinstance(option, LibraryOption):
            raise TypeError(f"library_options: {option.name} must be a LibraryOption")

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def grouped(*args: Any, **kwargs: Any) -> Any:
            chosen: dict[str, Any] = {}
            for option in declared:
                value = kwargs.pop(option.name)
                if option.is_flag and value:
                    chosen[option.parameter] = option.setting
                elif not option.is_flag and value is not None:
                    chosen[option.parameter] = value
            return command(*args, **{keyword: chosen}, **kwargs)

        for option in reversed(options):
            grouped = option(grouped)
        return grouped

    return decorate


def output_option(help: str) -> Decorator:
    """``-o/--output``: the file a command writes (the library's ``path``)."""
    return click.option("-o", "--output", type=click.Path(), cls=LibraryOption, parameter="path", help=help)


class NameList(click.ParamType):
    """Comma-separated names, as a tuple (``"a, b"`` -> ``("a", "b")``)."""

    name = "NAMES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        return tuple(name.strip() for name in str(value).split(",") if name.strip())


# The fields of bnfold.ExportOptions that ``bnfold export`` sets from its own flags (verification
# and metadata have their groups): an option here sets the field its `parameter` names.
export_options = library_options(
    "exporting",
    [
        click.option(
            "--static-batch",
            is_flag=True,
            cls=LibraryOption,
            parameter="dynamic_batch",
            setting=False,
            help="Fix the batch size to the input shape's instead of a dynamic batch axis.",
        ),
        click.option(
            "--dynamic-size",
            is_flag=True,
            cls=LibraryOption,
            help="Free the height and width of image inputs (NxCxHxW): any size the model takes (e.g. a multiple "
            "of its stride), stated in the report and the metadata; verified at three sizes.",
        ),
        click.option("--opset", type=int, cls=LibraryOption, help="ONNX opset version (default: the exporter's)."),
        click.option(
            "--no-verify",
            is_flag=True,
            cls=LibraryOption,
            parameter="verify",
            setting=False,
            help="Skip verification in ONNX Runtime (the BatchNormalization count is still checked).",
        ),
        click.option(
            "--fp16",
            is_flag=True,
            cls=LibraryOption,
            help="Export float16 weights and activations (folded in float64 first).",
        ),
        click.option(
            "--keep-io-types", is_flag=True, cls=LibraryOption, help="With --fp16: keep float32 inputs and outputs."
        ),
        click.option(
            "--int8",
            is_flag=True,
            cls=LibraryOption,
            help="Quantize the verified float32 model to INT8 (ONNX Runtime, QDQ, per-channel weights) "
            "calibrated on --calibration, and write it only if it meets the accuracy budget.",
        ),
        click.option(
            "--calibration",
            type=click.Path(),
            cls=LibraryOption,
            help="With --int8: data (.npy/.npz, or a folder of images read with the preprocessing), split into "
            "calibration samples and held-out samples that verify.",
        ),
        click.option(
            "--calibration-method",
            type=click.Choice(CALIBRATION_METHODS),
            cls=LibraryOption,
            help=f"With --int8: how activation ranges are calibrated [default: {CALIBRATION_METHODS[0]}].",
        ),
        click.option(
            "--calibration-samples",
            type=int,
            cls=LibraryOption,
            help="With --int8: samples that calibrate; the others verify [default: half the data, at most 256].",
        ),
        click.option(
            "--int8-min-agreement",
            type=float,
            cls=LibraryOption,
            help=f"With --int8: least top-1 agreement with PyTorch, a fraction [default: {INT8_MIN_AGREEMENT:g}].",
        ),
        click.option(
            "--int8-min-sqnr",
            type=float,
            cls=LibraryOption,
            help=f"With --int8: least SQNR of every output, in dB [default: {INT8_MIN_SQNR_DB:g}].",
        ),
        click.option(
            "--int8-max-float-layers",
            type=int,
            cls=LibraryOption,
            help="With --int8: most sensitive layers the budget may leave in float (0: none) "
            f"[default: {INT8_MAX_FLOAT_LAYERS}].",
        ),
        click.option(
            "--rules",
            type=NameList(),
            cls=LibraryOption,
            help="Apply only these fold rules (comma-separated names; default: all; an unknown name lists them).",
        ),
        click.option(
            "--skip-rules",
            type=NameList(),
            cls=LibraryOption,
            help="Apply every fold rule except these (comma-separated names).",
        ),
    ],
)


@dataclass(frozen=True)
class ModelOptions:
    """How to read a PyTorch model file: ``--arch``, ``--arch-kwargs``, ``--trust-pickle``."""

    arch: str | None
    arch_kwargs: str | None
    """JSON text; :func:`bnfold.load_model` checks what it holds."""
    trust_pickle: bool

    def load(self, model: str) -> LoadedModel:
        """The model at ``model``, loaded as these options say."""
        kwargs = None
        if self.arch_kwargs:
            try:
                kwargs = json.loads(self.arch_kwargs)
            except ValueError as exc:
                raise UsageError(f"--arch-kwargs is not valid JSON: {exc}") from exc
        from bnfold.loading import load_model

        return load_model(model, arch=self.arch, arch_kwargs=kwargs, trust_pickle=self.trust_pickle)


model_options = option_group(
    "loading",
    ModelOptions,
    [
        click.option(
            "--arch",
            metavar="MODULE:FACTORY",
            help="Architecture for a state_dict file: package.module:factory or file.py:factory. Its code is imported and run.",
        ),
        click.option(
            "--arch-kwargs",
            metavar="JSON",
            help="Keyword arguments for the --arch factory, as a JSON object, e.g. '{\"num_classes\": 10}'.",
        ),
        click.option(
            "--trust-pickle",
            is_flag=True,
            cls=LibraryOption,
            help="Allow unpickling a whole nn.Module. Unpickling runs code from the file: only for files you trust.",
        ),
    ],
)


@dataclass(frozen=True)
class InputShapeOptions:
    """The model's input shapes (``--input-shape``, repeated), for files that do not record them."""

    input_shapes: tuple[str, ...]

    def shapes(self) -> list[tuple[int, ...]]:
        """The parsed shapes (call it before any slow step: a malformed one is a usage error)."""
        return [parse_shape(text) for text in self.input_shapes]


input_shape_options = option_group(
    "input_shape",
    InputShapeOptions,
    [
        click.option(
            "--input-shape",
            "input_shapes",
            multiple=True,
            metavar="NxCxHxW",
            help="Input shape, batch first (repeat for several inputs). Needed when the file does not record it.",
        )
    ],
)


@dataclass(frozen=True)
class VerifyOptions:
    """How to verify an ONNX model: ``--rtol``, ``--atol``, ``--inputs``, ``--reference``."""

    rtol: float | None
    atol: float | None
    inputs: str | None
    reference: str

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`bnfold.verify` and :func:`bnfold.export` they set."""
        return dataclasses.asdict(self)


def verify_options(float16_when: str) -> Decorator:
    """The verification options; the float16 tolerances apply ``float16_when`` (for the help)."""
    return option_group(
        "verification",
        VerifyOptions,
        [
            click.option(
                "--rtol",
                type=float,
                help=f"Relative tolerance, against max|y_ref| [default: {DEFAULT_RTOL:g}; {FP16_RTOL:g} {float16_when}].",
            ),
            click.option(
                "--atol",
                type=float,
                help=f"Absolute tolerance [default: {DEFAULT_ATOL:g}; {FP16_ATOL:g} {float16_when}].",
            ),
            click.option(
                "--inputs", type=click.Path(), help="Verification data: .npy, or .npz with one array per model input."
            ),
            click.option(
                "--reference",
                type=click.Choice(REFERENCES),
                default="float32",
                show_default=True,
                help="float64 also reports the error of the original and the ONNX model against a float64 run.",
            ),
        ],
    )


@dataclass(frozen=True)
class MetadataOptions:
    """Class labels and image preprocessing to store in the ONNX metadata (``--labels``,
    ``--preprocess-*``); each overrides what the model file carries."""

    labels_path: str | None
    preprocess_size: str | None
    preprocess_mean: str | None
    preprocess_std: str | None
    preprocess_channels: str | None

    def labels(self, loaded: LoadedModel) -> list[str] | None:
        """The labels of ``--labels``, else those the model file carries."""
        return read_labels(self.labels_path) if self.labels_path else loaded.labels

    def preprocess(
        self, loaded: LoadedModel, example: Sequence[torch.Tensor], dynamic_size: bool = False
    ) -> Preprocess | None:
        """The model file's preprocessing with each given ``--preprocess-*`` option replacing its
        field (see :func:`bnfold.metadata.preprocess_for` for the defaults; ``dynamic_size``: the
        size defaults to each image's own)."""
        mean, std = self.preprocess_mean, self.preprocess_std
        size: Sequence[int] | str | None = None
        if self.preprocess_size:
            dynamic = self.preprocess_size.strip().lower() == DYNAMIC
            size = DYNAMIC if dynamic else parse_shape(self.preprocess_size, "preprocess.size", "224x224 or dynamic")
        return preprocess_for(
            example[0].shape,
            loaded.preprocess,
            size=size,
            mean=parse_floats(mean, "preprocess.mean") if mean else None,
            std=parse_floats(std, "preprocess.std") if std else None,
            channel_order=self.preprocess_channels,
            dynamic_size=dynamic_size,
        )


metadata_options = option_group(
    "metadata",
    MetadataOptions,
    [
        click.option(
            "--labels",
            "labels_path",
            type=click.Path(),
            cls=LibraryOption,
            parameter="labels",
            help="Class labels, one per line, stored in the ONNX metadata.",
        ),
        click.option(
            "--preprocess-size",
            metavar="HxW|dynamic",
            cls=LibraryOption,
            parameter="preprocess.size",
            help="Image preprocessing stored in the ONNX metadata: resize to HxW, or keep each image's size "
            "(dynamic) [default: the input's HxW; dynamic with --dynamic-size].",
        ),
        click.option(
            "--preprocess-mean",
            metavar="M[,M,M]",
            cls=LibraryOption,
            parameter="preprocess.mean",
            help="Per-channel mean subtracted after scaling pixels to [0, 1] (default 0).",
        ),
        click.option(
            "--preprocess-std",
            metavar="S[,S,S]",
            cls=LibraryOption,
            parameter="preprocess.std",
            help="Per-channel std divided by (default 1).",
        ),
        click.option(
            "--preprocess-channels",
            type=click.Choice(CHANNEL_ORDERS),
            cls=LibraryOption,
            parameter="preprocess.channel_order",
            help="Channel order: RGB, BGR or L (grayscale); default from the channel count.",
        ),
    ],
)


@dataclass(frozen=True)
class RayOptions:
    """Running ``bnfold predict`` on Ray Data: ``--ray``, ``--ray-address``, ``--actors``,
    ``--cpus-per-actor``, ``--gpus-per-actor`` (the last four only with ``--ray``)."""

    ray: bool
    ray_address: str | None
    actors: str | None
    cpus_per_actor: float | None
    gpus_per_actor: float | None

    def check(self) -> None:
        """A usage error if a Ray option is given without ``--ray``."""
        if self.ray:
            return
        given = [flag for flag, value in zip(RAY_ONLY_FLAGS, dataclasses.astuple(self)[1:]) if value is not None]
        if given:
            raise UsageError(f"{given[0]} needs --ray")

    def pool(self) -> int | tuple[int, int]:
        """``--actors``: a pool size ``N`` or an autoscaling range ``MIN,MAX`` (default 1)."""
        text = self.actors or "1"
        try:
            sizes = [int(part) for part in text.split(",")]
        except ValueError:
            sizes = []
        if len(sizes) not in (1, 2):
            raise UsageError(f"--actors {text!r}: expected N or MIN,MAX, e.g. 4 or 1,8")
        return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


RAY_ONLY_FLAGS = ("--ray-address", "--actors", "--cpus-per-actor", "--gpus-per-actor")

ray_options = option_group(
    "scale",
    RayOptions,
    [
        click.option("--ray", is_flag=True, help="Run on Ray Data (needs bnfold[ray]) and write -o OUT.parquet."),
        click.option(
            "--ray-address",
            metavar="ADDRESS",
            cls=LibraryOption,
            parameter="address",
            help="Join the Ray cluster at ADDRESS (auto, host:port or ray://host:port) instead of starting a local one.",
        ),
        click.option(
            "--actors", metavar="N|MIN,MAX", help="Prediction actors: a pool of N, or MIN to MAX [default: 1]."
        ),
        click.option(
            "--cpus-per-actor",
            type=float,
            help="CPUs (ONNX Runtime threads) per actor [default: the cluster's CPUs shared among the actors].",
        ),
        click.option(
            "--gpus-per-actor", type=float, help="GPUs per actor; CUDA runs only on actors given one [default: 0]."
        ),
    ],
)
