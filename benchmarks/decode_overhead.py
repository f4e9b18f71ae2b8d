"""End-to-end cost of every decoding method, relative to plain greedy, with the KV cache on.

Plain greedy, every vlsae steering method (``vlsae``: attach with no options, the space's
recommendation; ``-contrast``, ``-shift``, ``-reference``, ``-evidence`` with word and phrase
readouts, ``-cutoff``: contrast with contrast_weight = 0) and the peers (VCD, DoLa, VTI, VISTA) run
interleaved in one process (same prompt, same machine state), each repeat in the order of
``METHODS``. One greedy generate per method and repeat, timed step by step (a stopping
criterion that only reads the clock), gives the seconds to the first token (prefill + 1 token)
and the median decode step after it. From these, per repeat, the end-to-end ratio to plain of
(a) a one-token answer and (b) a 512-token caption (first token + 511 decode steps); each
reported ratio is the median over repeats of these paired ratios. Extrapolating from a short
decode keeps the 7B run short; for ``vlsae-reference`` (uncached: a step recomputes the whole
sequence) the caption ratio is a lower bound, its steps growing with the caption.

    python benchmarks/decode_overhead.py --json OUT.json                  # toy + 7B geometry
    python benchmarks/decode_overhead.py --json OUT.json --skip-7b
    python benchmarks/decode_overhead.py --json OUT.json --n-layers 2 --vision-layers 1

Writes {"toy": {method: {"one_token": r, "caption": r}}, "llava7b_geometry": {...},
"default": {geometry: {"method": "vlsae", "steering", "one_token", "caption", "limit": 1.1,
"meets_limit"}}, "details": {...}} and prints a Markdown table.
The 7B geometry model is LLaVA-1.5-7B's shape (Llama 32 x 4096, CLIP ViT-L/14-336, 576 image
tokens) with random bf16 weights, and a VL-SAE of h = 32768, k = 256 with an aligner, stored
bf16, trained-at-layer 30 of 32 as the reference's (steered one layer later), with a random word
readout over 4,096 tokens and a random phrase readout over 4,096 phrases for evidence mode (as
the toy space recommends, with phrases: prefill encodes all 576 image positions and takes every
concept's score at each; a step compares the last token with the phrases' first tokens).
Peers run at their published defaults; what would need fitting data is random of the right
shape (VTI's directions), as only the cost is measured; VISTA computes its vectors at prefill.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from eval_suites.peers.dola import LayerContrast
from eval_suites.peers.vcd import VisualContrast
from eval_suites.peers.vista import VisualSteering
from eval_suites.peers.vti import LatentSteering, vision_layers
from vlsae_hooks import attach, find_space, load_space
from vlsae_hooks.adapters import adapter_for
from vlsae_hooks.attach import space_steering
from vlsae_hooks.phrase_evidence import PhraseReadout
from vlsae_hooks.spaces import VLSAE, AuxAligner, ConceptSpace, SpaceConfig, VLSAESpace
from vlsae_hooks.testing import random_space, tiny_llava
from vlsae_hooks.word_evidence import WordReadout

CAPTION_TOKENS = 512
"""Length of the caption of ratio (b)."""
DEFAULT_LIMIT = 1.10
"""The default method (``vlsae``) should cost at most this much of plain, on (a) and (b)."""

Setup = Callable[[nn.Module, ConceptSpace], contextlib.AbstractContextManager]
"""A method: (model, space) -> a context manager under which ``generate`` decodes with it."""


def steering(**options) -> Setup:
    """``attach(model, space, **options)``; with no options the space's recommendation."""
    return lambda model, space: attach(model, space, **options)


def random_vti(model: nn.Module, space: ConceptSpace) -> LatentSteering:
    """VTI at its default strengths with random directions of the fitted ones' shapes: one per
    language layer [D], one per vision layer and vision token [tokens, D]."""
    g = torch.Generator().manual_seed(2)
    dtype = next(model.parameters()).dtype
    vision = model.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1  # patches + class token
    text_shape = (len(adapter_for(model).layers(model)), adapter_for(model).hidden_size(model))
    vision_shape = (len(vision_layers(model)), tokens, vision.hidden_size)
    return LatentSteering(model, torch.randn(text_shape, generator=g).to(dtype),
                          torch.randn(vision_shape, generator=g).to(dtype), 0.4, 0.4)


METHODS: dict[str, Setup] = {
    "plain": lambda model, space: contextlib.nullcontext(),
    "vlsae": steering(),
    "vlsae-contrast": steering(mode="contrast"),
    "vlsae-shift": steering(mode="shift"),
    "vlsae-reference": steering(mode="reference"),
    # strengths given so both readouts run (at strength 0, as the toy recommends, they are skipped)
    "vlsae-evidence": steering(mode="evidence", strength=5.0, phrase_strength=1.0),
    "vlsae-cutoff": steering(mode="contrast", contrast_weight=0.0, plausibility_cutoff=0.8),
    "vcd": lambda model, space: VisualContrast(model, alpha=1.0, beta=0.1, noise_step=500),
    "dola": lambda model, space: LayerContrast(model, layers="high", relative_top=0.1),
    "vti": random_vti,
    "vista": lambda model, space: VisualSteering(model, lam=0.1),
}
"""Every method timed, by name, as it is set up for timing (the peers at their defaults)."""


def random_readout(n_concepts: int, n_tokens: int, dtype: torch.dtype) -> WordReadout:
    """A word readout of the right shape (its values do not change the cost), max-pooled like
    the shipped toy readout: every image position is encoded at prefill."""
    g = torch.Generator().manual_seed(0)
    return WordReadout(torch.randn(n_concepts, n_tokens, generator=g).to(dtype),
                       torch.zeros(n_tokens, dtype=dtype), torch.arange(5, 5 + n_tokens),
                       torch.full((n_tokens,), -3.0), pool="max")


def random_phrases(n_concepts: int, n_phrases: int, dtype: torch.dtype) -> PhraseReadout:
    """A phrase readout of the right shape, over the max-pooled dense concept scores."""
    g = torch.Generator().manual_seed(1)
    return PhraseReadout(torch.randn(n_concepts, n_phrases, generator=g).to(dtype),
                         torch.zeros(n_phrases, dtype=dtype), 5 + torch.arange(n_phrases),
                         torch.full((n_phrases,), -3.0), torch.full((n_phrases,), 5))


def default_toy_model() -> str:
    """The shipped toy LLaVA (the benchmark lives beside eval_suites, which ships it)."""
    from eval_suites.toyworld.assets_paths import toy_paths

    return str(toy_paths().llava)


def with_readouts(space: ConceptSpace) -> ConceptSpace:
    """``space`` with random word and phrase readouts (32 each) where it has none."""
    if space.word_readout is None:
        space.word_readout = random_readout(space.config.n_concepts, 32, torch.float32)
    if space.phrase_readout is None:
        space.phrase_readout = random_phrases(space.config.n_concepts, 32, torch.float32)
    return space


def load_toy(path: str | None):
    """The shipped toy LLaVA and its space, or a random tiny LLaVA with a random space."""
    if path is None:
        model = tiny_llava()
        space = with_readouts(random_space(model, layer=2))
        return model, space, "random tiny LLaVA (no toy assets)"
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    found = find_space(model)
    space = load_space(found) if found else random_space(model, layer=len(
        model.model.language_model.layers) // 2)
    return model, with_readouts(space), f"{path} ({'its space' if found else 'random space'})"


def llava_7b_geometry(n_layers: int, vision_layers: int):
    """LLaVA-1.5-7B's shapes with random bf16 weights (plain init, no meta device)."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                       num_hidden_layers=vision_layers, num_attention_heads=16,
                                       image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=n_layers, num_attention_heads=32,
                                num_key_value_heads=32, vocab_size=32064,
                                max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                                pad_token_id=0),
        image_token_index=32000, image_seq_length=576, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id = 0
    train_layer = max(0, min(n_layers - 2, round(30 * n_layers / 32)))
    space_config = SpaceConfig(kind="vlsae", d_model=4096, n_concepts=32768, k=256,
                               model_name="llava-hf/llava-1.5-7b-hf", model_type="llava",
                               site="layer_input", layer=train_layer, has_aligner=True,
                               source="reference")
    space = VLSAESpace(VLSAE(4096, 32768, 256), AuxAligner(4096), space_config)
    space.word_readout = random_readout(32768, 4096, torch.bfloat16)
    space.phrase_readout = random_phrases(32768, 4096, torch.bfloat16)
    space.recommended_steering = {"mode": "evidence", "phrase_strength": 1.0}
    return model, space.to(torch.bfloat16).eval()


def prompt_inputs(model, n_text: int = 24) -> dict:
    """One image prompt, LLaVA style: ``<s> <image>*n text``, with a random image."""
    config = model.config
    vision = config.vision_config
    torch.manual_seed(0)
    vocab = config.text_config.vocab_size
    text = torch.randint(5, vocab, (n_text,))  # ids 0-4: pad / bos / eos / unk-like specials
    text[text == config.image_token_id] = 5
    image = torch.full((config.image_seq_length,), config.image_token_id)
    ids = torch.cat([torch.tensor([1]), image, text])[None]
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, dtype=dtype)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)


class StepClock(StoppingCriteria):
    """Never stops generation; notes the time at the end of every step."""

    def __init__(self) -> None:
        self.times = [time.perf_counter()]

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def generate_seconds(model, inputs: dict, new_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, i.e. prefill + 1 token, median seconds of a decode step
    after it) of one greedy generate; ``new_tokens`` >= 2. The KV cache is generate's default
    (on), so ``vlsae-reference`` can turn it off."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time a decode step, got {new_tokens}")
    clock = StepClock()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, stopping_criteria=StoppingCriteriaList([clock]))
    steps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
    return clock.times[1] - clock.times[0], statistics.median(steps)


def end_to_end(first_token: float, per_token: float, tokens: int) -> float:
    """Seconds to generate ``tokens`` tokens: the first (prefill) then ``tokens - 1`` steps."""
    return first_token + (tokens - 1) * per_token


def paired_ratios(runs: list[tuple[float, float]], plain: list[tuple[float, float]],
                  caption_tokens: int = CAPTION_TOKENS) -> dict[str, float]:
    """Medians over repeats of method / plain (same repeat) for (a) a one-token answer and
    (b) a ``caption_tokens``-token caption; runs are (first-token, per-token) seconds."""
    one = [m[0] / p[0] for m, p in zip(runs, plain)]
    caption = [end_to_end(*m, caption_tokens) / end_to_end(*p, caption_tokens)
               for m, p in zip(runs, plain)]
    return {"one_token": statistics.median(one), "caption": statistics.median(caption)}


def measure(model, space: ConceptSpace, inputs: dict, new_tokens: int, repeats: int,
            methods: tuple[str, ...] = tuple(METHODS)) -> dict:
    """Interleave plain and ``methods``: {"ratios": per method the paired end-to-end ratios to
    plain, "seconds": per method the median first-token and per-token seconds}."""
    names = ["plain", *(name for name in methods if name != "plain")]
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for name in names:  # warm-up: lazy set-up, allocator growth, first-call paths
        with METHODS[name](model, space):
            generate_seconds(model, inputs, 2)
    for _ in range(repeats):
        for name in names:
            with METHODS[name](model, space):
                runs[name].append(generate_seconds(model, inputs, new_tokens))
    ratios = {name: paired_ratios(runs[name], runs["plain"]) for name in names if name != "plain"}
    seconds = {name: {"first_token": statistics.median(r[0] for r in values),
                      "decode_per_token": statistics.median(r[1] for r in values)}
               for name, values in runs.items()}
    return {"ratios": ratios, "seconds": seconds}


def default_verdict(ratios: dict, space: ConceptSpace) -> dict:
    """The default method's ratios, what it resolved to, and whether both are within the limit."""
    one, caption = ratios["vlsae"]["one_token"], ratios["vlsae"]["caption"]
    return {"method": "vlsae", "steering": space_steering(space) or {"mode": "contrast"},
            "one_token": one, "caption": caption, "limit": DEFAULT_LIMIT,
            "meets_limit": one <= DEFAULT_LIMIT and caption <= DEFAULT_LIMIT}


def markdown_table(results: dict) -> str:
    """One row per method, (a) and (b) for each geometry measured."""
    geometries = [g for g in ("toy", "llava7b_geometry") if g in results]
    header = " | ".join(f"{g} (a) one token | {g} (b) {CAPTION_TOKENS}-token caption"
                        for g in geometries)
    lines = [f"| method | {header} |", "|---" * (1 + 2 * len(geometries)) + "|"]
    for name in results[geometries[0]]:
        cells = " | ".join(f"{results[g][name]['one_token']:.2f}x | "
                           f"{results[g][name]['caption']:.2f}x" for g in geometries)
        lines.append(f"| {name} | {cells} |")
    for g in geometries:
        if g in results.get("default", {}):
            verdict = results["default"][g]
            lines.append(f"\n{g}: default `vlsae` ({verdict['steering']}) "
                         f"{'meets' if verdict['meets_limit'] else 'does NOT meet'} "
                         f"<= {DEFAULT_LIMIT:.2f}x on both (a) and (b)")
    return "\n".join(lines)


def run_geometry(results: dict, key: str, model, space: ConceptSpace, new_tokens: int,
                 repeats: int, methods: tuple[str, ...], details: dict) -> None:
    """Measure one model into ``results[key]`` (and its default verdict and details)."""
    measured = measure(model, space, prompt_inputs(model), new_tokens, repeats, methods)
    results[key] = measured["ratios"]
    if "vlsae" in measured["ratios"]:
        results.setdefault("default", {})[key] = default_verdict(measured["ratios"], space)
    results["details"][key] = {**details, "new_tokens": new_tokens, "repeats": repeats,
                               "seconds": measured["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--toy-model", default=default_toy_model(),
                        help="toy LLaVA folder (default: the shipped toy, else a random tiny one)")
    parser.add_argument("--skip-7b", action="store_true", help="only the toy model")
    parser.add_argument("--n-layers", type=int, default=32, help="decoder layers of the 7B shape")
    parser.add_argument("--vision-layers", type=int, default=24,
                        help="vision-tower layers of the 7B shape (prefill cost only)")
    parser.add_argument("--toy-tokens", type=int, default=32)
    parser.add_argument("--big-tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="a subset to time (plain always runs; default: all)")
    args = parser.parse_args()

    methods = tuple(args.methods)
    results: dict = {"details": {"torch_threads": torch.get_num_threads(),
                                 "torch": torch.__version__, "caption_tokens": CAPTION_TOKENS}}
    with torch.no_grad():
        model, space, description = load_toy(args.toy_model)
        run_geometry(results, "toy", model, space, args.toy_tokens, args.repeats, methods,
                     {"model": description})
        if not args.skip_7b:
            del model, space
            model, space = llava_7b_geometry(args.n_layers, args.vision_layers)
            run_geometry(results, "llava7b_geometry", model, space, args.big_tokens,
                         args.repeats, methods,
                         {"n_layers": args.n_layers, "vision_layers": args.vision_layers,
                          "steered_layers": args.n_layers - 1 - space.config.layer})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown_table(results))


if __name__ == "__main__":
    main()
