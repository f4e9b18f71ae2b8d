"""Time one full VL-SAE training step (forward + backward + Adam) of the sparse fast path
against a straightforward dense implementation of the same loss, in one run.

    python benchmarks/sae_step.py --json OUT.json [--d 1024 --expansion 8 --k 64 --batch 512]

Dense: cosine matmul with autograd, top-k, the code scattered into a dense [n, h] matrix, and
h-wide decoder matmuls. Ours: ``sae_training.losses.SAEObjective`` (CSR sparse products in the
backward). Both start from the same weights and see the same batches; ``max_loss_diff`` is the
largest difference of their losses over the timed steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

from sae_training.losses import SAEObjective
from vlsae_hooks.spaces.autoencoder import VLSAE


def dense_loss(sae: VLSAE, vision: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    x = torch.cat([vision, text])
    cos = F.normalize(x, dim=-1) @ F.normalize(sae.concepts, dim=-1).T
    top, indices = cos.topk(sae.k, dim=-1)
    values = 2 - torch.sqrt(torch.clamp(2 - 2 * top, min=1e-12))
    z = torch.zeros(len(x), sae.h, device=x.device).scatter(1, indices, values)
    n = len(vision)
    return F.mse_loss(sae.vision_decoder(z[:n]), vision) + F.mse_loss(sae.text_decoder(z[n:]),
                                                                        text)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(d: int, expansion: int, k: int, batch: int, steps: int, warmup: int,
        device: torch.device) -> dict:
    torch.manual_seed(0)
    sae = VLSAE(d, expansion * d, k).to(device)
    models = {"ours": sae, "dense": copy.deepcopy(sae)}
    objective = SAEObjective(models["ours"], auxk_coef=0.0)
    losses = {"ours": lambda v, t: objective(v, t)["loss"],
              "dense": lambda v, t: dense_loss(models["dense"], v, t)}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-4, fused=True)
                  for name, m in models.items()}
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(batch, d, generator=g).to(device) + 1,
                torch.randn(batch, d, generator=g).to(device) - 1)
               for _ in range(warmup + steps)]
    seconds = {name: 0.0 for name in models}
    recorded = {name: [] for name in models}
    for i, (vision, text) in enumerate(batches):
        for name in ("dense", "ours"):
            _sync(device)
            start = time.perf_counter()
            loss = losses[name](vision, text)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            _sync(device)
            if i >= warmup:
                seconds[name] += time.perf_counter() - start
                recorded[name].append(loss.item())
    max_diff = max(abs(a - b) for a, b in zip(recorded["ours"], recorded["dense"]))
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "d": d, "h": expansion * d, "k": k,
            "batch_pairs": batch, "steps": steps,
            "seconds_per_step_dense": seconds["dense"] / steps,
            "seconds_per_step_ours": seconds["ours"] / steps,
            "speedup": seconds["dense"] / seconds["ours"], "max_loss_diff": max_diff,
            "losses_ours": recorded["ours"], "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--batch", type=int, default=512, help="pairs per step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be at least 1 and --warmup at least 0, got {args.steps} "
                     f"and {args.warmup}")
    result = run(args.d, args.expansion, args.k, args.batch, args.steps, args.warmup,
                 torch.device(args.device))
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "losses_ours"}, indent=2))


if __name__ == "__main__":
    main()
