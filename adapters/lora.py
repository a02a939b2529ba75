"""LoRA weights in memory, and reading them from a PEFT adapter folder with full validation.

Validation happens before anything touches the model: safetensors only (a pickle ``.bin`` is never
opened), LoRA type, target modules present in the base, tensor shapes matching, rank within the
configured maximum. Every problem found is collected into one :class:`AdapterInvalid`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.dora import MAGNITUDE_KEY_RE, check_magnitude
from adapters.errors import AdapterInvalid
from adapters.ia3 import IA3Module, check_ia3_config, read_ia3_modules
from adapters.peft_types import adapter_type, peft_type_of
from adapters.prefix_tuning import AttentionShape, PrefixKV, read_prefix
from adapters.prompt_tuning import read_virtual_tokens
from adapters.safe_files import UnsafeFile, check_regular_file, read_json_object
from adapters.store import CONFIG_FILE, WEIGHTS_FILE

# PEFT saves keys as "base_model.model.<module>.lora_A.weight" (the adapter name stripped).
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")
_UNSUPPORTED_CONFIG = {
    "modules_to_save": "adapters with modules_to_save (full extra layers) are not supported",
    "layers_to_transform": None,  # handled through the weights actually present
}
# Value bounds (README "Adapters"): an adapter inside them cannot overflow the serving dtypes by itself.
MAX_LORA_SCALING = 256.0  # |lora_alpha / r| (or / sqrt(r) with rsLoRA) of any module
MAX_DELTA_NORM = 1e4  # |scaling| · ‖B‖_F · ‖A‖_F, an upper bound of ‖ΔW‖_F, of any module
MAX_PATTERN_KEYS = 1024  # entries of rank_pattern / alpha_pattern
MAX_PATTERN_KEY_CHARS = 256  # one pattern (a regular expression over module names)


@dataclass(frozen=True)
class LoRAModule:
    """One adapted linear layer: ``ΔW = scaling · B @ A``; with ``magnitude``, a DoRA layer
    (``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖``, see :mod:`adapters.dora`)."""

    lora_A: torch.Tensor  # (r, in_features)
    lora_B: torch.Tensor  # (out_features, r)
    scaling: float
    magnitude: torch.Tensor | None = None  # DoRA: (out_features,)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())  # (out, in)

    def num_bytes(self) -> int:
        extra = self.magnitude.nbytes if self.magnitude is not None else 0
        return self.lora_A.nbytes + self.lora_B.nbytes + extra


@dataclass
class LoRAWeights:
    """A whole adapter: its name, the config it came with and its per-module weights."""

    name: str
    modules: dict[str, LoRAModule | IA3Module]  # module name in the base model -> weights
    config: dict
    virtual_tokens: torch.Tensor | None = None  # prompt tuning: (num_virtual_tokens, hidden)
    prefix: PrefixKV | None = None  # prefix tuning: per-layer keys and values

    @property
    def peft_type(self) -> str:
        """``lora``, ``rslora``, ``dora``, ``ia3``, ``prompt_tuning`` or ``prefix_tuning``
        (:mod:`adapters.peft_types`)."""
        return adapter_type(self.config)

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def target_modules(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    @property
    def num_virtual_tokens(self) -> int:
        """Positions the adapter adds before every prompt (prompt or prefix tuning; else 0)."""
        if self.virtual_tokens is not None:
            return self.virtual_tokens.shape[0]
        return 0 if self.prefix is None else self.prefix.num_virtual_tokens

    def num_bytes(self) -> int:
        extra = self.virtual_tokens.nbytes if self.virtual_tokens is not None else 0
        extra += self.prefix.num_bytes() if self.prefix is not None else 0
        return extra + sum(m.num_bytes() for m in self.modules.values())


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module name.

    The keys were compiled once by :func:`_check_pattern`, so a bad expression never gets here.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_pattern(config: dict, key: str, is_valid, expected: str, problems: list[str]) -> None:
    """``rank_pattern``/``alpha_pattern``: a mapping of module-name expressions to valid values."""
    patterns = config.get(key)
    if patterns is None:
        return
    if not isinstance(patterns, dict):
        problems.append(
            f"{key} must be an object mapping module patterns to values, got {type(patterns).__name__}"
        )
        return
    if len(patterns) > MAX_PATTERN_KEYS:
        problems.append(f"{key} has {len(patterns)} entries; the limit is {MAX_PATTERN_KEYS}")
        return
    for pattern, value in patterns.items():
        if len(pattern) > MAX_PATTERN_KEY_CHARS:
            problems.append(f"{key}: a pattern is longer than {MAX_PATTERN_KEY_CHARS} characters")
            continue
        try:
            re.compile(pattern)
        except re.error as e:
            problems.append(f"{key}: {pattern[:64]!r} is not a valid regular expression ({e})")
            continue
        if not is_valid(value):
            problems.append(f"{key}[{pattern[:64]!r}] must be {expected}, got {value!r}"[:300])


def _check_config(config: dict, max_rank: int, problems: list[str]) -> None:
    if str(config.get("peft_type", "")).upper() != "LORA":
        problems.append(f"peft_type must be LORA, got {str(config.get('peft_type'))[:64]!r}")
    for key, reason in _UNSUPPORTED_CONFIG.items():
        if reason and config.get(key):
            problems.append(reason)
    rank = config.get("r")
    if not _is_int(rank) or rank < 1:
        problems.append(f"r must be a positive integer, got {str(rank)[:64]!r}")
    elif rank > max_rank:
        problems.append(f"rank {rank} exceeds the server's maximum rank {max_rank}")
    alpha = config.get("lora_alpha")
    if not _is_number(alpha):
        problems.append(f"lora_alpha must be a finite number, got {str(alpha)[:64]!r}")
    for key in ("use_rslora", "fan_in_fan_out"):
        if config.get(key) is not None and not isinstance(config.get(key), bool):
            problems.append(f"{key} must be true or false, got {str(config.get(key))[:64]!r}")
    dropout = config.get("lora_dropout")
    if dropout is not None and not (_is_number(dropout) and 0 <= dropout <= 1):
        problems.append(f"lora_dropout must be a number in [0, 1], got {str(dropout)[:64]!r}")
    _check_pattern(
        config,
        "rank_pattern",
        lambda v: _is_int(v) and 1 <= v <= max_rank,
        f"an integer in [1, {max_rank}]",
        problems,
    )
    _check_pattern(config, "alpha_pattern", _is_number, "a finite number", problems)
    if config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out adapters (Conv1D bases) are not supported")
    if config.get("bias", "none") not in ("none", None):
        problems.append("adapters that train biases (bias != 'none') are not supported")


def module_problem(module: str, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> str | None:
    """Why one module's weights cannot be served (non-finite, or a delta beyond the bounds), or None.

    Shared by loading and merging, so a merge can never install what loading would refuse.
    """
    if not math.isfinite(scaling) or abs(scaling) > MAX_LORA_SCALING:
        return f"{module}: scaling {scaling:.4g} is outside [-{MAX_LORA_SCALING:g}, {MAX_LORA_SCALING:g}]"
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        return f"{module}: weights contain NaN or infinity"
    bound = abs(scaling) * float(lora_B.float().norm()) * float(lora_A.float().norm())
    if not math.isfinite(bound) or bound > MAX_DELTA_NORM:
        return (
            f"{module}: the update is too large (|scaling|·‖B‖·‖A‖ = {bound:.4g}, "
            f"the limit is {MAX_DELTA_NORM:g})"
        )
    return None


def load_lora_weights(
    name: str,
    folder: Path,
    linear_shapes: Mapping[str, tuple[int, int]],
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    attention: AttentionShape | None = None,
) -> LoRAWeights:
    """Reads and validates a PEFT adapter folder against the base model's linear layers.

    Args:
        name: the adapter's name (for messages).
        folder: the adapter folder.
        linear_shapes: base module name -> (in_features, out_features) for every adaptable linear.
        max_rank: the largest rank the server accepts.
        dtype: dtype of the returned tensors.
        attention: the base's attention sizes, which a prefix-tuning adapter must match (when given).

    Raises:
        AdapterInvalid: listing every problem found.
    """
    problems: list[str] = []
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.exists() and not weights_path.is_symlink():
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise AdapterInvalid(name, ["pickle weight files (.bin/.pt) are refused; save with safetensors"])
        raise AdapterInvalid(name, [f"{WEIGHTS_FILE} is missing"])
    try:
        check_regular_file(weights_path)
        config = read_json_object(folder / CONFIG_FILE)
    except UnsafeFile as e:
        raise AdapterInvalid(name, [str(e)]) from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AdapterInvalid(name, [f"{CONFIG_FILE} is not a valid JSON object ({e})"]) from e
    if peft_type_of(config) == "IA3":
        return _load_ia3(name, weights_path, config, linear_shapes, dtype)
    if peft_type_of(config) == "PROMPT_TUNING":
        return _load_prompt_tuning(name, weights_path, config, dtype)
    if peft_type_of(config) == "PREFIX_TUNING":
        return _load_prefix_tuning(name, weights_path, config, dtype, attention)
    _check_config(config, max_rank, problems)
    if problems:
        raise AdapterInvalid(name, problems)

    tensors: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"A", "B", and "m" for DoRA}
    for key, tensor in _read_tensors(name, weights_path).items():
        match = _KEY_RE.match(key)
        magnitude = MAGNITUDE_KEY_RE.match(key)
        if match is not None:
            tensors.setdefault(match["module"], {})[match["which"]] = tensor
        elif magnitude is not None:
            tensors.setdefault(magnitude["module"], {})["m"] = tensor
        else:
            problems.append(
                f"unexpected tensor {key!r} (only lora_A/lora_B weights and DoRA magnitudes are supported)"
            )

    if not tensors and not problems:
        problems.append("the adapter holds no LoRA weights")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules: dict[str, LoRAModule] = {}
    for module, pair in sorted(tensors.items()):
        if module not in linear_shapes:
            problems.append(f"target module {module!r} is not a linear layer of the base model")
            continue
        if set(pair) - {"m"} != {"A", "B"}:
            problems.append(f"{module}: needs both lora_A and lora_B")
            continue
        in_features, out_features = linear_shapes[module]
        lora_A, lora_B = pair["A"], pair["B"]
        rank = int(_pattern_value(rank_pattern, module, config["r"]))
        if lora_A.ndim != 2 or lora_B.ndim != 2:
            problems.append(f"{module}: LoRA weights must be 2-D")
            continue
        if tuple(lora_A.shape) != (rank, in_features) or tuple(lora_B.shape) != (out_features, rank):
            problems.append(
                f"{module}: shapes A{tuple(lora_A.shape)} B{tuple(lora_B.shape)} do not match "
                f"A({rank}, {in_features}) B({out_features}, {rank})"
            )
            continue
        if rank > max_rank:
            problems.append(f"{module}: rank {rank} exceeds the server's maximum rank {max_rank}")
            continue
        magnitude = pair.get("m")
        dora_problem = _dora_problem(config, module, magnitude, out_features)
        if dora_problem:
            problems.append(dora_problem)
            continue
        alpha = float(_pattern_value(alpha_pattern, module, config["lora_alpha"]))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        problem = module_problem(module, lora_A, lora_B, scaling)
        if problem is not None:
            problems.append(problem)
            continue
        magnitude = magnitude.float() if magnitude is not None else None  # DoRA's ratio is taken in fp32
        modules[module] = LoRAModule(lora_A.to(dtype), lora_B.to(dtype), scaling, magnitude)
    if problems:
        raise AdapterInvalid(name, problems)
    return LoRAWeights(name=name, modules=modules, config=config)


def _dora_problem(config: dict, module: str, magnitude: torch.Tensor | None, out_features: int) -> str | None:
    """Whether a module's DoRA magnitude agrees with the config's ``use_dora`` and the layer's shape."""
    if config.get("use_dora"):
        if magnitude is None:
            return f"{module}: use_dora is set but the module has no lora_magnitude_vector"
        return check_magnitude(module, magnitude, out_features)
    if magnitude is not None:
        return f"{module}: holds a DoRA lora_magnitude_vector but use_dora is not set"
    return None


def _read_tensors(name: str, weights_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file by key (safetensors never runs code, unlike pickle)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterInvalid(name, [f"{WEIGHTS_FILE} is not a readable safetensors file ({e})"]) from e


def _load_prompt_tuning(name: str, weights_path: Path, config: dict, dtype: torch.dtype) -> LoRAWeights:
    """A prompt-tuning adapter (:mod:`adapters.prompt_tuning`); its width is checked at install."""
    problems: list[str] = []
    virtual_tokens = read_virtual_tokens(config, _read_tensors(name, weights_path), dtype, problems)
    if problems:
        raise AdapterInvalid(name, problems)
    return LoRAWeights(name=name, modules={}, config=config, virtual_tokens=virtual_tokens)


def _load_prefix_tuning(
    name: str, weights_path: Path, config: dict, dtype: torch.dtype, attention: AttentionShape | None
) -> LoRAWeights:
    """A prefix-tuning adapter (:mod:`adapters.prefix_tuning`), checked against ``attention`` if given
    (and at install in any case)."""
    problems: list[str] = []
    prefix = read_prefix(config, _read_tensors(name, weights_path), dtype, problems, attention)
    if problems:
        raise AdapterInvalid(name, problems)
    return LoRAWeights(name=name, modules={}, config=config, prefix=prefix)


def _load_ia3(
    name: str,
    weights_path: Path,
    config: dict,
    linear_shapes: Mapping[str, tuple[int, int]],
    dtype: torch.dtype,
) -> LoRAWeights:
    """An IA³ adapter (:mod:`adapters.ia3`), validated with every problem collected."""
    problems: list[str] = []
    check_ia3_config(config, problems)
    if problems:
        raise AdapterInvalid(name, problems)
    modules = read_ia3_modules(config, _read_tensors(name, weights_path), linear_shapes, dtype, problems)
    if problems:
        raise AdapterInvalid(name, problems)
    return LoRAWeights(name=name, modules=dict(modules), config=config)


def save_lora_weights(weights: LoRAWeights, folder: Path, base_model: str | None = None) -> None:
    """Writes an adapter in PEFT's format (config + safetensors), loadable by PEFT and by the server.

    Each module's scaling is folded into its B so that the saved config can say ``lora_alpha = r``
    (scaling 1) per module through ``rank_pattern``/``alpha_pattern``, whatever the modules' ranks.
    """
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    for module, lora in weights.modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora.lora_A.float().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = (
            lora.lora_B.float() * lora.scaling
        ).contiguous()
        rank_pattern[re.escape(module)] = lora.rank
    rank = weights.rank
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": weights.target_modules,
        "rank_pattern": {k: v for k, v in rank_pattern.items() if v != rank},
        "alpha_pattern": {k: v for k, v in rank_pattern.items() if v != rank},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "base_model_name_or_path": base_model,
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file(tensors, str(folder / WEIGHTS_FILE))
