"""``ann-kernels generate`` on a tiny LM checkpoint (random weights, a real BPE tokenizer in
its run directory): text and --json output, modes, bad arguments."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
import torch

import ann_kernels
from ann_kernels.cli import main
from ann_kernels.generation.checkpoint import load_lm_checkpoint
from ann_kernels.nn.causal_lm import causal_exit_lm
from ann_kernels.train.lm import LM_FORMAT

pytest.importorskip("tokenizers", reason="Hugging Face tokenizers is not installed (pip install tokenizers)")

from ann_kernels.train.text import load_text_data  # noqa: E402

SMALL_GLOB = str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("lm")
    data = load_text_data(run, text_glob=SMALL_GLOB, vocab_size=300, seq_len=16, progress=False)
    torch.manual_seed(0)
    kwargs = {"dim": 32, "layers": 3, "heads": 2}
    model = causal_exit_lm(data.vocab_size, max_len=64, **kwargs)
    spec = {"seq_len": 64, "model_kwargs": kwargs}
    torch.save({"format": LM_FORMAT, "spec": spec, "epoch": 1, "model": model.state_dict(),
                "vocab_size": data.vocab_size}, run / "last.pt")
    return run / "last.pt"


def test_generate_json_equals_the_api(checkpoint, capsys):
    argv = ["generate", "--checkpoint", str(checkpoint), "--prompt", "def loads(", "--prompt", "import re\n",
            "--max-new-tokens", "6", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    lm = load_lm_checkpoint(checkpoint)
    ref = ann_kernels.generate(lm.model, [lm.encode("def loads("), lm.encode("import re\n")], max_new_tokens=6,
                               eos_token_id=lm.eos_token_id)
    assert out["tokens"] == ref.tokens and out["exit_index"] == ref.exit_index
    assert out["completions"] == [lm.decode(t) for t in ref.tokens]
    assert main(argv + ["--mode", "self_speculative", "--exit-index", "1", "--draft-len", "3"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["tokens"] == ref.tokens and "acceptance_rate" in spec["stats"]


def test_generate_text_output_and_prompts_file(checkpoint, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("class JSONDecoder:\\n    def\nreturn\n")
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompts-file", str(prompts), "--max-new-tokens",
                 "5", "--mode", "confidence", "--threshold", "0.0"]) == 0
    text = capsys.readouterr().out
    assert text.count("--- prompt") == 2 and "class JSONDecoder:\n    def" in text
    assert "tokens per exit: 0:5 1:0 2:0" in text and "mode confidence:" in text


def test_generate_bad_arguments(checkpoint, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint)]) == 2
    assert "--prompt / --prompts-file" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", "x", "--mode", "static",
                 "--exit-index", "7"]) == 2
    assert "exit_index: 7 is out of range" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "none.pt"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
