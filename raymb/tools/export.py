"""`raymb export`: a saved model as safetensors, ONNX or TorchScript, checked against torch.

Every format carries what a reader needs to use the model without raymb's checkpoint: the
config, the inputs spec (task, row shape, the data.scale/mean/std a row is normalised with),
in_features, out_features, classify, the tokenizer (and a transformers model's resolved
config), each as JSON under `raymb.<key>`: in the safetensors header's metadata (with
rebuild() turning it back into a model), the ONNX model's metadata_props, and the TorchScript
archive's extra files.

The ONNX and TorchScript models take what `InputShape.collate` makes: float rows [B, d] or
images [B, C, H, W], or int64 token ids [B, T] for a language model; the batch axis (and
the token axis, up to the model's block size) is free. A model of named inputs (data.inputs)
takes its columns in order, each named as its column (ONNX input names), as stored, and
gives its logits (a Hugging Face ModelOutput's .logits); it is traced on the first rows of
--data, whose types (token ids, floats) only the data tells. Both are traced in eval mode (a
BatchNorm uses its running statistics). After writing, the file is read back by its own
reader and run on a batch of another size than the one traced, and compared with the torch
model. The file is written under a temporary name and renamed: a failed export leaves none.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raymb.core.batch import logits
from raymb.core.shape import InputShape
from raymb.errors import RaymbError
from raymb.storage import temp_sibling
from raymb.tools.checks import check_export
from raymb.tools.load import build_from_payload, load_model, payload_inputs

TRACE_ROWS, CHECK_ROWS = 2, 4  # different sizes: the check proves the batch axis is free
OPSET = 17  # the first with LayerNormalization; read by every maintained ONNX runtime
RTOL = 1e-3
"""Largest difference from torch that passes the check, relative to the outputs' largest
magnitude (at least 1): float32 rounding gives ~1e-6; a mis-traced model gives O(1)."""
_META_KEYS = ("config", "inputs", "in_features", "out_features", "classify", "tokenizer")
_OPTIONAL_META = ("transformers",)  # a transformers model's resolved config, when stored


def export(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    *,
    data: str | None = None,
    trust_model_code: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Write the model saved in `checkpoint` to `out` in format `fmt` and check it (a custom
    model factory runs only with `trust_model_code`: raymb.checkpoint.load_model). An
    existing `out` is replaced only with `force`; never the checkpoint, a file in its folder,
    a folder or a device (raymb.tools.checks.check_export). A model of named inputs
    (data.inputs) is traced and checked on the first rows of `data`, which it needs: their
    types (token ids, floats) are the data's.

    Returns out (path), format, bytes, max_abs_diff (the read-back file against the torch
    model) and rows (the size of the batch they were compared on).
    """
    check_export(checkpoint, fmt, out, force=force, data=data)
    out = Path(out)
    model, payload = load_model(checkpoint, trust_model_code=trust_model_code)
    model.eval()
    inputs = payload_inputs(payload)
    metadata = _metadata(payload, inputs)
    if inputs.columns is not None:
        names = [name for name, _ in inputs.columns]
        rows = _first_rows(data, inputs, payload, names)
        traced = tuple(rows[name][:TRACE_ROWS] for name in names)
        checked = tuple(rows[name] for name in names)
    else:
        names = [INPUT]
        traced = (example_input(inputs, payload["out_features"], TRACE_ROWS, seed=0),)
        checked = (example_input(inputs, payload["out_features"], CHECK_ROWS, seed=1),)
    tmp = temp_sibling(out)  # unique: two exports of one --out do not collide
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch's notes on tracing and on its TorchScript exporters are not the user's
            warnings.simplefilter("ignore")
            _WRITERS[fmt](model, traced, names, metadata, tmp)
            want = positional(model, names)(*checked)
            try:
                got = _READERS[fmt](tmp, checked, names)
            except Exception as e:  # the exporters' errors come in many types
                traced_on = "" if fmt == "safetensors" else f" (traced on {TRACE_ROWS})"
                raise RaymbError(
                    f"{fmt} export check: the written model fails on {CHECK_ROWS} "
                    f"rows{traced_on}: {_first_line(e)}"
                ) from None
        diff = _max_abs_diff(got, want)
        limit = RTOL * max(1.0, want.abs().max().item())
        if not diff <= limit:  # NaN fails too
            raise RaymbError(
                f"{fmt} export check: the written model differs from torch by {diff:.2g} "
                f"on {CHECK_ROWS} rows (at most {limit:.2g} expected); the model may do "
                "something tracing does not capture (data-dependent control flow)"
            )
        size = tmp.stat().st_size
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"out": str(out), "format": fmt, "bytes": size, "max_abs_diff": diff, "rows": CHECK_ROWS}


INPUT = "input"
"""The one input's name in ONNX, for a model of data.features (named inputs keep theirs)."""


class Positional(nn.Module):
    """A model of named inputs called with them in order, returning its logits (a tensor):
    what tracing and ONNX take (input names: the columns)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, list(names)

    def forward(self, *columns: torch.Tensor) -> torch.Tensor:
        return logits(self.model(**dict(zip(self.names, columns))))


def positional(model: nn.Module, names: list[str]) -> nn.Module:
    """The model as the exported file runs it: itself for one input, else Positional."""
    return model if names == [INPUT] else Positional(model, names)


def _first_rows(
    data: str | None, inputs: InputShape, payload: dict[str, Any], names: list[str]
) -> dict[str, torch.Tensor]:
    """CHECK_ROWS rows of the named inputs from the start of `data` (repeated if fewer)."""
    from raymb.config import Config
    from raymb.data.columns import named_tensors
    from raymb.tools.evaluate import check_named_inputs, read_batches

    if data is None:
        raise RaymbError(
            f"--data: needed to export a model of named inputs ({', '.join(names)}): give a "
            "parquet file or folder with those columns; its first rows trace and check it"
        )
    label = Config.from_saved(payload["config"]).data.label
    info, named = check_named_inputs(data, inputs, label)
    table = next((t for _, t in read_batches(info, CHECK_ROWS) if len(t)), None)
    if table is None:
        raise RaymbError(f"--data: {data} has no rows to trace the model on")
    columns, _ = named_tensors(table, named)
    at = torch.arange(CHECK_ROWS) % len(table)
    return {name: columns[name].index_select(0, at) for name in names}


def example_input(inputs: InputShape, vocab: int, rows: int, *, seed: int) -> torch.Tensor:
    """A seeded batch of what the model takes: token ids [rows, T] (int64, below `vocab`)
    for a language model, else float32 rows [rows, *shape] drawn from N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    shape = (rows, *inputs.model_shape)
    if inputs.task == "lm":
        return torch.randint(0, vocab, shape, generator=g, dtype=torch.int64)
    return torch.randn(shape, generator=g)


def rebuild(
    path: str | Path, *, trust_model_code: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The model in a safetensors file raymb exported, from the file alone; and the payload
    (config, inputs, ...) its metadata holds, as in a checkpoint's model.pt. Checked as a
    checkpoint is, a custom model factory run only with `trust_model_code`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    missing = [k for k in _META_KEYS if f"raymb.{k}" not in metadata]
    if missing:
        raise RaymbError(f"{path}: not a raymb export (no raymb.{missing[0]} in its metadata)")
    payload = {}
    for k in (*_META_KEYS, *(k for k in _OPTIONAL_META if f"raymb.{k}" in metadata)):
        try:
            payload[k] = json.loads(metadata[f"raymb.{k}"])
        except json.JSONDecodeError:
            raise RaymbError(f"{path}: not a raymb export (raymb.{k} is not JSON)") from None
    state = {**payload, "state_dict": load_file(str(path))}
    return build_from_payload(state, path, trust_model_code=trust_model_code), payload


def format_size(n: int) -> str:
    """Bytes in decimal units: 812 B, 3.4 kB, 1.2 MB."""
    if n < 1000:
        return f"{n} B"
    exp = min(int(math.log10(n) // 3), 4)
    return f"{n / 1000**exp:.1f} {('kB', 'MB', 'GB', 'TB')[exp - 1]}"


def _metadata(payload: dict[str, Any], inputs: InputShape) -> dict[str, str]:
    """`raymb.<key>`: JSON of each payload entry a reader needs (the inputs resolved, for a
    checkpoint from before tensor columns)."""
    values = {k: payload.get(k) for k in _META_KEYS}
    values |= {k: payload[k] for k in _OPTIONAL_META if payload.get(k) is not None}
    values["inputs"] = inputs.to_dict()
    return {f"raymb.{k}": json.dumps(v) for k, v in values.items()}


def _write_safetensors(
    model: nn.Module, xs: tuple, names: list[str], metadata: dict[str, str], path: Path
) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share storage (the gpt's head is its token
    # embedding): each name gets its own copy, so the file loads as the full state_dict.
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", **metadata})


def _read_safetensors(path: Path, xs: tuple, names: list[str]) -> torch.Tensor:
    # The file was written from a model export() already rebuilt, trusted or built in.
    model, _ = rebuild(path, trust_model_code=True)
    return positional(model.eval(), names)(*xs)


def _write_onnx(
    model: nn.Module, xs: tuple, names: list[str], metadata: dict[str, str], path: Path
) -> None:
    import onnx

    if names == [INPUT]:
        axes = {INPUT: {0: "batch", 1: "tokens"} if xs[0].dtype == torch.int64 else {0: "batch"}}
        axes["output"] = axes[INPUT]
    else:  # named columns: rows of a fixed shape each, any number of them
        axes = {name: {0: "batch"} for name in [*names, "output"]}
    buffer = io.BytesIO()
    try:
        # The TorchScript-based exporter: it needs no onnxscript and takes well under a
        # second for these models (the torch.export-based one takes seconds).
        torch.onnx.export(
            positional(model, names),
            xs,
            buffer,
            dynamo=False,
            input_names=names,
            output_names=["output"],
            dynamic_axes=axes,
            opset_version=OPSET,
        )
    except Exception as e:  # torch raises many types for a model it cannot trace
        raise RaymbError(f"cannot export the model to onnx: {_first_line(e)}") from None
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def _read_onnx(path: Path, xs: tuple, names: list[str]) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: x.numpy() for name, x in zip(names, xs)}
    (output,) = session.run(["output"], feeds)
    return torch.from_numpy(output)


def _write_torchscript(
    model: nn.Module, xs: tuple, names: list[str], metadata: dict[str, str], path: Path
) -> None:
    try:  # export() checks it
        traced = torch.jit.trace(positional(model, names), xs, check_trace=False)
    except Exception as e:  # torch raises many types for a model it cannot trace
        raise RaymbError(f"cannot trace the model for torchscript: {_first_line(e)}") from None
    torch.jit.save(traced, str(path), _extra_files=metadata)


def _read_torchscript(path: Path, xs: tuple, names: list[str]) -> torch.Tensor:
    return torch.jit.load(str(path), map_location="cpu")(*xs)


_WRITERS = {
    "safetensors": _write_safetensors,
    "onnx": _write_onnx,
    "torchscript": _write_torchscript,
}
_READERS = {"safetensors": _read_safetensors, "onnx": _read_onnx, "torchscript": _read_torchscript}


def _max_abs_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape:
        raise RaymbError(
            f"export check: the written model gives outputs of shape {list(got.shape)}, "
            f"torch {list(want.shape)}"
        )
    return (got.double() - want.double()).abs().max().item()


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
