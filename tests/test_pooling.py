"""GeM pooling keeps the sign of LayerNorm'd tokens: checked against a hand computation."""

from __future__ import annotations

import torch

from vembed.models.embedder import GeM


def test_gem_matches_a_hand_computation_with_negative_tokens():
    gem = GeM(p=3.0, eps=0.0)
    tokens = torch.tensor([[[-2.0, -1.0], [0.0, -3.0], [4.0, -2.0]]])  # 1 image, 3 tokens, 2 channels
    # channel 0: min -2, shifted 0, 2, 6 -> ((0 + 8 + 216) / 3) ** (1/3) - 2
    # channel 1: min -3, shifted 2, 0, 1 -> ((8 + 0 + 1) / 3) ** (1/3) - 3
    expected = torch.tensor([[(224 / 3) ** (1 / 3) - 2, 3 ** (1 / 3) - 3]])
    assert torch.allclose(gem(tokens), expected, atol=1e-5)
    assert (gem(tokens) < 0).any()  # all-negative channels stay negative, not eps


def test_gem_is_the_mean_at_p1_tends_to_the_max_and_moves_with_a_shift():
    tokens = torch.randn(4, 16, 8)
    assert torch.allclose(GeM(p=1.0)(tokens), tokens.mean(1), atol=1e-5)
    big = GeM(p=80.0)(tokens)
    assert (big <= tokens.amax(1) + 1e-4).all() and (big >= tokens.mean(1)).all()
    assert torch.allclose(GeM()(tokens + 5.0), GeM()(tokens) + 5.0, atol=1e-4)


def test_gem_gradients_reach_tokens_and_p():
    gem = GeM()
    tokens = torch.randn(2, 5, 3, requires_grad=True)
    gem(tokens).sum().backward()
    assert torch.isfinite(tokens.grad).all() and torch.isfinite(gem.p.grad) and gem.p.grad != 0


def test_gem_of_constant_tokens_is_that_constant():
    tokens = torch.full((2, 4, 3), 100.0)
    assert torch.allclose(GeM()(tokens), torch.full((2, 3), 100.0))
