"""What every export shares: the result it reports, its tolerances, the check batch and the ONNX writer
(used by :mod:`vembed.export` for image models and :mod:`vembed.export_dual` for dual encoders)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vembed.errors import VembedError

DTYPES = ("float32", "float16", "bfloat16")
ONNX_FILE = "model.onnx"
ONNX_OPSET = 18
ONNX_SINGLE_FILE_BYTES = 1_500_000_000  # larger graphs keep their weights in model.onnx.data
ONNX_ATOL = 1e-4  # max abs difference allowed between ONNX and PyTorch embeddings (float32)
# max abs difference allowed between the reloaded export and the source model's embeddings
RELOAD_ATOL = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}


@dataclass
class ExportResult:
    """What ``export_model`` wrote and how closely it reproduces the source model."""

    source: str  # what was asked for (run dir, model folder, registry name or hub id)
    model: str  # the model folder (or name) actually loaded, e.g. RUN/final
    out_dir: Path
    dtype: str
    embed_dim: int
    max_abs_diff: float  # reloaded export vs source, float32 embeddings of a check batch
    onnx_path: Path | None = None
    onnx_max_abs_diff: float | None = None
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    head_checks: dict[str, float] = field(default_factory=dict)  # the head's own checks (e.g. logits)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "model": self.model,
            "out_dir": str(self.out_dir),
            "dtype": self.dtype,
            "embed_dim": self.embed_dim,
            "max_abs_diff": self.max_abs_diff,
            "onnx": str(self.onnx_path) if self.onnx_path else None,
            "onnx_max_abs_diff": self.onnx_max_abs_diff,
            "files": self.files,
            "seconds": round(self.seconds, 3),
            **self.head_checks,
        }


def check_batch(embedder: nn.Module, n: int = 2) -> torch.Tensor:
    """A fixed, reproducible batch of normalised pixel values at the model's input size."""
    size = embedder.spec.image_size
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=generator)


def write_onnx(
    embedder: nn.Module, path: Path, check: torch.Tensor, reference: torch.Tensor, opset: int
) -> float:
    """Export ``embedder`` (pixel_values → embeddings, dynamic batch) and compare onnxruntime with PyTorch."""
    batch = torch.export.Dim("batch", min=1)
    session = onnx_export(
        embedder,
        (check,),
        path,
        input_names=["pixel_values"],
        dynamic_shapes={"pixel_values": {0: batch}},
        opset=opset,
        external_data=num_bytes(embedder) > ONNX_SINGLE_FILE_BYTES,
        what="ONNX export",
    )
    # run a different batch size than the one traced, to check the batch axis really is dynamic
    bigger = torch.cat([check, check.flip(0)[:1]])
    with torch.inference_mode():
        expected = torch.cat([reference, embedder(bigger[len(check) :]).float()])
    got = torch.from_numpy(session.run(["embeddings"], {"pixel_values": bigger.numpy()})[0])
    if got.shape != expected.shape:
        raise VembedError(f"ONNX graph returned shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    return onnx_diff(got, expected, "ONNX output")


def onnx_export(
    module: nn.Module,
    args: tuple,
    path: Path,
    *,
    input_names: list[str],
    dynamic_shapes: dict,
    opset: int,
    what: str,
    external_data: bool,
):
    """``torch.onnx.export`` (dynamo) of ``module`` to ``path`` with the exporter's chatter silenced and
    its many exception types turned into one line (``{what} failed: ...``); an onnxruntime session.
    ``external_data``: the weights in ``PATH.data`` beside the graph."""
    import onnxruntime

    noise = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=input_names,
                output_names=["embeddings"],
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                dynamo=True,
                external_data=external_data,
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many types; report one line with the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise VembedError(f"{what} failed: {first}") from None
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_diff(got: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    """Max abs difference of onnxruntime's output from PyTorch's; over ``ONNX_ATOL`` is an error."""
    diff = float((got - expected).abs().max())
    if not diff <= ONNX_ATOL:
        raise VembedError(
            f"{what} differs from PyTorch by {diff:.2e} (max abs, allowed {ONNX_ATOL:.0e}); nothing was written"
        )
    return diff


def num_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())
