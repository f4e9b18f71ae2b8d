"""What every reader shares: the skip log (counted, every skip kept, the first few of a reason
warned of), images decoded whole to RGB, and a source read part after part."""

import io
import logging

import pytest
from PIL import Image

from sae_training.samples import Part, Sample, SkipLog, Source, decode_image


def test_skips_are_counted_kept_and_the_first_few_of_each_reason_warned_of(caplog):
    skipped = SkipLog(warn_first=2)
    with caplog.at_level(logging.DEBUG, logger="sae_training.samples"):
        for n in range(3):
            skipped("bad image", f"a.tar:{n}", OSError(f"broken {n}"))
        skipped("no caption", "a.tar:9")
    assert skipped.counts == {"bad image": 3, "no caption": 1} and skipped.total == 4
    assert skipped.records[2] == {"where": "a.tar:2", "reason": "bad image", "error": "broken 2"}
    assert skipped.records[3] == {"where": "a.tar:9", "reason": "no caption", "error": ""}
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "skipped a.tar:0 (bad image) broken 0"),
        (logging.WARNING, "skipped a.tar:1 (bad image) broken 1"),
        (logging.DEBUG, "skipped a.tar:2 (bad image) broken 2"),
        (logging.WARNING, "skipped a.tar:9 (no caption) ")]
    assert SkipLog().warn_first == 5


def test_images_are_decoded_whole_and_to_rgb(tmp_path):
    buffer = io.BytesIO()
    Image.new("L", (6, 4), 200).save(buffer, "PNG")
    data = buffer.getvalue()
    (tmp_path / "grey.png").write_bytes(data)
    for given in (data, tmp_path / "grey.png", str(tmp_path / "grey.png"),
                  Image.open(io.BytesIO(data))):
        image = decode_image(given)
        assert (image.mode, image.size, image.getpixel((5, 3))) == ("RGB", (6, 4),
                                                                    (200, 200, 200))
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, "JPEG")
    with pytest.raises(OSError, match="(?i)truncated"):  # here, not when the image is used
        decode_image(buffer.getvalue()[:-200])


def test_a_source_yields_every_part_in_order():
    image = Image.new("RGB", (2, 2))

    class Two(Source):
        def parts(self):
            return [Part(name, lambda name=name: iter(
                [Sample(f"{name}{i}", image, "c") for i in range(2)])) for name in "ab"]

    assert [s.key for s in Two()] == ["a0", "a1", "b0", "b1"]
