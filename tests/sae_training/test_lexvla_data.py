"""LexVLA's pair stream: how many pairs it holds, the seeded order of every epoch (parts and
pairs shuffled afresh each epoch), and the fingerprint a resumed run checks its data by."""

from __future__ import annotations

import pytest
from helpers.image_shards import write_shard, write_shards

from sae_training.lexvla.data import PairStream


def epochs(stream: PairStream, n_pairs: int, n_epochs: int) -> list[list[str]]:
    """The captions of each of the first ``n_epochs`` epochs (one batch of ``n_pairs`` each)."""
    assert stream.batch_size == n_pairs
    return [captions for (_, _, captions), _ in zip(stream.batches(), range(n_epochs))]


def test_max_samples_holds_that_many_pairs_in_a_new_order_each_epoch(tmp_path):
    write_shards(tmp_path / "data", n_shards=2, per_shard=8)
    stream = PairStream(str(tmp_path / "data"), 5, seed=0, shuffle_buffer=4, max_samples=5)
    assert len(stream.memory) == 5 and stream.fingerprint()["in_memory"] == 5
    held = [s.caption for s in stream.memory]
    orders = epochs(stream, 5, 3)
    assert all(sorted(order) == sorted(held) for order in orders)
    assert held not in orders  # shuffled, not read out as stored
    assert len({tuple(order) for order in orders}) == 3  # each epoch its own order
    assert orders == epochs(PairStream(str(tmp_path / "data"), 5, 0, 4, 5), 5, 3)  # seeded


def test_a_streamed_epoch_shuffles_its_parts_and_its_pairs(tmp_path):
    write_shards(tmp_path / "data", n_shards=4, per_shard=3)
    read = [s.caption for s in PairStream(str(tmp_path / "data"), 1, 0, 1).source]
    # a one-pair buffer passes pairs on as read: only the parts' order changes per epoch
    firsts = {order[0] for order in epochs(PairStream(str(tmp_path / "data"), 12, 0, 1), 12, 6)}
    assert firsts <= set(read[::3]) and len(firsts) > 1
    # a buffer as big as the data shuffles the pairs themselves
    whole = epochs(PairStream(str(tmp_path / "data"), 12, 0, 100), 12, 2)
    for order in whole:
        assert sorted(order) == sorted(read)
        blocks = [order[i:i + 3] for i in range(0, 12, 3)]
        assert [b for b in blocks if b in [read[i:i + 3] for i in range(0, 12, 3)]] == []
    assert whole[0] != whole[1]


def test_the_fingerprint_sees_a_rewritten_part_and_a_changed_table(tmp_path):
    write_shards(tmp_path / "data", n_shards=2, per_shard=4)
    before = PairStream(str(tmp_path / "data"), 2, 0, 4).fingerprint()
    assert [name for name, _ in before["parts"]] == ["00000", "00001"]
    assert before["in_memory"] is None
    write_shard(tmp_path / "data" / "00001.tar", 4, 5)  # same name, one pair more
    after = PairStream(str(tmp_path / "data"), 2, 0, 4).fingerprint()
    assert after["parts"][0] == before["parts"][0] and after["parts"][1] != before["parts"][1]
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    table = tmp_path / "pairs.tsv"
    table.write_text("a red star\t0.png\na blue ring\t0.png\n")
    first = PairStream(str(table), 2, 0, 4).fingerprint()
    assert first["parts"][-1] == ["pairs.tsv", table.stat().st_size]
    table.write_text("a red star and more\t0.png\na blue ring\t0.png\n")  # same rows, new text
    assert PairStream(str(table), 2, 0, 4).fingerprint() != first


def test_a_stream_without_one_readable_pair_is_refused_after_its_first_pass(tmp_path,
                                                                           monkeypatch):
    (tmp_path / "data").mkdir()
    write_shard(tmp_path / "data" / "00000.tar", 0, 3, corrupt=(0, 1, 2))
    stream = PairStream(str(tmp_path / "data"), 2, 0, 4)
    passes, real_epoch = [], PairStream._epoch

    def epoch(self, number):
        passes.append(number)
        if len(passes) > 2:
            raise RuntimeError("read the empty data again and again")
        return real_epoch(self, number)

    monkeypatch.setattr(PairStream, "_epoch", epoch)
    with pytest.raises(ValueError, match="yielded no readable pairs"):
        next(stream.batches())
    assert passes == [0]
