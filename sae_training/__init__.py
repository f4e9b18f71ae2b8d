"""sae_training: learn VL-SAE concept spaces for ``vlsae_hooks``.

    python -m sae_training extract --model M --data SHARDS --out ACTS   # hooks -> safetensors
    python -m sae_training train --data ACTS --out RUN                  # aligner + VL-SAE
    python -m sae_training inspect --run RUN                            # PNG sheets

Data readers (``readers``), activation shards (``store``), extraction (``extract``), the sparse
training kernels (``sparse``), losses, the resumable trainer (``train``), metrics, inspection.
"""

from sae_training.config import AlignerConfig, ExtractConfig, SAEConfig, TrainConfig

__all__ = ["AlignerConfig", "ExtractConfig", "SAEConfig", "TrainConfig"]
