"""mode="confidence": recompute against the oracle's exact states, the threshold limits, the
cache after a recompute run, propagate, calibration for a target cost."""

from __future__ import annotations

import pytest
import torch

import ann_kernels
from ann_kernels.generation import DecodeState, ModeConfig, RowParams, as_adapter
from ann_kernels.generation.calibration import calibrate_generation, exit_costs, forward_exits
from ann_kernels.generation.reference import generate_reference
from tests.utils import ragged_prompts, tiny_causal_lm

V = 40


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(V, head_scale=40.0)


@pytest.fixture(scope="module")
def prompts():
    return ragged_prompts(8, V, seed=2)


@pytest.mark.parametrize("criterion, threshold", [("max_prob", 0.8), ("margin", [0.7, 0.6, 0.5]),
                                                  ("entropy", 0.7)])
def test_recompute_equals_first_confident_exit_on_exact_states(model, prompts, criterion, threshold):
    out = ann_kernels.generate(model, prompts, max_new_tokens=10, mode="confidence", threshold=threshold,
                               criterion=criterion)
    used = set()
    for p, toks, exits in zip(prompts, out.tokens, out.exit_index):
        ref = generate_reference(model, p, 10, mode="confidence", threshold=threshold, criterion=criterion)
        assert (toks, exits) == ref
        used |= set(exits)
    assert len(used) >= 3, used  # rows leave at several exits: the decisions are per row
    st = out.stats
    assert 0 < st["mean_exit"] < 3 and sum(st["exit_counts"]) == 80


def test_threshold_limits(model, prompts):
    full = ann_kernels.generate(model, prompts, max_new_tokens=8)
    above = ann_kernels.generate(model, prompts, max_new_tokens=8, mode="confidence", threshold=1.5)
    assert above.tokens == full.tokens and above.exit_index == full.exit_index
    static0 = ann_kernels.generate(model, prompts, max_new_tokens=8, mode="static", exit_index=0)
    zero = ann_kernels.generate(model, prompts, max_new_tokens=8, mode="confidence", threshold=0.0)
    assert zero.tokens == static0.tokens and all(e == [0] * 8 for e in zero.exit_index)


def _teacher_forced_kv(model, tokens: list[int]):
    """Per layer (k, v) [H, S, d] of the whole row, from the model's own blocks (no engine)."""
    x = model.stages[0].embedding(torch.tensor([tokens]))
    out = []
    for stage in model.stages:
        for block in stage.blocks:
            b, s, d = x.shape
            q, k, v = block.qkv(block.norm1(x)).view(b, s, 3, block.heads, d // block.heads).permute(2, 0, 3, 1, 4)
            out.append((k[0], v[0]))
            x = block(x)
    return out


def test_cache_after_recompute_equals_teacher_forced_pass(model, prompts):
    ad = as_adapter(model)
    st = DecodeState(ad, ModeConfig("confidence", thresholds=(0.8, 0.8, 0.8, 0.0)), max_batch_size=8,
                     max_positions=30)
    st.add_rows(prompts, [RowParams(20)] * 8, list(range(8)))
    with torch.inference_mode():
        for _ in range(10):
            st.step()
    pending = 0
    for slot, row in enumerate(st.row_ids):
        length = int(st.length[slot])
        tokens = st.tokens[slot, :length].tolist()
        ref = _teacher_forced_kv(model, tokens)
        for layer, (k, v) in enumerate(ref):
            seg = next(s for s, e in enumerate(ad.exit_layers) if layer <= e)
            valid = int(st.seg_len[slot, seg])
            assert valid >= (prompts[row].__len__() - 1)
            torch.testing.assert_close(st.cache.keys[layer][slot, :, :valid], k[:, :valid])
            torch.testing.assert_close(st.cache.values[layer][slot, :, :valid], v[:, :valid])
        pending += int(st.seg_len[slot, 0] - st.seg_len[slot, -1])
    assert pending > 0  # some rows carry waiting positions: the deep segments were exercised


def test_propagate_runs_and_is_cheaper(model, prompts):
    kw = dict(max_new_tokens=10, mode="confidence", threshold=0.8)
    rec = ann_kernels.generate(model, prompts, kv_policy="recompute", **kw)
    prop = ann_kernels.generate(model, prompts, kv_policy="propagate", **kw)
    assert all(len(t) == 10 for t in prop.tokens)
    assert prop.stats["layer_fraction"] < rec.stats["layer_fraction"]
    # the first new token of each row comes from the exact prompt cache: same as recompute
    assert [t[0] for t in prop.tokens] == [t[0] for t in rec.tokens]


def test_forward_exits_matches_the_model(model):
    tokens = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))
    ours = forward_exits(as_adapter(model), tokens)
    for a, b in zip(ours, model(tokens)):
        torch.testing.assert_close(a, b)


def test_calibration_meets_the_budget(model):
    held_out = torch.randint(0, V, (16, 12), generator=torch.Generator().manual_seed(5))
    calib = calibrate_generation(model, held_out, 0.6)
    costs = exit_costs(as_adapter(model))
    assert calib.mean_flops <= 0.6 * float(costs[-1]) + 1e-6
    assert calib.thresholds[-1] == float("-inf")
    out = ann_kernels.generate(model, ragged_prompts(4, V), max_new_tokens=6, mode="confidence", threshold=calib)
    assert all(len(t) == 6 for t in out.tokens)
    with pytest.raises(ValueError, match="budget"):
        calibrate_generation(model, held_out, 0.01)


def test_infinite_threshold_skips_that_exit(model, prompts):
    """+inf at an exit: its head is never evaluated and no row leaves there; the rest as the oracle."""
    thresholds = [float("inf"), 0.8, float("inf")]
    out = ann_kernels.generate(model, prompts, max_new_tokens=8, mode="confidence", threshold=thresholds)
    for p, toks, exits in zip(prompts, out.tokens, out.exit_index):
        assert (toks, exits) == generate_reference(model, p, 8, mode="confidence", threshold=thresholds)
        assert set(exits) <= {1, 3}
    assert out.stats["exit_counts"][0] == out.stats["exit_counts"][2] == 0 < out.stats["exit_counts"][1]


def test_calibration_on_a_subset_of_exits(model):
    held_out = torch.randint(0, V, (16, 12), generator=torch.Generator().manual_seed(5))
    calib = calibrate_generation(model, held_out, 0.8, exits=[1])
    assert calib.thresholds[0] == calib.thresholds[2] == float("inf") and calib.thresholds[3] == float("-inf")
    assert calib.exit_counts[0] == calib.exit_counts[2] == 0
    full_cost = float(exit_costs(as_adapter(model))[-1])
    assert calib.mean_flops <= 0.8 * full_cost * (1 + 1e-9)
    out = ann_kernels.generate(model, ragged_prompts(4, V), max_new_tokens=6, mode="confidence", threshold=calib)
    assert {e for row in out.exit_index for e in row} <= {1, 3}
    with pytest.raises(ValueError, match="exits: expected exit indices in \\[0, 4\\)"):
        calibrate_generation(model, held_out, 0.8, exits=[7])
