"""Decode-time peer baselines on stock transformers, each a context manager of hooks:

- ``vcd.VisualContrast``: VCD (Leng et al., 2024), contrast with a diffusion-noised image;
- ``dola.LayerContrast``: DoLa-style contrast of the final layer with an early exit;
- ``vti.LatentSteering``: VTI (Liu et al., ICLR 2025), fixed visual and textual directions fitted
  on a few dozen examples, steering every vision and language layer;
- ``vista.VisualSteering``: VISTA (Li et al., ICML 2025), a per-image vector (the last prompt
  token with the image minus without it) steering every language layer while decoding.

``methods`` registers the data-free ones in ``eval_suites.core.methods``; VTI needs fitting data,
so the toy world registers it (``eval_suites.toyworld.vti_method``). ``eval_suites.lmms.methods``
offers them to the lmms-eval plugin. Nothing here imports the toy world.
"""
