"""Decoding methods of the lmms-eval plugin, selected with ``--model_args method=NAME``.

Each method puts hooks on the loaded model for the whole evaluation and leaves the task's own
generation arguments (greedy / sampling / beams, lengths) in charge of ``generate``. Add a method
with a row in ``LMMS_METHODS``; its option names become valid ``--model_args`` keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

from torch import nn

from vlsae_hooks.modes.registry import mode_names, mode_spec


@dataclass(frozen=True)
class LmmsMethod:
    steer: Callable[[nn.Module, dict, object], AbstractContextManager]
    """(model, options, tokenizer) -> context manager that keeps the method's hooks on the
    model."""
    options: tuple[str, ...] = ()
    """``--model_args`` keys this method reads (anything else is rejected)."""
    doc: str = ""


def _plain(model: nn.Module, options: dict, tokenizer=None) -> AbstractContextManager:
    return contextlib.nullcontext()


def _vcd(model: nn.Module, options: dict, tokenizer=None) -> AbstractContextManager:
    from eval_suites.peers.vcd import VisualContrast

    return VisualContrast(model, alpha=float(options.get("cd_alpha", 1.0)),
                          beta=float(options.get("cd_beta", 0.1)),
                          noise_step=int(options.get("noise_step", 500)))


def _dola_layers(value) -> str | list[int]:
    """"high", "low", one index, or indices joined by '+' (model_args split on commas)."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, str) and value not in ("high", "low"):
        return [int(i) for i in value.split("+")]
    return value


def _dola(model: nn.Module, options: dict, tokenizer=None) -> AbstractContextManager:
    from eval_suites.peers.dola import LayerContrast

    return LayerContrast(model, layers=_dola_layers(options.get("dola_layers", "high")),
                         relative_top=float(options.get("relative_top", 0.1)))


def mode_options(mode: str, *left_out: str) -> tuple[str, ...]:
    """``space`` and the options of steering mode ``mode`` (its options class's fields, what
    ``attach`` checks), less ``left_out``; evidence's ``affirm_token_ids`` are given as
    ``affirm_words`` here (``affirming_token_ids``)."""
    names = mode_spec(mode).option_names
    words = ("affirm_words",) if "affirm_token_ids" in names else ()
    return ("space", *(o for o in names if o not in (*left_out, "affirm_token_ids")), *words)


RECOMMENDED_OPTIONS = tuple(dict.fromkeys(o for mode in mode_names() for o in mode_options(mode)))
"""What ``vlsae`` takes: the options of any mode a space may recommend (``attach`` then checks
them against the mode it resolves)."""


def affirming_token_ids(tokenizer, words: str = "yes+Yes") -> tuple[int, ...]:
    """The first token of each word ('+'-joined), alone and after a space, as the answer to a
    yes/no question starts; words the tokenizer does not know are left out."""
    ids = set()
    for word in words.split("+"):
        for text in (word, " " + word):
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            if tokens and tokens[0] != tokenizer.unk_token_id:
                ids.add(tokens[0])
    if not ids:
        raise ValueError(f"the tokenizer knows none of the affirming words {words!r}")
    return tuple(sorted(ids))


def _vlsae(mode: str | None) -> Callable[[nn.Module, dict, object], AbstractContextManager]:
    """Steering through ``attach``; ``mode`` None keeps the mode the space recommends."""
    def steer(model: nn.Module, options: dict, tokenizer=None) -> AbstractContextManager:
        from vlsae_hooks import attach

        settings = {k: v for k, v in options.items() if k not in ("space", "affirm_words")}
        if "affirm_words" in options or float(settings.get("affirm", 0)):
            settings["affirm_token_ids"] = affirming_token_ids(
                tokenizer, str(options.get("affirm_words", "yes+Yes")))
        if mode is not None:
            settings["mode"] = mode
        return attach(model, options.get("space"), **settings)
    return steer


def _cutoff(model: nn.Module, options: dict, tokenizer=None) -> AbstractContextManager:
    """Contrast with contrast_weight 0: only the plausibility cutoff acts (the control that
    says how much of a contrast method's gain under sampling is the cutoff alone)."""
    return _vlsae("contrast")(model, {**options, "contrast_weight": 0.0}, tokenizer)


def _vista(model: nn.Module, options: dict, tokenizer=None) -> AbstractContextManager:
    from eval_suites.peers.vista import VisualSteering

    return VisualSteering(model, lam=float(options.get("vista_lambda", 0.1)))


def _lexvla(model: nn.Module, options: dict, tokenizer=None) -> AbstractContextManager:
    from vlsae_hooks import attach

    if not options.get("space"):
        raise ValueError("method=lexvla needs space=<folder of a LexVLA space> in --model_args")
    return attach(model, options["space"], strength=float(options.get("strength", 4.0)))


LMMS_METHODS: dict[str, LmmsMethod] = {
    "greedy": LmmsMethod(
        _plain,
        doc="the model as it is (the task's generation arguments decide greedy or sampling)"),
    "vcd": LmmsMethod(
        _vcd, ("cd_alpha", "cd_beta", "noise_step"),
        doc="visual contrastive decoding with a diffusion-noised image"),
    "dola": LmmsMethod(
        _dola, ("dola_layers", "relative_top"), doc="DoLa-style contrast with an early-exit layer"),
    "vlsae": LmmsMethod(
        _vlsae(None), RECOMMENDED_OPTIONS,
        doc="steering as the space recommends (attach's default: the toy space's grounding "
            "mode; else contrast)"),
    "vlsae-contrast": LmmsMethod(
        _vlsae("contrast"), mode_options("contrast"),
        doc="VL-SAE concept steering, plain and steered logits contrasted"),
    "vlsae-reference": LmmsMethod(
        _vlsae("reference"), mode_options("reference"),
        doc="the reference's exact computation: contrast without a KV cache, every step "
            "recomputing the whole sequence (slow; to check the cached contrast against)"),
    "vlsae-shift": LmmsMethod(
        _vlsae("shift"), mode_options("shift"),
        doc="VL-SAE concept steering, hidden-state shift only"),
    "vlsae-evidence": LmmsMethod(
        _vlsae("evidence"), mode_options("evidence"),
        doc="VL-SAE concepts read out as words: evidence on the next-token logits (needs a space "
            "with a word readout); phrase_strength > 0 also steers the second token of each phrase "
            "of its phrase readout; affirm > 0 also moves 'yes' by the asked words' evidence"),
    "vlsae-grounding": LmmsMethod(
        _vlsae("grounding"), mode_options("grounding"),
        doc="per-patch evidence on the logits: a word no image patch shows loses, and an object "
            "after an attribute where no one patch shows both (needs a patch readout: beside the "
            "space, or readout=FOLDER; fit one with `vlsae patch-readout`)"),
    "vlsae-cutoff": LmmsMethod(
        _cutoff, mode_options("contrast", "contrast_weight"),
        doc="the cutoff-only control: contrast with contrast_weight 0, so only the plausibility "
            "cutoff acts"),
    "vista": LmmsMethod(
        _vista, ("vista_lambda",),
        doc="VISTA: the residual difference of a with-image and a without-image prefill, added to "
            "every layer's MLP output while decoding (data-free)"),
    "lexvla": LmmsMethod(
        _lexvla, ("space", "strength"),
        doc="LexVLA image words as evidence on the next-token logits"),
}
"""The plugin's methods by ``method=`` name. A table of its own rather than the registry of
``eval_suites.core.methods``: a registered method there yields its own decoder with its settings
fixed, while here lmms-eval's task decides how to generate and ``--model_args`` set the options,
so a method is only its hooks and the options they read."""
