"""Atomic writes of results: a PNG drawn while the run is killed leaves the earlier picture."""

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from sae_training.store import atomic_write_png, write_json  # noqa: E402


class Interrupted(Exception):
    pass


def test_a_png_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    path = tmp_path / "new" / "curves.png"
    assert atomic_write_png(fig, path, dpi=40) == path
    first = path.read_bytes()
    assert first.startswith(b"\x89PNG\r\n\x1a\n") and len(first) > 500

    def torn(buffer, **kwargs):  # half a picture written, then the run is killed
        buffer.write(first[:100])
        raise Interrupted

    fig.savefig = torn
    with pytest.raises(Interrupted):
        atomic_write_png(fig, path, dpi=40)
    plt.close(fig)
    assert path.read_bytes() == first
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temporary left


def test_json_files_hold_null_where_a_number_is_not_finite(tmp_path: Path) -> None:
    """Strict JSON: a NaN explained variance (held-out rows without spread) is written null,
    never the NaN that Python writes and jq or JavaScript refuse."""
    write_json(tmp_path / "metrics.json", {
        "explained_variance": {"vision": math.nan, "text": 0.25},
        "curve": [1.0, math.inf, (-math.inf, 2)], "name": "nan", "steps": 3, "done": True})
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda name: pytest.fail(name)) == {
        "explained_variance": {"vision": None, "text": 0.25},
        "curve": [1.0, None, [None, 2]], "name": "nan", "steps": 3, "done": True}
