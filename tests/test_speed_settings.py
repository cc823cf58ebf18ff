"""Speed settings reach the pieces they configure: attention kernels, fused AdamW, torch.compile, workers."""

from __future__ import annotations

import pytest
import torch

from vembed.errors import VembedError
from vembed.models.factory import create_embedder
from vembed.settings import ModelSettings, Settings, load_settings
from vembed.training.optim import build_optimizer


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_model_attention_picks_the_kernels(tiny_model, attention):
    embedder = create_embedder(str(tiny_model), ModelSettings(attention=attention, device="cpu"))
    assert embedder.backbone.config._attn_implementation == attention


def test_unavailable_attention_is_one_clear_error(tiny_model):
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401

        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(VembedError, match="model.attention=flash_attention_2"):
        create_embedder(str(tiny_model), ModelSettings(attention="flash_attention_2", device="cpu"))


@pytest.mark.parametrize(
    "fused, expected", [(True, True), (False, None), (None, torch.cuda.is_available() or None)]
)
def test_fused_adamw_setting(fused, expected):
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    settings = load_settings(values={"train.fused_adamw": fused})
    optimizer = build_optimizer([{"params": params}], settings.train)
    assert optimizer.defaults["fused"] == expected
    params[0].grad = torch.randn(4, 4)
    optimizer.step()  # fused AdamW runs on the CPU too


def test_compile_setting_reaches_accelerate(tmp_path):
    from vembed.training.loop import _make_accelerator, _release_accelerator

    for compile_, backend in ((True, "INDUCTOR"), (False, "NO")):
        settings = load_settings(values={"train.compile": compile_, "model.device": "cpu"})
        settings.train.output_dir = tmp_path
        try:
            assert _make_accelerator(settings).state.dynamo_plugin.backend.name == backend
        finally:
            _release_accelerator()


def test_num_workers_default_follows_the_cores(monkeypatch):
    import os

    from vembed import settings as settings_module

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert Settings().data.num_workers == 12 == settings_module.default_num_workers()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert Settings().data.num_workers == 1
    assert load_settings(values={"data.num_workers": 0}).data.num_workers == 0
