"""Cost of hooked extraction against a bare forward of the same batches, side by side in one run.

Both sides process the same image-caption batches through the processor and the model. The
bare side runs the model without its head (extraction never needs the logits); the "full_depth"
ratio reads the OUTPUT of the last decoder layer, so both run every layer and the ratio is the
hooks' own overhead (goal <= 1.05x); "default_site" reads where extraction reads by default (the
reference's relative depth) and stops the forward there.

    python benchmarks/extract_overhead.py --json OUT.json [--model LLAVA_DIR] [--batches 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from eval_suites.arguments import positive_int
from eval_suites.toyworld.assets_paths import toy_paths
from eval_suites.toyworld.language import caption
from eval_suites.toyworld.world import STREAM_PAIRS, make_scene
from sae_training.extractors import VLMExtractor
from sae_training.samples import Sample


def samples(n: int) -> list[Sample]:
    rng = np.random.default_rng(0)
    scenes = [make_scene(0, STREAM_PAIRS, i) for i in range(n)]
    return [Sample(key=str(i), image=s.image, caption=caption(s.scene, rng))
            for i, s in enumerate(scenes)]


@torch.inference_mode()
def bare(model, processor, prompt: str, batch: list[Sample]) -> None:
    inputs = processor(images=[s.image for s in batch],
                       text=[prompt.replace("{caption}", s.caption) for s in batch],
                       return_tensors="pt", padding=True, padding_side="left")
    model.model(**inputs, use_cache=False)  # every layer and the final norm, not the head


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--model", default=None,
                        help="llava-hf folder (default: the shipped toy LLaVA)")
    parser.add_argument("--batches", type=positive_int, default=20)
    parser.add_argument("--batch-size", type=positive_int, default=32)
    args = parser.parse_args()

    path = args.model or str(toy_paths().llava)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    n_layers = model.config.text_config.num_hidden_layers
    extractors = {"full_depth": VLMExtractor(model, processor, site="layer_output",
                                             layer=n_layers - 1),
                  "default_site": VLMExtractor(model, processor)}
    data = samples(args.batch_size * args.batches)
    batches = [data[i : i + args.batch_size] for i in range(0, len(data), args.batch_size)]
    prompt = extractors["full_depth"].prompt
    bare(model, processor, prompt, batches[0])  # warm-up
    seconds: dict[str, list[float]] = {"bare": [], **{name: [] for name in extractors}}
    for batch in batches:  # interleaved, so drift on a shared machine hits every side alike
        seconds["bare"].append(timed(bare, model, processor, prompt, batch))
        for name, extractor in extractors.items():
            seconds[name].append(timed(extractor, batch))
    result = {name: statistics.median(e / b for e, b in zip(seconds[name], seconds["bare"]))
              for name in extractors}
    result["details"] = {"model": path, "batch_size": args.batch_size, "batches": args.batches,
                         "default_layer": extractors["default_site"].layer, "n_layers": n_layers,
                         "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
                         "torch_threads": torch.get_num_threads()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
