"""Tiny models, tokenizers and adapters built inside the tests (no downloads, seconds to make)."""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer():
    """A byte-level BPE tokenizer with no merges: every byte is a token, plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def make_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    """A 2-layer Llama with peaked (large-init) logits so greedy decoding is well separated."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=False,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_base(folder: Path, seed: int = 0) -> Path:
    tokenizer = make_tokenizer()
    model = make_tiny_llama(len(tokenizer), seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_random_adapter(
    base_dir: Path,
    out_dir: Path,
    rank: int = 4,
    alpha: float = 8.0,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    **lora_options,
) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved as PEFT does.

    ``lora_options`` go to ``LoraConfig`` (``use_rslora``, ``rank_pattern``, ``alpha_pattern``,
    ``use_dora``). A DoRA adapter's magnitudes are rescaled per row by a random factor in [0.5, 1.5], so
    that they are not PEFT's identity init (``m = ‖W + ΔW‖``).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        init_lora_weights=False,
        lora_dropout=0.0,
        **lora_options,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # make the delta large enough to change greedy outputs
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand_like(param))
            elif "lora_" in name:
                param.mul_(3.0)
    peft_model.save_pretrained(out_dir)
    return out_dir


def save_random_prompt_tuning_adapter(
    base_dir: Path, out_dir: Path, num_virtual_tokens: int = 4, seed: int = 0
) -> Path:
    """A PEFT prompt-tuning adapter with random virtual-token embeddings (PEFT's RANDOM init)."""
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)
    get_peft_model(model, config).save_pretrained(out_dir)
    return out_dir


def save_random_prefix_tuning_adapter(
    base_dir: Path, out_dir: Path, num_virtual_tokens: int = 3, seed: int = 0, prefix_projection: bool = False
) -> Path:
    """A PEFT prefix-tuning adapter with ``N(0, 1)`` prefix parameters (the MLP's too, with
    ``prefix_projection``), saved as PEFT does."""
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=num_virtual_tokens,
        prefix_projection=prefix_projection,
        encoder_hidden_size=16,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.normal_()
    peft_model.save_pretrained(out_dir)
    return out_dir


def save_random_ia3_adapter(
    base_dir: Path,
    out_dir: Path,
    target_modules: tuple[str, ...] = ("k_proj", "v_proj", "down_proj"),
    feedforward_modules: tuple[str, ...] = ("down_proj",),
    seed: int = 0,
) -> Path:
    """A PEFT IA³ adapter with vectors ``1 + 0.5·N(0, 1)`` (not the identity init), saved as PEFT does."""
    from peft import IA3Config, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = IA3Config(target_modules=list(target_modules), feedforward_modules=list(feedforward_modules))
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "ia3_l" in name:
                param.add_(0.5 * torch.randn_like(param))
    peft_model.save_pretrained(out_dir)
    return out_dir
