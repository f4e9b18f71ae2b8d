"""A protocol run's settings (``eval_suites.reproduce.settings``): what each method fills in and
takes, the ``generate`` and ``attach`` options made of them, and what a run resumes by."""

from dataclasses import asdict

import pytest
import torch

from eval_suites.reproduce import settings as settings_module
from eval_suites.reproduce.methods import METHOD_MODES
from eval_suites.reproduce.settings import RunSettings
from vlsae_hooks.modes import build_options, mode_spec

BASE = dict(model="m", max_new_tokens=4, alpha=None)


def test_generate_and_steering_options_carry_beams_and_site():
    assert RunSettings(method="greedy", num_beams=2, **BASE).generate_kwargs() == {
        "do_sample": False, "num_beams": 2}
    assert RunSettings(method="vlsae", site="output", **BASE).steering() == {"site": "output"}


@pytest.mark.parametrize("method", ["vlsae-contrast", "vlsae-reference", "vlsae-shift",
                                    "vlsae-evidence", "vlsae-grounding"])
def test_each_method_fills_and_takes_only_its_modes_options(method):
    """The reference's weights fill only the options the method's mode takes (shift: no
    contrast_weight or cutoff, which attach would refuse after the model loaded); one the mode
    lacks is refused when given."""
    spec = mode_spec(METHOD_MODES[method])
    settings = RunSettings(method=method, model="m", max_new_tokens=4,
                           alpha=0.8 if "alpha" in spec.option_names else None)
    build_options(spec, settings.steering())  # attach takes every one
    expected = {"vlsae-contrast": {"alpha", "image_weight", "contrast_weight",
                                   "plausibility_cutoff"},
                "vlsae-shift": {"alpha", "image_weight"}}
    assert set(settings.steering()) == expected.get(method.replace("reference", "contrast"),
                                                    set())
    lacking = [name for name in ("contrast_weight", "alpha") if name not in spec.option_names]
    for name in lacking:
        with pytest.raises(ValueError, match=f"takes no --{name.replace('_', '-')}; drop it"):
            RunSettings(method=method, **{**BASE, name: 0.5})


def test_resume_key_holds_the_resolved_device_and_dtype_and_the_protocol():
    """The dtype left to the default is filled in before it is compared, and ``limit`` counts
    only for batches (see ``resume_key``)."""
    settings = RunSettings(method="greedy", device="cpu", limit=2, **BASE)
    key = settings.resume_key(protocol="pope", questions_sha256="ab")
    expected = {**asdict(settings), "protocol": "pope", "questions_sha256": "ab"}
    del expected["limit"]
    assert key == expected and (key["device"], key["dtype"]) == ("cpu", "float32")
    batched = RunSettings(method="greedy", device="cpu", limit=2, batch_size=2, **BASE)
    assert batched.resume_key()["limit"] == 2


def test_a_cuda_run_defaults_to_float16(monkeypatch):
    monkeypatch.setattr(settings_module, "requested_device", lambda name: torch.device("cuda:0"))
    settings = RunSettings(method="greedy", **BASE)
    settings.resolve()
    assert (settings.device, settings.dtype) == ("cuda:0", "float16")
