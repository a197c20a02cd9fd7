"""Loading an early-exit LM checkpoint for generation: the model, its tokenizer and its
held-out text.

A checkpoint of ``ann-kernels train --dataset text`` (``ann_kernels/train/lm.py``, format
``ann_kernels-lm-1``) stores the model's spec and weights; its run directory (the
checkpoint's folder) holds ``tokenizer.json`` (byte-level BPE, ``<|endoftext|>`` = id 0) and
``tokens.pt`` (the token streams of the train / val / test splits, ``ann_kernels/train/text.py``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from ann_kernels.nn.causal_lm import CausalExitLM, causal_exit_lm
from ann_kernels.train.lm import LM_FORMAT
from ann_kernels.train.text import EOT

__all__ = ["LMCheckpoint", "load_lm_checkpoint", "held_out_blocks"]


@dataclass
class LMCheckpoint:
    """``model`` (eval mode, on CPU), ``tokenizer`` (``tokenizers.Tokenizer`` or None when
    the run directory has none), ``eos_token_id`` (``<|endoftext|>`` or None), ``run_dir``,
    ``spec`` (the training spec), ``epoch``."""

    model: CausalExitLM
    tokenizer: object | None
    eos_token_id: int | None
    run_dir: Path
    spec: dict
    epoch: int

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise FileNotFoundError(f"{self.run_dir}/tokenizer.json: no tokenizer beside the checkpoint")
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise FileNotFoundError(f"{self.run_dir}/tokenizer.json: no tokenizer beside the checkpoint")
        return self.tokenizer.decode(ids)


def load_lm_checkpoint(path) -> LMCheckpoint:
    """Rebuild the LM of ``path`` (a ``last.pt`` of a text run) with its tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != LM_FORMAT:
        raise ValueError(f"checkpoint: {path} is not an LM checkpoint (format {LM_FORMAT!r}; train one with "
                         "ann-kernels train --dataset text)")
    spec = ckpt["spec"]
    accepted = set(inspect.signature(causal_exit_lm).parameters)
    kwargs = {k: v for k, v in spec["model_kwargs"].items() if k in accepted and k != "dropout"}
    model = causal_exit_lm(int(ckpt["vocab_size"]), max_len=int(spec["seq_len"]), **kwargs)
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing:
        raise ValueError(f"checkpoint: {path} lacks weights {missing[:5]} of the model its spec describes")
    model.eval()
    run_dir = path.parent
    tokenizer, eos = None, None
    if (run_dir / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer.json"))
        eos = tokenizer.token_to_id(EOT)
    return LMCheckpoint(model, tokenizer, eos, run_dir, spec, int(ckpt.get("epoch", 0)))


def held_out_blocks(run_dir, split: str, length: int, count: int) -> torch.Tensor:
    """[count', length] int64: consecutive non-overlapping blocks of the ``split`` token stream
    of a run directory (``tokens.pt``), count' <= count."""
    path = Path(run_dir) / "tokens.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no token streams in the run directory (held-out text)")
    stream = torch.load(path)[split].long()
    n = min(count, stream.numel() // length)
    if n < 1:
        raise ValueError(f"held-out split {split!r} has {stream.numel()} tokens: too few for blocks of {length}")
    return stream[: n * length].view(n, length)
