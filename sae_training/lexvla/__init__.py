"""LexVLA (arXiv 2407.17827): a lexical vision-language aligner whose concepts are LM words.

``config`` (dataclasses), ``vocabulary`` (pruning), ``model`` (DINOv2 + adapter, LoRA text LM),
``losses`` (InfoNCE + overuse), ``data`` + ``train`` (the loop), ``evaluate`` (retrieval,
PatchDis, heat-maps). The inference side lives in ``vlsae_hooks.spaces.lexvla``.
"""
