"""LayerSkip's early-exit training recipe on a Hugging Face ``LlamaForCausalLM`` (the class
of LayerSkip's released checkpoints), with the fused :class:`AnytimeLinearLoss`.

    loss_fn = HFLlamaEarlyExitLoss(model, exit_layers=[3, 7, 11, 15], weighting="layerskip",
                                   scale="sum", curriculum="rot", layer_dropout=0.1)
    loss = loss_fn(input_ids, attention_mask=mask)   # labels default to input_ids
    loss.backward()

Exit l (0-based decoder layer) = the hidden state after layer l, through the model's own
final norm (``model.model.norm``) and ``lm_head``, exactly as LayerSkip does it:
``facebookresearch/LayerSkip``, ``train.py`` ``LayerSkipModel.forward`` takes
``hidden_states[l]`` of ``output_hidden_states=True``, applies ``self.model.model.norm``
then ``self.model.lm_head``; the last layer's exit is the model's own logits. Here the
hidden states come from forward hooks on the chosen decoder layers (no copy of every
layer's state) and the K exits go to the fused linear + multi-exit cross-entropy, so the
K x tokens x vocabulary logits are never materialised. Causal-LM targets as Hugging
Face's ``ForCausalLMLoss``: position t predicts ``labels[t + 1]``; ``-100`` (and, when no
labels are given, every position ``attention_mask`` marks as padding) is ignored; each
exit's loss is the mean over the valid tokens of the batch.

Weighting: every scheme ``AnytimeLinearLoss`` takes. ``layerskip`` (the default) gets
``exit_layers`` and ``num_layers`` filled in, so its scales (``uniform``, ``linear``,
``sum``, ...) and curricula (``rot``, ``gradual``) are LayerSkip's, as
:mod:`ann_kernels.losses.layerskip` defines them. LayerSkip's ``train.py`` itself trains
the last layer plus one early exit rotating over layers 1..L-1, combined as
``(loss_L + s * loss_e) / (1 + s)``: ``weighting="layerskip", curriculum="rot",
curriculum_layers=[0]`` with an exit after every layer is that rotation.

Layer dropout (``layer_dropout``, ``layer_dropout_scale``): LayerSkip's ``train.py`` has
none; LayerSkip's recipe has it in torchtune (``torchtune/modules/layer_dropout.py``,
``LayerDropout`` and ``create_layer_dropout_modules``): in training each sequence skips
decoder layer l (the layer's output is its input) with probability
``layer_dropout * scale(l)`` (:func:`ann_kernels.nn.causal_lm.layer_dropout_probs`; ``exp``
by default, 0 at layer 0). Deviation: torchtune runs the layer on the kept rows only; here
the layer runs on every row and the skipped rows take their input back (the same function
and gradients, no compute saved: Llama's attention mask and rotary embeddings are per
batch, so slicing rows out of a Hugging Face layer call is not cheap to do in general).
The draws use the global torch RNG.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ann_kernels.losses.linear_loss import AnytimeLinearLoss
from ann_kernels.nn.causal_lm import layer_dropout_probs

__all__ = ["HFLlamaEarlyExitLoss", "hf_llama_parts"]


def hf_llama_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Linear]:
    """``(decoder, layers, final_norm, lm_head)`` of a Llama-style causal LM
    (``model.model``, ``model.model.layers``, ``model.model.norm``, ``model.lm_head``), or
    a clear error naming what is missing."""
    decoder = getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    if decoder is None or not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise TypeError(f"model: expected a Llama-style causal LM with model.model.layers (e.g. transformers' "
                        f"LlamaForCausalLM), got {type(model).__name__}")
    norm = getattr(decoder, "norm", None)
    if not isinstance(norm, nn.Module) or isinstance(norm, nn.Identity):
        raise ValueError(f"model: {type(model).__name__} has no final norm (model.model.norm is {norm!r}); every "
                         "exit goes through the model's own final norm and lm_head, as LayerSkip's recipe does")
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"model: expected model.lm_head to be an nn.Linear, got {type(head).__name__}")
    return decoder, layers, norm, head


class HFLlamaEarlyExitLoss(nn.Module):
    """Early-exit loss of a Hugging Face Llama causal LM (see the module docstring).

    Args:
        model: a ``transformers`` ``LlamaForCausalLM`` (or any model with the same
            ``model.layers`` / ``model.norm`` / ``lm_head`` layout, e.g. Mistral, Qwen2).
        exit_layers: 0-based decoder layers with an exit; the last layer is added if
            missing (it is the model's own output). Each in ``[0, num_hidden_layers)``.
        weighting, weighting_kwargs, ignore_index, label_smoothing, z_loss: as
            :class:`AnytimeLinearLoss` (``layerskip`` gets ``exit_layers`` / ``num_layers``).
        layer_dropout, layer_dropout_scale: LayerSkip's layer dropout (0 = off).

    ``forward(input_ids [B, S] int64, attention_mask=None [B, S], labels=None [B, S]
    int64)`` -> the scalar float32 loss; ``per_exit_loss`` [K] afterwards (the loss of
    every exit, weighted or not). The hooks act only inside this forward: the model's own
    ``forward``/``generate`` are unchanged. :meth:`remove` detaches them.
    """

    def __init__(self, model: nn.Module, exit_layers: Sequence[int], weighting="layerskip", *,
                 layer_dropout: float = 0.0, layer_dropout_scale: str = "exp", ignore_index: int = -100,
                 label_smoothing: float = 0.0, z_loss: float = 0.0, **weighting_kwargs):
        super().__init__()
        decoder, layers, norm, head = hf_llama_parts(model)
        num_layers = len(layers)
        layer_ids = [int(i) for i in exit_layers]
        bad = [i for i in layer_ids if not 0 <= i < num_layers]
        if not layer_ids or bad:
            raise ValueError(f"exit_layers: expected 0-based decoder layers in [0, {num_layers}) (the model has "
                             f"{num_layers} layers), got {list(exit_layers)}")
        self.exit_layers = sorted(set(layer_ids) | {num_layers - 1})
        self.num_layers = num_layers
        self.drop_probs = layer_dropout_probs(num_layers, float(layer_dropout), layer_dropout_scale)
        if weighting == "layerskip":
            weighting_kwargs.setdefault("exit_layers", self.exit_layers)
            weighting_kwargs.setdefault("num_layers", num_layers)
        # Kept outside the module tree: the model owns (and saves) its parameters.
        self.__dict__.update(model=model, _decoder=decoder, _norm=norm)
        self.loss_fn = AnytimeLinearLoss(head, len(self.exit_layers), weighting, ignore_index=ignore_index,
                                         label_smoothing=label_smoothing, z_loss=z_loss, **weighting_kwargs)
        self.ignore_index = ignore_index
        self._captured: dict[int, torch.Tensor] = {}
        self._active = False
        self._handles = [layers[i].register_forward_hook(self._make_hook(i), with_kwargs=True)
                         for i in range(num_layers) if i in self.exit_layers or self.drop_probs[i] > 0]

    @property
    def per_exit_loss(self) -> torch.Tensor:
        return self.loss_fn.last_per_exit

    @property
    def weights(self) -> torch.Tensor:
        return self.loss_fn.weights

    def _make_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            if not self._active:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            p = self.drop_probs[layer]
            dropped = self.model.training and p > 0
            if dropped:  # LayerSkip layer dropout: skipped rows keep their input
                x = args[0] if args else kwargs["hidden_states"]
                skip = (torch.rand(hidden.shape[0]) < p).to(hidden.device).view(-1, *([1] * (hidden.dim() - 1)))
                hidden = torch.where(skip, x, hidden)
            if layer in self.exit_layers:
                self._captured[layer] = hidden
            if not dropped:
                return None
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def exit_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The K exits' hidden states after the final norm, each [B, S, D]."""
        self._captured.clear()
        self._active = True
        try:
            # 1. the decoder alone (no lm_head over the whole vocabulary), no KV cache
            self._decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            # 2. every exit through the model's own final norm
            return [self._norm(self._captured[i]) for i in self.exit_layers]
        finally:
            self._active = False
            self._captured.clear()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise ValueError(f"input_ids: expected [batch, seq_len >= 2] token ids, got shape {tuple(input_ids.shape)}")
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0,
                                                                                     self.ignore_index)
        elif labels.shape != input_ids.shape:
            raise ValueError(f"labels: expected the shape of input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(labels.shape)}")
        hidden = self.exit_hidden_states(input_ids, attention_mask)
        # 3. position t predicts labels[t + 1] (Hugging Face's shift); 4. the fused loss
        return self.loss_fn([h[:, :-1] for h in hidden], labels[:, 1:])

    def remove(self) -> None:
        """Detach the forward hooks from the model's layers."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def extra_repr(self) -> str:
        return f"exit_layers={self.exit_layers}, num_layers={self.num_layers}, layer_dropout={max(self.drop_probs)}"
