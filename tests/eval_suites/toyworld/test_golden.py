"""Every shipped toy-world number rests on the exact scenes, POPE questions and captions that the
seeds draw: a change to any generator, however harmless it looks, moves them all and must be
made on purpose (rerun the shipped tables, then update these fingerprints)."""

import hashlib

import numpy as np

from eval_suites.toyworld.language import caption
from eval_suites.toyworld.pope import SPLITS, pope_questions
from eval_suites.toyworld.world import STREAM_HELDOUT, sample_scene, scene_rng


def fingerprint(value) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def test_the_held_out_draws_of_a_seed_are_the_shipped_ones():
    scenes = [sample_scene(scene_rng(2, STREAM_HELDOUT, i), broken=bool(i % 2))
              for i in range(40)]  # as heldout_scenes(2, 40) draws them, before rendering
    questions = [(row["question"], row["answer"]) for split in SPLITS
                 for row in pope_questions([s.classes for s in scenes], split, 2)]
    captions = [caption(s, np.random.default_rng(0)) for s in scenes]
    assert fingerprint([s.objects for s in scenes]) == "081799ee3d94df99"
    assert fingerprint(questions) == "fc0e564df0fe0c52"
    assert fingerprint(captions) == "6ab122ec14801120"
