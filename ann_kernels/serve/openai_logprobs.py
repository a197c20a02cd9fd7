"""OpenAI's legacy completions ``logprobs`` object (``/v1/completions`` with ``logprobs: 0``)
for one choice, built chunk by chunk so a streamed choice's pieces concatenate to the
non-streamed answer:

``{"tokens": [str], "token_logprobs": [float], "text_offset": [int], "top_logprobs": null}``

- ``token_logprobs``: each generated token's natural-log probability as the engine reports it
  (``ann_kernels.generate``'s ``out.logprobs``: the producing exit's distribution; the
  verifying exit's under ``self_speculative``; after temperature / top-k / top-p for sampled
  rows), floored at -9999.0 as vLLM does (JSON has no -inf);
- ``tokens``: each token's text: what it adds to the decoded text after up to
  :data:`CONTEXT_TOKENS` tokens before it (so a word-piece's leading space is its own; the
  token decoded alone when that is not a clean extension, e.g. inside a multi-byte
  character); EOS is included (usually "");
- ``text_offset``: where each token's text starts, counted from the start of the choice's
  generated text (the running sum of the ``tokens`` lengths, as vLLM's
  ``_create_completion_logprobs`` without ``echo``);
- ``top_logprobs``: null: the engine hands back the chosen token's log-probability only, so
  alternatives (``logprobs`` >= 1) are refused with 400.

Every generated token is listed (as ``exit_index`` and ``usage.completion_tokens`` count
them), also the tokens of a stop string whose text was cut from ``text``.
"""

from __future__ import annotations

__all__ = ["CompletionLogprobs", "CONTEXT_TOKENS", "LOGPROB_FLOOR"]

CONTEXT_TOKENS = 4
LOGPROB_FLOOR = -9999.0  # vLLM's stand-in for -inf (serving_completion.py, _create_completion_logprobs)


class CompletionLogprobs:
    """The ``logprobs`` of one choice; ``decode(ids) -> str`` is the server's tokenizer."""

    def __init__(self, decode) -> None:
        self.decode = decode
        self.recent: list[int] = []
        self.offset = 0

    def add(self, token_ids, logprobs) -> dict:
        """The ``logprobs`` object of the next tokens (their log-probabilities ``logprobs``)."""
        if len(token_ids) != len(logprobs):
            raise ValueError(f"logprobs: {len(logprobs)} values for {len(token_ids)} tokens")
        texts, offsets = [], []
        for token in token_ids:
            context = self.recent[-CONTEXT_TOKENS:]
            before = self.decode(context) if context else ""
            after = self.decode(context + [token])
            piece = after[len(before):] if after.startswith(before) else self.decode([token])
            texts.append(piece)
            offsets.append(self.offset)
            self.offset += len(piece)
            self.recent = context + [token]
        return {"tokens": texts, "token_logprobs": [max(float(v), LOGPROB_FLOOR) for v in logprobs],
                "text_offset": offsets, "top_logprobs": None}
