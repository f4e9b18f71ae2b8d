"""DoLa-style layer contrast (Chuang et al., ICLR 2024): next-token log-probabilities of the
final layer minus those of an early exit (an earlier layer read through the final norm and
LM head), so tokens whose probability grows in the upper layers win.

transformers moved DoLa to a hub ``custom_generate`` repository that does not work offline;
this version is hooks on stock ``generate``: each step records the last position's input to the
candidate layers and rewrites the last logits before the logits processors run, so greedy,
sampling and beam search all work and the cost stays near plain decoding. The premature layer is
chosen per sequence (largest Jensen-Shannon divergence to the final layer), so a sequence's
output does not depend on what else is in its batch.

Three differences from DoLa's own code (and transformers' port of it), so numbers can differ
from published DoLa ones: no repetition penalty (the code's evaluation scripts decode DoLa with
1.2; on the toy model it changes 3 of 200 seed-2 captions and no metric to three decimals); the
divergence is the Jensen-Shannon divergence as the paper defines it,
where the code computes 0.5 (KL(M || P) + KL(M || Q)) with M the mixture, which can pick another
layer; and an early exit goes through the final norm before the head, which the code leaves out
for the early layers (an open issue of the DoLa repository).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlsae_hooks.adapters import adapter_for

LAYER_BUCKETS = ("low", "high")


def candidate_layers(n_layers: int, which: str | list[int] = "high",
                     tied_embeddings: bool = False) -> list[int]:
    """Indices i of ``hidden_states[i]`` (0: the embeddings) that may serve as early exits.

    "low" / "high" follow the DoLa buckets transformers used: every second layer of the lower /
    upper half (the lowest / highest 20 of deeper models), never the final layer, and not the
    embeddings when the LM head is tied to them.
    """
    if not isinstance(which, str):
        layers = sorted({int(i) for i in which})
        if not layers or layers[0] < 0 or layers[-1] >= n_layers:
            raise ValueError(f"DoLa layers must lie in [0, {n_layers}), got {which}")
        return layers
    if which == "low":
        start, end = (2 if tied_embeddings else 0), (n_layers // 2 if n_layers <= 40 else 20)
    elif which == "high":
        start, end = (n_layers // 2 if n_layers <= 40 else n_layers - 20), n_layers
    else:
        raise ValueError(f"DoLa layers must be one of {LAYER_BUCKETS} or a list of indices, "
                         f"got {which!r}")
    layers = list(range(start, end, 2))
    if not layers:
        raise ValueError(f"no {which!r} DoLa layers in a {n_layers}-layer model; "
                         "pass indices instead")
    return layers


def relative_top_filter(final_logp: Tensor, base_logp: Tensor,
                        relative_top: float = 0.1) -> tuple[Tensor, Tensor]:
    """Keep the tokens with p >= relative_top * max p under the final layer; the others get -inf
    (final) and -1e-3 (base), as in DoLa."""
    cutoff = final_logp.max(dim=-1, keepdim=True).values + math.log(relative_top)
    drop = final_logp < cutoff
    return final_logp.masked_fill(drop, -math.inf), base_logp.masked_fill(drop, -1e-3)


def layer_contrast_logits(final_logits: Tensor, early_logits: Tensor,
                          relative_top: float = 0.1) -> Tensor:
    """DoLa scores from ``final_logits`` [B, V] and ``early_logits`` [L, B, V] (one per candidate).

    Per row, the candidate with the largest Jensen-Shannon divergence to the final layer is the
    premature layer; the score is log p_final - log p_premature on the plausible tokens.
    """
    final_logp = F.log_softmax(final_logits.float(), dim=-1)
    early_logp = F.log_softmax(early_logits.float(), dim=-1)
    mean = 0.5 * (final_logp.exp()[None] + early_logp.exp())
    log_mean = mean.clamp_min(1e-30).log()
    jsd = 0.5 * ((final_logp.exp()[None] * (final_logp[None] - log_mean)).sum(-1)
                 + (early_logp.exp() * (early_logp - log_mean)).sum(-1))  # [L, B]
    chosen = jsd.argmax(dim=0)  # [B]
    base = early_logp[chosen, torch.arange(final_logits.shape[0], device=chosen.device)]
    final, base = relative_top_filter(final_logp, base, relative_top)
    return final - base


class LayerContrast:
    """DoLa-style decoding on a llava-hf / Qwen2.5-VL model until ``remove()`` (or a ``with``
    block ends)."""

    def __init__(self, model: nn.Module, layers: str | list[int] = "high",
                 relative_top: float = 0.1) -> None:
        if not 0 < relative_top <= 1:
            raise ValueError(f"relative_top must lie in (0, 1], got {relative_top}")
        adapter = adapter_for(model)
        decoder_layers = adapter.layers(model)
        tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False)
                    or getattr(model.config, "tie_word_embeddings", False))
        self.layers = candidate_layers(len(decoder_layers), layers, tied)
        self.norm, self.head = adapter.norm(model), adapter.head(model)
        self.relative_top = float(relative_top)
        self._states: dict[int, Tensor] = {}
        self.hooks = [
            decoder_layers[i].register_forward_pre_hook(self._recorder(i), with_kwargs=True)
            for i in self.layers]
        self.hooks.append(model.register_forward_hook(self._contrast))

    def _recorder(self, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._states[index] = hidden[:, -1]
        return hook

    def _contrast(self, module: nn.Module, args: tuple, output):
        states, self._states = self._states, {}
        if len(states) != len(self.layers):
            return None
        early = torch.stack([self.head(self.norm(states[i])) for i in self.layers])
        logits = output.logits.clone()
        logits[:, -1] = layer_contrast_logits(output.logits[:, -1], early,
                                              self.relative_top).to(logits.dtype)
        output.logits = logits
        return output

    def remove(self) -> None:
        """Take the hooks off; the model is exactly as before."""
        for hook in self.hooks:
            hook.remove()
        self.hooks, self._states = [], {}

    def __enter__(self) -> LayerContrast:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
