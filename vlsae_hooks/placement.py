"""What ``attach`` steers and where its tensors live, wherever users run models: a bare model, a
``pipeline``, a PEFT model, or a model that accelerate split across devices or offloaded; and
the device a command runs on."""

from __future__ import annotations

import torch
from torch import nn


def steerable_model(obj: object) -> nn.Module:
    """The ``*ForConditionalGeneration`` inside ``obj``: a transformers ``Pipeline`` is unwrapped
    to its ``.model``, a ``torch.compile``d model to the model it compiles (its ``generate``
    calls that model, which a hook on the wrapper never sees), a PEFT model to its base model
    (its hooks then see the LoRA-adapted layers, which is what generates), anything else is
    returned as is."""
    from transformers import Pipeline

    if isinstance(obj, Pipeline):
        obj = obj.model
    compiled = getattr(obj, "_orig_mod", None)  # torch.compile's OptimizedModule
    if isinstance(obj, nn.Module) and isinstance(compiled, nn.Module):
        obj = compiled
    get_base_model = getattr(obj, "get_base_model", None)
    if callable(get_base_model):  # peft.PeftModel and its task subclasses
        obj = get_base_model()
    if not isinstance(obj, nn.Module):
        raise TypeError(f"attach needs a model, a transformers pipeline or a PEFT model, got "
                        f"{type(obj).__name__}")
    return obj


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on. Under accelerate's ``device_map`` an offloaded module's
    weights sit on the meta device until its forward, so its parameters would say "meta": the
    device its accelerate hook moves them to is the one that counts."""
    hook = getattr(module, "_hf_hook", None)
    for candidate in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(candidate, "execution_device", None)
        if device is not None:
            return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    raise ValueError(f"{type(module).__name__} has no weights on a real device and no accelerate "
                     "hook that says where it runs; load the model with from_pretrained(..., "
                     "device_map=...) or move it to a device first")


def requested_device(name: str | None) -> torch.device:
    """The device a user named (default: CUDA when there is one, else the CPU), checked before
    anything loads: a bad name or a GPU this machine lacks would otherwise fail only once a
    model has been read, with torch's traceback."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise ValueError(f"device {name}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name}: this machine has no CUDA device; use cpu")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ValueError(f"device {name}: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    return device
