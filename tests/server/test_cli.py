"""The `loraplex` command: serve's flags mirror the settings; export writes a loadable model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from server.cli import load_settings, main
from server.config import Settings


def test_serve_help_documents_every_setting_with_its_env_var():
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out
        assert "LORAPLEX_" + name.upper() in out.replace("\n", "").replace(" ", "")


def test_flags_beat_env_which_beats_config_file(tmp_path, monkeypatch):
    config = tmp_path / "loraplex.yaml"
    config.write_text("max_loaded_adapters: 3\nmax_n: 5\nport: 9001\n")
    monkeypatch.setenv("LORAPLEX_MAX_N", "6")
    settings = load_settings(["--config", str(config), "--port", "9002"])
    assert (settings.max_loaded_adapters, settings.max_n, settings.port) == (3, 6, 9002)
    assert settings.adapter_dir == settings.data_dir / "adapters"


@pytest.mark.parametrize(
    ("argv", "named"),
    [(["--max-loaded-adapters", "0"], "--max-loaded-adapters"), (["--port", "http"], "--port")],
)
def test_invalid_settings_fail_fast_naming_the_setting(argv, named):
    with pytest.raises(SystemExit) as info:
        load_settings(argv)
    assert named in str(info.value)


def test_export_writes_a_model_transformers_loads(tiny_base_dir, adapter_store_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exported"
    argv = [
        "export",
        "--adapter",
        "all-r8",
        "--out",
        str(out),
        "--dtype",
        "float32",
        "--quantization",
        "none",
        "--base-model",
        str(tiny_base_dir),
        "--adapter-dir",
        str(adapter_store_dir),
    ]
    assert main(argv) == 0
    exported = AutoModelForCausalLM.from_pretrained(out)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base_dir), adapter_store_dir / "all-r8"
    )
    ids = torch.tensor([[5, 9, 33, 70, 101]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_eval_runs_in_process_through_the_serving_engine(tiny_base_dir, adapter_store_dir, tmp_path, capsys):
    import json

    data = tmp_path / "test.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(3)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "scores.json"
    argv = [
        "eval",
        "--data",
        str(data),
        "--adapter",
        "attn-r4",
        "--base-model",
        str(tiny_base_dir),
        "--quantization",
        "none",
        "--adapter-dir",
        str(adapter_store_dir),
        "--max-tokens",
        "4",
        "--json-out",
        str(out),
    ]
    assert main(argv) == 0
    assert out.exists() and "exact" in capsys.readouterr().out.lower()
