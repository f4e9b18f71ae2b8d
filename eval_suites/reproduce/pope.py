"""The VL-SAE paper's POPE protocol on VCD-format question files.

Each question file (COCO / A-OKVQA / GQA, split random / popular / adversarial) is a jsonl of
``{"question_id", "image", "text", "label"}``; ``image`` is a file name inside the image folder.
The prompt is the question + " Please answer this question with one word.", decoded by sampling
(T = 1, top_p = 1, seed 55 reset before each file) with up to 1024 new tokens, and answers are
read as POPE's own evaluation reads them (``parse_pope_answer``).
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers

from ..toyworld.pope import pope_scores
from .runner import RunSettings, open_run, settings_markdown, write_report

POPE_SUFFIX = " Please answer this question with one word."
POPE_MAX_NEW_TOKENS = 1024
POPE_ALPHA = 0.8
QUESTION_FIELDS = ("question_id", "image", "text", "label")


def read_questions(path: str | Path) -> list[dict]:
    """The rows of a VCD-format POPE file, checked for the fields and labels the protocol needs."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not JSON: {err}") from None
        missing = [name for name in QUESTION_FIELDS if name not in row]
        if missing:
            raise ValueError(f"{path}:{number} lacks {missing}; VCD-format POPE lines hold "
                             f"{list(QUESTION_FIELDS)}")
        if row["label"] not in ("yes", "no"):
            raise ValueError(f"{path}:{number} has label {row['label']!r}, expected 'yes' or 'no'")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no questions")
    return rows


def parse_pope_answer(text: str) -> str:
    """POPE's reading of a free answer: first sentence only, commas dropped; "no" if the words
    "No", "no" or "not" occur in it, otherwise "yes" (so an empty answer counts as yes)."""
    first = text.split(".")[0]
    words = first.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def run_pope(settings: RunSettings, question_files: list[Path], images: Path, out: Path,
             prompt_suffix: str = POPE_SUFFIX) -> dict:
    """Answer every question file, write ``out/pope.{json,md}`` and per-file answer jsonl.

    ``prompt_suffix`` is the reference's; change it only for a model trained on other prompts.
    """
    files = {Path(f).stem: read_questions(f)[:settings.limit] for f in question_files}
    if len(files) != len(question_files):
        raise ValueError("question files need distinct names: results are keyed by file stem")
    for name, rows in files.items():
        absent = sorted({r["image"] for r in rows if not (images / r["image"]).is_file()})
        if absent:
            raise FileNotFoundError(f"{len(absent)} images of {name} are not in {images}, "
                                    f"e.g. {absent[:3]}")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with open_run(settings) as run:
        for name, rows in files.items():
            transformers.set_seed(settings.seed)
            items = [(images / r["image"], r["text"] + prompt_suffix) for r in rows]
            answers = run.answer(items, settings.max_new_tokens, desc=f"POPE {name}")
            parsed = [parse_pope_answer(text) for text, _ in answers]
            results[name] = pope_scores(parsed, [r["label"] for r in rows])
            with open(out / f"pope_{name}.answers.jsonl", "w") as f:
                for row, (text, n_tokens), answer in zip(rows, answers, parsed):
                    f.write(json.dumps({"question_id": row["question_id"], "image": row["image"],
                                        "prompt": row["text"] + prompt_suffix, "text": text,
                                        "answer": answer, "label": row["label"],
                                        "n_tokens": n_tokens}) + "\n")
        report = {"protocol": "pope", "question_files": {name: str(f) for name, f in
                                                         zip(files, question_files)},
                  "images": str(images), "prompt_suffix": prompt_suffix, "results": results,
                  **run.record(settings)}
    write_report(out, "pope", report, pope_markdown(report))
    return report


def pope_markdown(report: dict) -> str:
    lines = [f"# POPE: {report['settings']['method']} on {report['settings']['model']}", "",
             "| file | n | accuracy | precision | recall | F1 | yes-ratio |",
             "|---|---|---|---|---|---|---|"]
    for name, s in report["results"].items():
        lines.append(f"| {name} | {s['n']} | {100 * s['accuracy']:.2f} | "
                     f"{100 * s['precision']:.2f} | {100 * s['recall']:.2f} | {100 * s['f1']:.2f} | "
                     f"{100 * s['yes_ratio']:.2f} |")
    lines += ["", "yes-ratio is the share of the model's answers read as yes (POPE's own).", ""]
    return "\n".join(lines) + settings_markdown(report)
