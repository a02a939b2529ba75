"""IA³ adapters (https://arxiv.org/abs/2205.05638): a learned vector that scales a layer's activations.

PEFT's rule (``tuners/ia3/layer.py::Linear.forward``, ``model.py::_check_target_module_feedforward``):
a target module that is one of ``feedforward_modules`` scales its *input*, ``base(x ⊙ l)`` with ``l``
saved as ``(1, in)``; any other target scales its *output*, ``base(x) ⊙ l`` with ``l`` saved as
``(out, 1)`` (the bias is scaled too). Reading validates every vector and collects every problem.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

# PEFT saves "base_model.model.<module>.ia3_l" (the adapter name stripped).
IA3_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.ia3_l(?:\.weight)?$")


@dataclass(frozen=True)
class IA3Module:
    """One IA³-scaled linear layer: ``vector`` scales its input (``feedforward``) or its output."""

    vector: torch.Tensor  # (in,) when feedforward, else (out,)
    feedforward: bool

    @property
    def rank(self) -> int:
        return 0  # no low-rank factors: the bank's LoRA path never runs for this module

    def num_bytes(self) -> int:
        return self.vector.nbytes


def _as_list(value: object) -> list[str] | str | None:
    return list(value) if isinstance(value, (list, tuple, set)) else value


def is_feedforward(config: Mapping, module: str) -> bool:
    """Whether ``module`` (its full name in the base) is one of the config's ``feedforward_modules``."""
    feedforward = _as_list(config.get("feedforward_modules"))
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, module) is not None
    return any(module.endswith(name) for name in feedforward or ())


def check_ia3_config(config: Mapping, problems: list[str]) -> None:
    """Appends every reason the IA³ config cannot be served (PEFT's own ``IA3Config`` checks included)."""
    targets = _as_list(config.get("target_modules"))
    feedforward = _as_list(config.get("feedforward_modules"))
    for key, value in (("target_modules", targets), ("feedforward_modules", feedforward)):
        if value is None:
            continue
        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as e:
                problems.append(f"{key} is not a valid regular expression ({e})")
        elif not all(isinstance(name, str) and name for name in value):
            problems.append(f"{key} must be a list of module names or a regex, got {value!r}")
            return
    if targets is None:
        problems.append("an IA3 adapter must list its target_modules")
    if isinstance(targets, list) and isinstance(feedforward, list):
        extra = sorted(set(feedforward) - set(targets))
        if extra:
            problems.append(f"feedforward_modules {extra} are not among the target_modules {sorted(targets)}")
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out adapters (Conv1D bases) are not supported")
    if config.get("modules_to_save"):
        problems.append("adapters with modules_to_save (full extra layers) are not supported")


def read_ia3_modules(
    config: Mapping,
    tensors: Mapping[str, torch.Tensor],
    linear_shapes: Mapping[str, tuple[int, int]],
    dtype: torch.dtype,
    problems: list[str],
) -> dict[str, IA3Module]:
    """The IA³ vectors of a safetensors file (``key -> tensor``), checked against the base's linears.

    Args:
        config: the adapter's (checked) config.
        tensors: every tensor of the weights file by its saved key.
        linear_shapes: base module name -> (in_features, out_features).
        dtype: dtype of the returned vectors.
        problems: every problem found is appended here.
    """
    modules: dict[str, IA3Module] = {}
    for key, tensor in sorted(tensors.items()):
        match = IA3_KEY_RE.match(key)
        if match is None:
            problems.append(f"unexpected tensor {key!r} (an IA3 adapter holds only ia3_l vectors)")
            continue
        module = match["module"]
        if module not in linear_shapes:
            problems.append(f"target module {module!r} is not a linear layer of the base model")
            continue
        feedforward = is_feedforward(config, module)
        in_features, out_features = linear_shapes[module]
        expected = (1, in_features) if feedforward else (out_features, 1)
        if tuple(tensor.shape) != expected:
            kind = "feedforward (input)" if feedforward else "output"
            problems.append(
                f"{module}: IA3 vector has shape {tuple(tensor.shape)}, the {kind} scaling needs {expected}"
            )
            continue
        if not torch.isfinite(tensor).all():
            problems.append(f"{module}: IA3 vector contains NaN or infinity")
            continue
        modules[module] = IA3Module(tensor.reshape(-1).to(dtype), feedforward)
    if not modules and not problems:
        problems.append("the adapter holds no IA3 vectors")
    return modules


def fold_ia3(
    weight: torch.Tensor, bias: torch.Tensor | None, module: IA3Module
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PEFT's ``merge``: the ``(out, in)`` weight (and bias) with the vector folded in, in float32."""
    vector = module.vector.float().to(weight.device)
    if module.feedforward:
        return weight.float() * vector.view(1, -1), bias  # scales the input: columns of W
    scaled_bias = None if bias is None else bias.float() * vector
    return weight.float() * vector.view(-1, 1), scaled_bias  # scales the output: rows of W and the bias
