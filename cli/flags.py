"""The one place where the library's parameter names become the CLI's flags.

Library errors write a parameter, or a call that would fix the problem, in backticks
(`` `rtol` must be non-negative``); :func:`cli_message` replaces each such name by the flag that
sets it, so the library never names a flag and the CLI never re-words the library's checks.
"""

from __future__ import annotations

import re

# Library parameter (or `name=value` suggestion) -> the flag (or argument) that sets it.
PARAMETER_FLAGS: dict[str, str] = {
    # export / inspect / verify
    "path": "-o",
    "rtol": "--rtol",
    "atol": "--atol",
    "inputs": "--inputs",
    "reference": "--reference",
    'reference="float64"': "--reference float64",
    "fp16=True": "--fp16",
    "keep_io_types=True": "--keep-io-types",
    "verify=False": "--no-verify",
    "dynamic_batch=False": "--static-batch",
    "input_shapes": "--input-shape",
    "opset": "--opset",
    "rules": "--rules",
    "skip_rules": "--skip-rules",
    # loading
    "arch": "--arch",
    "arch_kwargs": "--arch-kwargs",
    "trust_pickle=True": "--trust-pickle",
    # labels and preprocessing
    "labels": "--labels",
    "preprocess": "--preprocess-mean/--preprocess-std",
    "preprocess.size": "--preprocess-size",
    "preprocess.mean": "--preprocess-mean",
    "preprocess.std": "--preprocess-std",
    "preprocess.channel_order": "--preprocess-channels",
    # Predictor (bnfold predict)
    "batch_size": "--batch-size",
    "device": "--device",
    "device='auto'": "--device auto",
    "device='cuda'": "--device cuda",
    "top_k": "--top-k",
    # bnfold predict --ray (bnfold.scale)
    "address": "--ray-address",
    "actors": "--actors",
    "cpus_per_actor": "--cpus-per-actor",
    "gpus_per_actor": "--gpus-per-actor",
    "data": "INPUTS",
    # bnfold serve (bnfold.scale.serve); `address` is shared with bnfold predict --ray
    "host": "--host",
    "port": "--port",
    "replicas": "--replicas",
    "cpus_per_replica": "--cpus-per-replica",
    "gpus_per_replica": "--gpus-per-replica",
    "max_batch_size": "--max-batch-size",
    "batch_wait_ms": "--batch-wait-ms",
    "max_body_mb": "--max-body-mb",
    "body_timeout_s": "--body-timeout-s",
    "token_file": "--token-file",
    # recalibrate (bnfold export --recalibrate); its batch_size is not predict's --batch-size
    "recalibrate": "--recalibrate",
    "recalibrate(batch_size)": "--recalibrate-batch-size",
    # bench
    "batch_sizes": "--batch-sizes",
    "repeats": "--repeats",
}

_CODE = re.compile(r"`([^`]+)`")


def cli_message(message: str) -> str:
    """``message`` with every backticked library parameter replaced by its flag; other
    backticked code keeps its backticks."""
    return _CODE.sub(lambda m: PARAMETER_FLAGS.get(m.group(1), m.group(0)), message)
