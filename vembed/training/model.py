"""The model a run trains: the Embedder with its method applied (LoRA, full, frozen) and its loss."""

from __future__ import annotations

import torch
from torch import nn

from vembed.errors import VembedError
from vembed.losses import build_loss, loss_options
from vembed.models.embedder import Embedder
from vembed.models.factory import create_embedder
from vembed.models.lora import apply_lora
from vembed.settings import Settings, TrainSettings

# train.<key> → the loss option it sets (None values leave the loss's default).
LOSS_KEYS = ("temperature", "learnable_temperature", "margin", "scale", "mining")


def trainable_embedder(settings: Settings) -> Embedder:
    """Load the backbone (float32 master weights on the CPU; accelerate places it) and apply the method.

    ``method=lora`` raises :class:`VembedError` here, before any data is read, when no LoRA target
    matches a Linear module of the backbone.
    """
    model = settings.model
    dtype = "float32" if model.dtype == "auto" else model.dtype
    embedder = create_embedder(model.name, model.model_copy(update={"device": "cpu", "dtype": dtype}))
    train = settings.train
    apply_method(embedder, train)
    if train.method == "frozen" and embedder.gem is not None and train.cache_features:
        embedder.gem.requires_grad_(False)  # the cache holds features pooled with the initial p
    return embedder


def apply_method(model: Embedder, train: TrainSettings) -> None:
    """``train.method`` on a model around a backbone: LoRA adapters on a frozen backbone, a frozen
    backbone in eval mode, or everything trained; ``train.grad_checkpointing`` unless frozen."""
    if train.grad_checkpointing and train.method != "frozen":
        _enable_checkpointing(model.backbone)
    if train.method == "lora":
        model.backbone.requires_grad_(False)
        apply_lora(model, train.lora)
    elif train.method == "frozen":
        model.backbone.requires_grad_(False)
        model.backbone.eval()


def _enable_checkpointing(backbone: nn.Module) -> None:
    """Recompute each block's activations in backward (non-reentrant: works with frozen inputs and LoRA)."""
    if hasattr(backbone, "activation_checkpointing_enable"):  # transformers >= 5
        backbone.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def set_train_mode(embedder: Embedder, method: str) -> None:
    """Training mode, except a frozen backbone (no dropout in features the head is fitted to)."""
    embedder.train()
    if method == "frozen":
        embedder.backbone.eval()


def loss_kwargs(settings: TrainSettings) -> dict:
    """The options ``build_loss`` gets from ``train.*`` keys; keys the loss does not take are errors."""
    name = settings.loss.strip().lower()
    accepted = loss_options(name)  # also raises for an unknown loss name, with a suggestion
    options: dict = {}
    for key in LOSS_KEYS:
        value = getattr(settings, key)
        if value is None or (key == "learnable_temperature" and value is False):
            continue
        if key not in accepted:
            raise VembedError(
                f"train.{key} does not apply to loss '{name}' (its options: {', '.join(accepted) or 'none'})"
            )
        options[key] = value
    for key, value in settings.loss_options.items():
        if key in options:
            raise VembedError(f"train.loss_options.{key} repeats train.{key}; set it once")
        options[key] = value
    if settings.matryoshka_dims:
        options["matryoshka_dims"] = list(settings.matryoshka_dims)
    if settings.memory_bank:
        options["memory_bank"] = settings.memory_bank
    return options


def make_loss(settings: TrainSettings, *, embed_dim: int, num_classes: int) -> nn.Module:
    return build_loss(settings.loss, embed_dim=embed_dim, num_classes=num_classes, **loss_kwargs(settings))


def check_objective(settings: TrainSettings, embedder: Embedder) -> None:
    """Loss name and options, and that ``method=frozen`` trains something the saved model keeps.

    A frozen backbone without a projection (or GeM) head has no trainable weight in the embedding: only a
    loss whose parameters are kept with the model (``ce``'s classifier, ``trains_classifier``) is then
    worth training. ArcFace/CosFace proxies or a learnable temperature would train, but change nothing
    the saved model computes.
    """
    with torch.random.fork_rng(devices=[]):  # the probe must not shift the seeded initialisation
        probe = make_loss(settings, embed_dim=embedder.embed_dim, num_classes=2)
    if any(p.requires_grad for p in embedder.parameters()):
        return
    if getattr(probe, "trains_classifier", False):
        return  # the classifier is kept with the model (vembed classify)
    learns = (
        "only the loss's own parameters (class proxies, temperature) would learn, and the saved model would "
        "not change"
        if any(True for _ in probe.parameters())
        else "nothing would learn"
    )
    raise VembedError(
        f"method=frozen with loss '{settings.loss}' has nothing to train that reaches the embedding: the "
        f"backbone is frozen and the model has no head, so {learns}. Set model.projection_dim (e.g. "
        "model.projection_dim=256: a linear head trained on the frozen features), use train.method=lora or "
        "full, or train.loss=ce (a classifier kept with the model)"
    )


def trainable_state(embedder: Embedder, loss: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold: trainable weights of the embedder, and the loss's state (``loss.*``)."""
    state = {name: p.detach() for name, p in embedder.named_parameters() if p.requires_grad}
    state.update({f"loss.{k}": v.detach() for k, v in loss.state_dict().items()})
    return state


def load_trainable_state(
    embedder: Embedder, loss: nn.Module, state: dict[str, torch.Tensor], *, where: str
) -> None:
    model_part = {k: v for k, v in state.items() if not k.startswith("loss.")}
    loss_part = {k[len("loss.") :]: v for k, v in state.items() if k.startswith("loss.")}
    expected = {name for name, p in embedder.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - set(model_part)), sorted(set(model_part) - expected)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise VembedError(f"{where}: the checkpoint does not match this model and method ({detail})")
    embedder.load_state_dict(model_part, strict=False)
    try:
        loss.load_state_dict(loss_part)
    except RuntimeError as exc:
        raise VembedError(f"{where}: the checkpoint's loss state does not match train.loss ({exc})") from None
