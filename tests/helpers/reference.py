"""The VL-SAE authors' released file format at small dims: an SAE state dict (``encoder`` [h, d]
and two decoders) and the LLaVA auxiliary aligner's, with random values from a fixed seed."""

from __future__ import annotations

from pathlib import Path

import torch

from vlsae_hooks.convert import AUX_MODULES

D, H, K = 64, 128, 16
"""The default width, concept count and the k that ``write_reference``'s file name says."""


def reference_sae(d: int = D, h: int = H, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {"encoder": torch.randn(h, d), "vision_decoder.weight": torch.randn(d, h) / h,
            "vision_decoder.bias": torch.randn(d), "text_decoder.weight": torch.randn(d, h) / h,
            "text_decoder.bias": torch.randn(d)}


def reference_aux(d: int = D, seed: int = 1) -> dict:
    torch.manual_seed(seed)
    return {f"{m}.{p}": torch.randn(d, d) / d**0.5 if p == "weight" else torch.randn(d)
            for m in AUX_MODULES for p in ("weight", "bias")}


def write_reference(folder: Path) -> tuple[Path, Path, dict, dict]:
    """``llava_16_2_best.pth`` (k 16, h = 2 d) and ``llava_aux_best.pt`` in ``folder``: their
    paths, then the SAE and auxiliary state dicts."""
    sae, aux = reference_sae(), reference_aux()
    torch.save(sae, folder / "llava_16_2_best.pth")
    torch.save(aux, folder / "llava_aux_best.pt")
    return folder / "llava_16_2_best.pth", folder / "llava_aux_best.pt", sae, aux
