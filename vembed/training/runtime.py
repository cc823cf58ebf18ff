"""The accelerate side of a run: the Accelerator, releasing its process-wide state, deterministic mode."""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

from vembed.errors import VembedError
from vembed.models.factory import resolve_device
from vembed.settings import Settings


def make_accelerator(settings: Settings) -> Accelerator:
    s = settings.train
    kwargs: dict = {
        "mixed_precision": s.precision,
        "gradient_accumulation_steps": s.grad_accum,
        # on a machine without an accelerator, accelerate runs several processes (torchrun) only with cpu=True
        "cpu": resolve_device(settings.model.device).type == "cpu",
        # train.compile: accelerate wraps the prepared model in torch.compile (inductor)
        "dynamo_backend": "inductor" if s.compile else "no",
        # a backbone carries parameters an embedding's forward never uses (DINOv2's mask token, CLIP's
        # post-layernorm under cls/mean pooling, SigLIP's attention-pooling head under mean pooling): DDP
        # must look for them each step, or it stops at the second step waiting for their gradients
        "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)],
    }
    from accelerate.utils import is_tensorboard_available

    if is_tensorboard_available():
        kwargs.update(log_with="tensorboard", project_dir=str(s.output_dir))
    try:
        accelerator = Accelerator(**kwargs)
    except (ValueError, RuntimeError) as exc:
        raise VembedError(f"train.precision={s.precision}: {exc}") from None
    if accelerator.distributed_type == DistributedType.FSDP:
        raise VembedError(
            "FSDP is not supported by vembed's checkpoints yet: use DDP (`accelerate launch --multi_gpu`); "
            "ViT backbones up to dinov2-giant fit one GPU with bf16 and train.grad_checkpointing=true"
        )
    if accelerator.trackers == [] and kwargs.get("log_with"):
        accelerator.init_trackers("vembed")
    return accelerator


def release_accelerator() -> None:
    """Forget accelerate's process-wide state so a later train() may use other settings (notebooks, tests)."""
    AcceleratorState._reset_state()
    GradientState._reset_state()


@contextlib.contextmanager
def deterministic(enabled: bool):
    """torch.use_deterministic_algorithms (warn only) and no cudnn autotuning, restored afterwards."""
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = benchmark
