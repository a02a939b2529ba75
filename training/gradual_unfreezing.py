"""Gradual unfreezing of adapter layers (ULMFiT, https://arxiv.org/abs/1801.06146, section 3.3).

``--unfreeze gradual --unfreeze-stages N`` splits the run's optimizer steps into ``N`` equal stages.
In stage ``k`` (``k = 1 … N``) the adapter parameters of the top ``⌈k·L/N⌉`` of the model's ``L``
decoder layers train; those of the layers below stay as initialised. The last stage trains every
layer. Parameters that belong to no decoder layer (none for LoRA, DoRA and IA³) always train.

A frozen layer's gradients are dropped as soon as they are accumulated (``p.grad = None``), so gradient
clipping does not count them and the optimizer skips those parameters entirely: no weight decay and no
optimizer state until their stage begins. The schedule depends only on the global step, so a run
resumed from a checkpoint continues in the stage it was in.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable

import torch
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")  # PEFT names: ...model.layers.<i>.self_attn.q_proj.lora_A...


def layer_of(parameter_name: str) -> int | None:
    """The decoder layer a parameter belongs to, or None."""
    match = _LAYER_RE.search(parameter_name)
    return int(match[1]) if match else None


def stage_starts(total_steps: int, stages: int) -> list[int]:
    """The first optimizer step of each stage: ``[0, T/N, 2T/N, …]`` (rounded down)."""
    return [total_steps * k // stages for k in range(stages)]


def lowest_trainable_layer(step: int, total_steps: int, stages: int, num_layers: int) -> int:
    """The lowest decoder layer whose adapter trains at optimizer step ``step`` (0-based)."""
    stage = max(k for k, start in enumerate(stage_starts(total_steps, stages)) if start <= step)  # 0-based
    return num_layers - math.ceil((stage + 1) * num_layers / stages)


def describe_schedule(total_steps: int, stages: int, num_layers: int) -> list[dict]:
    """Each stage's first step and trained layers, for the log and the training card."""
    return [
        {
            "first_step": start,
            "layers": [lowest_trainable_layer(start, total_steps, stages, num_layers), num_layers - 1],
        }
        for start in stage_starts(total_steps, stages)
    ]


class GradualUnfreezing(TrainerCallback):
    """Keeps the adapter parameters of the layers below the current stage's lowest one from training.

    Args:
        parameters: the trainable ``(name, parameter)`` pairs of the adapter.
        num_layers: the model's decoder layers.
        stages: how many stages the run is split into.
        total_steps: the run's optimizer steps.
    """

    def __init__(
        self,
        parameters: Iterable[tuple[str, torch.nn.Parameter]],
        num_layers: int,
        stages: int,
        total_steps: int,
    ):
        self.num_layers, self.stages, self.total_steps = num_layers, stages, total_steps
        self.lowest = lowest_trainable_layer(0, total_steps, stages, num_layers)
        self._handles = []
        for name, parameter in parameters:
            layer = layer_of(name)
            if layer is not None:
                self._handles.append(parameter.register_post_accumulate_grad_hook(self._hook(layer)))
        logger.info("gradual unfreezing: %s", describe_schedule(total_steps, stages, num_layers))

    def _hook(self, layer: int):
        def drop_frozen_gradient(parameter: torch.Tensor) -> None:
            if layer < self.lowest:
                parameter.grad = None

        return drop_frozen_gradient

    def on_step_begin(self, args, state, control, **kwargs):
        lowest = lowest_trainable_layer(state.global_step, self.total_steps, self.stages, self.num_layers)
        if lowest != self.lowest:
            logger.info(
                "step %d: adapters of layers %d-%d now train", state.global_step, lowest, self.num_layers - 1
            )
        self.lowest = lowest

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
