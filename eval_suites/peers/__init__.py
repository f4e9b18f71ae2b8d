"""Decode-time peer baselines on stock transformers, each a context manager of hooks:

- ``vcd.VisualContrast``: VCD (Leng et al., 2024), contrast with a diffusion-noised image;
- ``dola.LayerContrast``: DoLa-style contrast of the final layer with an early exit.

``toyworld_methods`` registers them as toy-world methods; ``eval_suites.lmms.methods`` offers
them to the lmms-eval plugin.
"""
