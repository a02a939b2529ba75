"""Merged export on a tiny Llama: loadable by plain transformers, same greedy output as the served adapter."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from adapters.export import REPORT_FILE, export_merged_model

PROMPTS = ["the cat sat on the mat", "merge me, then export me"]


def _greedy(model, tokenizer, prompt: str) -> list[int]:
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=16, do_sample=False
        )
    return out[0, input_ids.shape[1] :].tolist()


def test_fp32_export_generates_like_the_unmerged_adapter(tiny_base_dir, tiny_adapter_sources, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = tmp_path / "exported"
    report = export_merged_model(
        tiny_base_dir,
        tiny_adapter_sources["all-r8"],
        out_dir,
        dtype=torch.float32,
        quantization="none",
        sample_prompts=PROMPTS,
    )

    exported = AutoModelForCausalLM.from_pretrained(out_dir).eval()  # plain transformers, no PEFT
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    served = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32),
        tiny_adapter_sources["all-r8"],
    ).eval()
    for prompt in PROMPTS:
        assert _greedy(exported, tokenizer, prompt) == _greedy(served, tokenizer, prompt)

    assert next(exported.parameters()).dtype == torch.float32
    assert report.modules_merged == 14  # 7 linears x 2 layers
    assert report.max_abs_logit_diff < 1e-3  # fp32 fold vs unmerged: rounding only (logits are O(10))
    assert report.top1_agreement == 1.0
    assert json.loads((out_dir / REPORT_FILE).read_text())["adapter_name"] == "all-r8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no temporary left behind


def test_export_from_a_quantized_server_warns_with_the_difference(
    tiny_base_dir, tiny_adapter_sources, tmp_path, caplog
):
    from transformers import AutoModelForCausalLM

    with caplog.at_level(logging.WARNING, logger="adapters.export"):
        report = export_merged_model(
            tiny_base_dir, tiny_adapter_sources["attn-r4"], tmp_path / "out", sample_prompts=PROMPTS
        )

    assert report.served_quantization == "nf4" and report.dtype == "bfloat16"
    assert 0 < report.max_abs_logit_diff < float("inf")
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING and r.name == "adapters.export")
    assert "nf4-quantized" in warning.getMessage()
    assert f"{report.max_abs_logit_diff:.4g}" in warning.getMessage()
    assert next(AutoModelForCausalLM.from_pretrained(tmp_path / "out").parameters()).dtype == torch.bfloat16


def test_export_refuses_to_overwrite_unless_asked(tiny_base_dir, tiny_adapter_sources, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("x")
    kwargs = {"dtype": torch.float32, "quantization": "none", "sample_prompts": PROMPTS[:1]}
    with pytest.raises(FileExistsError):
        export_merged_model(tiny_base_dir, tiny_adapter_sources["mlp-r2"], out_dir, **kwargs)
    assert (out_dir / "keep.txt").exists()

    export_merged_model(tiny_base_dir, tiny_adapter_sources["mlp-r2"], out_dir, overwrite=True, **kwargs)
    assert not (out_dir / "keep.txt").exists() and (out_dir / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
