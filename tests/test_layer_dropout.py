"""LayerSkip's layer dropout in ``causal_exit_lm`` (torchtune's ``LayerDropout`` along the
batch, rates from ``create_layer_dropout_modules``): rates per layer, identity for the
skipped rows, eval unchanged, gradients for every parameter even when a whole batch skips."""

from __future__ import annotations

import math

import pytest
import torch

from ann_kernels.nn.causal_lm import causal_exit_lm, layer_dropout_probs


def test_rates_match_torchtune_scales():
    # exp: prob_max * (2^(l / (L - 1)) - 1): 0 at the first layer, prob_max at the last.
    probs = layer_dropout_probs(5, 0.2, "exp")
    assert probs == pytest.approx([0.2 * (math.exp(v * math.log(2) / 4) - 1) for v in range(5)])
    assert probs[0] == 0.0 and probs[-1] == pytest.approx(0.2)
    assert layer_dropout_probs(4, 0.3, "linear") == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert layer_dropout_probs(3, 0.1, "uniform") == pytest.approx([0.1] * 3)
    assert layer_dropout_probs(1, 0.1, "exp") == [0.1]
    with pytest.raises(ValueError, match="layer_dropout"):
        layer_dropout_probs(3, 1.0)
    with pytest.raises(ValueError, match="layer_dropout_scale"):
        layer_dropout_probs(3, 0.1, "cubic")


def test_skipped_rows_pass_through_and_eval_is_unchanged():
    torch.manual_seed(0)
    model = causal_exit_lm(50, dim=16, layers=2, heads=2, max_len=8, layer_dropout=0.5,
                           layer_dropout_scale="uniform")
    block = model.stages[1].blocks[0]
    x = torch.randn(16, 8, 16)
    full = block._block(x)
    block.train()
    torch.manual_seed(1)
    out = block(x)
    torch.manual_seed(1)
    keep = torch.rand(16) >= 0.5  # the same draw
    assert 0 < int(keep.sum()) < 16
    torch.testing.assert_close(out[keep], full[keep], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[~keep], x[~keep])  # skipped: the input, unscaled
    block.eval()
    torch.testing.assert_close(block(x), full)


def test_every_parameter_gets_a_gradient_when_a_batch_skips_a_layer():
    torch.manual_seed(0)
    model = causal_exit_lm(50, dim=16, layers=2, heads=2, max_len=8, layer_dropout=0.999,
                           layer_dropout_scale="uniform")
    tokens = torch.randint(0, 50, (2, 8))
    sum(h.sum() for h in model.forward_hidden(tokens)).backward()
    assert all(p.grad is not None for p in model.parameters())  # DDP needs every parameter used
