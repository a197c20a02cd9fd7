"""GPU-only cases of the early-exit op (the CUDA kernel of csrc/cuda/early_exit_kernel.cu),
each skipped with "no CUDA device" where there is none: vocabulary-sized rows, more than
2^31 logit elements (the kernels' int64 offsets), a side stream, and CUDA-graph capture
(which the op does not support: it reads the survivor count on the host, and says so).

The device-parametrised cases shared with the CPU (every criterion, non-finite rows,
layouts, quota, opcheck) are in tests/test_early_exit.py."""

from __future__ import annotations

import math

import pytest
import torch

from ann_kernels.ops.early_exit import CRITERIA, early_exit_step, exit_confidence, exit_confidence_reference
from tests.test_early_exit import CONF_ATOL, assert_same, buffers, run_both, safe_threshold
from tests.utils import max_abs_err, requires_cuda, requires_ext

pytestmark = [requires_ext, requires_cuda, pytest.mark.cuda]
INF = math.inf


def free_gib() -> float:
    return torch.cuda.mem_get_info()[0] / 2**30


@pytest.mark.parametrize("num_classes", [32000, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("criterion", list(CRITERIA))
def test_vocabulary_sized_rows_match_cpu_and_reference(num_classes, dtype, criterion):
    gen = torch.Generator().manual_seed(num_classes)
    m = 48
    logits = (4 * torch.randn(m, num_classes, generator=gen)).to(dtype)
    logits[::5, num_classes - 1] += 40  # confident rows, their maximum in the last column
    logits[7, 3] = math.nan
    logits[11, 100] = INF
    ref_conf = exit_confidence_reference(logits, criterion)[0]
    finite = ~ref_conf.isnan()
    # fp32 sums over tens of thousands of terms differ from torch's cascade sum by a few
    # 1e-6 on a confidence (CPU: 8 partial sums; CUDA: 32 lanes); the threshold sits >= 5e-4
    # from every confidence, so no decision can flip.
    atol = 1e-5
    threshold = safe_threshold(ref_conf[finite], 0.5, gap=1e-3)
    kernel, ref = run_both(logits, torch.arange(m), torch.randn(m, 16), m, threshold=threshold,
                           criterion=criterion, exit_id=3, device="cuda", atol=atol)
    assert_same(kernel, ref, atol=atol)


def test_more_than_2_pow_31_logit_elements():
    """[M, C] bf16 with M * C > 2^31: rows past the 32-bit element offset keep their own
    confidence and argmax, and their hidden rows (past 2^31 bytes) are gathered right."""
    num_classes = 32768
    m = (2**31) // num_classes + 64  # 65600 rows, 2.15e9 elements, 4.3 GB in bf16
    need_gib = m * num_classes * 2 / 2**30 + m * 8192 * 4 / 2**30 + 2
    if free_gib() < need_gib:
        pytest.skip(f"needs {need_gib:.0f} GiB of free GPU memory, {free_gib():.0f} GiB free")
    logits = torch.zeros(m, num_classes, dtype=torch.bfloat16, device="cuda")
    rows = torch.arange(m, device="cuda")
    peak_column = (rows * 7919) % num_classes
    logits[rows, peak_column] = 6.0 + (rows % 3).to(torch.bfloat16)  # three confidence levels
    hidden = rows.float().unsqueeze(1).expand(m, 8192).contiguous()  # row r holds r: 2.1 GB
    prediction, exit_index, confidence = buffers(m, "cuda")
    level_conf = exit_confidence_reference(logits[:3].cpu())[0]  # rows 0, 1, 2: peaks 6, 7, 8
    threshold = float(level_conf[1] + level_conf[2]) / 2  # the rows r % 3 == 2 exit
    step = early_exit_step(logits, rows, hidden, prediction, exit_index, confidence, threshold=threshold,
                           exit_id=1)
    tail = slice(m - 64, m)  # every one of these rows starts past element 2^31
    ref_conf, ref_pred = exit_confidence_reference(logits[tail].cpu())
    exits_ref = ref_conf >= threshold
    assert torch.equal((exit_index[tail] == 1).cpu(), exits_ref)
    assert torch.equal(prediction[tail].cpu()[exits_ref], ref_pred[exits_ref])
    assert max_abs_err(confidence[tail].cpu()[exits_ref], ref_conf[exits_ref]) <= CONF_ATOL
    expected_kept = torch.arange(m)[torch.arange(m) % 3 != 2]
    assert torch.equal(step.survivor_index.cpu(), expected_kept)
    assert torch.equal(step.hidden[:, 0].cpu(), expected_kept.float())
    assert torch.equal(step.hidden[:, -1].cpu(), expected_kept.float())


def test_side_stream_gives_the_same_result():
    logits = 3 * torch.randn(300, 10, device="cuda")
    hidden = torch.randn(300, 4, 4, 4, device="cuda").to(memory_format=torch.channels_last)
    threshold = safe_threshold(exit_confidence(logits)[0].cpu(), 0.5)
    default = early_exit_step(logits, torch.arange(300, device="cuda"), hidden, *buffers(300, "cuda"),
                              threshold=threshold)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        side_bufs = buffers(300, "cuda")
        side = early_exit_step(logits, torch.arange(300, device="cuda"), hidden, *side_bufs, threshold=threshold)
    torch.cuda.current_stream().wait_stream(stream)
    for a, b in zip(default, side):
        assert torch.equal(a, b)
    assert side.hidden.is_contiguous(memory_format=torch.channels_last)


def test_graph_capture_is_refused_with_an_error():
    """The op sizes its outputs by the survivor count (one device-to-host copy), which a CUDA
    graph cannot capture: capture must fail loudly, not record a wrong graph. In a fresh
    process, so a failed capture cannot disturb the CUDA context of the other tests."""
    import os
    import subprocess
    import sys

    script = """
import torch, ann_kernels
from ann_kernels.ops.early_exit import early_exit_step
logits = torch.randn(64, 10, device="cuda")
active = torch.arange(64, device="cuda")
bufs = [torch.empty(64, dtype=torch.int64, device="cuda"), torch.empty(64, dtype=torch.int64, device="cuda"),
        torch.empty(64, device="cuda")]
early_exit_step(logits, active, None, *bufs, threshold=0.5)  # warm-up outside capture
graph = torch.cuda.CUDAGraph()
try:
    with torch.cuda.graph(graph):
        early_exit_step(logits, active, None, *bufs, threshold=0.5)
except RuntimeError as error:
    print("refused:", str(error).splitlines()[0])
else:
    print("captured")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("refused:"), done.stdout
