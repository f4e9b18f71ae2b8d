"""Decode-time peer baselines on stock transformers, each a context manager of hooks:

- ``vcd.VisualContrast``: VCD (Leng et al., 2024), contrast with a diffusion-noised image;
- ``dola.LayerContrast``: DoLa-style contrast of the final layer with an early exit;
- ``vti.LatentSteering``: VTI (Liu et al., ICLR 2025), fixed visual and textual directions fitted
  on a few dozen examples, steering every vision and language layer;
- ``vista.VisualSteering``: VISTA (Li et al., ICML 2025), a per-image vector (the last prompt
  token with the image minus without it) steering every language layer while decoding.

``toyworld_methods`` registers them as toy-world methods; ``eval_suites.lmms.methods`` offers
them to the lmms-eval plugin.
"""
