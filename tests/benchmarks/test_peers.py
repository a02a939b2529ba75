"""The peers benchmark's pure parts: build flags, command lines, request bodies, the table (no llama.cpp)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.http_client import request_body
from benchmarks.llama_cpp_build import cmake_flags, read_cpu_info
from benchmarks.llama_cpp_server import (
    LlamaServerFlags,
    convert_command,
    llama_cpp_request_body,
    server_command,
)
from benchmarks.peers_bench import WORKLOADS, PeerWorkload, peer_requests
from benchmarks.workload import BenchRequest

CPUINFO = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse avx avx2 fma f16c bmi2 avx512f amx_tile amx_int8
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse avx avx2 fma f16c bmi2 avx512f amx_tile amx_int8
"""


def test_cpu_info_reads_model_flags_and_cores():
    cpu = read_cpu_info(CPUINFO)
    assert (cpu.model_name, cpu.cores) == ("AMD EPYC 7B13", 2)
    assert {"avx2", "avx512f", "amx_tile"} <= cpu.flags
    assert "amx_tile" in cpu.isa_summary()


@pytest.mark.parametrize(
    "flags, on, off",
    [
        ({"avx", "avx2", "fma", "f16c"}, {"GGML_AVX2", "GGML_FMA"}, {"GGML_AVX512"}),
        ({"avx2", "avx512f", "avx512_vnni"}, {"GGML_AVX512", "GGML_AVX512_VNNI"}, {"GGML_FMA"}),
        (set(), set(), {"GGML_AVX", "GGML_AVX2"}),
    ],
)
def test_cmake_flags_follow_the_cpu_and_never_enable_amx(flags, on, off):
    args = cmake_flags(frozenset(flags | {"amx_tile", "amx_int8", "amx_bf16"}))
    assert "-DGGML_NATIVE=OFF" in args
    assert {f"-DGGML_AMX_{k}=OFF" for k in ("TILE", "INT8", "BF16")} <= set(args)
    assert not any(a.startswith("-DGGML_AMX") and a.endswith("=ON") for a in args)
    assert {f"-D{o}=ON" for o in on} <= set(args)
    assert {f"-D{o}=OFF" for o in off} <= set(args)


def test_convert_command_points_the_converter_at_the_base_config():
    cmd = convert_command(Path("/src"), Path("/base"), Path("/adapters/a0"), Path("/out/a0.gguf"))
    assert cmd[1] == "/src/convert_lora_to_gguf.py"
    assert cmd[cmd.index("--base") + 1] == "/base"
    assert cmd[cmd.index("--outfile") + 1] == "/out/a0.gguf"
    assert cmd[cmd.index("--outtype") + 1] == "f32"
    assert cmd[-1] == "/adapters/a0"


def test_server_loads_adapters_at_scale_zero_not_init_without_apply():
    ggufs = [Path("/c/a0.gguf"), Path("/c/a1.gguf")]
    cmd = server_command(Path("/bin/llama-server"), Path("/m.gguf"), ggufs, 8123, LlamaServerFlags())
    assert cmd[cmd.index("--lora-scaled") + 1] == "/c/a0.gguf:0.0,/c/a1.gguf:0.0"
    assert "--lora-init-without-apply" not in cmd
    assert cmd[cmd.index("-np") + 1] == "32" and cmd[cmd.index("-t") + 1] == "2"
    assert cmd[cmd.index("--port") + 1] == "8123"
    assert "--no-repack" not in cmd
    assert "--no-repack" in server_command(Path("/s"), Path("/m"), [], 1, LlamaServerFlags(no_repack=True))


def test_server_flags_name_the_bad_value():
    with pytest.raises(ValueError, match="llama-parallel"):
        LlamaServerFlags(parallel=0)


def test_request_bodies_select_the_adapter_each_server_s_way():
    req = BenchRequest(0, (1000, 1001), 16, "bench-003")
    ids = {"bench-000": 0, "bench-003": 3}
    ours, theirs = request_body(req), llama_cpp_request_body(req, ids)
    assert ours["adapter"] == "bench-003" and "lora" not in ours
    assert theirs["lora"] == [{"id": 3, "scale": 1.0}] and "adapter" not in theirs
    for body in (ours, theirs):
        assert body["prompt"] == [1000, 1001] and body["max_tokens"] == 16
        assert body["ignore_eos"] and body["stream"]
    base = BenchRequest(1, (5,), 16, None)
    assert "lora" not in llama_cpp_request_body(base, ids)  # global scales are 0.0: the base model


def test_workloads_round_robin_adapters_with_fixed_output_length():
    reqs = peer_requests(PeerWorkload("rr", 32, 8), 16, 32)
    assert [r.adapter for r in reqs[:9]] == [f"bench-{i % 8:03d}" for i in range(9)]
    assert {r.output_tokens for r in reqs} == {32}
    assert all(r.adapter is None for r in peer_requests(PeerWorkload("base", 1, 0), 4, 32))
    assert [w.concurrency for w in WORKLOADS] == [32, 32, 1, 1]


def _fake(tps: float, ttft: float) -> dict:
    return {"output_tokens_per_s": tps, "ttft_ms_p50": ttft, "ttft_ms_p99": 2 * ttft, "tpot_ms_p50": 10.0}


def test_peers_table_has_both_systems_and_their_ratio(tmp_path):
    workloads = ["w1", "w2"]
    results = {
        "llama.cpp": {"w1": _fake(200.0, 50.0), "w2": _fake(100.0, 20.0)},
        "loraplex": {"w1": _fake(100.0, 100.0), "w2": {**_fake(50.0, 0.0), "errors": 3}},
    }
    table = report.peers_table(results, workloads).splitlines()
    assert table[0] == "| workload | metric | llama.cpp | loraplex | loraplex / llama.cpp |"
    assert table[2] == "| w1 | out tok/s | 200 | 100 | 0.50 |"
    assert table[3] == "|  | TTFT p50 ms | 50 | 100 | 2.00 |"
    assert len(table) == 2 + 4 * len(workloads)
    assert "w2 (**3 failed requests**)" in table[6]
    report.plot_peers(tmp_path / "peers.png", results, workloads)
    assert (tmp_path / "peers.png").stat().st_size > 0


def test_ratio_is_missing_rather_than_infinite():
    assert report.ratio(1.0, 0.0) is None and report.ratio(None, 1.0) is None
    assert report.ratio(3.0, 2.0) == 1.5
