"""Merged export: one adapter folded into the base weights, saved as a standalone HF model.

For users who deploy one adapter elsewhere: the result loads with plain
``transformers.AutoModelForCausalLM.from_pretrained(out_dir)``, no PEFT and no loraplex needed.

The fold happens in float32 on the full-precision base, as PEFT's ``merge_and_unload`` does it: LoRA and
rsLoRA ``W += s·B A``; DoRA ``W ← m ⊙ (W + s·B A) / ‖W + s·B A‖``; IA³ ``W ← W ⊙ l`` (columns for a
feedforward module, rows and bias otherwise); then the model is cast to the export dtype. Prompt and
prefix tuning add virtual tokens, not weights, and are refused.

The server, though, serves the adapter *unmerged* on a quantized base (NF4 or int8), so the exported
model cannot reproduce the served outputs exactly: the export measures by how much (max |logit
difference| on a few prompts, through the server's own batched adapter layers) and says so, as PEFT
warns when it merges into a quantized layer.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from adapters.base_model import SERVING_QUANTIZATIONS, BaseModelError, load_base_model
from adapters.batched_lora import BatchedLoRAModel
from adapters.dora import fold_dora
from adapters.errors import AdapterInvalid
from adapters.ia3 import IA3Module, fold_ia3
from adapters.lora import LoRAModule, LoRAWeights, load_lora_weights
from adapters.peft_types import VIRTUAL_TOKEN_PEFT_TYPES, peft_type_of
from adapters.store import CONFIG_FILE

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Write a short poem about the sea.",
    "Question: What is 12 times 7?\nAnswer:",
)
REPORT_FILE = "loraplex_export.json"
_EXCLUDED_MODULES = ("lm_head",)


@dataclass
class ExportReport:
    """What an export wrote, and how far the exported model is from the served adapter.

    Attributes:
        out_dir: the exported model's directory.
        adapter_name: the adapter folded in.
        base_model_id: the base model's id.
        dtype: dtype of the saved weights (``bfloat16`` …).
        served_quantization: the quantization the comparison ran the served path with.
        modules_merged: number of linear layers that received a delta.
        max_abs_logit_diff: max |logit| difference between the served path (quantized base + unmerged
            adapter) and the exported model, over every position of every sample prompt.
        per_prompt_max_abs_logit_diff: the same, per prompt.
        top1_agreement: fraction of positions where both pick the same next token.
        prompts: the sample prompts.
    """

    out_dir: Path
    adapter_name: str
    base_model_id: str
    dtype: str
    served_quantization: str
    modules_merged: int
    max_abs_logit_diff: float
    per_prompt_max_abs_logit_diff: list[float] = field(default_factory=list)
    top1_agreement: float = 1.0
    prompts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        report = asdict(self)
        report["out_dir"] = str(self.out_dir)
        return report


def export_merged_model(
    base_model_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: torch.dtype = torch.bfloat16,
    quantization: str = "nf4",
    sample_prompts: Sequence[str] = DEFAULT_SAMPLE_PROMPTS,
    adapter_name: str | None = None,
    overwrite: bool = False,
) -> ExportReport:
    """Writes ``base + adapter`` (merged) as a standalone HF model and measures it against serving.

    The directory appears atomically (written to a temporary sibling, checked by reloading it with
    ``from_pretrained``, then renamed), so an interrupted export leaves no half-written model.

    Args:
        base_model_dir: the HF directory of the base model (see
            :func:`adapters.base_model.resolve_base_model`).
        adapter_dir: the adapter's folder in the store (PEFT format).
        out_dir: where the merged model goes; must not exist unless ``overwrite``.
        dtype: dtype of the saved weights.
        quantization: how the server quantizes the base (``nf4``, ``int8``, ``none``): the served path
            the exported model is compared with.
        sample_prompts: prompts on which the logits are compared.
        adapter_name: the adapter's name in messages (default: the folder's name).
        overwrite: replace an existing ``out_dir``.

    Returns:
        The report, also saved as ``loraplex_export.json`` in ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
        AdapterInvalid: the adapter does not fit the base model.
        BaseModelError: the base model cannot be loaded.
    """
    base_model_dir, adapter_dir, out_dir = Path(base_model_dir), Path(adapter_dir), Path(out_dir)
    adapter_name = adapter_name or adapter_dir.name
    if quantization not in SERVING_QUANTIZATIONS:  # before the expensive part
        raise BaseModelError(
            f"quantization must be one of {', '.join(SERVING_QUANTIZATIONS)}, not {quantization!r}"
        )
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite to replace it")
    _refuse_virtual_tokens(adapter_dir, adapter_name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        weights, base_model_id, tokenizer = _write_merged(
            base_model_dir, adapter_dir, adapter_name, tmp, dtype
        )
        report = _compare_with_served(
            tmp, base_model_dir, weights, tokenizer, quantization, list(sample_prompts)
        )
        report.out_dir, report.base_model_id = out_dir, base_model_id
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log_report(report)
    return report


def fold_lora(model: nn.Module, weights: LoRAWeights) -> int:
    """Folds the adapter into the weight (and, for IA³ on an output, the bias) of each layer it targets.

    The folded weight is computed in float32 and rounded once into the layer's dtype. Returns the
    number of layers changed.
    """
    with torch.no_grad():
        for name, module in weights.modules.items():
            linear = model.get_submodule(name)
            weight, bias = _folded(linear, module)
            linear.weight.copy_(weight.to(linear.weight.dtype))
            if bias is not None and linear.bias is not None:
                linear.bias.copy_(bias.to(linear.bias.dtype))
    return len(weights.modules)


def _folded(linear: nn.Module, module: LoRAModule | IA3Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's ``(out, in)`` float32 weight (and changed bias, or None) with ``module`` folded in."""
    if isinstance(module, IA3Module):
        return fold_ia3(linear.weight, linear.bias, module)
    if module.magnitude is not None:
        return fold_dora(linear.weight, module), None
    return linear.weight.float() + module.delta_weight().to(linear.weight.device), None  # (out, in)


def _refuse_virtual_tokens(adapter_dir: Path, adapter_name: str) -> None:
    """Prompt/prefix tuning cannot be folded into weights: say so before anything is loaded."""
    try:
        config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return  # the loader reports a missing or broken config with every other problem
    kind = peft_type_of(config) if isinstance(config, dict) else ""
    if kind in VIRTUAL_TOKEN_PEFT_TYPES:
        raise AdapterInvalid(
            adapter_name,
            [
                f"{kind} adds virtual tokens to the prompt instead of changing weights, so it cannot be "
                "merged into a standalone model; serve it instead"
            ],
        )


def _linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) of every linear an adapter may target."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] not in _EXCLUDED_MODULES
    }


def _write_merged(
    base_model_dir: Path, adapter_dir: Path, adapter_name: str, tmp: Path, dtype: torch.dtype
) -> tuple[LoRAWeights, str, object]:
    """Loads the base in float32, folds the adapter in, saves model and tokenizer into ``tmp``."""
    base = load_base_model(base_model_dir, quantization="none", device="cpu", dtype=torch.float32)
    weights = load_lora_weights(adapter_name, adapter_dir, _linear_shapes(base.model), max_rank=sys.maxsize)
    modules_merged = fold_lora(base.model, weights)
    logger.info("folded adapter %s into %d linear layers of %s", adapter_name, modules_merged, base.model_id)
    base.model.to(dtype)
    base.model.save_pretrained(tmp)
    base.tokenizer.save_pretrained(tmp)
    model_id, tokenizer = base.model_id, base.tokenizer
    del base
    gc.collect()
    return weights, model_id, tokenizer


def _compare_with_served(
    exported_dir: Path,
    base_model_dir: Path,
    weights: LoRAWeights,
    tokenizer,
    quantization: str,
    prompts: list[str],
) -> ExportReport:
    """Logits of the exported model (reloaded from disk) against the served path, prompt by prompt.

    Returns a report whose ``out_dir`` and ``base_model_id`` the caller fills in.
    """
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(exported_dir).eval()  # as a user will load it
    dtype = str(next(exported.parameters()).dtype).removeprefix("torch.")
    exported_logits = [_logits(exported, tokenizer, p) for p in prompts]
    del exported
    gc.collect()

    served = load_base_model(base_model_dir, quantization=quantization, device="cpu")
    lora = BatchedLoRAModel(served.model, next(served.model.parameters()).dtype)  # the server's own layers
    lora.reserve_slots(2)
    lora.install(1, weights)
    with lora.rows([1]):
        served_logits = [_logits(served.model, tokenizer, p) for p in prompts]
    del served, lora
    gc.collect()

    per_prompt = [(a - b).abs().max().item() for a, b in zip(served_logits, exported_logits)]
    agree = sum((a.argmax(-1) == b.argmax(-1)).sum().item() for a, b in zip(served_logits, exported_logits))
    positions = sum(a.shape[0] for a in served_logits)
    return ExportReport(
        out_dir=exported_dir,
        adapter_name=weights.name,
        base_model_id="",
        dtype=dtype,
        served_quantization=quantization,
        modules_merged=len(weights.modules),
        max_abs_logit_diff=max(per_prompt, default=0.0),
        per_prompt_max_abs_logit_diff=per_prompt,
        top1_agreement=agree / positions if positions else 1.0,
        prompts=prompts,
    )


@torch.no_grad()
def _logits(model: nn.Module, tokenizer, prompt: str) -> torch.Tensor:
    """Float32 logits at every position of ``prompt``: (T, vocab)."""
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(next(model.parameters()).device)  # (1, T)
    return model(input_ids=input_ids).logits[0].float().cpu()


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Renames ``tmp`` to ``out_dir``; an existing ``out_dir`` is moved aside first, then deleted."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _log_report(report: ExportReport) -> None:
    summary = (
        f"max |logit difference| {report.max_abs_logit_diff:.4g} over {len(report.prompts)} prompts, "
        f"top-1 agreement {report.top1_agreement:.1%}"
    )
    if report.served_quantization != "none":
        logger.warning(
            "the server serves adapter %s on a %s-quantized base, unmerged; the export folds it into the "
            "full-precision base (%s), which is lossy with respect to what was served: %s",
            report.adapter_name,
            report.served_quantization,
            report.dtype,
            summary,
        )
    else:
        logger.info("exported %s to %s (%s): %s", report.adapter_name, report.out_dir, report.dtype, summary)
