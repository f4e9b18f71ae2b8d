"""``SpaceConfig``'s bounds as config.json gives them: which values are refused (a bool for a
count, a zero width, a float or a bool for a layer, a non-string source) and which fields an
older config may leave out."""

import pytest
from helpers.spaces import space_config

from vlsae_hooks import SpaceConfig


@pytest.mark.parametrize(("field", "value", "message"), [
    ("k", True, "SpaceConfig.k must be a positive integer, got True"),
    ("d_model", 0, "SpaceConfig.d_model must be a positive integer, got 0"),
    ("n_concepts", 0, "SpaceConfig.n_concepts must be a positive integer, got 0"),
    ("layer", True, "SpaceConfig.layer must be a decoder layer index >= 0"),
    ("layer", 2.0, "SpaceConfig.layer must be a decoder layer index >= 0"),
    ("layer", "2", "SpaceConfig.layer must be a decoder layer index >= 0"),
    ("layer", -1, "SpaceConfig.layer must be a decoder layer index >= 0"),
    ("source", None, "SpaceConfig.source must be a string, got None"),
])
def test_a_value_of_the_wrong_kind_is_refused_by_name(field, value, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        SpaceConfig.from_dict({**space_config().to_dict(), field: value})


def test_the_smallest_values_are_accepted():
    config = space_config(d_model=1, n_concepts=1, k=1, layer=0)
    assert (config.d_model, config.n_concepts, config.k, config.layer) == (1, 1, 1, 0)


@pytest.mark.parametrize("left_out", [("source",), ("extra",), ("source", "extra")])
def test_a_config_without_source_or_extra_loads_with_their_defaults(left_out):
    """Configs written before ``source`` and ``extra`` existed: a space trained here, no
    metadata."""
    data = {k: v for k, v in space_config(source="reference", extra={"a": 1}).to_dict().items()
            if k not in left_out}
    config = SpaceConfig.from_dict(data)
    assert config.source == ("vlsae" if "source" in left_out else "reference")
    assert config.extra == ({} if "extra" in left_out else {"a": 1})


def test_any_other_field_left_out_is_named():
    data = space_config().to_dict()
    del data["site"], data["has_aligner"]
    with pytest.raises(ValueError, match=r"^concept-space config lacks fields "
                                         r"\['site', 'has_aligner'\]$"):
        SpaceConfig.from_dict(data)
