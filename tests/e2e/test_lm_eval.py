"""lm-eval's ``local-completions`` (loglikelihood through echo + logprobs) against a real server gives
the accuracy of lm-eval's own ``hf`` backend on the same model, within quantization noise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TASK = "loraplex_capitals_mc"
QUESTIONS = 24


def run_lm_eval(out: Path, *model: str) -> float:
    """Runs the lm-eval CLI on the local task (from the repo root, where its data path is relative)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "lm_eval", "run", *model,
        "--include_path", "tests/e2e/lm_eval_tasks", "--tasks", TASK, "--output_path", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    return results["results"][TASK]["acc,none"]


def test_local_completions_matches_the_hf_backend(server, default_model_dir, tmp_path):
    served = run_lm_eval(
        tmp_path / "served",
        "--model", "local-completions",
        "--model_args",
        f"model=SmolLM2-135M-Instruct,base_url={server['url']}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={default_model_dir},num_concurrent=4,max_retries=1",
    )  # fmt: skip
    reference = run_lm_eval(
        tmp_path / "hf",
        "--model", "hf", "--model_args", f"pretrained={default_model_dir},dtype=float32",
        "--device", "cpu", "--batch_size", "8",
    )  # fmt: skip
    assert served > 0.4  # far above chance (0.25): the logprobs are the model's
    assert abs(served - reference) <= 3 / QUESTIONS, (served, reference)  # NF4 vs fp32: a few flips
