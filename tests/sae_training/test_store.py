"""Atomic writes of results: a PNG drawn while the run is killed leaves the earlier picture."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from sae_training.store import atomic_write_png  # noqa: E402


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
