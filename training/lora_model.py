"""Wrapping the shared base model with a trainable adapter (new, or resumed from the store): LoRA, rsLoRA,
DoRA, IA³, prompt tuning or prefix tuning."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from adapters.base_model import BaseModel
from adapters.peft_types import DORA, IA3, PREFIX_TUNING, PROMPT_TUNING, RSLORA
from training.args import LoRAArgs

logger = logging.getLogger(__name__)


def num_hidden_layers(model: torch.nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def _layers_kwargs(args: LoRAArgs, model: torch.nn.Module) -> dict:
    """PEFT's ``layers_to_transform`` for ``--layers``: only the top N decoder layers are trained."""
    if args.layers is None:
        return {}
    total = num_hidden_layers(model)
    if args.layers >= total:
        return {}
    return {"layers_to_transform": list(range(total - args.layers, total)), "layers_pattern": "layers"}


def lora_config(args: LoRAArgs, model: torch.nn.Module):
    """PEFT's ``LoraConfig`` for ``args`` (``lora``, ``rslora`` or ``dora``)."""
    from peft import LoraConfig

    return LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=args.method == RSLORA,
        use_dora=args.method == DORA,
        **_layers_kwargs(args, model),
    )


def ia3_config(args: LoRAArgs, model: torch.nn.Module):
    """PEFT's ``IA3Config``: ``all-linear`` means every linear but the head, as for LoRA; the model type's
    feedforward modules (PEFT's own table, e.g. Llama's ``down_proj``) among the targets scale inputs."""
    from peft import IA3Config
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

    targets = args.target_modules
    if targets == "all-linear":
        targets = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings()
            }
        )
    known = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model.config.model_type, [])
    return IA3Config(
        target_modules=list(targets),
        feedforward_modules=[m for m in targets if m in known],
        task_type="CAUSAL_LM",
    )  # PEFT's IA3Config has no layers_to_transform: LoRAArgs refuses --layers with ia3


def prompt_learning_config(args: LoRAArgs):
    """PEFT's ``PromptTuningConfig`` (virtual tokens started from random vocabulary embeddings, so they
    begin on the scale of real ones) or ``PrefixTuningConfig`` (the prefix itself is learned, without
    PEFT's optional reparameterising MLP, so what is saved is what is trained)."""
    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit

    if args.adapter_type == PROMPT_TUNING:
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=args.num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
        )
    return PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=args.num_virtual_tokens, prefix_projection=False
    )


def peft_config_for(args: LoRAArgs, model: torch.nn.Module):
    """The PEFT config of a new adapter of ``args.method``."""
    if args.method == IA3:
        return ia3_config(args, model)
    if args.adapter_type in (PROMPT_TUNING, PREFIX_TUNING):
        return prompt_learning_config(args)
    return lora_config(args, model)


def prepare_for_training(base: BaseModel, gradient_checkpointing: bool) -> torch.nn.Module:
    """Makes the serving-mode base (eval, frozen) trainable under a LoRA adapter.

    The base weights stay frozen; a quantized base goes through PEFT's ``prepare_model_for_kbit_training``
    (norms kept in fp32, input gradients enabled for checkpointing).
    """
    model = base.model
    if base.quantization != "none":
        from peft import prepare_model_for_kbit_training

        disable_cpu_4bit_repacking(model)

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def disable_cpu_4bit_repacking(model: torch.nn.Module) -> None:
    """Stops bitsandbytes from repacking 4-bit weights for its CPU inference kernel; restores repacked ones.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight the first time it runs
    in eval mode without gradients. Two things break on a repacked weight: gradients flowing back
    through it (input gradients collapse, so training loss rises after ``Trainer.evaluate``), and PEFT
    LoRA layers injected after the repacking (the adapter's output is garbage). Both training and
    offline evaluation therefore keep the plain layout.
    """
    for module in model.modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        module.support_avx512bf16_for_cpu = False
        if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                module.weight.data, module.weight.quant_state
            )


def attach_new_adapter(model: torch.nn.Module, args: LoRAArgs):
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config_for(args, model))
    _log_trainable(peft_model)
    return peft_model


def attach_stored_adapter(model: torch.nn.Module, folder: Path):
    """Loads an adapter from the store as trainable, to continue training it."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, folder, is_trainable=True)
    _log_trainable(peft_model)
    return peft_model


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable adapter parameters by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _log_trainable(model: torch.nn.Module) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("trainable parameters: %d of %d (%.2f%%)", trainable, total, 100 * trainable / max(total, 1))
