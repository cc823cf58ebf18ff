"""Which floating-point type a model computes in: ``model.dtype=auto`` → bf16 where the hardware has it.

bf16 inference is used on GPUs (fp16 on those without bf16) and on CPUs that compute bf16 natively:
x86 with AMX-BF16 or AVX512-BF16, ARM with the BF16 extension. Elsewhere bf16 is emulated and slower
than fp32, so ``auto`` stays fp32. Training keeps fp32 master weights whatever this says (see
``train.precision``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

# /proc/cpuinfo flags that mean the CPU multiplies bf16 in hardware (x86 "flags", ARM "Features").
X86_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
ARM_BF16_FLAGS = ("bf16",)
# Set to 0 or 1 to override the detection (e.g. to compare both on one machine).
ENV_OVERRIDE = "VEMBED_CPU_BF16"


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on GPUs that support it (fp16 otherwise) and on CPUs with native bf16, else fp32."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 matrix products in hardware (and torch's oneDNN uses them).

    ``VEMBED_CPU_BF16=0`` / ``=1`` overrides the detection.
    """
    forced = os.environ.get(ENV_OVERRIDE, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return _detect_cpu_bf16()


def cpu_bf16_reason() -> str:
    """One line saying why bf16 is (not) native here, for logs and skipped tests."""
    flags = sorted(cpu_flags() & set(X86_BF16_FLAGS + ARM_BF16_FLAGS))
    if cpu_has_native_bf16():
        return f"native bf16 on this CPU ({', '.join(flags) or ENV_OVERRIDE + '=1'})"
    return (
        f"this CPU has no native bf16 (none of the flags {', '.join(X86_BF16_FLAGS)} on x86, "
        f"{', '.join(ARM_BF16_FLAGS)} on ARM{', or ' + ENV_OVERRIDE + '=0' if flags else ''})"
    )


@functools.cache
def _detect_cpu_bf16() -> bool:
    machine = platform.machine().lower()
    flags = cpu_flags()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        native = bool(flags & set(X86_BF16_FLAGS))
    elif machine in ("aarch64", "arm64"):
        native = bool(flags & set(ARM_BF16_FLAGS))
    else:
        native = False
    return native and _torch_cpu_bf16()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from ``/proc/cpuinfo`` (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def _torch_cpu_bf16() -> bool:
    """Whether this torch build has bf16 CPU kernels (oneDNN); private API, so failures mean no."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.mkldnn.is_available()


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → cuda if available, then mps, else cpu."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class BackboneModule(nn.Module):
    """A model around a transformers ``self.backbone``: where it runs, the type it computes in, and
    the eval mode its inference methods run in (the training mode is restored after)."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)


class HeadModule(nn.Module):
    """A task head whose weights are its whole state (:class:`vembed.models.heads.Head`)."""

    def weights(self) -> dict[str, torch.Tensor]:
        """Its weights (float32, CPU, contiguous), saved under the ``task_head.`` prefix."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
