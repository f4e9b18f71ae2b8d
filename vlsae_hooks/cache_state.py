"""The per-sequence state that steering with a KV cache carries (``CacheState``; the layer
modes' ``SteeringState``), kept inside the model's own ``Cache`` so that beam search's
``reorder_cache`` and ``batch_select_indices`` move it along with the keys and values, and a
conversation's next turn finds it (``conversation_state``: only under the steering that made it);
and the cache layers that hold the contrast branch's rows beside the model's (``TwinRows``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from vlsae_hooks.pooling import masked_sum


class CacheState(CacheLayerMixin):
    """A sequence's steering state, stored as an extra layer at the end of the model's
    ``Cache`` (``install_state``), so that it lives exactly as long as the conversation and
    goes wherever the cache goes: a conversation continued with its cache goes on with its own
    state, whatever ran in between.

    It holds no keys or values; it only follows the cache's batch operations (beam reorder,
    batch selection, repeat) on the per-row tensors its class names in ``TENSORS``, so each
    always belongs to the right sequence.
    """

    is_compileable = True
    """Never what stops a static cache from being one: ``generate`` then hands each step the 4-D
    mask it made (as without steering) rather than have the model rebuild it from a 2-D one,
    which reads the cache's length back from the device at every step."""
    is_croppable = False  # a running sum cannot be rolled back token by token
    supports_early_init = False
    is_sliding = False
    TENSORS: tuple[str, ...] = ()
    """The per-row tensors that follow the cache's batch operations."""

    def __init__(self) -> None:
        super().__init__()
        self.ready = True
        self.made_under: tuple | None = None
        """The steering that made this state, (options, space config), noted by
        ``install_state``: a conversation continued under another ``attach`` goes on only under
        the same (``take_over``)."""

    def _apply(self, fn) -> None:
        with torch.inference_mode(False):  # the sums stay updatable (``updatable``)
            for name in self.TENSORS:
                tensor = getattr(self, name)
                if tensor is not None:  # a field the mode does not use
                    setattr(self, name, fn(tensor))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._apply(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise ValueError("vlsae_hooks steering cannot roll its state back token by token: "
                             "assisted / speculative decoding is not supported while attached")

    def reset(self) -> None:
        self.ready = False  # the next forward is a new prefill and refills this state

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} holds no keys/values; an attention layer was "
                           "routed to it by mistake")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


def take_over(state: CacheState, made_under: tuple) -> None:
    """A conversation's cache passed back under another ``attach`` (``made_under``: its
    options and space config): its state goes on only under the mode, options and space it was
    made with (another mode's state has other fields, another space other concepts)."""
    if state.made_under != made_under:
        raise ValueError(f"this cache holds a conversation steered with "
                         f"{_steering(state.made_under)}; it cannot go on under "
                         f"{_steering(made_under)}: attach as when it began, or start a new "
                         "conversation (generate without the cache)")
    state.made_under = made_under


def _steering(made_under: tuple) -> str:
    options, config = made_under
    return (f"{options} and a {config.kind} space ({config.n_concepts} concepts, layer "
            f"{config.layer})")


class SteeringState(CacheState):
    """What every layer mode keeps per row: the image's code and the running text sums; a mode
    that keeps more subclasses it and names its tensors in ``TENSORS`` (evidence mode's
    ``EvidenceState``)."""

    TENSORS = ("vision_values", "vision_indices", "text_sum", "text_count", "has_image")

    def __init__(self, vision_values: Tensor, vision_indices: Tensor, text_sum: Tensor,
                 text_count: Tensor, has_image: Tensor) -> None:
        super().__init__()
        self.vision_values, self.vision_indices = vision_values, vision_indices
        """The image's sparse code z_v (values, indices) [B, k]."""
        self.text_sum, self.text_count = updatable(text_sum), updatable(text_count)
        self.has_image = has_image
        """Running float32 sum [B, d] and count [B] of the text positions' states (kept while
        decoding by the modes that read them), and whether each row has an image [B]. The sums
        are this state's own tensors: a decoding step adds to them in place."""
        with torch.inference_mode(False):
            self.text_total_seen = torch.zeros((), pin_memory=text_sum.is_cuda)
        """A host copy of the sums' total (``note_text_total``), copied without waiting by a
        decoding step and read at the start of the next one, when ``generate`` has already
        waited for the device: the sums' finiteness checked without a sync. 0 until then (the
        prefill checks its own sums in its forward)."""
        self._total_seen_on_host = self.text_total_seen.numpy()
        """``text_total_seen``'s memory as a numpy array, made once: ``Tensor.numpy()`` at
        every step cost about 20 us inside a generate on a CPU."""

    def text_mean(self) -> Tensor:
        """Mean [B, d] of the text positions so far (0 for a row without any)."""
        return self.text_sum / self.text_count.clamp(min=1)[:, None]

    def add_text(self, hidden: Tensor, mask: Tensor) -> None:
        """Add the ``mask`` (bool [B, T]) positions of ``hidden`` [B, T, d] to the running sums,
        in place. A decoding step (T = 1) adds ``hidden * mask`` directly: the same float32
        values as ``masked_sum`` over one position, in one operation instead of five, but for
        nan / inf at a masked position, which the product keeps (0 x inf): a step's masked rows
        are rows without an image, unsteered, whose own states are then non-finite anyway."""
        if hidden.shape[1] == 1:
            self.text_sum.addcmul_(hidden[:, 0].float(), mask)  # the bool mask counts as 0 / 1
            self.text_count.add_(mask[:, 0])
            return
        text_sum, count = masked_sum(hidden, mask)
        self.text_sum.add_(text_sum)
        self.text_count.add_(count)

    def note_text_total(self) -> None:
        """Start copying the sums' total to ``text_total_seen`` (no wait on a GPU); sums on the
        host are summed straight into it (one operation)."""
        if self.text_sum.is_cpu:
            torch.sum(self.text_sum, dim=(0, 1), out=self.text_total_seen)
        else:
            self.text_total_seen.copy_(self.text_sum.sum(), non_blocking=True)

    def text_total_finite(self) -> bool:
        """Whether the total the last ``note_text_total`` copied is finite: a read of host
        memory, not of the device."""
        return math.isfinite(self._total_seen_on_host)


def updatable(tensor: Tensor) -> Tensor:
    """``tensor``, or a normal copy of it if it was made under ``torch.inference_mode``: the
    state's sums are updated in place, which torch refuses for such a tensor outside inference
    mode, as when a conversation begun under inference mode goes on (its cache passed back to
    ``generate``) without it. A normal tensor may be updated in place under inference mode."""
    if not tensor.is_inference():
        return tensor
    with torch.inference_mode(False):
        return tensor.clone()


class TwinRows(CacheLayerMixin):
    """A cache layer whose batch holds two branches, the model's rows then the steered branch's
    (contrast runs its upper layers once on both): beam search's reorder and a batch selection
    pick a row of each branch, and a repeat-interleave (which keeps the two halves apart) needs
    nothing more. Mixed into the layer's own class by ``with_twin_rows``."""

    _layer_type = None  # never register in transformers' layer-type mappings
    _reset = False
    """Whether the layer was reset since its last update: the next update may be the plain
    model's (steering removed), one branch's rows."""

    def _rows_of_both(self, index: Tensor) -> Tensor:
        index = index.to(self.keys.device)
        if index.dtype == torch.bool:
            return torch.cat([index, index])
        return torch.cat([index, index + self.keys.shape[0] // 2])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            super().reorder_cache(self._rows_of_both(beam_idx))

    def batch_select_indices(self, indices: Tensor) -> None:
        if self.get_seq_length() > 0:
            super().batch_select_indices(self._rows_of_both(indices))

    def reset(self) -> None:
        super().reset()
        self._reset = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if self._reset:  # the first update of a reused cache: contrast keeps the allocation;
            self._reset = False  # one branch's rows (steering removed) get the plain layer back
            if self.is_initialized and len(key_states) * 2 == len(self.keys):
                self.__class__, self.is_initialized = type(self).__bases__[1], False
                return self.update(key_states, value_states, *args, **kwargs)
        try:
            return super().update(key_states, value_states, *args, **kwargs)
        except RuntimeError as error:  # no shape check on the way: a step pays nothing for it
            if self.keys is None or len(key_states) * 2 != len(self.keys):
                raise
            raise ValueError("this cache holds a conversation decoded with contrast steering "
                             "(its layers hold both branches' rows) and is continued without "
                             "it: attach as when it began, or start a new conversation "
                             "(generate without the cache)") from error


_TWIN_CLASSES: dict[type, type] = {}


def with_twin_rows(layer: CacheLayerMixin, twin: bool) -> CacheLayerMixin:
    """``layer`` (of a fresh or reset cache, holding nothing yet) as one that holds both
    branches' rows (``TwinRows`` mixed into its class) or, if not ``twin``, one branch's (a
    reused cache that a contrast call had); its attributes taken over but for what it has
    allocated, which is sized for the other number of rows (a static cache initialized early,
    or reset after a call): its first update allocates again."""
    if isinstance(layer, TwinRows) == twin:
        return layer
    cls = type(layer)
    if twin:
        if cls not in _TWIN_CLASSES:
            _TWIN_CLASSES[cls] = type(f"TwinRows{cls.__name__}", (TwinRows, cls), {})
        cls = _TWIN_CLASSES[cls]
    else:
        cls = cls.__bases__[1]
    copied = object.__new__(cls)
    copied.__dict__.update(vars(layer))
    copied.is_initialized = False
    return copied


CACHE_KWARGS = ("cache", "past_key_values")


def call_cache(kwargs: dict) -> Cache | None:
    """The cache a forward call was given, under either keyword; None without one."""
    return next((kwargs[key] for key in CACHE_KWARGS if kwargs.get(key) is not None), None)


def model_cache(output) -> Cache | None:
    """The cache a model's output holds (the one it made for a call given none), whether the
    call returned a ``ModelOutput`` or a tuple (``return_dict=False``)."""
    if isinstance(output, tuple):
        return next((value for value in output if isinstance(value, Cache)), None)
    return getattr(output, "cache", None)


def find_state(cache: Cache | None, n_layers: int) -> CacheState | None:
    """The steering state a cache holds after the model's ``n_layers`` layers, None if none."""
    if cache is not None and len(cache.layers) > n_layers:
        last = cache.layers[-1]
        if isinstance(last, CacheState):
            return last
    return None


def conversation_state(cache: Cache | None, n_layers: int,
                       made_under: tuple) -> CacheState | None:
    """The state of the sequence a call goes on with (a decoding step, or a conversation's next
    turn: its cache's state, taken over by this steering, ``take_over``), or None for a call
    that starts one (no cache, an empty one, or one reset for reuse). A cache that holds tokens
    run without steering is refused."""
    state = find_state(cache, n_layers)
    if state is not None and state.ready:
        if state.made_under is not made_under:  # a conversation continued under a new attach
            take_over(state, made_under)
        return state
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError("the cache passed to the model already holds tokens that were run "
                         "without steering; attach before the prompt is run, or start a new "
                         "conversation")
    return None


def install_state(cache: Cache, state: CacheState, n_layers: int, made_under: tuple,
                  branch_from: int | None = None) -> None:
    """Append ``state``, noted as made under ``made_under`` (the steering's options and space
    config, which ``conversation_state`` checks), to a fresh ``Cache`` (replace it in a reused
    one); the layers ``branch_from..n_layers-1``, if any, hold a steered branch's rows beside
    the model's (``TwinRows``: contrast)."""
    state.made_under = made_under
    reused = find_state(cache, n_layers) is not None  # the cache was reset and is reused
    while len(cache.layers) < n_layers:
        if cache.layer_class_to_replicate is None:
            raise ValueError(f"cache has {len(cache.layers)} layers for a model with "
                             f"{n_layers}; cannot add the steering slots")
        cache.layers.append(cache.layer_class_to_replicate())
    if len(cache.layers) != n_layers + reused:
        raise ValueError("the cache has more layers than the model (is it shared with "
                         "another steered model?)")
    for j in range(n_layers):
        cache.layers[j] = with_twin_rows(cache.layers[j], branch_from is not None
                                         and j >= branch_from)
    if reused:
        cache.layers[-1] = state
    else:
        cache.layers.append(state)
