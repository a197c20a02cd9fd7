"""Early-exit language models: the causal builder, the text pipeline (split by file, BPE
cached in the run dir), ``ann-kernels train --dataset text`` / ``eval`` and exact resume."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ann_kernels.nn.causal_lm import causal_exit_lm
from tests.utils import requires_ext

pytest.importorskip("tokenizers", reason="Hugging Face tokenizers is not installed (pip install tokenizers)")

from ann_kernels.train.text import BlockDataset, corpus_files, load_text_data, split_files  # noqa: E402

SMALL_GLOB = str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")


def test_builder_exits_norm_heads_and_flops():
    torch.manual_seed(0)
    m = causal_exit_lm(50, dim=16, layers=4, heads=2, max_len=8, exit_layers=[1])
    assert m.exit_layers == [1, 3] and m.num_exits == 2 and m.shared_head
    assert m.lm_heads[0].weight is m.stages[0].embedding.token.weight  # tied
    x = torch.randint(0, 50, (3, 8))
    logits = m(x)
    hidden = m.forward_hidden(x)
    for z, h in zip(logits, hidden):
        assert z.shape == (3, 8, 50)
        torch.testing.assert_close(z, m.lm_heads[0](h))  # final norm, then the shared head
    flops = m.per_token_exit_flops(8)
    assert flops[1] > flops[0] > 2 * 16 * 50  # at least the head's matmul per token
    untied = causal_exit_lm(50, dim=16, layers=2, heads=2, max_len=8, shared_head=False, tie_embeddings=False)
    assert not untied.shared_head and untied.lm_heads[0] is not untied.lm_heads[1]
    with pytest.raises(ValueError, match="tie_embeddings"):
        causal_exit_lm(50, dim=16, layers=2, heads=2, shared_head=False)


def test_builder_is_causal():
    torch.manual_seed(0)
    m = causal_exit_lm(30, dim=16, layers=2, heads=2, max_len=6).eval()
    x = torch.randint(0, 30, (1, 6))
    y = x.clone()
    y[0, 4:] = (y[0, 4:] + 1) % 30
    for a, b in zip(m(x), m(y)):
        torch.testing.assert_close(a[:, :4], b[:, :4])


def test_split_by_file_is_stable_and_disjoint():
    files = corpus_files()
    assert all("site-packages" not in str(f) for f in files)
    split = split_files(files)
    again = split_files(list(reversed(files)))
    assert {k: sorted(v) for k, v in split.items()} == {k: sorted(v) for k, v in again.items()}
    names = [set(v) for v in split.values()]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert sum(len(v) for v in split.values()) == len(files)


def test_text_data_cached_and_blocks(tmp_path):
    data = load_text_data(tmp_path, text_glob=SMALL_GLOB, vocab_size=300, seq_len=16, progress=False)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokens.pt").is_file()
    x, y = data.train[0]
    assert x.shape == y.shape == (16,) and torch.equal(x[1:], y[:-1])
    mtime = (tmp_path / "tokens.pt").stat().st_mtime
    again = load_text_data(tmp_path, text_glob=SMALL_GLOB, vocab_size=300, seq_len=16, progress=False)
    assert (tmp_path / "tokens.pt").stat().st_mtime == mtime and len(again.train) == len(data.train)
    with pytest.raises(ValueError, match="too few"):
        BlockDataset(torch.arange(5), 16)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        load_text_data(tmp_path / "x", text_glob=str(tmp_path / "nothing*.txt"))


@requires_ext
def test_evaluate_lm_matches_eager_cross_entropy(tmp_path):
    from ann_kernels.train.lm import evaluate_lm

    torch.manual_seed(0)
    m = causal_exit_lm(40, dim=16, layers=2, heads=2, max_len=8)
    ds = BlockDataset(torch.randint(0, 40, (8 * 6 + 1,)), 8)
    r = evaluate_lm(m, ds, batch_size=4)
    xs = torch.stack([ds[i][0] for i in range(len(ds))])
    ys = torch.stack([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        for k, z in enumerate(m(xs)):
            ce = F.cross_entropy(z.reshape(-1, 40), ys.reshape(-1)).item()
            acc = (z.argmax(-1) == ys).double().mean().item()
            assert r["loss"][k] == pytest.approx(ce, rel=1e-5)
            assert r["acc"][k] == pytest.approx(acc)


def _argv(out, *extra):
    return ["train", "--dataset", "text", "--text-glob", SMALL_GLOB, "--vocab-size", "300", "--seq-len", "16",
                 "--limit-train", "24", "--limit-eval", "4", "--batch-size", "8", "--optimizer", "adamw",
                 "--model-arg", "dim=16", "--model-arg", "layers=2", "--model-arg", "heads=2",
                 "--weighting", "layerskip", "--weighting-arg", "curriculum=\"rot\"", "--weighting-arg",
                 "scale=\"sum\"", "--z-loss", "1e-4", "--no-progress", "--out", str(out), *extra]


def _train(out, *extra):
    from ann_kernels.cli import main

    return main(_argv(out, *extra))


@requires_ext
def test_train_eval_and_exact_resume(tmp_path, capsys):
    from ann_kernels.cli import build_parser, main
    from ann_kernels.train import lm

    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert _train(straight, "--epochs", "2") == 0
    assert (straight / "anytime.png").is_file() and (straight / "last.pt").is_file()
    # An interrupted run: epoch 1 of the same 2-epoch schedule, then --resume.
    args = build_parser().parse_args(_argv(resumed, "--epochs", "2"))
    lm.train_lm(lm._spec_from_args(args), until_epoch=1)
    assert _train(resumed, "--epochs", "2", "--resume") == 0
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    rows_a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_a) == len(rows_b) == 2
    assert [r["test_ppl"] for r in rows_a] == [r["test_ppl"] for r in rows_b]
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(straight / "last.pt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ppl"] == pytest.approx(rows_a[-1]["test_ppl"], rel=1e-6)
    assert len(out["exit_flops_per_token"]) == 2
