"""Cost of steering per generated token, steered / plain, with the KV cache on.

Plain, contrast, shift and evidence runs are interleaved in one process (same prompt, same machine
state). Each generate is timed step by step (a stopping criterion that only reads the clock);
the per-token figure is the median decode step, prefill excluded, and each ratio is the median
over repeats of steered / plain.

    python benchmarks/decode_overhead.py --json OUT.json                  # toy + 7B geometry
    python benchmarks/decode_overhead.py --json OUT.json --skip-7b
    python benchmarks/decode_overhead.py --json OUT.json --n-layers 2 --vision-layers 1

Writes {"toy": {"contrast": r, "shift": r, "evidence": r}, "llava7b_geometry": {...},
"details": {...}}.
The 7B geometry model is LLaVA-1.5-7B's shape (Llama 32 x 4096, CLIP ViT-L/14-336, 576 image
tokens) with random bf16 weights, and a VL-SAE of h = 32768, k = 256 with an aligner, stored
bf16, trained-at-layer 30 of 32 as the reference's (steered one layer later), with a random word
readout over 4,096 tokens and a random phrase readout over 4,096 phrases for evidence mode (as
the toy space recommends, with phrases: prefill encodes all 576 image positions and takes every
concept's score at each; a step compares the last token with the phrases' first tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from vlsae_hooks import attach, find_space, load_space
from vlsae_hooks.spaces import VLSAE, AuxAligner, SpaceConfig, VLSAESpace
from vlsae_hooks.testing import random_space, tiny_llava
from vlsae_hooks.phrase_evidence import PhraseReadout
from vlsae_hooks.word_evidence import WordReadout

MODES = ("contrast", "shift", "evidence")


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


def default_toy_model() -> str | None:
    try:
        from vlsae_hooks.assets import toy_paths
    except ImportError:
        return None
    return str(toy_paths().llava)


def load_toy(path: str | None):
    """The shipped toy LLaVA and its space, or a random tiny LLaVA with a random space."""
    if path is None:
        model = tiny_llava()
        space = random_space(model, layer=2)
        space.word_readout = random_readout(space.config.n_concepts, 32, torch.float32)
        return model, space, "random tiny LLaVA (no toy assets)"
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    found = find_space(model)
    space = load_space(found) if found else random_space(model, layer=len(
        model.model.language_model.layers) // 2)
    if space.word_readout is None:
        space.word_readout = random_readout(space.config.n_concepts, 32, torch.float32)
    return model, space, f"{path} ({'its space' if found else 'random space'})"


def llava_7b_geometry(n_layers: int, vision_layers: int):
    """LLaVA-1.5-7B's shapes with random bf16 weights (plain init, no meta device)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

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
    ids = torch.cat([torch.tensor([1]), torch.full((config.image_seq_length,), config.image_token_id),
                     text])[None]
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


def per_token_seconds(model, inputs: dict, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, median decode seconds per token) of one greedy cached generate."""
    clock = StepClock()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, use_cache=True, stopping_criteria=StoppingCriteriaList([clock]))
    steps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]
    return clock.times[1] - clock.times[0], statistics.median(steps)


def measure(model, space, inputs: dict, new_tokens: int, repeats: int) -> dict:
    """Interleave plain and every steering mode; median ratios of decode seconds per token."""
    per_token_seconds(model, inputs, 3)  # warm-up (bitsandbytes repacking, allocator)
    runs = {"plain": [], **{mode: [] for mode in MODES}}
    for _ in range(repeats):
        for name in runs:
            if name == "plain":
                runs[name].append(per_token_seconds(model, inputs, new_tokens))
            else:
                with attach(model, space, mode=name):
                    runs[name].append(per_token_seconds(model, inputs, new_tokens))
    result = {}
    for name in MODES:
        ratios = [steered[1] / plain[1] for steered, plain in zip(runs[name], runs["plain"])]
        result[name] = statistics.median(ratios)
    result["seconds"] = {name: {"prefill": statistics.median(r[0] for r in values),
                                "decode_per_token": statistics.median(r[1] for r in values)}
                         for name, values in runs.items()}
    return result


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
    args = parser.parse_args()

    results: dict = {"details": {"torch_threads": torch.get_num_threads(),
                                 "torch": torch.__version__}}
    with torch.no_grad():
        model, space, description = load_toy(args.toy_model)
        toy = measure(model, space, prompt_inputs(model), args.toy_tokens, args.repeats)
        results["toy"] = {mode: toy[mode] for mode in MODES}
        results["details"]["toy"] = {"model": description, "new_tokens": args.toy_tokens,
                                     "seconds": toy["seconds"]}
        if not args.skip_7b:
            del model
            model, space = llava_7b_geometry(args.n_layers, args.vision_layers)
            big = measure(model, space, prompt_inputs(model), args.big_tokens, args.repeats)
            results["llava7b_geometry"] = {mode: big[mode] for mode in MODES}
            results["details"]["llava7b_geometry"] = {
                "n_layers": args.n_layers, "vision_layers": args.vision_layers,
                "new_tokens": args.big_tokens, "steered_layers": args.n_layers - 1 - space.config.layer,
                "seconds": big["seconds"]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "details"}, indent=2))


if __name__ == "__main__":
    main()
