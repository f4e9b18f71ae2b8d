"""Contrast mode: the reference's method, with the KV cache (its uncached computation is mode
"reference", ``modes/reference.py``).

At the input of decoder layer ``s`` every text position after the image is shifted by
t' - t = alpha (D_t((1 - w) E_t(t) + w z_v) - t) (``realignment``). The shifted copy becomes a
steered branch that runs beside the plain states through the layers ``j >= s``, as extra rows
of the same batch: those layers run once on 2B rows (one launch per op for both branches), and
their cache slots hold both branches' keys and values (``TwinRows``), and the model's
``lm_head`` runs once on both (its weights read once a step, the largest single read at 7B); the
logits are split again at the output. (A call given ``labels`` splits the final norm's output
instead, so that the model's loss sees the plain rows only, and runs the steered half through
``lm_head`` here.) The logits become ``(1 - contrast_weight) l + contrast_weight l_steered`` on
the tokens with p >= plausibility_cutoff * max p under the plain model, -inf elsewhere. Layers
below ``s`` run on B rows. With contrast_weight 0 no branch runs: the cutoff alone acts on the
plain logits.

Running both branches as one batch changes the plain half's float rounding slightly where a
kernel's result depends on the batch size (as batching prompts does): within an ulp or so of a
B-row run, not bit for bit.

Cached decoding versus the reference (which recomputes the whole sequence every step with
``use_cache=False``): here each position is shifted once, when it is computed, using the text
mean up to and including that position; past positions keep the shift they had then (their
keys/values are cached), whereas the reference re-shifts every past position with the newest
mean. The contrast branch likewise attends to its own cached past. Mode "reference" (or
``generate(use_cache=False)``) reproduces the reference's computation: every step then sees the
full sequence and v, t and the shift of every position are recomputed from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from vlsae_hooks.forward_call import ForwardCall
from vlsae_hooks.modes.options import check_number
from vlsae_hooks.modes.registry import register_mode
from vlsae_hooks.modes.shift import RealignState, ShiftOptions, ShiftSteerer, shifted_states
from vlsae_hooks.realignment import contrast_logits, cutoff_logits


@dataclass
class ContrastOptions(ShiftOptions):
    """Contrast mode. Defaults are the reference's POPE settings."""

    contrast_weight: float = 0.6
    """w in (1 - w) l + w l_steered on the tokens that survive the cutoff; 0 leaves the plain
    logits there (what the cutoff alone does) and runs no steered branch."""
    plausibility_cutoff: float = 0.8
    """Keep tokens with p >= cutoff * max p under the plain model; 0 keeps every token."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number(self, "contrast_weight", 0, 1)
        check_number(self, "plausibility_cutoff", 0, 1)


RECORDED = ("hidden_states", "attentions")
"""The outputs that record every decoder layer's rows, the upper layers' twice as many."""


@dataclass(slots=True)
class _ContrastForward(ForwardCall):
    """A contrast call: ``ForwardCall`` and its steered branch."""

    both_rows: bool = False
    """Whether the final norm's output, and so the model's logits, hold both branches' rows."""
    steered: Tensor | None = None
    """With ``labels``: the steered branch's final norm output (split off the 2B rows so that the
    model's loss sees the plain rows only), for ``lm_head`` here."""
    both: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    """id(a layer input with a batch dimension) -> (it, its rows twice): the decoder layers'
    masks and rotary embeddings, doubled once per call for every upper layer."""


class ContrastSteerer(ShiftSteerer):
    """Plain and steered branch, contrasted at the logits: the shift's states become a second
    branch (extra rows of the batch) instead of going on through the model."""

    TWIN_ROWS = True
    CHANGES_LOGITS = True
    ALWAYS_BRANCHED = False
    """Whether the branch runs even at contrast_weight 0 (reference mode: its cost is the
    point)."""
    Forward = _ContrastForward

    def __init__(self, model: nn.Module, space, options: ContrastOptions) -> None:
        super().__init__(model, space, options)
        self.contrast_weight = options.contrast_weight
        self.plausibility_cutoff = options.plausibility_cutoff
        self.branched = self.ALWAYS_BRANCHED or options.contrast_weight != 0
        """False with contrast_weight 0: the branch's logits would weigh nothing, so it does not
        run and the cutoff alone acts on the plain logits (the same logits, a plain step's
        cost)."""
        self.reads_text = self.branched  # the running text mean feeds the branch only

    def no_op(self) -> str | None:
        if self.contrast_weight == 0 and self.plausibility_cutoff == 0:
            return ("mode contrast with contrast_weight = 0 and plausibility_cutoff = 0 keeps "
                    "the plain logits")
        return None

    def _extra_hooks(self) -> list[RemovableHandle]:
        if not self.branched:
            return []
        hooks = [layer.register_forward_pre_hook(self._on_upper_layer, with_kwargs=True)
                 for layer in self.layers[self.site_layer + 1:]]
        hooks.append(self.norm.register_forward_hook(self._on_norm))
        return hooks

    def _steer(self, call: _ContrastForward, state: RealignState, hidden: Tensor,
               text: Tensor, args: tuple, kwargs: dict):
        if not self.branched:
            return None
        steered = shifted_states(self.realigner, state, hidden, text)
        return (torch.cat([hidden, steered]), *args[1:]), self._inputs_for_both(call, kwargs)

    def _on_upper_layer(self, module: nn.Module, args: tuple, kwargs: dict):
        call = self._forward()
        if call is None or call.text_now is None:
            return None
        return args, self._inputs_for_both(call, kwargs)

    @staticmethod
    def _inputs_for_both(call: _ContrastForward, kwargs: dict) -> dict:
        """A decoder layer's keyword inputs for 2B rows: every tensor with the batch's B rows
        (the mask, position ids, the rotary cos and sin) twice; the rest as they are. An input
        of another type made for B > 1 rows (flex attention's ``BlockMask``) is an error: it
        cannot be doubled."""
        rows = call.input_ids.shape[0]

        def twice(key: str, value):
            if isinstance(value, tuple):
                return tuple(twice(key, v) for v in value)
            if not isinstance(value, Tensor):
                shape = getattr(value, "shape", None)
                if rows > 1 and isinstance(shape, tuple) and shape[:1] == (rows,):
                    raise ValueError(
                        f"mode contrast runs its steered branch as extra rows of the batch, "
                        f"and cannot double the decoder layers' {key} ({type(value).__name__}, "
                        f"made for {rows} rows); load the model with attn_implementation="
                        "'sdpa' or 'eager', or steer one prompt at a time")
                return value
            if value.dim() < 2 or value.shape[0] != rows:
                return value
            if id(value) not in call.both:
                doubled = (value.expand(2, *value.shape[1:]) if rows == 1
                           else torch.cat([value, value]))
                call.both[id(value)] = value, doubled
            return call.both[id(value)][1]

        return {key: twice(key, value) for key, value in kwargs.items()}

    def _on_norm(self, module: nn.Module, args: tuple, output: Tensor):
        call = self._forward()
        if call is None or call.text_now is None:
            return None
        if not call.labels_given:  # the model's head runs once on both branches' rows
            call.both_rows = True
            return None
        rows = call.input_ids.shape[0]
        call.steered = output[rows:]
        return output[:rows]

    def _changes_logits(self, call: _ContrastForward) -> bool:
        return call.both_rows or call.steered is not None or not self.branched

    def _logits(self, call: _ContrastForward, logits: Tensor, rows: Tensor, kept: int) -> Tensor:
        if not self.branched:  # the branch would weigh 0: the cutoff alone
            return torch.where(rows[..., None],
                               cutoff_logits(logits, self.plausibility_cutoff), logits)
        if call.both_rows:
            n = call.input_ids.shape[0]
            logits, steered = logits[:n], logits[n:]
        else:
            steered = call.steered if call.steered.shape[1] == kept else call.steered[:, -kept:]
            steered = self.lm_head(steered).to(logits.device, logits.dtype)
        combined = contrast_logits(logits, steered, self.contrast_weight,
                                   self.plausibility_cutoff)
        return torch.where(rows[..., None], combined, logits)

    def _outputs(self, call: _ContrastForward, output):
        """The model's outputs without the steered rows that the upper layers' recorded
        hidden states and attentions (``output_hidden_states``, ``output_attentions``) hold."""
        rows = call.input_ids.shape[0]

        def plain_rows(value):
            if isinstance(value, tuple):
                return tuple(map(plain_rows, value))
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == 2 * rows:
                return value[:rows]
            return value

        if isinstance(output, tuple):  # return_dict=False: they are its tuples of tensors
            return tuple(plain_rows(v) if isinstance(v, tuple) else v for v in output)
        for key in RECORDED:
            if getattr(output, key, None) is not None:
                output[key] = plain_rows(output[key])
        return output


register_mode("contrast", ContrastOptions, ContrastSteerer)
