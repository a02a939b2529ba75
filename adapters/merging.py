"""Composing several LoRA adapters into one per request: the merge spec, its cache key and the math.

The math is PEFT's ``LoraModel.add_weighted_adapter`` (peft 0.21), written again over our in-memory
:class:`~adapters.lora.LoRAWeights` so that a merge needs no PEFT model around it. Per module:

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` combine the ``lora_A``
  matrices and the ``lora_B`` matrices *separately*, each weighted by ``sqrt(weight · scaling)`` (the
  sign on ``A`` only), so the merged ``B' A'`` has cross terms: it is not ``Σ wᵢ ΔWᵢ``. Elementwise
  combination needs equal ranks.
- ``cat`` stacks the adapters along the rank: ``ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ`` exactly, rank ``Σ rᵢ``.
- ``svd`` keeps the best rank-``max rᵢ`` approximation of ``Σ wᵢ ΔWᵢ``.

The merged adapter always has ``scaling = 1`` (``lora_alpha = r``), as in PEFT. Where we depart from
PEFT, on purpose:

1. Ranks are compared per module, among the adapters present at that module (PEFT compares the
   configs' ``r``), so adapters whose ``rank_pattern`` agree merge, and the error names the modules.
2. ``svd`` factors the stacked low-rank factors (two thin QRs and an ``R×R`` SVD, ``R = Σ rᵢ``) instead
   of running a full SVD of every ``(out, in)`` delta: the same singular triplets (the delta has rank at
   most ``R``) at a fraction of the cost. It keeps ``min(max rᵢ, R)`` components; PEFT pads to
   ``max rᵢ`` with components whose singular values are rounding noise.
3. An rsLoRA first adapter does not change the merged scaling (PEFT copies ``use_rslora`` into the
   merged config, which then scales by ``sqrt(r)`` a delta that already holds every scaling).
4. The adapters are combined in canonical order (sorted by name) whatever order the request lists them
   in, so every method is order-independent and specs that differ only in order share one cache key.
   For ``cat`` this fixes the order of the rank slices; the delta does not depend on it.
5. ``dare_*`` draw their random masks from a generator seeded by (spec hash, module name), on the CPU
   in float32: the same spec gives the same adapter on any device and in any module order (PEFT draws
   from the global RNG).
6. Negative weights are refused (PEFT accepts them to subtract adapters); a spec with one adapter is
   a ``linear`` merge whatever its method, as in PEFT.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from adapters.errors import MergeSpecInvalid
from adapters.lora import LoRAModule, LoRAWeights, module_problem
from adapters.peft_types import MERGEABLE_TYPES
from adapters.store import MERGED_PREFIX as MERGED_NAME_PREFIX

METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune", "svd")
DENSITY_METHODS = frozenset({"ties", "dare_linear", "dare_ties", "magnitude_prune"})
SIGN_METHODS = frozenset({"ties", "dare_ties"})
MAJORITY_SIGN_METHODS = ("total", "frequency")
_KEY_VERSION = 1  # bump when the math changes, so that no cache or seed outlives it
_MAX_LISTED = 3  # modules named in an incompatibility error
MAX_MERGE_WEIGHT = 100.0  # largest weight of one part (README "Merging adapters per request")
MIN_DENSITY = 1e-3  # dare_* rescale kept values by 1/density: smaller densities blow them up


# --------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class SpecFields:
    """The request fields a spec came from, so that every error names the one at fault.

    ``part_name`` and ``part_weight`` are format strings with ``{i}`` (the part's index).
    """

    parts: str
    part_name: str
    part_weight: str
    method: str
    density: str
    majority_sign_method: str

    @classmethod
    def request(cls, prefix: str = "adapter") -> SpecFields:
        """Our form: ``{"merge": [{"name", "weight"}], "method", "density", "majority_sign_method"}``."""
        return cls(
            parts=f"{prefix}.merge",
            part_name=f"{prefix}.merge[{{i}}].name",
            part_weight=f"{prefix}.merge[{{i}}].weight",
            method=f"{prefix}.method",
            density=f"{prefix}.density",
            majority_sign_method=f"{prefix}.majority_sign_method",
        )

    @classmethod
    def lorax(cls, prefix: str = "merged_adapters") -> SpecFields:
        """LoRAX's form: ``{"ids", "weights", "merge_strategy", "density", "majority_sign_method"}``."""
        return cls(
            parts=f"{prefix}.ids",
            part_name=f"{prefix}.ids[{{i}}]",
            part_weight=f"{prefix}.weights[{{i}}]",
            method=f"{prefix}.merge_strategy",
            density=f"{prefix}.density",
            majority_sign_method=f"{prefix}.majority_sign_method",
        )


@dataclass(frozen=True)
class MergeSpec:
    """What to merge and how; validated on construction (every error names its request field).

    Attributes:
        parts: ``(adapter name, weight)`` pairs; weights finite in ``[0, MAX_MERGE_WEIGHT]``, names unique.
        method: one of :data:`METHODS` (PEFT's ``combination_type`` names).
        density: fraction of values kept, in ``[MIN_DENSITY, 1]``; required by :data:`DENSITY_METHODS`.
        majority_sign_method: ``total`` or ``frequency``; used by :data:`SIGN_METHODS`.
        fields: where the spec came from in the request (not part of equality or the cache key).
    """

    parts: tuple[tuple[str, float], ...]
    method: str = "linear"
    density: float | None = None
    majority_sign_method: str = "total"
    fields: SpecFields = field(default_factory=SpecFields.request, compare=False, repr=False)

    def __post_init__(self) -> None:
        fields = self.fields
        if not isinstance(self.parts, (tuple, list)) or not self.parts:
            raise MergeSpecInvalid(fields.parts, "must list at least one adapter")
        parts: list[tuple[str, float]] = []
        seen: set[str] = set()
        for i, part in enumerate(self.parts):
            if not isinstance(part, (tuple, list)) or len(part) != 2:
                raise MergeSpecInvalid(fields.parts, "each part must be an (adapter name, weight) pair", part)
            name, weight = part
            if not isinstance(name, str) or not name:
                raise MergeSpecInvalid(fields.part_name.format(i=i), "must be a non-empty adapter name", name)
            if name in seen:
                raise MergeSpecInvalid(
                    fields.part_name.format(i=i), f"adapter '{name}' is listed more than once", name
                )
            seen.add(name)
            parts.append((name, _check_weight(weight, fields.part_weight.format(i=i))))
        object.__setattr__(self, "parts", tuple(parts))

        if not isinstance(self.method, str) or self.method not in METHODS:
            raise MergeSpecInvalid(fields.method, f"must be one of {', '.join(METHODS)}", self.method)
        if self.density is not None:
            object.__setattr__(self, "density", _check_density(self.density, fields.density))
        elif self.method in DENSITY_METHODS:
            raise MergeSpecInvalid(
                fields.density, f"is required by method '{self.method}' (a value in [{MIN_DENSITY:g}, 1])"
            )
        if self.majority_sign_method not in MAJORITY_SIGN_METHODS:
            raise MergeSpecInvalid(
                fields.majority_sign_method,
                f"must be one of {', '.join(MAJORITY_SIGN_METHODS)}",
                self.majority_sign_method,
            )

    @classmethod
    def from_request(cls, data: object, max_parts: int | None = None, prefix: str = "adapter") -> MergeSpec:
        """Builds a spec from our request form.

        Args:
            data: ``{"merge": [{"name": str, "weight": float = 1.0}, ...], "method": str = "linear",
                "density": float | None, "majority_sign_method": "total" | "frequency"}``.
            max_parts: the server's limit on the number of adapters in one merge (None: no limit).
            prefix: the request field that held ``data``, for error messages.

        Raises:
            MergeSpecInvalid: naming the offending field, e.g. ``adapter.merge[1].weight``.
        """
        fields = SpecFields.request(prefix)
        _check_keys(data, prefix, {"merge", "method", "density", "majority_sign_method"})
        items = _check_list(data.get("merge"), fields.parts, max_parts)
        parts = []
        for i, item in enumerate(items):
            _check_keys(item, f"{fields.parts}[{i}]", {"name", "weight"})
            parts.append((item.get("name"), item.get("weight", 1.0)))
        return cls(
            parts=tuple(parts),
            method=_or_default(data.get("method"), "linear"),
            density=data.get("density"),
            majority_sign_method=_or_default(data.get("majority_sign_method"), "total"),
            fields=fields,
        )

    @classmethod
    def from_lorax(
        cls, data: object, max_parts: int | None = None, prefix: str = "merged_adapters"
    ) -> MergeSpec:
        """Builds a spec from LoRAX's ``merged_adapters`` form, so that LoRAX clients port over.

        LoRAX's strategy and sign names are ours (its upper-case protobuf enum names are accepted
        too); missing ``weights`` mean 1 each, and ``density`` is ignored by methods that do not prune
        (LoRAX sends its protobuf default 0.0 there). Note that LoRAX's own ``linear`` weights the A and
        B matrices by ``w`` where PEFT, and we, weight them by ``sqrt(w · scaling)``.

        Args:
            data: ``{"ids": [str], "weights": [float], "merge_strategy": str | None, "density": float,
                "majority_sign_method": str | None}``.
            max_parts: the server's limit on the number of adapters in one merge (None: no limit).
            prefix: the request field that held ``data``, for error messages.

        Raises:
            MergeSpecInvalid: naming the offending field, e.g. ``merged_adapters.weights[1]``.
        """
        fields = SpecFields.lorax(prefix)
        _check_keys(data, prefix, {"ids", "weights", "merge_strategy", "density", "majority_sign_method"})
        ids = _check_list(data.get("ids"), fields.parts, max_parts)
        weights = data.get("weights") or [1.0] * len(ids)
        if not isinstance(weights, (list, tuple)) or len(weights) != len(ids):
            raise MergeSpecInvalid(f"{prefix}.weights", "must list one weight per id", weights)
        method = _lower(_or_default(data.get("merge_strategy"), "linear"))
        density = data.get("density") if method in DENSITY_METHODS else None
        return cls(
            parts=tuple(zip(ids, weights)),
            method=method,
            density=density,
            majority_sign_method=_lower(_or_default(data.get("majority_sign_method"), "total")),
            fields=fields,
        )

    @property
    def effective_method(self) -> str:
        """The method actually run: a single adapter is always a ``linear`` merge (as in PEFT)."""
        return "linear" if len(self.parts) == 1 else self.method

    @property
    def canonical_parts(self) -> tuple[tuple[str, float], ...]:
        """The parts sorted by adapter name: the order in which adapters are combined."""
        return tuple(sorted(self.parts))

    def to_dict(self) -> dict:
        """The spec in our request form (as ``GET /v1/adapters`` shows it)."""
        return {
            "merge": [{"name": name, "weight": weight} for name, weight in self.parts],
            "method": self.method,
            "density": self.density,
            "majority_sign_method": self.majority_sign_method,
        }


def _check_weight(weight: object, param: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise MergeSpecInvalid(param, "must be a number", weight)
    if not math.isfinite(weight):
        raise MergeSpecInvalid(param, "must be finite", weight)
    if weight < 0:
        raise MergeSpecInvalid(param, "must be >= 0", weight)
    if weight > MAX_MERGE_WEIGHT:
        raise MergeSpecInvalid(param, f"must be at most {MAX_MERGE_WEIGHT:g}", weight)
    return float(weight) + 0.0  # + 0.0 turns -0.0 into 0.0, so both hash alike


def _check_density(density: object, param: str) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise MergeSpecInvalid(param, f"must be a number in [{MIN_DENSITY:g}, 1]", density)
    if not (math.isfinite(density) and MIN_DENSITY <= density <= 1):
        raise MergeSpecInvalid(param, f"must be in [{MIN_DENSITY:g}, 1]", density)
    return float(density)


def _check_keys(data: object, param: str, allowed: set[str]) -> None:
    if not isinstance(data, Mapping):
        raise MergeSpecInvalid(param, "must be an object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise MergeSpecInvalid(
            f"{param}.{unknown[0]}", f"unknown field (expected {', '.join(sorted(allowed))})"
        )


def _check_list(items: object, param: str, max_parts: int | None) -> Sequence:
    if not isinstance(items, (list, tuple)) or not items:
        raise MergeSpecInvalid(param, "must be a non-empty list of adapters")
    if max_parts is not None and len(items) > max_parts:
        raise MergeSpecInvalid(param, f"merges at most {max_parts} adapters, got {len(items)}", len(items))
    return items


def _or_default(value: object, default: str) -> object:
    return default if value is None else value


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


# ---------------------------------------------------------------------------------------- cache key


def canonical_key(spec: MergeSpec) -> str:
    """A stable SHA-256 (hex) of what determines the merged weights, for caching and seeding.

    Order-independent for every method (see the module docstring, point 4); parameters a method does
    not use (``density`` for ``linear``, the sign method outside ties) do not enter the key, and a
    single-adapter spec hashes as the ``linear`` merge it runs. The key covers the spec, not the
    adapters' weights: a cache must drop merges whose parts are reloaded.
    """
    method = spec.effective_method
    payload = {
        "v": _KEY_VERSION,
        "method": method,
        "parts": [[name, weight] for name, weight in spec.canonical_parts],
        "density": spec.density if method in DENSITY_METHODS else None,
        "majority_sign_method": spec.majority_sign_method if method in SIGN_METHODS else None,
    }
    encoded = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


def merged_name(spec: MergeSpec) -> str:
    """The adapter name a cached merge goes by: ``merge-<first 12 hex digits of the key>``."""
    return MERGED_NAME_PREFIX + canonical_key(spec)[:12]


def module_generator(key: str, module: str) -> torch.Generator:
    """The CPU generator that draws ``dare_*`` masks for one module of the merge with cache key ``key``."""
    digest = hashlib.sha256(f"{key}\0{module}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# -------------------------------------------------------------------------------- tensor operations


def _weighted_sum(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σᵢ wᵢ tᵢ`` over the stacked dim 0 (``stacked``: (n, ...), ``weights``: (n,))."""
    return (stacked * _expand(weights, stacked)).sum(dim=0)


def _expand(weights: torch.Tensor, stacked: torch.Tensor) -> torch.Tensor:
    return weights.view(weights.shape + (1,) * (stacked.dim() - 1))  # (n, 1, 1)


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keeps the ``int(density · numel)`` largest-magnitude values (TIES' trim step), zeros the rest."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.numel())
    # unsorted top-k and scatter_: the same kept set as PEFT's sorted top-k and index_put (among equal
    # magnitudes at the cut, which ones are kept is up to top-k in both), at a tenth of the time
    kept = torch.topk(tensor.abs().reshape(-1), k=keep, largest=True, sorted=False).indices  # (keep,)
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device).scatter_(0, kept, 1.0)
    return tensor * mask.reshape(tensor.shape)


def _random_prune(tensor: torch.Tensor, density: float, rng: torch.Generator) -> torch.Tensor:
    """DARE's drop-and-rescale: keeps each value with probability ``density``, divides by it."""
    if density >= 1:
        return tensor
    keep_prob = torch.full(tensor.shape, density, dtype=torch.float32)  # on the CPU, for rng
    mask = torch.bernoulli(keep_prob, generator=rng).to(tensor.device)
    return tensor * mask / density


def _majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """TIES' elect step: where each task tensor agrees with the sign elected across them."""
    sign = stacked.sign()  # (n, ...)
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    elected = torch.where(votes >= 0, 1, -1)
    return sign == elected


def _disjoint_merge(weighted: torch.Tensor, agrees: torch.Tensor) -> torch.Tensor:
    """TIES' disjoint mean: the mean over the task tensors that agree with the elected sign."""
    kept = (weighted * agrees).sum(dim=0)
    return kept / torch.clamp(agrees.sum(dim=0), min=1.0)


def _low_rank_svd(lora_B: torch.Tensor, lora_A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ``lora_B @ lora_A`` without forming the product's full SVD.

    Args:
        lora_B: (out, R) stacked (and weighted) B factors.
        lora_A: (R, in) stacked A factors.
        rank: components to keep.

    Returns:
        ``(A', B')`` with A' (k, in), B' (out, k), ``k = min(rank, R, out, in)``, ``B' A'`` ≈ ``B A``.
    """
    q_B, r_B = torch.linalg.qr(lora_B)  # (out, p), (p, R)
    q_A, r_A = torch.linalg.qr(lora_A.T)  # (in, q), (q, R)
    u, s, vh = torch.linalg.svd(r_B @ r_A.T, full_matrices=False)  # (p, m), (m,), (m, q)
    k = min(rank, s.shape[0])
    new_B = (q_B @ u[:, :k]) * s[:k]  # (out, k)
    new_A = vh[:k] @ q_A.T  # (k, in)
    return new_A, new_B


# ---------------------------------------------------------------------------------------- strategies


@dataclass(frozen=True)
class Contribution:
    """One adapter's weights at one module, with its weight in the spec."""

    adapter: str
    module: LoRAModule
    weight: float


class MergeStrategy(ABC):
    """How one module's contributions become one ``(lora_A, lora_B)`` pair with scaling 1."""

    def check(self, module: str, contributions: list[Contribution]) -> str | None:
        """Returns why the contributions cannot be merged at ``module``, or None."""
        return None

    @abstractmethod
    def merged_rank(self, contributions: list[Contribution]) -> int:
        """The rank of the merged module, known before computing it."""

    @abstractmethod
    def merge_module(
        self, contributions: list[Contribution], rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns float32 ``lora_A`` (r, in) and ``lora_B`` (out, r) of the merged module."""


class ElementwiseMerge(MergeStrategy):
    """PEFT's generalized task arithmetic: the A matrices and the B matrices are combined separately.

    Each contribution enters with ``sqrt(|w·s|)`` on both sides and the sign of ``w·s`` on ``A``
    alone, so that a single adapter gives back exactly ``w · s · B A``.
    """

    def __init__(self, density: float | None = None, majority_sign_method: str = "total"):
        self.density = density if density is not None else 1.0
        self.majority_sign_method = majority_sign_method

    def check(self, module: str, contributions: list[Contribution]) -> str | None:
        ranks = {c.adapter: c.module.rank for c in contributions}
        if len(set(ranks.values())) > 1:
            return f"{module} (" + ", ".join(f"'{a}' r={r}" for a, r in ranks.items()) + ")"
        return None

    def merged_rank(self, contributions: list[Contribution]) -> int:
        return contributions[0].module.rank

    def merge_module(
        self, contributions: list[Contribution], rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights_A, weights_B = [], []
        for c in contributions:
            weight_with_scaling = c.weight * c.module.scaling
            root = math.sqrt(abs(weight_with_scaling))
            weights_A.append(root if weight_with_scaling >= 0 else -root)  # the sign goes on A only
            weights_B.append(root)
        lora_A = self.combine([c.module.lora_A.float() for c in contributions], torch.tensor(weights_A), rng)
        lora_B = self.combine([c.module.lora_B.float() for c in contributions], torch.tensor(weights_B), rng)
        return lora_A, lora_B

    @abstractmethod
    def combine(
        self, tensors: list[torch.Tensor], weights: torch.Tensor, rng: torch.Generator
    ) -> torch.Tensor:
        """Combines same-shaped task tensors (all the A's, or all the B's) with per-tensor weights (n,)."""


class LinearMerge(ElementwiseMerge):
    """Task arithmetic: ``Σ wᵢ tᵢ``."""

    def combine(
        self, tensors: list[torch.Tensor], weights: torch.Tensor, rng: torch.Generator
    ) -> torch.Tensor:
        return _weighted_sum(torch.stack(tensors), weights)


class MagnitudePruneMerge(ElementwiseMerge):
    """Task arithmetic over tensors trimmed to their ``density`` largest-magnitude values."""

    def combine(
        self, tensors: list[torch.Tensor], weights: torch.Tensor, rng: torch.Generator
    ) -> torch.Tensor:
        trimmed = torch.stack([_magnitude_prune(t, self.density) for t in tensors])  # (n, ...)
        return _weighted_sum(trimmed, weights)


class TiesMerge(ElementwiseMerge):
    """TIES-merging (https://arxiv.org/abs/2306.01708): trim, elect sign, disjoint mean."""

    def combine(
        self, tensors: list[torch.Tensor], weights: torch.Tensor, rng: torch.Generator
    ) -> torch.Tensor:
        trimmed = torch.stack([_magnitude_prune(t, self.density) for t in tensors])  # (n, ...)
        agrees = _majority_sign_mask(trimmed, self.majority_sign_method)  # elected before weighting
        return _disjoint_merge(trimmed * _expand(weights, trimmed), agrees)


class DareLinearMerge(ElementwiseMerge):
    """DARE (https://arxiv.org/abs/2311.03099): random drop and rescale, then task arithmetic."""

    def combine(
        self, tensors: list[torch.Tensor], weights: torch.Tensor, rng: torch.Generator
    ) -> torch.Tensor:
        dropped = torch.stack([_random_prune(t, self.density, rng) for t in tensors])  # (n, ...)
        return _weighted_sum(dropped, weights)


class DareTiesMerge(ElementwiseMerge):
    """DARE's random drop and rescale, then TIES' sign election and disjoint mean."""

    def combine(
        self, tensors: list[torch.Tensor], weights: torch.Tensor, rng: torch.Generator
    ) -> torch.Tensor:
        dropped = torch.stack([_random_prune(t, self.density, rng) for t in tensors])  # (n, ...)
        agrees = _majority_sign_mask(dropped, self.majority_sign_method)
        return _disjoint_merge(dropped * _expand(weights, dropped), agrees)


class CatMerge(MergeStrategy):
    """Concatenation along the rank: exactly ``Σ wᵢ sᵢ Bᵢ Aᵢ``, at rank ``Σ rᵢ``."""

    def merged_rank(self, contributions: list[Contribution]) -> int:
        return sum(c.module.rank for c in contributions)

    def merge_module(
        self, contributions: list[Contribution], rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lora_A = torch.cat([c.module.lora_A.float() * c.weight * c.module.scaling for c in contributions])
        lora_B = torch.cat([c.module.lora_B.float() for c in contributions], dim=1)
        return lora_A, lora_B  # (Σr, in), (out, Σr)


class SvdMerge(MergeStrategy):
    """The best rank-``rank`` approximation of ``Σ wᵢ ΔWᵢ`` (PEFT: rank = the largest adapter rank)."""

    def __init__(self, rank: int):
        self.rank = rank

    def merged_rank(self, contributions: list[Contribution]) -> int:
        module = contributions[0].module
        out_features, in_features = module.lora_B.shape[0], module.lora_A.shape[1]
        return min(self.rank, sum(c.module.rank for c in contributions), out_features, in_features)

    def merge_module(
        self, contributions: list[Contribution], rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lora_B = torch.cat(
            [c.module.lora_B.float() * (c.weight * c.module.scaling) for c in contributions], dim=1
        )
        lora_A = torch.cat([c.module.lora_A.float() for c in contributions])
        return _low_rank_svd(lora_B, lora_A, self.rank)  # from (out, Σr) @ (Σr, in)


def build_strategy(spec: MergeSpec, adapters: Sequence[LoRAWeights]) -> MergeStrategy:
    """The strategy object for the spec's effective method."""
    method = spec.effective_method
    elementwise: dict[str, type[ElementwiseMerge]] = {
        "linear": LinearMerge,
        "magnitude_prune": MagnitudePruneMerge,
        "ties": TiesMerge,
        "dare_linear": DareLinearMerge,
        "dare_ties": DareTiesMerge,
    }
    if method in elementwise:
        return elementwise[method](spec.density, spec.majority_sign_method)
    if method == "cat":
        return CatMerge()
    if method == "svd":
        return SvdMerge(rank=max(a.rank for a in adapters))
    raise MergeSpecInvalid(spec.fields.method, f"must be one of {', '.join(METHODS)}", method)


# ---------------------------------------------------------------------------------------- the merge


def merge_lora(
    spec: MergeSpec, adapters: Sequence[LoRAWeights], name: str, max_rank: int | None = None
) -> LoRAWeights:
    """Computes the merged adapter as PEFT's ``add_weighted_adapter`` would (see the module docstring).

    Args:
        spec: a validated spec.
        adapters: the loaded adapters the spec names, in any order (others are ignored).
        name: the merged adapter's name (usually :func:`merged_name`).
        max_rank: the server's largest servable rank; a larger merged rank (``cat``) is refused.

    Returns:
        An adapter with scaling 1 in every module, in the first adapter's dtype and device, whose config
        reloads through :func:`adapters.lora.load_lora_weights` once saved.

    Raises:
        MergeSpecInvalid: the adapters cannot be merged by this method (unequal ranks for an
            elementwise method, a merged rank over ``max_rank``); ``param`` names the parts field.
        ValueError: ``adapters`` lacks an adapter the spec names (a caller bug).
    """
    by_name = {a.name: a for a in adapters}
    missing = [n for n, _ in spec.parts if n not in by_name]
    if missing:
        raise ValueError(f"merge_lora was not given the adapters {missing}")
    _check_lora_family(spec, by_name)
    ordered = [(by_name[n], w) for n, w in spec.canonical_parts]
    strategy = build_strategy(spec, [a for a, _ in ordered])
    per_module = _contributions_per_module(ordered)
    _check_compatible(spec, strategy, per_module, max_rank)

    key = canonical_key(spec)
    first = next(iter(ordered[0][0].modules.values()))
    dtype, device = first.lora_A.dtype, first.lora_A.device
    modules: dict[str, LoRAModule] = {}
    problems: list[str] = []
    for module_name, contributions in per_module.items():
        lora_A, lora_B = strategy.merge_module(contributions, module_generator(key, module_name))
        lora_A = lora_A.to(device=device, dtype=dtype).contiguous()
        lora_B = lora_B.to(device=device, dtype=dtype).contiguous()
        problem = module_problem(module_name, lora_A, lora_B, 1.0)  # the bounds loading applies
        if problem is not None:
            problems.append(problem)
        modules[module_name] = LoRAModule(lora_A, lora_B, scaling=1.0)
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED]) + (
            f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        )
        raise MergeSpecInvalid(spec.fields.parts, f"the merged adapter cannot be served: {listed}")
    return LoRAWeights(name=name, modules=modules, config=_merged_config(ordered[0][0].config, modules))


def _check_lora_family(spec: MergeSpec, by_name: Mapping[str, LoRAWeights]) -> None:
    """Refuses DoRA, IA³ and prompt-tuning parts: the merge math combines (B, A) factors, which would
    drop DoRA's magnitudes and has nothing to combine in an IA³ vector or in virtual tokens."""
    for i, (part, _) in enumerate(spec.parts):
        kind = by_name[part].peft_type
        if kind not in MERGEABLE_TYPES:
            raise MergeSpecInvalid(
                spec.fields.part_name.format(i=i),
                f"adapter '{part}' is a {kind} adapter; only LoRA and rsLoRA adapters can be merged",
                part,
            )


def _contributions_per_module(ordered: list[tuple[LoRAWeights, float]]) -> dict[str, list[Contribution]]:
    """Module name (sorted) -> the contributions of the adapters present there, in canonical order."""
    names = sorted({m for adapter, _ in ordered for m in adapter.modules})
    return {m: [Contribution(a.name, a.modules[m], w) for a, w in ordered if m in a.modules] for m in names}


def _check_compatible(
    spec: MergeSpec,
    strategy: MergeStrategy,
    per_module: Mapping[str, list[Contribution]],
    max_rank: int | None,
) -> None:
    """Raises one :class:`MergeSpecInvalid` naming the adapters and modules the method cannot merge."""
    method = spec.effective_method
    clashes = [p for m, cs in per_module.items() if (p := strategy.check(m, cs)) is not None]
    if clashes:
        listed = "; ".join(clashes[:_MAX_LISTED]) + (
            f"; and {len(clashes) - _MAX_LISTED} more" if len(clashes) > _MAX_LISTED else ""
        )
        raise MergeSpecInvalid(
            spec.fields.parts,
            f"method '{method}' combines lora_A and lora_B elementwise and needs equal ranks, but the "
            f"ranks differ at {len(clashes)} module(s): {listed}; use 'cat' or 'svd' for adapters of "
            "different ranks",
        )
    if max_rank is not None:
        rank = max(strategy.merged_rank(cs) for cs in per_module.values())
        if rank > max_rank:
            raise MergeSpecInvalid(
                spec.fields.parts,
                f"method '{method}' gives rank {rank}, over the server's maximum rank {max_rank}; "
                "use 'svd' (rank = the largest part's) or merge fewer adapters",
                rank,
            )


def _merged_config(first_config: Mapping, modules: Mapping[str, LoRAModule]) -> dict:
    """A PEFT LoRA config for the merged weights: exact module names, scaling 1 everywhere."""
    ranks = {name: module.rank for name, module in modules.items()}
    rank = max(ranks.values())
    odd = {re.escape(name): r for name, r in ranks.items() if r != rank}
    config = dict(first_config)
    config.update(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        target_modules=sorted(modules),
        rank_pattern=odd,
        alpha_pattern=dict(odd),  # alpha = r: scaling 1
        layers_to_transform=None,
        layers_pattern=None,
    )
    return config
