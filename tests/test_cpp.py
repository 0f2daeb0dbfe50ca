"""Builds the C++ test executable (and the benchmark, and the CUDA backend when nvcc is there)
with CMake from this checkout, then runs it through ctest: the C++ suite is part of the test
command. The build directory is reused between runs."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cpp-tests"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def cpp_build() -> Path:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("cmake is required to build the C++ tests (pip install cmake)")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = run([cmake, "-S", str(ROOT), "-B", str(BUILD), *gen, "-DCMAKE_BUILD_TYPE=Release",
               "-DFLASHPAGE_TESTS=ON", "-DFLASHPAGE_BENCH=ON"])
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    jobs = str(os.cpu_count() or 2)
    build = run([cmake, "--build", str(BUILD), "-j", jobs])
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-5000:]
    return BUILD


def test_cpp_unit_tests_pass(cpp_build: Path):
    res = run(["ctest", "--test-dir", str(cpp_build), "--output-on-failure"])
    assert res.returncode == 0, res.stdout + res.stderr
    direct = run([str(cpp_build / "cpp" / "tests" / "test_core")])
    assert direct.returncode == 0 and " 0 failed" in direct.stdout, direct.stdout + direct.stderr


def test_cuda_backend_compiles_when_nvcc_is_present(cpp_build: Path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    lib = cpp_build / "cuda" / "libflashpage_cuda.so"
    assert lib.is_file()
    syms = run(["nm", "-D", "--defined-only", str(lib)]).stdout
    for name in ("flashpage_cuda_abi_version", "flashpage_cuda_device_count", "flashpage_cuda_axpy"):
        assert name in syms
