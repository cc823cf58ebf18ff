"""LoRA: targets that exist (or a clear error), only adapters train, merging gives the same embeddings, and
a trained run's final/ loads in plain transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_model
from peft import PeftModel
from safetensors.torch import load_file
from training_data import make_nuisance_dataset, one_thread, tiny_settings

from vembed.errors import VembedError
from vembed.models.factory import create_embedder
from vembed.models.lora import apply_lora, linear_module_names, lora_target_modules, merge_lora
from vembed.settings import LoraSettings
from vembed.training import checkpoint as ckpt
from vembed.training import train
from vembed.training.model import load_trainable_state, make_loss, trainable_embedder

TOLERANCE = 1e-5  # float32, merged W + BA vs. W x + B(A x)


@pytest.fixture(autouse=True)
def _fp32_models(monkeypatch):
    """These tests compare embeddings with fp32 references at 1e-5: keep model.dtype=auto at fp32."""
    monkeypatch.setenv("VEMBED_CPU_BF16", "0")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _perturb_adapters(embedder, seed=0):
    """LoRA starts as the identity (B = 0); give B values so that merging has something to merge."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in embedder.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def test_spec_targets_that_exist_are_adapted(tiny_model):
    embedder = apply_lora(create_embedder(str(tiny_model)), LoraSettings(r=4))
    assert isinstance(embedder.backbone, PeftModel)
    trainable = [n for n, p in embedder.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }  # the spec lists old names too; only these exist
    assert len(trainable) == 2 * 4 * 2  # A and B x 4 projections x 2 layers


def test_explicit_targets_must_all_exist(tiny_model):
    backbone = create_embedder(str(tiny_model)).backbone
    assert linear_module_names(backbone) == ["fc1", "fc2", "k_proj", "o_proj", "q_proj", "v_proj"]
    names = lora_target_modules(backbone, ["fc1", "q_proj"], explicit=True)
    assert len(names) == 4 and all(n.endswith(("fc1", "q_proj")) for n in names)
    with pytest.raises(
        VembedError,
        match=r"no Linear module named qkv in the backbone; its Linear modules are: fc1, fc2, k_proj",
    ):
        lora_target_modules(backbone, ["q_proj", "qkv"], explicit=True)
    with pytest.raises(VembedError, match=r"none of the LoRA targets \(query, key\).*train\.lora\.targets"):
        lora_target_modules(backbone, ["query", "key"], explicit=False)


def test_siglip_pooling_head_linears_are_not_targets(tmp_path):
    model = create_embedder(str(save_tiny_model(tmp_path / "siglip", "siglip")))
    names = lora_target_modules(model.backbone, ["out_proj"], explicit=True)
    assert names and not any(n.startswith("head.") for n in names)  # nn.MultiheadAttention reads its weights


def test_merge_gives_the_same_embeddings_and_a_plain_model(tiny_model):
    embedder = apply_lora(create_embedder(str(tiny_model)), LoraSettings(r=4, dropout=0.0))
    _perturb_adapters(embedder)
    pixels = torch.randn(3, 3, 28, 28)
    with_adapters = embedder.encode(pixels)
    merged = merge_lora(embedder)
    assert not isinstance(merged.backbone, PeftModel) and isinstance(embedder.backbone, PeftModel)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged.encode(pixels), with_adapters, atol=TOLERANCE, rtol=0)
    base = create_embedder(str(tiny_model)).encode(pixels)
    assert (base - with_adapters).abs().max() > 1e-2  # the adapters do change the embedding


def test_lora_run_trains_only_adapters_and_final_loads_everywhere(tiny_model, tmp_path):
    train_file = make_nuisance_dataset(tmp_path / "data", per_class=4)
    settings = tiny_settings(
        tiny_model,
        train_file,
        tmp_path / "run",
        "train.method=lora",
        "train.max_steps=4",
        "train.lora.dropout=0",
    )
    result = train(settings, show_progress=False)
    last = ckpt.latest_checkpoint(result.run_dir)
    state = load_file(str(last / "model.safetensors"))
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state)

    # the merged backbone differs from the base model only in the adapted projection weights
    base = create_embedder(str(tiny_model)).backbone.state_dict()
    final = create_embedder(str(result.final_dir)).backbone.state_dict()
    assert set(final) == set(base)
    changed = {k for k in base if not torch.equal(base[k], final[k])}
    assert changed and all(
        k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) for k in changed
    )

    # final/ (merged) embeds like the run's LoRA model rebuilt from its last checkpoint
    pixels = torch.randn(4, 3, 28, 28)
    live = trainable_embedder(settings)
    loss = make_loss(settings.train, embed_dim=live.embed_dim, num_classes=8)
    load_trainable_state(live, loss, state, where=str(last))
    exported = create_embedder(str(result.final_dir))
    torch.testing.assert_close(exported.encode(pixels), live.encode(pixels), atol=TOLERANCE, rtol=0)

    # plain transformers loads it; CLS token + L2 norm reproduce vembed's embedding
    from transformers import AutoModel

    plain = AutoModel.from_pretrained(result.final_dir).eval()
    with torch.no_grad():
        cls = plain(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(F.normalize(cls, dim=-1), exported.encode(pixels), atol=TOLERANCE, rtol=0)
