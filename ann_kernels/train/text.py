"""Text data for early-exit language models, with no download.

Default corpus: the CPython standard library's own source (``sysconfig.get_paths()
["stdlib"]``, ``*.py``, without ``site-packages`` and without the ``test`` package, which
is most of the bytes and slow to tokenise here), split **by file** into train / val / test
by a stable hash of each file's relative path (default 90 / 5 / 5). Any other text files
via ``text_glob`` (``--text-glob``). A byte-level BPE vocabulary (Hugging Face
``tokenizers``; 8192 tokens by default, up to 50k) is trained on the training split only and
cached in the run directory (``tokenizer.json``), as are the token ids (``tokens.pt``).

Samples are non-overlapping blocks of ``seq_len + 1`` tokens of each split's token stream
(files joined by ``<|endoftext|>``): input = block[:-1], target = block[1:].
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["add_text_args", "TextData", "corpus_files", "split_files", "train_tokenizer", "load_text_data", "BlockDataset"]

EOT = "<|endoftext|>"
MAX_VOCAB = 50_000


def add_text_args(p) -> None:
    """The ``--dataset text`` options of ``ann-kernels train`` (argparse parser ``p``)."""
    g = p.add_argument_group("text (--dataset text)")
    g.add_argument("--text-glob", default=None,
                   help="text files to train on (recursive **); default: the CPython standard library's source")
    g.add_argument("--vocab-size", type=int, default=8192, help="byte-level BPE vocabulary (<= 50000)")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence")
    g.add_argument("--z-loss", type=float, default=0.0, help="z * lse^2 per token (PaLM / Liger)")


def corpus_files(text_glob: str | None = None) -> list[Path]:
    """The corpus's files, sorted: ``text_glob`` matches (recursive ``**``) or the stdlib."""
    if text_glob:
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(text_glob), recursive=True) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"--text-glob {text_glob!r} matches no files")
        return files
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for d, dirs, names in os.walk(root):
        rel = Path(d).relative_to(root)
        dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__")
                         and not (rel == Path(".") and x == "test"))
        files += [Path(d) / n for n in sorted(names) if n.endswith(".py")]
    if not files:
        raise FileNotFoundError(f"no .py files under the standard library at {root}")
    return sorted(files)


def split_files(files: list[Path], fractions=(0.9, 0.05, 0.05)) -> dict[str, list[Path]]:
    """Split by file: a stable hash of the path (relative to the common root) -> bucket."""
    if len(files) < 3:
        raise ValueError(f"text corpus: need at least 3 files to split into train/val/test, got {len(files)}")
    root = Path(os.path.commonpath([str(f) for f in files])) if len(files) > 1 else files[0].parent
    out = {"train": [], "val": [], "test": []}
    for f in files:
        rel = str(f.relative_to(root)) if root != f else f.name
        u = int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) / 16**8
        out["train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"].append(f)
    for name, group in out.items():  # tiny corpora: every split gets at least one file
        if not group:
            donor = max(out, key=lambda n: len(out[n]))
            group.append(out[donor].pop())
    return out


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int = 8192):
    """Byte-level BPE (``tokenizers``) trained on ``files``; ``<|endoftext|>`` is id 0."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as e:  # pragma: no cover - a dependency of the text pipeline
        raise ImportError("the text dataset needs Hugging Face `tokenizers` (pip install tokenizers)") from e
    if not 256 < vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size: expected 257..{MAX_VOCAB}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((_read(f) for f in files), trainer=trainer, length=len(files))
    return tok


def _encode(tok, files: list[Path]) -> torch.Tensor:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    batch = 64
    for i in range(0, len(files), batch):
        for enc in tok.encode_batch([_read(f) for f in files[i:i + batch]]):
            ids.extend(enc.ids)
            ids.append(eot)
    return torch.tensor(ids, dtype=torch.int32)


class BlockDataset(torch.utils.data.Dataset):
    """Non-overlapping blocks of a token stream: item i -> (tokens [S], next tokens [S]) int64."""

    def __init__(self, stream: torch.Tensor, seq_len: int, limit: int | None = None):
        n = (stream.numel() - 1) // seq_len
        if n < 1:
            raise ValueError(f"text split has {stream.numel()} tokens: too few for seq_len = {seq_len}")
        self.n = n if limit is None else min(n, limit)
        self.stream, self.seq_len = stream, seq_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        block = self.stream[i * self.seq_len: (i + 1) * self.seq_len + 1].long()
        return block[:-1], block[1:]


@dataclass
class TextData:
    train: BlockDataset
    val: BlockDataset
    test: BlockDataset
    vocab_size: int
    tokenizer_path: Path
    files: dict[str, int]


def load_text_data(run_dir: str | Path, *, text_glob: str | None = None, vocab_size: int = 8192,
                   seq_len: int = 128, limit_train: int | None = None, limit_eval: int | None = None,
                   progress: bool = True) -> TextData:
    """Tokenizer and token streams for the three splits, cached in ``run_dir`` (a cache
    made for another corpus or vocabulary size is rebuilt)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_path, ids_path, meta_path = run_dir / "tokenizer.json", run_dir / "tokens.pt", run_dir / "text.json"
    files = split_files(corpus_files(text_glob))
    meta = {"text_glob": text_glob, "vocab_size": vocab_size, "files": {k: len(v) for k, v in files.items()}}
    cached = meta_path.exists() and json.loads(meta_path.read_text()) == meta and tok_path.exists() and ids_path.exists()
    if cached:
        streams = torch.load(ids_path)
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(tok_path)).get_vocab_size()
    else:
        if progress:
            print(f"text: training a {vocab_size}-token byte-level BPE on {len(files['train'])} files "
                  f"({'stdlib' if text_glob is None else text_glob}); cached in {run_dir}", flush=True)
        tok = train_tokenizer(files["train"], vocab_size)
        streams = {}
        from tqdm import tqdm

        for name in tqdm(("train", "val", "test"), desc="tokenising", disable=not progress):
            streams[name] = _encode(tok, files[name])
        tok.save(str(tok_path))
        torch.save(streams, ids_path)
        meta_path.write_text(json.dumps(meta))
        vocab = tok.get_vocab_size()
    return TextData(BlockDataset(streams["train"], seq_len, limit_train), BlockDataset(streams["val"], seq_len, limit_eval),
                    BlockDataset(streams["test"], seq_len, limit_eval), vocab, tok_path, meta["files"])
