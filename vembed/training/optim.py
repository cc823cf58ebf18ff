"""AdamW parameter groups (no decay on norms/biases/tokens, layer-wise lr decay, head lr) and the schedule."""

from __future__ import annotations

import re

from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

from vembed.settings import TrainSettings

# Parameters that are never weight-decayed besides 1-D ones: learned tokens and position embeddings.
_NO_DECAY = re.compile(r"(cls_token|class_embedding|mask_token|register_tokens|position_embedding)")
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
_EMBEDDINGS = re.compile(r"(?:^|\.)(embeddings|pre_layrnorm)\.")


def head_lr(settings: TrainSettings) -> float:
    """The lr of the projection and the loss's parameters (see ``train.head_lr``)."""
    if settings.head_lr is not None:
        return settings.head_lr
    return settings.lr if settings.method == "frozen" else 10 * settings.lr


def layer_id(name: str, num_layers: int) -> int:
    """0 for the embeddings, i + 1 for transformer block i, ``num_layers + 1`` for what follows."""
    match = _LAYER.search(name)
    if match:
        return int(match.group(1)) + 1
    if _EMBEDDINGS.search(name):
        return 0
    return num_layers + 1


def param_groups(
    backbone: nn.Module, head: list[tuple[str, nn.Parameter]], settings: TrainSettings
) -> list[dict]:
    """AdamW groups for the trainable parameters of ``backbone`` and the ``head`` parameters.

    Backbone parameters get ``settings.lr`` scaled by ``layer_decay ** (L + 1 - layer_id)`` when
    ``layer_decay`` is set; head parameters (projection, GeM, loss proxies/classifier/temperature) get
    :func:`head_lr`. 1-D parameters, learned tokens and position embeddings have no weight decay.
    """
    num_layers = _num_layers(backbone)
    groups: dict[tuple[str, float, float], list[nn.Parameter]] = {}

    def add(kind: str, name: str, param: nn.Parameter, lr: float) -> None:
        decay = 0.0 if param.ndim <= 1 or _NO_DECAY.search(name) else settings.weight_decay
        groups.setdefault((kind, lr, decay), []).append(param)

    for name, param in backbone.named_parameters():
        if not param.requires_grad:
            continue
        scale = 1.0
        if settings.layer_decay is not None:
            scale = settings.layer_decay ** (num_layers + 1 - layer_id(name, num_layers))
        add("backbone", name, param, settings.lr * scale)
    for name, param in head:
        if param.requires_grad:  # a loss may give a parameter its own rate (proxy_anchor's proxies)
            add("head", name, param, head_lr(settings) * getattr(param, "lr_scale", 1.0))
    return [
        {"params": params, "lr": lr, "weight_decay": decay, "name": f"{kind}/lr={lr:.3g}/wd={decay:g}"}
        for (kind, lr, decay), params in groups.items()
    ]


def build_optimizer(groups: list[dict], settings: TrainSettings) -> Optimizer:
    """AdamW over ``groups``; fused (one kernel for every parameter) per ``train.fused_adamw``."""
    fused = settings.fused_adamw
    if fused is None:
        import torch

        fused = torch.cuda.is_available()
    return AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused or None)


def build_scheduler(
    optimizer: Optimizer, settings: TrainSettings, *, total_steps: int, steps_per_epoch: int
) -> LambdaLR:
    """Linear warm-up over ``train.warmup_ratio`` of the steps, then ``train.scheduler``:

    - ``cosine``: cosine decay to 0 at the last step (transformers' schedule);
    - ``step``: the lr times ``train.step_gamma`` at each ``train.step_epochs`` boundary (every N epochs,
      or after each listed epoch), counted in optimiser steps (``epoch x steps_per_epoch``);
    - ``constant``: the peak lr throughout.
    """
    warmup = round(total_steps * settings.warmup_ratio)
    total = max(total_steps, 1)
    if settings.scheduler == "cosine":
        from transformers import get_cosine_schedule_with_warmup

        return get_cosine_schedule_with_warmup(optimizer, warmup, total)
    boundaries: list[int] = []
    if settings.scheduler == "step":
        epochs = settings.step_epochs
        if isinstance(epochs, list):
            boundaries = sorted(e * steps_per_epoch for e in epochs)
        else:
            boundaries = list(range(epochs * steps_per_epoch, total + 1, epochs * steps_per_epoch))
    gamma = settings.step_gamma

    def factor(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        return gamma ** sum(step >= b for b in boundaries)

    return LambdaLR(optimizer, factor)


def _num_layers(backbone: nn.Module) -> int:
    config = getattr(backbone, "config", None)
    layers = getattr(config, "num_hidden_layers", None)
    if layers is None:
        found = [int(m.group(1)) for name, _ in backbone.named_parameters() if (m := _LAYER.search(name))]
        layers = max(found, default=-1) + 1
    return int(layers)
