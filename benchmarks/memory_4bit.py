"""Memory cost of steering a bitsandbytes 4-bit LLaVA: steered peak minus plain peak, against the
concept space's own size.

    python benchmarks/memory_4bit.py --json OUT.json [--n-layers 4] [--device cpu|cuda]

The model has LLaVA-1.5-7B's width (Llama 4096 wide, 576 image tokens, random weights, saved and
reloaded in 4-bit through ``from_pretrained(quantization_config=...)``, the users' path) and the
space the reference's size (h = 32768, k = 256, with its aligner, bf16). Depth is configurable:
contrast's steered branch runs (as extra rows of the batch) only through the layers from the
steering site on, so what steering adds does not grow with depth. Plain, contrast and shift each
run in a fresh process (an allocator reusing one run's freed memory would hide the next run's
peak). Peak: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's resident set,
sampled every millisecond during ``generate``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_overhead import llava_7b_geometry, prompt_inputs  # noqa: E402

MODES = ("plain", "contrast", "shift")


class PeakRSS:
    """Highest resident set size of this process while the ``with`` block runs."""

    def __init__(self, every_s: float = 0.001) -> None:
        import psutil

        self.process, self.every_s = psutil.Process(), every_s
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakRSS:
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def child(mode: str, model_dir: str, space_dir: str, device: str, new_tokens: int) -> dict:
    """Load the 4-bit model (and for a steered mode the space), generate, report the peak."""
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    from sae_training.hub_kernels import offline_kernels
    from vlsae_hooks import attach, load_space

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, **offline_kernels(dict(
        device_map=device, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)))).eval()
    model.generation_config.pad_token_id = 0
    inputs = prompt_inputs(model)  # on the model's device
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    handle = None
    if mode != "plain":
        handle = attach(model, load_space(space_dir).to(device), mode=mode)
    gc.collect()
    run = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            model.generate(**inputs, **run)
            peak = torch.cuda.max_memory_allocated()
        else:
            with PeakRSS() as rss:
                model.generate(**inputs, **run)
            peak = rss.peak
    if handle is not None:
        handle.remove()
    return {"peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="where to write the results")
    parser.add_argument("--n-layers", type=int, default=4, help="decoder layers (width is 7B's)")
    parser.add_argument("--vision-layers", type=int, default=2,
                        help="vision-tower layers (the same in every run)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--space-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args.space_dir, args.device,
                               args.new_tokens)))
        return
    if args.json is None:
        parser.error("--json is required")

    with tempfile.TemporaryDirectory() as tmp:
        model, space = llava_7b_geometry(args.n_layers, args.vision_layers)
        model.save_pretrained(Path(tmp) / "model")
        space.save_pretrained(Path(tmp) / "space")
        space_bytes = sum(p.numel() * p.element_size() for p in space.parameters())
        steered_layers = args.n_layers - 1 - space.config.layer
        del model, space
        peaks = {}
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--model-dir", f"{tmp}/model",
                 "--space-dir", f"{tmp}/space", "--device", args.device,
                 "--new-tokens", str(args.new_tokens)],
                capture_output=True, text=True)
            if out.returncode != 0:  # its traceback, not only its exit status
                sys.exit(f"the {mode} run failed (exit {out.returncode}):\n{out.stderr}")
            peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
            print(f"{mode}: peak {peaks[mode] / 2**30:.2f} GiB", flush=True)

    gib = 2 ** 30
    result = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
              "measure": "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS",
              "n_layers": args.n_layers, "hidden": 4096, "image_tokens": 576,
              "steered_layers": steered_layers, "new_tokens": args.new_tokens,
              "space_gib": space_bytes / gib,
              "peak_gib": {mode: peaks[mode] / gib for mode in MODES}}
    for mode in ("contrast", "shift"):
        delta = (peaks[mode] - peaks["plain"]) / gib
        result[mode] = {"delta_gib": delta, "delta_over_space": delta / result["space_gib"]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
