"""Typed argument groups of ``loraplex train``; each ``__post_init__`` names the flag at fault.

The defaults are chosen for the embedded SmolLM2-135M base and a few hundred short chat rows: they give
a useful adapter on the bundled example without tuning (see ``training/examples``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adapters.base_model import QUANTIZATIONS
from adapters.peft_types import IA3, PROMPT_LEARNING_TYPES, TRAIN_METHODS
from adapters.store import check_adapter_name

SCHEDULERS = ("linear", "cosine", "constant")
OVERLONG_POLICIES = ("drop", "truncate")
UNFREEZE_MODES = ("all", "gradual")  # see training/gradual_unfreezing.py


class ArgumentError(ValueError):
    """A command-line value that cannot be used; ``flag`` names the option at fault."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def _require(condition: bool, flag: str, message: str) -> None:
    if not condition:
        raise ArgumentError(flag, message)


@dataclass
class DataArgs:
    """Where the rows come from and how they are cut to length."""

    data: Path
    eval_data: Path | None = None
    eval_fraction: float = 0.1  # held out (seeded) when --eval-data is absent
    max_seq_length: int = 512
    overlong: str = "drop"  # rows longer than max_seq_length: drop them, or truncate them
    strict: bool = False  # any invalid row is an error (default: skipped and reported)

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        self.eval_data = Path(self.eval_data) if self.eval_data else None
        _require(self.data.is_file(), "--data", f"no such file: {self.data}")
        _require(
            self.eval_data is None or self.eval_data.is_file(),
            "--eval-data",
            f"no such file: {self.eval_data}",
        )
        _require(0.0 <= self.eval_fraction < 1.0, "--eval-fraction", "must be in [0, 1)")
        _require(self.max_seq_length >= 8, "--max-seq-length", "must be at least 8")
        _require(self.overlong in OVERLONG_POLICIES, "--overlong", f"must be one of {OVERLONG_POLICIES}")


@dataclass
class LoRAArgs:
    """The adapter's shape: ``ΔW = (alpha / r) · B @ A`` on ``target_modules`` of the top ``layers``.

    ``method`` is one of :data:`adapters.peft_types.TRAIN_METHODS`: ``lora``, ``rslora`` (scaling
    ``alpha / √r``), ``dora`` (LoRA plus a learned per-row magnitude), ``ia3`` (a learned vector per
    module; it has no rank, alpha or dropout, so those flags must keep their defaults, nor ``--layers``),
    ``prompt-tuning`` (``num_virtual_tokens`` learned input embeddings) or ``prefix-tuning``
    (``num_virtual_tokens`` learned keys and values in every layer). The two prompt-learning methods
    change no linear layer: none of the LoRA flags apply to them.
    """

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    layers: int | None = None  # train only the top N transformer layers (None = all)
    method: str = "lora"
    num_virtual_tokens: int = 8  # prompt and prefix tuning only

    @property
    def adapter_type(self) -> str:
        """The served type this method trains (``prompt-tuning`` → ``prompt_tuning``)."""
        return self.method.replace("-", "_")

    def __post_init__(self) -> None:
        _require(self.method in TRAIN_METHODS, "--method", f"must be one of {', '.join(TRAIN_METHODS)}")
        prompt_learning = self.adapter_type in PROMPT_LEARNING_TYPES
        if self.method == IA3 or prompt_learning:
            for flag, value, default in (
                ("--r", self.r, 16),
                ("--alpha", self.alpha, 32.0),
                ("--dropout", self.dropout, 0.05),
            ):
                _require(
                    value == default,
                    flag,
                    f"{self.method} has no rank, alpha or dropout; leave it out with --method {self.method}",
                )
            _require(
                self.layers is None, "--layers", f"PEFT's {self.method} cannot be limited to the top layers"
            )
        if prompt_learning:
            _require(
                self.target_modules == "all-linear",
                "--target-modules",
                f"{self.method} adds virtual tokens and targets no module",
            )
        _require(
            prompt_learning or self.num_virtual_tokens == 8,
            "--num-virtual-tokens",
            "only prompt-tuning and prefix-tuning have virtual tokens",
        )
        _require(1 <= self.num_virtual_tokens <= 512, "--num-virtual-tokens", "must be in [1, 512]")
        _require(1 <= self.r <= 1024, "--r", "must be in [1, 1024]")
        _require(self.alpha > 0, "--alpha", "must be positive")
        _require(0.0 <= self.dropout < 1.0, "--dropout", "must be in [0, 1)")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        _require(bool(self.target_modules), "--target-modules", "name at least one module, or all-linear")
        _require(self.layers is None or self.layers >= 1, "--layers", "must be at least 1")


@dataclass
class OptimArgs:
    """The optimisation loop, handed to transformers' ``Trainer``."""

    epochs: float = 2.0
    max_steps: int | None = None  # overrides --epochs
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    warmup_steps: int | None = None  # overrides --warmup-ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    eval_steps: int | None = None  # None = four evaluations over the run
    early_stopping_patience: int = 0  # evaluations without improvement before stopping (0 = off)
    logging_steps: int | None = None  # None = about 50 points on the loss curve
    save_steps: int = 0  # Trainer checkpoints every N steps (0 = none); see --resume-checkpoint
    gradient_checkpointing: bool = False
    unfreeze: str = "all"  # "gradual": top layers' adapters first, lower ones stage by stage
    unfreeze_stages: int = 2  # with --unfreeze gradual: equal stages of the run's steps

    def __post_init__(self) -> None:
        _require(self.unfreeze in UNFREEZE_MODES, "--unfreeze", f"must be one of {UNFREEZE_MODES}")
        _require(self.unfreeze_stages >= 1, "--unfreeze-stages", "must be at least 1")
        _require(
            self.unfreeze == "gradual" or self.unfreeze_stages == 2,
            "--unfreeze-stages",
            "only applies with --unfreeze gradual",
        )
        _require(self.epochs > 0, "--epochs", "must be positive")
        _require(self.max_steps is None or self.max_steps >= 1, "--max-steps", "must be at least 1")
        _require(self.batch_size >= 1, "--batch-size", "must be at least 1")
        _require(self.grad_accum >= 1, "--grad-accum", "must be at least 1")
        _require(0 < self.lr < 1, "--lr", "must be in (0, 1)")
        _require(self.scheduler in SCHEDULERS, "--scheduler", f"must be one of {SCHEDULERS}")
        _require(0.0 <= self.warmup_ratio < 1.0, "--warmup-ratio", "must be in [0, 1)")
        _require(self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps", "must be >= 0")
        _require(self.weight_decay >= 0, "--weight-decay", "must be >= 0")
        _require(self.max_grad_norm >= 0, "--max-grad-norm", "must be >= 0 (0 disables clipping)")
        _require(self.eval_steps is None or self.eval_steps >= 1, "--eval-steps", "must be at least 1")
        _require(self.early_stopping_patience >= 0, "--early-stopping-patience", "must be >= 0")
        _require(self.logging_steps is None or self.logging_steps >= 1, "--logging-steps", "must be >= 1")
        _require(self.save_steps >= 0, "--save-steps", "must be >= 0")


@dataclass
class OutputArgs:
    """Which base model, and where the adapter goes."""

    name: str
    adapter_dir: Path = Path("data/adapters")
    overwrite: bool = False
    base_model: str | None = None  # None = the server's default model
    quantization: str = "nf4"
    device: str | None = None
    checkpoint_dir: Path | None = None  # None = <adapter_dir>/.runs/<name>, removed after success
    resume_checkpoint: str | None = None  # a Trainer checkpoint folder, or "last"
    register: str | None = None  # URL of a running server to hot-load the adapter into
    api_key: str | None = None

    def __post_init__(self) -> None:
        try:
            check_adapter_name(self.name)
        except ValueError as e:
            raise ArgumentError("--name", str(e)) from e
        self.adapter_dir = Path(self.adapter_dir)
        _require(self.quantization in QUANTIZATIONS, "--quantization", f"must be one of {QUANTIZATIONS}")
        _require(
            self.register is None or self.register.startswith(("http://", "https://")),
            "--register",
            "must be an http(s):// URL",
        )
        _require(
            self.api_key is None or self.register is not None, "--api-key", "only makes sense with --register"
        )

    @property
    def run_dir(self) -> Path:
        return self.checkpoint_dir or self.adapter_dir / ".runs" / self.name


@dataclass
class ContinualArgs:
    """Continuing an existing adapter on new data while measuring (and limiting) forgetting."""

    resume_from: str | None = None  # adapter name in the store
    replay_data: Path | None = None  # old data; default: the old card's recorded training file
    replay_fraction: float = 0.25  # replayed old rows, as a fraction of the new training rows
    ewc_lambda: float = 0.0  # strength of the EWC penalty (0 = off)
    ewc_samples: int = 64  # old rows used to estimate the Fisher information
    old_eval_rows: int = 64  # old rows held out to measure forgetting

    def __post_init__(self) -> None:
        if self.resume_from is not None:
            try:
                check_adapter_name(self.resume_from)
            except ValueError as e:
                raise ArgumentError("--resume-from", str(e)) from e
        self.replay_data = Path(self.replay_data) if self.replay_data else None
        _require(
            self.replay_data is None or self.replay_data.is_file(),
            "--replay-data",
            f"no such file: {self.replay_data}",
        )
        _require(self.replay_data is None or self.resume_from, "--replay-data", "needs --resume-from")
        _require(0.0 <= self.replay_fraction <= 10.0, "--replay-fraction", "must be in [0, 10]")
        _require(self.ewc_lambda >= 0, "--ewc-lambda", "must be >= 0")
        _require(self.ewc_lambda == 0 or self.resume_from, "--ewc-lambda", "needs --resume-from")
        _require(self.ewc_samples >= 1, "--ewc-samples", "must be at least 1")
        _require(self.old_eval_rows >= 1, "--old-eval-rows", "must be at least 1")


@dataclass
class TrainConfig:
    """Every argument group of one training run."""

    data: DataArgs
    output: OutputArgs
    lora: LoRAArgs = field(default_factory=LoRAArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    continual: ContinualArgs = field(default_factory=ContinualArgs)

    def __post_init__(self) -> None:
        _require(
            not (self.lora.method == "prefix-tuning" and self.optim.gradient_checkpointing),
            "--gradient-checkpointing",
            "PEFT's prefix tuning does not work with gradient checkpointing",
        )
        _require(
            not (self.optim.unfreeze == "gradual" and self.lora.adapter_type in PROMPT_LEARNING_TYPES),
            "--unfreeze",
            f"{self.lora.method} has no per-layer adapter parameters to unfreeze gradually",
        )
