"""lmms-eval requests made by hand, and the toy LLaVA loaded as lmms-eval's model would be."""

from __future__ import annotations

from pathlib import Path

from lmms_eval.api.instance import Instance
from PIL import Image


def requests_for(images: list[Image.Image], prompts: list[str],
                 gen_kwargs: list[dict], visual=None) -> list[Instance]:
    """Request i asks ``prompts[i]`` of doc i of task "toy", split "test"; ``visual`` (the task's
    ``doc_to_visual``) reads a doc's images, by default ``[doc["image"]]``."""
    def image_of(doc):
        return [doc["image"]]
    visual = visual or image_of
    return [Instance(request_type="generate_until", arguments=(p, g, visual, i, "toy", "test"),
                     idx=0, metadata={"task": "toy", "doc_id": i, "repeats": 1})
            for i, (p, g) in enumerate(zip(prompts, gen_kwargs))]


def load(model_dir: Path):
    from eval_suites.toyworld.evaluate import load_model

    return load_model(str(model_dir))
