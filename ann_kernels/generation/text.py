"""Text for the generation server: encoding prompts with any tokenizer, and the incremental
decoding of a request's tokens with stop strings (what a stream may show so far).

Stop strings follow the OpenAI completions API (as vLLM implements it,
``vllm/v1/engine/detokenizer.py``, ``check_stop_strings``): the completion ends before the
first occurrence of any stop string, which is not returned. While the text's tail could still
become a stop string, or ends in an incomplete UTF-8 sequence (U+FFFD from a byte-level BPE
decode), that tail is held back from the stream.
"""

from __future__ import annotations

__all__ = ["StopTextState", "encode_text"]


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text``: ``tokenizers.Tokenizer`` (``.encode(text).ids``) or a tokenizer
    whose ``encode`` returns ids (Hugging Face ``transformers``, a custom one)."""
    encoded = tokenizer.encode(text)
    return [int(t) for t in getattr(encoded, "ids", encoded)]


class StopTextState:
    """One request's decoded text. ``add(tokens, final)`` -> (new text to show, stopped);
    ``flush()`` releases what was held back (a request cut short); ``text``: everything
    shown so far (the completion once finished). EOS ids are not decoded. Without a tokenizer
    every text is ''. ``incremental=False`` (no stream, no stop strings): nothing is decoded
    until the request finishes (one decode instead of one per step)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), eos=frozenset(), incremental: bool = True) -> None:
        self.tokenizer, self.stop, self.eos = tokenizer, tuple(stop), set(eos)
        self.incremental = incremental or bool(stop)
        self.ids: list[int] = []
        self.text = ""
        self._full = ""

    def add(self, tokens, final: bool = False) -> tuple[str, bool]:
        if self.tokenizer is None:
            return "", False
        self.ids.extend(t for t in tokens if t not in self.eos)
        if not (self.incremental or final):
            return "", False
        full = self._full = self.tokenizer.decode(self.ids)
        if self.stop:
            hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
            if hits:
                return self._show(full[: min(hits)]), True
        if final:
            return self._show(full), False
        safe = full.rstrip("\ufffd")
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(safe)), hold, -1):
                if safe.endswith(s[:k]):
                    hold = k
                    break
        return self._show(safe[: len(safe) - hold]), False

    def flush(self) -> str:
        if self.tokenizer is None:
            return ""
        if not self.incremental:
            self._full = self.tokenizer.decode(self.ids)
        return self._show(self._full)

    def _show(self, upto: str) -> str:
        if len(upto) <= len(self.text) or not upto.startswith(self.text):
            return ""
        new = upto[len(self.text):]
        self.text = upto
        return new
