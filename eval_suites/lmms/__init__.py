"""lmms-eval plugin: the ``vlsae_llava`` model (``eval_suites.lmms.model``) and its decoding
methods (``eval_suites.lmms.methods``).

lmms-eval finds the model through the ``lmms_eval.models`` entry point, which loads this module:
keep it free of heavy imports (one entry point that fails to import stops the others loading).
"""


def manifest():
    """The ``lmms_eval.models`` entry point: ``--model vlsae_llava``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlsae_llava",
                         simple_class_path="eval_suites.lmms.model.VLSAELlava")
