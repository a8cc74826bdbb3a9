"""What an exported ONNX model is, read from its session and bnfold's metadata: inputs and
outputs, the image sizes of a dynamic-size model, labels, preprocessing, the weights' dtype, the fold report's summary and, for an INT8
model, its quantization facts. ``bnfold inspect MODEL.onnx`` prints it."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from ..image_sizes import ImageSizes
from ..metadata import FOLD_REPORT_KEY, VERSION_KEY, WEIGHT_DTYPE_KEY
from .runner import Predictor
from .specs import TensorSpec


def describe_tensor(spec: TensorSpec) -> dict[str, Any]:
    """Name, shape (``None`` for a free dimension such as the batch axis) and dtype."""
    return {
        "name": spec.name,
        "shape": [d if isinstance(d, int) else None for d in spec.shape],
        "dtype": str(spec.dtype),
    }


def model_summary(predictor: Predictor) -> dict[str, Any]:
    """The model ``predictor`` runs, as JSON-safe data (``None`` where bnfold's metadata is absent,
    e.g. for an ONNX file bnfold did not export)."""
    meta = predictor.metadata
    return {
        "inputs": [describe_tensor(s) for s in predictor.inputs],
        "outputs": [describe_tensor(s) for s in predictor.outputs],
        "image_sizes": {name: sizes.to_dict() for name, sizes in predictor.image_sizes.items()} or None,
        "labels": predictor.labels,
        "preprocessing": asdict(predictor.preprocess) if predictor.preprocess is not None else None,
        "weight_dtype": meta.get(WEIGHT_DTYPE_KEY),
        "exported_with": meta.get(VERSION_KEY),
        "fold_report": _json_or_none(meta.get(FOLD_REPORT_KEY)),
        "int8": predictor.int8,
    }


def _json_or_none(text: str | None) -> Any:
    """A metadata entry's JSON, or ``None`` when it is missing or malformed (a file from elsewhere)."""
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def summary_text(path: str, summary: dict[str, Any]) -> str:
    """``summary`` (see :func:`model_summary`) as the lines ``bnfold inspect`` prints."""
    shape = lambda t: "x".join("?" if d is None else str(d) for d in t["shape"])
    lines = [
        f"ONNX model: {path}"
        + (f" (exported by bnfold {summary['exported_with']})" if summary["exported_with"] else "")
    ]
    lines += [f"  input  {t['name']}: {shape(t)} {t['dtype']}" for t in summary["inputs"]]
    lines += [f"  output {t['name']}: {shape(t)} {t['dtype']}" for t in summary["outputs"]]
    sizes = {name: ImageSizes.from_dict(rule) for name, rule in (summary["image_sizes"] or {}).items()}
    lines.append(
        "  image size: "
        + (", ".join(f"dynamic, input '{name}': {rule}" for name, rule in sizes.items()) if sizes else "fixed")
    )
    int8 = summary["int8"]
    if int8:
        floats = int8.get("float_layers") or []
        agreement = ", ".join(f"{name} {value:.2%}" for name, value in (int8.get("top1_agreement") or {}).items())
        lines.append(
            f"  weights: INT8 (QDQ; {int8.get('calibration_method')} calibration on {int8.get('calibration_samples')} "
            f"sample(s); {len(floats)} layer(s) left in float{': ' + ', '.join(floats) if floats else ''}; "
            f"top-1 agreement {agreement or 'n/a'} on {int8.get('verification_samples')} held-out sample(s))"
        )
    else:
        lines.append(f"  weights: {summary['weight_dtype'] or 'not recorded (not exported by bnfold)'}")
    report = summary["fold_report"]
    if report:
        lines.append(
            f"  fold: {report.get('batch_norms')} batch-norm(s), {report.get('folded')} folded, {report.get('kept')} kept"
        )
    if summary["labels"]:
        lines.append(
            f"  labels: {len(summary['labels'])} ({', '.join(summary['labels'][:5])}{', ...' if len(summary['labels']) > 5 else ''})"
        )
    if summary["preprocessing"]:
        p = summary["preprocessing"]
        size = f"resize to {p['size'][0]}x{p['size'][1]}" if p["size"] else "each image at its own size"
        lines.append(f"  preprocessing: {size}, {p['channel_order']}, mean {list(p['mean'])}, std {list(p['std'])}")
    return "\n".join(lines)
