"""lmms-eval tasks over an exported toy world (``python -m eval_suites.toyworld export``).

The data folder comes from the environment variable ``VLSAE_TOYWORLD_DIR``: lmms-eval resolves
``data_files`` only against the YAML's own folder, so the task classes here resolve them against
that variable instead. POPE reuses lmms-eval's stock POPE functions; CHAIR is scored with our
``eval_suites.core.chair.ChairScorer`` and the export's synonym list, so it needs no NLTK data.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path

from lmms_eval.api.task import ConfigurableTask
from lmms_eval.tasks.pope.utils import pope_process_results

from eval_suites.core.chair import ChairScorer
from eval_suites.toyworld.language import EVAL_DESCRIBE_PROMPT

ENV_VAR = "VLSAE_TOYWORLD_DIR"


def toyworld_dir() -> Path:
    """The exported toy world named by ``$VLSAE_TOYWORLD_DIR``, with a clear error if unusable."""
    value = os.environ.get(ENV_VAR)
    if not value:
        raise RuntimeError(f"set {ENV_VAR} to a folder written by "
                           "`python -m eval_suites.toyworld export --seed S --n-images N "
                           "--out DIR`")
    root = Path(value)
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"{ENV_VAR}={root} holds no toy-world export (no manifest.json); "
                                "write one with `python -m eval_suites.toyworld export --out DIR`")
    return root


class ToyworldTask(ConfigurableTask):
    """A YAML task whose ``dataset_kwargs.data_files`` are relative to ``$VLSAE_TOYWORLD_DIR``."""

    def __init__(self, config: dict) -> None:
        config = {k: v for k, v in config.items() if k != "class"}
        kwargs = dict(config.get("dataset_kwargs") or {})
        root = toyworld_dir()
        kwargs["data_files"] = {split: str(root / path)
                                for split, path in kwargs["data_files"].items()}
        super().__init__(config={**config, "dataset_kwargs": kwargs})


def toyworld_pope_process_results(doc: dict, results: list[str]) -> dict:
    """Stock POPE results plus the model's own share of "yes" answers and its distance from the
    ground truth's share (stock pope_yes_ratio is the ground truth's share, not the model's)."""
    scores = pope_process_results(doc, results)
    scores["pope_answer_yes_ratio"] = scores["pope_answer_yes_ratio_gap"] = scores["pope_accuracy"]
    return scores


def pope_aggregate_answer_yes_ratio(results: list[dict]) -> float:
    """The share of "yes" answers: neither higher nor lower is better (its task YAML says null);
    a model that says "yes" too often, or too rarely, shows in the gap below."""
    return sum(r["prediction"] == "yes" for r in results) / max(len(results), 1)


def pope_aggregate_answer_yes_ratio_gap(results: list[dict]) -> float:
    """|share of "yes" answers - share of "yes" in the ground truth|: lower is better."""
    truth = sum(r["ground_truth"] == "yes" for r in results) / max(len(results), 1)
    return abs(pope_aggregate_answer_yes_ratio(results) - truth)


def chair_doc_to_visual(doc: dict) -> list:
    return [doc["image"].convert("RGB")]


def chair_doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return EVAL_DESCRIBE_PROMPT


def chair_process_results(doc: dict, results: list[str]) -> dict:
    item = {"image_id": doc["image_id"], "caption": results[0], "objects": list(doc["objects"])}
    return {metric: item for metric in CHAIR_METRICS}


@lru_cache(maxsize=4)
def _scorer(synonyms_file: str) -> ChairScorer:
    return ChairScorer(json.loads(Path(synonyms_file).read_text()), per_mention=False)


def _chair(items: list[dict], key: str) -> float | None:
    scorer = _scorer(str(toyworld_dir() / "chair" / "synonyms.json"))
    return scorer.score([i["caption"] for i in items], [set(i["objects"]) for i in items])[key]


def chair_aggregate_s(items: list[dict]) -> float:
    return _chair(items, "chair_s")


def chair_aggregate_i(items: list[dict]) -> float:
    """CHAIR_I, nan when the captions name nothing (lmms-eval aggregates to numbers)."""
    value = _chair(items, "chair_i")
    return math.nan if value is None else value


def chair_aggregate_recall(items: list[dict]) -> float:
    return _chair(items, "recall")


def chair_aggregate_mean_len(items: list[dict]) -> float:
    return _chair(items, "mean_len")


CHAIR_METRICS = ("toyworld_chair_s", "toyworld_chair_i", "toyworld_chair_recall",
                 "toyworld_chair_mean_len")


class ToyworldChairTask(ConfigurableTask):
    """One caption request per exported image; ground truth from ``chair/ground_truth.json``."""

    def __init__(self, config: dict) -> None:
        super().__init__(config={k: v for k, v in config.items() if k != "class"})

    def download(self, dataset_kwargs: dict | None = None) -> None:
        from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

        root = toyworld_dir()
        truth = json.loads((root / "chair" / "ground_truth.json").read_text())
        features = Features({"image_id": Value("string"), "objects": Sequence(Value("string")),
                             "image": Image()})
        rows = Dataset.from_dict({"image_id": list(truth), "objects": list(truth.values()),
                                  "image": [str(root / "images" / f"{key}.png") for key in truth]},
                                 features=features)
        self.dataset = DatasetDict({"test": rows})
        self.dataset_no_image = DatasetDict({"test": rows.remove_columns("image")})
