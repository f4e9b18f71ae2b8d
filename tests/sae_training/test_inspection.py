"""Training logs a held-out loss beside the training loss, and curves.png plots every logged
metric of each stage in a panel of its own, with no empty panels."""

import json
import logging
from pathlib import Path

import matplotlib
import matplotlib.figure
import pytest
import torch
from helpers.activations import write_activations
from helpers.jsonl import read_jsonl
from helpers.training import small_config

from sae_training.inspection import CURVE_PANELS, training_curves
from sae_training.train import train

matplotlib.use("Agg")


def test_every_log_record_has_a_held_out_loss(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    write_activations(tmp_path / "acts", n=256)
    train(small_config(tmp_path / "acts", tmp_path / "run"))
    records = read_jsonl(tmp_path / "run" / "train_log.jsonl")
    assert {r["stage"] for r in records} == {"aligner", "sae"}
    assert all(r["val_loss"] > 0 and r["val_loss"] == r["val_loss"] for r in records)
    first, last = (next(r for r in records if r["stage"] == "sae"),
                   [r for r in records if r["stage"] == "sae"][-1])
    assert last["val_loss"] < first["val_loss"]  # the SAE learns what it is held out on too


def test_curves_have_one_panel_per_logged_metric(tmp_path: Path, monkeypatch) -> None:
    log = [{"stage": "aligner", "step": s, "loss": 3 - s / 10, "val_loss": 3.1 - s / 10,
            "infonce": 1.0, "mse_vision": 0.5, "mse_text": 0.4} for s in (1, 2, 3)]
    log += [{"stage": "sae", "step": s, "loss": 1 / s, "val_loss": 1.2 / s, "mse_vision": 0.2,
             "mse_text": 0.1, "dead_fraction": 0.0} for s in (1, 2)]
    (tmp_path / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: figures.append(fig))
    training_curves(tmp_path, tmp_path / "curves.png")
    visible = [ax for ax in figures[0].axes if ax.get_visible()]
    titles = sorted(ax.get_title() for ax in visible)
    assert titles == sorted(["aligner: loss", "aligner: infonce", "aligner: mse_vision",
                             "aligner: mse_text", "sae: loss", "sae: mse_vision",
                             "sae: mse_text", "sae: dead_fraction"])
    assert all(ax.lines for ax in visible)  # no empty panel
    loss = next(ax for ax in visible if ax.get_title() == "sae: loss")
    assert [line.get_label() for line in loss.lines] == ["train", "held out"]
    assert set(CURVE_PANELS) >= {"loss", "infonce", "dead_fraction"}


@pytest.mark.parametrize("torn", ["", "\n"])
def test_curves_skip_blank_lines(tmp_path: Path, torn: str, monkeypatch) -> None:
    (tmp_path / "train_log.jsonl").write_text(
        json.dumps({"stage": "sae", "step": 1, "loss": 1.0}) + "\n" + torn)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda *a, **k: None)
    training_curves(tmp_path, tmp_path / "curves.png")


def curves_of(tmp_path: Path, monkeypatch, text: str) -> matplotlib.figure.Figure:
    """The figure ``training_curves`` draws from a log of ``text``."""
    (tmp_path / "train_log.jsonl").write_text(text)
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: figures.append(fig))
    assert training_curves(tmp_path, tmp_path / "new" / "curves.png") == (
        tmp_path / "new" / "curves.png")
    assert (tmp_path / "new").is_dir()
    return figures[0]


def test_curves_columns_follow_each_stages_own_metrics_and_points(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """The aligner logs 5 panels' metrics, the SAE 3 (auxk in one record only): 5 rows, the
    SAE's last 2 hidden; each line holds its own stage's points of its own metric."""
    log = [{"stage": "aligner", "step": s, "loss": 3.0 - s, "val_loss": 4.0 - s, "infonce": s,
            "mse_vision": 0.5, "mse_text": 0.4, "mse_pair": 0.3} for s in (1, 2, 3)]
    log += [{"stage": "sae", "step": 1, "loss": 1.0, "val_loss": 1.2, "dead_fraction": 0.5},
            {"stage": "sae", "step": 2, "loss": 0.5, "val_loss": 0.6, "dead_fraction": 0.25,
             "auxk": 0.3}]
    fig = curves_of(tmp_path, monkeypatch, "".join(json.dumps(r) + "\n" for r in log))
    grid = [fig.axes[i:i + 2] for i in range(0, len(fig.axes), 2)]
    assert [[ax.get_title() if ax.get_visible() else None for ax in row] for row in grid] == [
        ["aligner: loss", "sae: loss"], ["aligner: infonce", "sae: auxk"],
        ["aligner: mse_vision", "sae: dead_fraction"], ["aligner: mse_text", None],
        ["aligner: mse_pair", None]]
    lines = {ax.get_title(): [(line.get_label(), list(line.get_xdata()),
                               list(line.get_ydata())) for line in ax.lines]
             for ax in fig.axes if ax.get_visible()}
    assert lines["sae: loss"] == [("train", [1, 2], [1.0, 0.5]),
                                  ("held out", [1, 2], [1.2, 0.6])]
    assert lines["aligner: infonce"] == [("train", [1, 2, 3], [1, 2, 3])]
    assert lines["sae: auxk"] == [("train", [2], [0.3])]
    assert lines["sae: dead_fraction"] == [("train", [1, 2], [0.5, 0.25])]


def test_curves_leave_out_a_torn_last_line_and_refuse_other_bad_logs(tmp_path: Path,
                                                                     monkeypatch,
                                                                     caplog) -> None:
    good = json.dumps({"stage": "sae", "step": 1, "loss": 1.0}) + "\n"
    torn = '{"stage": "sae", "st'
    with caplog.at_level(logging.WARNING):
        fig = curves_of(tmp_path, monkeypatch, good + torn + "\n\n")
    assert [ax.get_title() for ax in fig.axes] == ["sae: loss"]
    assert "leaving out the torn last line" in caplog.text and torn in caplog.text
    with pytest.raises(ValueError, match=r"train_log.jsonl line 3 is not JSON: fix or delete"):
        curves_of(tmp_path, monkeypatch, good + "\n" + torn + "\n" + good)
    for empty in ("", "\n", torn):
        with pytest.raises(ValueError, match="holds no log records: the run has not logged"):
            curves_of(tmp_path, monkeypatch, empty)
