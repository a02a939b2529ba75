"""The ``loraplex train`` / ``loraplex eval`` command lines: flags, errors that name them, exit codes."""

from __future__ import annotations

import pytest

from tests.training.toy_data import toy_rows, write_jsonl
from training import cli, eval_cli


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--data",
        "--eval-data",
        "--name",
        "--adapter-dir",
        "--epochs",
        "--max-steps",
        "--batch-size",
        "--grad-accum",
        "--lr",
        "--scheduler",
        "--warmup-ratio",
        "--warmup-steps",
        "--weight-decay",
        "--max-grad-norm",
        "--seed",
        "--max-seq-length",
        "--r",
        "--alpha",
        "--dropout",
        "--target-modules",
        "--layers",
        "--quantization",
        "--eval-steps",
        "--early-stopping-patience",
        "--resume-from",
        "--replay-data",
        "--ewc-lambda",
        "--register",
        "--api-key",
        "--overwrite",
    ):
        assert flag in text, flag


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--lr", "5"], "--lr"),
        (["--r", "0"], "--r"),
        (["--name", "../x"], "--name"),
        (["--eval-fraction", "1.5"], "--eval-fraction"),
        (["--ewc-lambda", "1"], "--ewc-lambda"),
        (["--api-key", "k"], "--api-key"),
        (["--register", "server:8000"], "--register"),
    ],
)
def test_bad_values_name_their_flag(tmp_path, capsys, extra, flag):
    data = write_jsonl(tmp_path / "d.jsonl", toy_rows(4))
    args = ["--data", str(data), "--name", "x", "--adapter-dir", str(tmp_path / "s"), *extra]
    assert cli.main(args) == cli.EXIT_BAD_INPUT
    assert f"error: {flag}:" in capsys.readouterr().err


def test_bad_data_is_refused_before_the_model_loads(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ["{oops", {"messages": [{"role": "user", "content": "hi"}]}])
    args = [
        "--data",
        str(data),
        "--name",
        "x",
        "--adapter-dir",
        str(tmp_path / "s"),
        "--base-model",
        "/nonexistent",
    ]
    assert cli.main(args) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "d.jsonl:1: malformed JSON" in err and "d.jsonl:2: the conversation has no assistant turn" in err


def test_train_then_eval_end_to_end(tmp_path, tiny_base_dir, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", toy_rows(24))
    store = tmp_path / "store"
    common = [
        "--adapter-dir",
        str(store),
        "--base-model",
        str(tiny_base_dir),
        "--quantization",
        "none",
        "--device",
        "cpu",
    ]
    status = cli.main(["--data", str(data), "--name", "toy", "--max-steps", "3", "--quiet", *common])
    assert status == 0 and (store / "toy" / "adapter_model.safetensors").is_file()
    assert "adapter 'toy' written to" in capsys.readouterr().out
    status = eval_cli.main(
        [
            "--data",
            str(data),
            "--adapter",
            "toy",
            "--limit",
            "4",
            "--max-tokens",
            "4",
            "--json-out",
            str(tmp_path / "e.json"),
            *common,
        ]
    )
    out = capsys.readouterr().out
    assert status == 0 and "exact_match" in out and "toy" in out and (tmp_path / "e.json").is_file()


def test_eval_uses_a_generate_function_handed_in(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", toy_rows(3))

    def generate(conversations, adapter, max_tokens):
        return ["X"] * len(conversations)

    assert eval_cli.main(["--data", str(data), "--adapter", "a"], generate=generate) == 0
    assert "exact_match" in capsys.readouterr().out
