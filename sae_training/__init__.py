"""sae_training: learn VL-SAE concept spaces for ``vlsae_hooks``.

    python -m sae_training extract --model M --data SHARDS --out ACTS   # hooks -> safetensors
    python -m sae_training train --data ACTS --out RUN                  # aligner + VL-SAE
    python -m sae_training inspect --run RUN                            # PNG sheets

Data: what readers yield (``samples``), the readers (``readers``), activation shards (``store``).
Extraction: one extractor per model kind (``extractors``), the shard loop and manifest
(``extract``). Training: the sparse kernels (``sparse``), ``losses``, the stages and their
schedule (``stages``), the held-out split and batches (``data_split``), dead concepts
(``dead_concepts``), checkpoints and resume (``checkpoint``), the trainer (``train``), what a run
leaves (``results``, ``metrics``). Beside them: word and phrase readouts (``readout``), the
per-patch readout of mode grounding (``patch_readout``; for a real LLaVA from COCO boxes:
``box_data``, ``grounding_units``, ``patch_state_cache``, ``grounding_readout``, configs in
``grounding_config``), PNG sheets (``inspection``), and LexVLA training (``lexvla``).
"""

from sae_training.config import AlignerConfig, ExtractConfig, SAEConfig, TrainConfig

__all__ = ["AlignerConfig", "ExtractConfig", "SAEConfig", "TrainConfig"]
