"""train.memory_bank: a cross-batch memory (XBM) of detached embeddings used as extra candidates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from training_data import checkpoint_weights, make_nuisance_dataset, max_abs_diff, one_thread, tiny_settings

from vembed.errors import VembedError
from vembed.losses import build_loss
from vembed.losses.memory import MemoryBank
from vembed.training import checkpoint as ckpt
from vembed.training import train

MEMORY_LOSSES = ["infonce", "supcon", "triplet", "multi_similarity"]
MODULES = {  # where each loss gathers its candidates (the pair losses in vembed.losses.memory.pair_masks)
    "infonce": "vembed.losses.memory",
    "supcon": "vembed.losses.memory",
    "triplet": "vembed.losses.triplet",
    "multi_similarity": "vembed.losses.memory",
}


def batches():
    g = torch.Generator().manual_seed(3)
    first = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    second = F.normalize(torch.randn(6, 4, generator=g), dim=1)
    return (first, torch.tensor([0, 0, 1, 1, 2, 2])), (second, torch.tensor([0, 1, 1, 3, 3, 2]))


@pytest.mark.parametrize("name", MEMORY_LOSSES)
def test_memory_entries_are_candidates_like_another_rank_s_batch(name, monkeypatch):
    """The loss of batch 2 with batch 1 in memory equals its loss with batch 1 gathered from another rank
    (the multi-process code path), and the memory then holds batch 2 after batch 1."""
    import importlib

    (e1, y1), (e2, y2) = batches()
    with_memory = build_loss(name, embed_dim=4, memory_bank=12)
    with_memory.train()
    with_memory(e1, y1)  # fills the memory with batch 1
    got = with_memory(e2, y2)
    stored, labels = with_memory.memory.entries()
    assert torch.equal(labels, torch.cat([y1, y2])) and torch.allclose(stored, torch.cat([e1, e2]))

    module = importlib.import_module(MODULES[name])
    monkeypatch.setattr(module, "gather_candidates", lambda a, y: (torch.cat([a, e1]), torch.cat([y, y1]), 0))
    expected = build_loss(name, embed_dim=4)(e2, y2)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    monkeypatch.undo()
    assert got.item() != pytest.approx(build_loss(name, embed_dim=4)(e2, y2).item())  # the memory mattered


def test_the_memory_is_a_ring_of_the_last_n_and_learns_nothing():
    bank = MemoryBank(5, 2)
    for step in range(3):  # 3 batches of 2: the oldest entry (step 0's first) drops out
        bank.add(torch.full((2, 2), float(step)), torch.tensor([10 * step, 10 * step + 1]))
    embeddings, labels = bank.entries()
    assert sorted(labels.tolist()) == [1, 10, 11, 20, 21]
    assert int(bank.filled) == 5 and not embeddings.requires_grad
    assert set(bank.state_dict()) == {"embeddings", "labels", "filled", "position"}


def test_memory_needs_a_pair_loss_and_one_width():
    with pytest.raises(VembedError, match="memory_bank does not apply to loss 'proxy_anchor'.*triplet"):
        build_loss("proxy_anchor", embed_dim=4, num_classes=3, memory_bank=8)
    with pytest.raises(VembedError, match="memory_bank and matryoshka_dims"):
        build_loss("supcon", embed_dim=8, memory_bank=8, matryoshka_dims=[4, 8])


def test_a_loss_not_in_training_mode_leaves_the_memory_alone():
    (e1, y1), _ = batches()
    loss = build_loss("triplet", embed_dim=4, memory_bank=8).eval()
    loss(e1, y1)
    assert int(loss.memory.filled) == 0


OPTIONS = (
    "train.method=lora",
    "train.loss=triplet",
    "train.memory_bank=24",
    "model.projection_dim=8",
    "train.max_steps=8",
    "train.checkpoint_every=3",
    "train.augment=false",
)


def test_resume_with_a_memory_is_exact(tiny_model, tmp_path):
    """The memory is in the loss's state (loss.memory.*): a crashed and resumed run ends bit-identical."""
    data = make_nuisance_dataset(tmp_path / "train", per_class=8)
    with one_thread():
        reference = train(tiny_settings(tiny_model, data, tmp_path / "ref", *OPTIONS), show_progress=False)

        def crash(info):
            if info.step == 5:
                raise RuntimeError("simulated crash")

        out = tmp_path / "run"
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(tiny_settings(tiny_model, data, out, *OPTIONS), show_progress=False, on_step=crash)
        result = train(
            tiny_settings(tiny_model, data, out, *OPTIONS, "train.resume=true"), show_progress=False
        )
    assert result.resumed_from == out / "checkpoints" / "step-0000003"
    last = ckpt.checkpoint_dir(out, 8)
    mine, theirs = checkpoint_weights(last), checkpoint_weights(ckpt.checkpoint_dir(reference.run_dir, 8))
    assert "loss.memory.embeddings" in mine and int(mine["loss.memory.filled"]) == 24
    assert max_abs_diff(mine, theirs) <= 1e-6
    final = load_file(str(result.final_dir / "model.safetensors"))
    assert max_abs_diff(final, load_file(str(reference.final_dir / "model.safetensors"))) <= 1e-6
