"""The VL-SAE paper's POPE protocol on VCD-format question files.

Each question file (COCO / A-OKVQA / GQA, split random / popular / adversarial) is a jsonl of
``{"question_id", "image", "text", "label"}``; ``image`` is a file name inside the image folder.
The prompt is the question + " Please answer this question with one word.", decoded by sampling
(T = 1, top_p = 1, seed 55 reset before each file) with up to 1024 new tokens, and answers are
read as POPE's own evaluation reads them (``core.pope.parse_pope_answer``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import transformers

from ..core.pope import parse_pope_answer, pope_scores
from .journal import AnswerLog
from .runner import open_run, settings_markdown, write_report
from .settings import RunSettings

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


def run_pope(settings: RunSettings, question_files: list[Path], images: Path, out: Path,
             prompt_suffix: str = POPE_SUFFIX) -> dict:
    """Answer every question file, write ``out/pope.{json,md}`` and per-file answer jsonl.

    Answers are appended to ``out/pope_<file>.answers.jsonl`` as they come; rerun the same
    command after a kill and it answers only the questions not in there yet.
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
        if len({r["question_id"] for r in rows}) != len(rows):
            raise ValueError(f"{name} repeats question ids; answers are matched by them")
    logs = {name: AnswerLog(out / f"pope_{name}.answers.jsonl", settings.resume_key(
        protocol="pope", questions=str(file), images=str(images), prompt_suffix=prompt_suffix,
        questions_sha256=hashlib.sha256(Path(file).read_bytes()).hexdigest()),
        key="question_id") for name, file in zip(files, question_files)}
    results = {}
    with open_run(settings) as run:
        for name, rows in files.items():
            transformers.set_seed(settings.seed)

            def answer_row(i: int, text: str, n_tokens: int, rows: list[dict] = rows) -> dict:
                return {"question_id": rows[i]["question_id"], "image": rows[i]["image"],
                        "prompt": rows[i]["text"] + prompt_suffix, "text": text,
                        "answer": parse_pope_answer(text), "label": rows[i]["label"],
                        "n_tokens": n_tokens}

            items = [(images / r["image"], r["text"] + prompt_suffix) for r in rows]
            answers = run.answer(logs[name], [r["question_id"] for r in rows], items,
                                 answer_row, settings.max_new_tokens, desc=f"POPE {name}")
            results[name] = pope_scores([a["answer"] for a in answers],
                                        [r["label"] for r in rows])
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
                     f"{100 * s['precision']:.2f} | {100 * s['recall']:.2f} | "
                     f"{100 * s['f1']:.2f} | {100 * s['yes_ratio']:.2f} |")
    lines += ["", "yes-ratio is the share of the model's answers read as yes (POPE's own).", ""]
    return "\n".join(lines) + settings_markdown(report)
