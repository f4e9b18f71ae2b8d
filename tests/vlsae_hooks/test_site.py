"""Where a layer-site mode steers (``resolve_site``) and whether the space fits the model
(``check_space_fits``), beyond what ``test_attach`` goes through."""

import pytest
import torch

from vlsae_hooks import attach
from vlsae_hooks.testing import random_space

torch.set_num_threads(1)
MODES = ["contrast", "shift", "reference"]  # every mode that steers where resolve_site says


@pytest.mark.parametrize("mode", MODES)
def test_the_warnings_point_at_the_line_that_called_attach(model, mode, monkeypatch):
    """Each mode's steerer classes nest differently (contrast's subclasses shift's): the
    warnings name the caller's line whichever mode led to them."""
    monkeypatch.setattr(model.config, "_name_or_path", "org/my-llava")
    own, other_type, other_name = (random_space(model, layer=2) for _ in range(3))
    other_type.config.model_type = "qwen2_5_vl"
    other_name.config.model_name = "org/another-llava"
    for space, options in ((own, dict(layer=0, site="input")), (other_type, {}),
                           (other_name, {})):
        with pytest.warns(UserWarning) as record:
            attach(model, space, mode=mode, **options).remove()
        assert [w.filename for w in record] == [__file__]
