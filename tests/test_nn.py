"""MultiExitNetwork (staged interface, FLOP accounting, validation) and the model builders."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ann_kernels
import ann_kernels.nn.multi_exit as multi_exit_module
from ann_kernels.nn import MultiExitNetwork, exit_transformer, mlp_ann, msdnet, resann
from ann_kernels.nn.msdnet import scales_per_block
from ann_kernels.nn.resann import downsample_groups

IMAGE_SHAPES = [(1, 28), (3, 32)]  # (channels, side)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_network(name: str, channels: int, side: int, num_classes: int = 7) -> MultiExitNetwork:
    """Each builder at a tiny width (fast on CPU) for inputs [N, channels, side, side]."""
    if name == "resann":
        return resann(num_classes, channels, side, width=4)
    if name == "resann_full_res":
        return resann(num_classes, channels, side, num_exits=4, blocks_per_exit=2, width=3, stem_stride=1,
                      head_channels=4)
    if name == "msdnet":
        return msdnet(num_classes, channels, side, growth=2, base_channels=2, head_channels=4)
    if name == "msdnet_half_res":
        return msdnet(num_classes, channels, side, num_exits=3, num_scales=2, growth=2, base_channels=3,
                      layers_per_block=1, head_channels=None, stem_stride=2)
    if name == "exit_transformer":
        return exit_transformer(num_classes, channels, side, dim=16, depth=3, heads=2)
    if name == "mlp_ann":
        return mlp_ann(in_features=channels * side * side, hidden=16, num_classes=num_classes)
    raise KeyError(name)


BUILDERS = ["resann", "resann_full_res", "msdnet", "msdnet_half_res", "exit_transformer", "mlp_ann"]
EXPECTED_EXITS = {"resann": 6, "resann_full_res": 4, "msdnet": 4, "msdnet_half_res": 3, "exit_transformer": 3,
                  "mlp_ann": 6}


def images(batch: int, channels: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(seed))


def select_rows(h, rows: torch.Tensor):
    """What the early-exit engine does: index dim 0 of every Tensor of a hidden state."""
    if isinstance(h, torch.Tensor):
        return h[rows]
    return type(h)(t[rows] for t in h)


@pytest.mark.parametrize("channels,side", IMAGE_SHAPES)
@pytest.mark.parametrize("name", BUILDERS)
def test_builder_exit_shapes(name, channels, side):
    torch.manual_seed(0)
    network = tiny_network(name, channels, side)
    logits = network(images(3, channels, side))
    assert network.num_exits == EXPECTED_EXITS[name] == len(logits)
    assert network.num_classes == 7
    for z in logits:
        assert z.shape == (3, 7) and z.dtype == torch.float32 and torch.isfinite(z).all()


@pytest.mark.parametrize("name", BUILDERS)
def test_forward_is_composition_of_stages_and_heads(name):
    torch.manual_seed(0)
    network = tiny_network(name, 1, 28).eval()
    x = images(3, 1, 28)
    with torch.no_grad():
        logits = network(x)
        h = x
        for k in range(network.num_exits):
            h = network.forward_stage(k, h)
            assert torch.equal(network.forward_head(k, h), logits[k])


@pytest.mark.parametrize("name", BUILDERS)
def test_stages_commute_with_row_selection(name):
    """Continuing from a row subset of a hidden state gives those rows' full-batch logits."""
    torch.manual_seed(0)
    network = tiny_network(name, 3, 32).eval()
    x = images(4, 3, 32)
    rows = torch.tensor([3, 1])
    with torch.no_grad():
        full = network(x)
        h = network.forward_stage(0, x)
        h = select_rows(h, rows)
        for k in range(1, network.num_exits):
            h = network.forward_stage(k, h)
            torch.testing.assert_close(network.forward_head(k, h), full[k][rows], atol=1e-5, rtol=1e-4)


def test_flops_match_hand_count_for_conv_linear_network():
    # Stage 0: Conv2d(1, 2, 3, padding=1) on 1x4x4: 2*4*4 outputs * 9 MACs = 288 MACs.
    # Head 0: Linear(32, 5): 160 MACs.  Stage 1: Conv2d(2, 3, 3, padding=1): 3*4*4 * 18 = 864 MACs.
    # Head 1: Linear(48, 5): 240 MACs. FLOPs = 2 * MACs; biases, ReLU and flatten count 0.
    network = MultiExitNetwork(
        stages=[nn.Conv2d(1, 2, 3, padding=1), nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU())],
        heads=[nn.Sequential(nn.Flatten(), nn.Linear(32, 5)), nn.Sequential(nn.Flatten(), nn.Linear(48, 5))],
    )
    x = torch.randn(3, 1, 4, 4)  # per-sample counts: totals are divided by the batch size
    stage = network.stage_flops(x)
    head = network.head_flops(x)
    assert stage.dtype == head.dtype == torch.float64
    assert stage.tolist() == [576.0, 1728.0]
    assert head.tolist() == [320.0, 480.0]
    # exit 1 pays for head 0 too (every head on the way, as MSDNet's counter)
    assert network.exit_flops(x).tolist() == [576.0 + 320.0, 576.0 + 320.0 + 1728.0 + 480.0]
    assert network.num_classes == 5  # inferred by the measurement


def test_attention_flops_are_counted():
    network = exit_transformer(dim=16, depth=2, heads=2)
    # one encoder layer on T = 17 tokens, dim 16, MLP hidden 32 (per sample):
    t, d, hidden = 17, 16, 32
    linear_macs = t * (d * 3 * d + d * d + d * hidden + hidden * d)
    attention_macs = 2 * t * t * d  # q k^T and (softmax) v over all heads
    assert network.stage_flops(images(2, 1, 28))[1].item() == 2 * (linear_macs + attention_macs)


@pytest.mark.parametrize("name", BUILDERS)
def test_exit_flops_are_cumulative_and_strictly_increasing(name):
    network = tiny_network(name, 1, 28)
    x = images(2, 1, 28)
    exit_cost = network.exit_flops(x)
    stage, head = network.stage_flops(x), network.head_flops(x)
    assert exit_cost.dtype == torch.float64 and exit_cost.shape == (network.num_exits,)
    assert (stage > 0).all() and (head > 0).all()
    torch.testing.assert_close(exit_cost, torch.cumsum(stage + head, 0), rtol=0, atol=0)
    assert (exit_cost[1:] > exit_cost[:-1]).all()


def test_flop_measurement_is_cached_per_input_shape(monkeypatch):
    network = tiny_network("resann", 1, 28)
    calls = []
    real_count_flops = multi_exit_module.count_flops

    def counting(fn, *args):
        calls.append(fn)
        return real_count_flops(fn, *args)

    monkeypatch.setattr(multi_exit_module, "count_flops", counting)
    first = network.exit_flops(images(2, 1, 28))
    measured = len(calls)
    assert measured == 2 * network.num_exits
    first.zero_()  # results are copies: mutating them must not corrupt the cache
    again = network.exit_flops(images(5, 1, 28))  # other batch size, same per-sample shape
    network.stage_flops(images(1, 1, 28))
    network.head_flops(images(1, 1, 28))
    assert len(calls) == measured
    assert (again > 0).all()
    bigger = network.exit_flops(images(1, 1, 32))  # new shape: measured again, and costs more
    assert len(calls) == 2 * measured
    assert (bigger > again).all()
    network.clear_flop_cache()
    network.exit_flops(images(1, 1, 28))
    assert len(calls) == 3 * measured


def test_flop_measurement_restores_modes_and_leaves_state_alone():
    network = tiny_network("resann", 1, 28).train()
    network.heads[2].eval()  # a mixed state must come back exactly
    flags = [module.training for module in network.modules()]
    state = copy.deepcopy(network.state_dict())
    network.exit_flops(images(4, 1, 28))
    assert [module.training for module in network.modules()] == flags
    for key, value in network.state_dict().items():  # BN running stats untouched (eval mode)
        assert torch.equal(value, state[key]), key


def test_shared_head_transformer_registers_one_head():
    network = exit_transformer(num_classes=5, dim=16, depth=4, heads=2)
    head = network.heads[0]
    assert all(h is head for h in network.heads)
    head_params = {id(p) for p in head.parameters()}
    all_params = list(network.parameters())
    assert len(all_params) == len({id(p) for p in all_params})
    assert sum(id(p) in head_params for p in all_params) == len(head_params) == 4  # LN w, b; Linear w, b
    expected = sum(p.numel() for m in network.stages for p in m.parameters()) + sum(
        p.numel() for p in head.parameters())
    assert sum(p.numel() for p in network.parameters()) == expected
    head_cost = network.head_flops(images(2, 1, 28))
    assert (head_cost == 2 * 16 * 5).all()  # the shared head is paid at every exit

    # state_dict round trip with the shared module
    clone = exit_transformer(num_classes=5, dim=16, depth=4, heads=2)
    clone.load_state_dict(network.state_dict())
    x = images(2, 1, 28)
    network.eval(), clone.eval()
    with torch.no_grad():
        for a, b in zip(network(x), clone(x)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", BUILDERS)
def test_gradients_reach_every_stage_from_summed_exit_losses(name):
    torch.manual_seed(0)
    network = tiny_network(name, 1, 28).train()
    x, target = images(4, 1, 28), torch.tensor([0, 3, 6, 2])
    sum(F.cross_entropy(z, target) for z in network(x)).backward()
    for k, module in enumerate(list(network.stages) + list(network.heads)):
        for param_name, param in module.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), f"module {k}: {param_name}"
        assert any(p.grad.abs().sum() > 0 for p in module.parameters()), f"module {k} got zero gradient"


def test_num_classes_is_inferred_on_first_forward():
    network = MultiExitNetwork([nn.Linear(4, 4), nn.Linear(4, 4)], [nn.Linear(4, 3), nn.Linear(4, 3)])
    with pytest.raises(RuntimeError, match="num_classes"):
        network.num_classes
    network(torch.randn(2, 4))
    assert network.num_classes == 3 and network.num_exits == 2


@pytest.mark.parametrize("stages,heads,argument", [
    ([], [], "stages"),
    ([nn.Linear(2, 2)], [], "heads"),
    ([nn.Linear(2, 2), nn.Linear(2, 2)], [nn.Linear(2, 3)], "heads"),
    ([nn.Linear(2, 2)], [nn.Linear(2, 3), nn.Linear(2, 3)], "heads"),
])
def test_bad_structure_raises_value_error_naming_the_argument(stages, heads, argument):
    with pytest.raises(ValueError, match=argument):
        MultiExitNetwork(stages, heads)


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match=r"stages\[1\]"):
        MultiExitNetwork([nn.Linear(2, 2), "relu"], [nn.Linear(2, 3), nn.Linear(2, 3)])
    with pytest.raises(ValueError, match="num_classes"):
        MultiExitNetwork([nn.Linear(2, 2)], [nn.Linear(2, 3)], num_classes=0)
    with pytest.raises(ValueError, match="width"):
        resann(width=0)
    with pytest.raises(ValueError, match="num_scales"):
        msdnet(image_size=2, num_scales=3)
    with pytest.raises(ValueError, match="heads"):
        exit_transformer(dim=10, heads=4)
    with pytest.raises(ValueError, match="num_exits"):
        mlp_ann(num_exits=0)
    network = mlp_ann(hidden=8)
    with pytest.raises(ValueError, match="batch"):
        network.exit_flops(torch.empty(0, 256))


def test_staged_calls_follow_copies_and_replaced_modules():
    network = tiny_network("mlp_ann", 1, 16)
    x = images(2, 1, 16)
    clone = copy.deepcopy(network)
    with torch.no_grad():
        clone.stages[0].weight.zero_()
    assert not torch.equal(clone(x)[0], network(x)[0])
    network.heads[1] = nn.Linear(16, 7, bias=False)
    with torch.no_grad():
        network.heads[1].weight.zero_()
    assert torch.equal(network(x)[1], torch.zeros(2, 7))


def test_mlp_ann_flattens_images_and_matches_flat_input():
    network = mlp_ann(in_features=3 * 8 * 8, hidden=16, num_exits=3)
    x = images(2, 3, 8)
    for a, b in zip(network(x), network(x.flatten(1))):
        assert torch.equal(a, b)


def test_msdnet_hidden_state_is_a_tuple_of_scales():
    network = tiny_network("msdnet", 1, 28)
    h = network.forward_stage(0, images(2, 1, 28))
    assert isinstance(h, tuple) and [t.shape[-1] for t in h] == [28, 14, 7]
    assert scales_per_block(4, 3) == [3, 3, 2, 1]
    for k in range(1, network.num_exits):
        h = network.forward_stage(k, h)
    assert len(h) == 1 and h[0].shape[-1] == 7


def test_resann_downsampling_schedule():
    assert downsample_groups(6) == [2, 4]
    assert downsample_groups(1) == []
    network = resann()
    h = network.forward_stage(0, images(2, 1, 28))
    assert h.shape == (2, 16, 14, 14)
    for k in range(1, network.num_exits):
        h = network.forward_stage(k, h)
    assert h.shape == (2, 64, 4, 4)


def test_top_level_export():
    assert ann_kernels.MultiExitNetwork is MultiExitNetwork
    assert "MultiExitNetwork" in ann_kernels.__all__
