"""The early-exit loss of a Hugging Face ``LlamaForCausalLM`` (issue 23, item 3): equal to
the torchtune-style eager loss on the same model (exits = Hugging Face's own hidden states
through the final norm and lm_head, F.cross_entropy per exit, LayerSkip's scales), loss and
gradients; LayerSkip layer dropout; clear errors for bad configurations. Tiny random
configs, no download."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

from ann_kernels.losses.hf_llama import HFLlamaEarlyExitLoss  # noqa: E402
from ann_kernels.losses.layerskip import layerskip_loss_scales  # noqa: E402

VOCAB, LAYERS = 64, 4


def tiny_llama(*, tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config).float()
    for p in model.parameters():  # random, not the near-zero init: exits must really differ
        torch.nn.init.normal_(p, std=0.1) if p.dim() > 1 else torch.nn.init.normal_(p, mean=1.0, std=0.1)
    return model


def eager_early_exit_loss(model, input_ids, attention_mask, labels, exit_layers, weights):
    """torchtune's ``early_exit_loss`` on Hugging Face's own hidden states: exit l =
    hidden_states[l + 1] -> model.model.norm -> lm_head (the last one is already normed,
    lm_head(hidden_states[-1]) == logits); F.cross_entropy with Hugging Face's shift."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    states = out.hidden_states
    total = 0.0
    for w, layer in zip(weights, exit_layers):
        h = states[-1] if layer == LAYERS - 1 else model.model.norm(states[layer + 1])
        logits = model.lm_head(h)
        if layer == LAYERS - 1:
            torch.testing.assert_close(logits, out.logits)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        total = total + w * loss
    return total


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("scale", ["sum", "uniform"])
def test_loss_and_grads_equal_eager_reference(tie, scale):
    model = tiny_llama(tie=tie)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # a left-padded row: its padding is masked and ignored
    loss_fn = HFLlamaEarlyExitLoss(model, exit_layers=[0, 2], weighting="layerskip", scale=scale)
    assert loss_fn.exit_layers == [0, 2, 3]  # the last layer joins
    weights = layerskip_loss_scales([0, 2, 3], LAYERS, scale)
    loss = loss_fn(input_ids, attention_mask=attention_mask)
    loss.backward()
    ours = _grads(model)
    model.zero_grad(set_to_none=True)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    ref = eager_early_exit_loss(model, input_ids, attention_mask, labels, [0, 2, 3], weights)
    ref.backward()
    theirs = _grads(model)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert ours.keys() == theirs.keys() and len(ours) == len(list(model.parameters()))
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5, msg=name)
    per_exit = loss_fn.per_exit_loss
    assert len(set(per_exit.tolist())) == 3  # the exits really differ


def test_rotational_curriculum_and_explicit_labels():
    model = tiny_llama()
    loss_fn = HFLlamaEarlyExitLoss(model, exit_layers=range(LAYERS), weighting="layerskip", curriculum="rot",
                                   curriculum_layers=[0])
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt that does not train
    active = []
    for _ in range(3):
        w = loss_fn.loss_fn.weighting.weights_for_step()
        ref = eager_early_exit_loss(model, ids, None, labels, list(range(LAYERS)), w.tolist())
        loss = loss_fn(ids, labels=labels)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        active.append([k for k, v in enumerate(w.tolist()) if v > 0])
    # LayerSkip's train.py: the last layer plus one early exit that moves every step.
    assert active == [[0, 3], [1, 3], [2, 3]]


def test_layer_dropout_skips_rows_in_training_only():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (8, 6), generator=torch.Generator().manual_seed(3))
    plain = HFLlamaEarlyExitLoss(model, exit_layers=[1])
    with torch.no_grad():
        ref = [h.clone() for h in plain.exit_hidden_states(ids)]
    plain.remove()
    dropping = HFLlamaEarlyExitLoss(model, exit_layers=[1], layer_dropout=0.5, layer_dropout_scale="uniform")
    model.eval()
    with torch.no_grad():  # eval: no dropout, the same states
        for a, b in zip(dropping.exit_hidden_states(ids), ref):
            torch.testing.assert_close(a, b)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        got = dropping.exit_hidden_states(ids)
    changed = [not torch.allclose(a, b) for a, b in zip(got[0], ref[0])]
    assert any(changed) and not all(changed)  # some rows skipped layers, not every row
    # The model's own forward is untouched by the hooks.
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model.lm_head(ref[-1]))


def test_bad_configurations_raise_clear_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"exit_layers.*\[0, 4\).*got \[1, 4\]"):
        HFLlamaEarlyExitLoss(model, exit_layers=[1, 4])
    with pytest.raises(ValueError, match="exit_layers"):
        HFLlamaEarlyExitLoss(model, exit_layers=[-1])
    model.model.norm = torch.nn.Identity()
    with pytest.raises(ValueError, match="no final norm"):
        HFLlamaEarlyExitLoss(model, exit_layers=[1])
    del model.model.norm
    with pytest.raises(ValueError, match="no final norm"):
        HFLlamaEarlyExitLoss(model, exit_layers=[1])
    with pytest.raises(TypeError, match="model.model.layers"):
        HFLlamaEarlyExitLoss(torch.nn.Linear(2, 2), exit_layers=[0])
    with pytest.raises(ValueError, match="layer_dropout"):
        HFLlamaEarlyExitLoss(tiny_llama(), exit_layers=[0], layer_dropout=1.5)
    with pytest.raises(ValueError, match="input_ids"):
        HFLlamaEarlyExitLoss(tiny_llama(), exit_layers=[0])(torch.zeros(4, dtype=torch.long))
