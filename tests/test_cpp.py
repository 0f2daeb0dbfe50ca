"""Builds the C++ test executable (and the benchmark, and the CUDA backend when nvcc is there)
with CMake from this checkout, then runs it through ctest: the C++ suite is part of the test
command. The build directory is reused between runs."""

import os
import re
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
    # The CUDA backend is compiled once, by the wheel build; the test below checks that one.
    cfg = run([cmake, "-S", str(ROOT), "-B", str(BUILD), *gen, "-DCMAKE_BUILD_TYPE=Release",
               "-DFLASHPAGE_TESTS=ON", "-DFLASHPAGE_BENCH=ON", "-DFLASHPAGE_CUDA=OFF"])
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


ASAN_BUILD = ROOT / "build" / "cpp-tests-asan"
# Any finding fails the run: ASan aborts on the first error (halt_on_error, the default, kept
# explicit), UBSan too (-fno-sanitize-recover=undefined in the build, halt_on_error here), leaks
# are reported at exit (detect_leaks) and use-after-return of stack frames is checked.
SANITIZER_ENV = {
    "ASAN_OPTIONS": "halt_on_error=1:abort_on_error=1:detect_leaks=1:detect_stack_use_after_return=1:"
                    "strict_string_checks=1:check_initialization_order=1:strict_init_order=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}
LSAN_UNAVAILABLE = ("LeakSanitizer has encountered a fatal error", "LeakSanitizer does not work under ptrace")


def run_sanitized(cmd: list[str], extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **SANITIZER_ENV, **(extra_env or {})}
    res = run(cmd, env=env)
    if res.returncode != 0 and any(m in res.stderr for m in LSAN_UNAVAILABLE):
        # LeakSanitizer stops the world with ptrace-like machinery; under a debugger, strace or
        # some container sandboxes it cannot run at all. Only then run without leak checking
        # (ASan's and UBSan's checks stay on), and say so.
        import warnings
        warnings.warn("LeakSanitizer cannot run here; sanitizer run without leak detection")
        env["ASAN_OPTIONS"] = env["ASAN_OPTIONS"].replace("detect_leaks=1", "detect_leaks=0")
        res = run(cmd, env=env)
    return res


def test_cpp_tests_pass_under_address_and_undefined_behavior_sanitizers():
    """The C++ core and test_core built with -fsanitize=address,undefined (FLASHPAGE_SANITIZE)
    in build/cpp-tests-asan: every test, then the engine tests again on each lower ISA level
    (the kernel tests already cover every level), with zero findings. About 50 s to build from
    scratch and 35 s to run on 2 cores."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("cmake is required to build the C++ tests (pip install cmake)")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = run([cmake, "-S", str(ROOT), "-B", str(ASAN_BUILD), *gen, "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
               "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1", "-DFLASHPAGE_SANITIZE=ON",
               "-DFLASHPAGE_TESTS=ON", "-DFLASHPAGE_BENCH=OFF", "-DFLASHPAGE_CUDA=OFF"])
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    build = run([cmake, "--build", str(ASAN_BUILD), "-j", str(os.cpu_count() or 2), "--target", "test_core"])
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-5000:]
    exe = str(ASAN_BUILD / "cpp" / "tests" / "test_core")
    res = run_sanitized([exe])
    assert res.returncode == 0 and " 0 failed" in res.stdout, res.stdout[-3000:] + res.stderr[-10000:]
    for isa in ("scalar", "avx2", "avx512", "avx512_bf16"):  # levels above the CPU's run its best
        res = run_sanitized([exe, "engine_"], {"FLASHPAGE_ISA": isa})
        assert res.returncode == 0 and " 0 failed" in res.stdout, isa + res.stdout[-3000:] + res.stderr[-10000:]


def test_cuda_backend_is_in_the_wheel_when_nvcc_is_present():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    import flashpage

    lib = Path(flashpage.__file__).resolve().parent / "libflashpage_cuda.so"
    assert lib.is_file(), "pip install . with nvcc on PATH must build libflashpage_cuda.so"
    syms = run(["nm", "-D", "--defined-only", str(lib)]).stdout
    # One export, the C ABI table's getter (cpp/src/runtime/cuda_abi.h); the entries are hidden.
    exported = sorted(set(re.findall(r"\b(flashpage_cuda_\w+)", syms)))
    assert exported == ["flashpage_cuda_get_ops"], exported
    # No dependency on CUDA runtime libraries: cudart is static, the driver is opened at run time.
    needed = run(["readelf", "-d", str(lib)]).stdout
    assert "libcudart" not in needed and "libcuda.so" not in needed


STORIES = ROOT.parent / "shared" / "models" / "stories260K"


def test_host_program_embeds_the_engine_through_find_package(cpp_build: Path, tmp_path: Path):
    """cpp/examples/ is a separate CMake project that finds the installed package
    (find_package(flashpage)) and generates with the C++ Engine, no Python involved."""
    prefix = tmp_path / "prefix"
    inst = run(["cmake", "--install", str(cpp_build), "--prefix", str(prefix)])
    assert inst.returncode == 0, inst.stdout + inst.stderr
    assert (prefix / "include" / "flashpage" / "engine.h").is_file()
    example = ROOT / "build" / "example"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = run(["cmake", "-S", str(ROOT / "cpp" / "examples"), "-B", str(example), *gen,
               f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release"])
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    build = run(["cmake", "--build", str(example)])
    assert build.returncode == 0, build.stdout[-5000:] + build.stderr[-5000:]
    exe = example / "generate"
    bad = run([str(exe), str(tmp_path), "1", "2"])
    assert bad.returncode == 1 and "config.json" in bad.stderr  # a clear error, not a crash
    if not STORIES.is_dir():
        pytest.skip("../shared/models/stories260K is not present")
    res = run([str(exe), str(STORIES), "--max-tokens", "24", "1", "403", "407", "261", "378"])
    assert res.returncode == 0, res.stderr
    tokens = [int(t) for t in res.stdout.split()]
    from flashpage import LLM, SamplingParams
    want = LLM(str(STORIES), kv_cache_memory_bytes=64 << 20).generate(
        {"prompt_token_ids": [1, 403, 407, 261, 378]}, SamplingParams(temperature=0, max_tokens=24))
    assert tokens == want[0].outputs[0].token_ids
    assert "process_start_to_first_token=" in res.stderr
