"""``make gpu-check``: everything that needs a GPU, in one run of at most ~10 minutes, offline.

    .venv/bin/python -m benchmarks.gpu_check [--skip-bench] [--requests 128]

1. prints the GPU, torch, CUDA and Triton versions;
2. runs the GPU tests (``pytest -m gpu`` plus the Triton kernel tests, which run compiled on CUDA):
   kernels against a PyTorch reference, CUDA-graph replay against the eager step, a heterogeneous
   batch against each request alone on an NF4 base;
3. runs the engine benchmark (``benchmarks/engine_bench.py``, a short seeded workload over 8 random
   adapters on the default model), NF4 and unquantized bf16, each in its own process;
4. if ``vllm`` is importable, serves the same workload with the same adapters (bf16) on vLLM and
   prints loraplex's output tokens/s over vLLM's. Without vLLM it says so; that is not a failure.

Nothing is downloaded: the default model is the packaged one, adapters are written locally.

Exit codes: 0 all ran and passed; 1 a test or a benchmark failed; 3 no CUDA device here (nothing was
run: "no CUDA device: gpu-check needs a GPU").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NO_GPU_EXIT = 3
ROOT = Path(__file__).resolve().parents[1]
GPU_TESTS = ["tests/adapters/test_triton_lora.py", "tests/server/engine"]


def gpu_summary() -> str | None:
    """The device and versions, or None without a CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed (the PyTorch LoRA paths run)"
    props = torch.cuda.get_device_properties(0)
    return (
        f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}); "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton_version}"
    )


def run_step(name: str, command: list[str], timeout_s: float) -> tuple[bool, str]:
    """Runs one step in its own process (a clean GPU for each); returns (passed, its stdout)."""
    print(f"\n== {name}: {' '.join(command)}", flush=True)
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=ROOT, timeout=timeout_s, stdout=subprocess.PIPE, text=True, env=dict(os.environ)
        )
    except subprocess.TimeoutExpired as e:
        print(e.stdout or "", end="")
        print(f"== {name}: timed out after {timeout_s:.0f} s", flush=True)
        return False, ""
    print(done.stdout, end="")
    print(f"== {name}: {'ok' if done.returncode == 0 else 'FAILED'} in {time.monotonic() - started:.0f} s")
    return done.returncode == 0, done.stdout


def bench_result(stdout: str) -> dict | None:
    """The JSON line a benchmark step printed last (``RESULT {...}``)."""
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :]) if lines else None


def bench_loraplex(args: argparse.Namespace) -> None:
    """One engine_bench run on the GPU; prints ``RESULT {...}``."""
    from benchmarks import engine_bench

    bench_args = engine_bench.parse_args(
        [
            *("--adapters", str(args.adapters), "--requests", str(args.requests)),
            *("--concurrency", str(args.concurrency), "--quantization", args.quantization),
            *("--dtype", "bfloat16", "--device", "cuda"),
        ]
    )
    result, dtype = engine_bench.run(bench_args)
    print("RESULT " + json.dumps({**result, "quantization": args.quantization, "dtype": str(dtype)}))


def bench_vllm(args: argparse.Namespace) -> None:
    """The same workload and adapters on vLLM's offline engine (bf16); prints ``RESULT {...}``."""
    from vllm import LLM
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.lora.request import LoRARequest

    from adapters.base_model import resolve_base_model
    from benchmarks.adapter_factory import adapter_mix, write_random_adapter
    from benchmarks.workload import WorkloadSpec, adapter_name, make_workload

    model_dir = resolve_base_model(None)
    with tempfile.TemporaryDirectory(prefix="loraplex-gpu-check-") as folder:
        lora_ids: dict[str, LoRARequest] = {}
        for i in range(args.adapters):  # the same seeds as engine_bench: the same weights
            rank, targets = adapter_mix(i)
            path = write_random_adapter(model_dir, Path(folder) / adapter_name(i), rank, targets, seed=i)
            lora_ids[adapter_name(i)] = LoRARequest(adapter_name(i), i + 1, str(path))
        llm = LLM(
            model=str(model_dir),
            dtype="bfloat16",
            enable_lora=True,
            max_loras=max(args.adapters, 1),
            max_lora_rank=64,
            max_num_seqs=args.concurrency,
            gpu_memory_utilization=0.5,
        )
        requests = make_workload(WorkloadSpec(args.requests, args.adapters, seed=0))
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in requests]
        params = [
            VLLMSamplingParams(max_tokens=r.output_tokens, temperature=0.0, ignore_eos=True) for r in requests
        ]
        loras = [lora_ids[r.adapter] if r.adapter else None for r in requests]
        llm.generate(prompts[:4], params[:4], lora_request=loras[:4], use_tqdm=False)  # warm-up
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        wall = time.perf_counter() - started
    generated = sum(len(out.outputs[0].token_ids) for out in outputs)
    result = {
        "output_tokens": generated,
        "wall_s": round(wall, 2),
        "output_tokens_per_s": round(generated / wall, 1),
    }
    print("RESULT " + json.dumps(result))


def check(args: argparse.Namespace) -> int:
    summary = gpu_summary()
    if summary is None:
        print("no CUDA device: gpu-check needs a GPU (nothing was run)")
        return NO_GPU_EXIT
    print(summary, flush=True)
    me = [sys.executable, "-m", "benchmarks.gpu_check"]
    failures = []
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *GPU_TESTS]
    tests_ok, _ = run_step("GPU tests", tests, timeout_s=240)
    kernels = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", GPU_TESTS[0]]
    kernels_ok, _ = run_step("Triton kernel tests on CUDA", kernels, timeout_s=120)
    failures += [name for name, ok in (("GPU tests", tests_ok), ("kernel tests", kernels_ok)) if not ok]
    if not args.skip_bench:
        sizes = ["--requests", str(args.requests), "--adapters", str(args.adapters)]
        sizes += ["--concurrency", str(args.concurrency)]
        ours = {}
        for quantization in ("nf4", "none"):
            ok, out = run_step(
                f"loraplex {quantization}",
                [*me, "bench-loraplex", *sizes, "--quantization", quantization],
                120,
            )
            ours[quantization] = bench_result(out) if ok else None
            if not ok:
                failures.append(f"loraplex benchmark ({quantization})")
        if _vllm_importable():
            ok, out = run_step("vLLM", [*me, "bench-vllm", *sizes], timeout_s=180)
            theirs = bench_result(out) if ok else None
            if theirs is None:
                failures.append("vLLM benchmark")
            elif ours.get("none"):
                mine, vllm = ours["none"]["output_tokens_per_s"], theirs["output_tokens_per_s"]
                print(
                    f"\nbf16, same workload and adapters: loraplex {mine} tok/s, vLLM {vllm} tok/s: "
                    f"loraplex/vLLM = {mine / vllm:.2f}"
                )
        else:
            print("\nvLLM is not installed here: no comparison (not a failure)")
    print("\ngpu-check: " + ("all passed" if not failures else "FAILED: " + ", ".join(failures)))
    return 1 if failures else 0


def _vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", nargs="?", default="check", choices=["check", "bench-loraplex", "bench-vllm"])
    parser.add_argument("--skip-bench", action="store_true", help="run the GPU tests only")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    args = parser.parse_args(argv)
    if args.step == "bench-loraplex":
        bench_loraplex(args)
    elif args.step == "bench-vllm":
        bench_vllm(args)
    else:
        sys.exit(check(args))


if __name__ == "__main__":
    main()
