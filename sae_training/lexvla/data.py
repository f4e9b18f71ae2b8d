"""Image-caption batches for LexVLA from the VL-SAE readers, as a pure function of
(seed, step): epoch ``e`` reads the data parts in a seeded order through a seeded shuffle
buffer, so a resumed run sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from sae_training.readers import open_source
from sae_training.samples import DataError, Sample, Source


class PairStream:
    """Endless (images, captions) batches; ``max_samples`` holds that many pairs in memory.
    A damaged data part (a cut or unreadable tar) ends the stream once a pass has read it,
    unless ``skip_bad``, as extraction does: its unreadable pairs would go missing silently."""

    def __init__(self, spec: str, batch_size: int, seed: int, shuffle_buffer: int,
                 max_samples: int | None = None, skip_bad: bool = False) -> None:
        self.source: Source = open_source(spec)
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.skip_bad = skip_bad
        self.memory: list[Sample] | None = None
        if max_samples is not None:
            self.memory = []
            for sample in self.source:
                if len(self.memory) == max_samples:
                    break
                self.memory.append(sample)
            if not self.memory:
                raise ValueError(f"no readable pairs in {spec!r}")
            self._check_damage()

    def _check_damage(self) -> None:
        """Raise ``DataError`` for the damaged parts read so far, unless ``skip_bad``."""
        damaged = getattr(self.source, "damaged", {})
        if damaged and not self.skip_bad:
            parts = "; ".join(f"{name}: {why}" for name, why in sorted(damaged.items()))
            raise DataError(f"damaged data ({parts}); repair or remove it, or pass --skip-bad "
                            "to train on the readable pairs (a rerun goes on from the last "
                            "checkpoint, if one was written)")

    def fingerprint(self) -> dict:
        """What a checkpoint's batches came from: every part's name and size (pairs, or bytes
        of its file), and the pairs held in memory. A resumed run on other data would
        fast-forward through another stream."""
        parts = []
        for part in self.source.parts():
            local = part.file is not None and Path(part.file).is_file()
            parts.append([part.name, Path(part.file).stat().st_size if local else part.size])
        table = getattr(self.source, "path", None)  # a table source: its file too
        if table is not None and Path(table).is_file():
            parts.append([str(Path(table).name), Path(table).stat().st_size])
        return {"parts": parts, "in_memory": None if self.memory is None else len(self.memory)}

    def _epoch(self, epoch: int) -> Iterator[Sample]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        if self.memory is not None:
            yield from rng.sample(self.memory, len(self.memory))
            return
        parts = self.source.parts()
        rng.shuffle(parts)
        buffer: list[Sample] = []
        for part in parts:
            for sample in part:
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def batches(self, start_step: int = 0) -> Iterator[tuple[int, list[Image.Image], list[str]]]:
        """(step, images, captions) from ``start_step`` on; earlier batches are read and dropped
        (resume fast-forwards through the stream, it does not keep an index of it)."""
        step, epoch, batch = 0, 0, []
        while True:
            seen = 0
            for sample in self._epoch(epoch):
                seen += 1
                batch.append(sample)
                if len(batch) == self.batch_size:
                    if step >= start_step:
                        yield step, [s.image for s in batch], [s.caption for s in batch]
                    step, batch = step + 1, []
            if seen == 0:
                raise ValueError("the data source yielded no readable pairs")
            self._check_damage()
            epoch += 1
