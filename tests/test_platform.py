"""The build's platform layer: run-time ISA dispatch of the CPU kernels, the CUDA backend's
optional loading, the CLI and the shipped benchmark binary."""

import os
import subprocess
import sys

import numpy as np
import pytest

import flashpage
from flashpage import _core


def test_isa_dispatch_reports_supported_levels():
    isas = _core.cpu_supported_isas()
    assert isas[0] == "scalar"
    # The best level is the highest, but for Intel's AVX512-BF16 without AMX (its vdpbf16ps is
    # slower than its FMAs): that stays at avx512.
    intel_bf16_only = isas[-1] == "avx512_bf16" and _core.cpu_features()["vendor"] == "GenuineIntel"
    assert _core.cpu_best_isa() == ("avx512" if intel_bf16_only else isas[-1])
    assert _core.cpu_isa() in isas
    # The levels follow the features CPUID and the OS grant (each level includes the ones below).
    f = _core.cpu_features()
    order = ["scalar", "avx2", "avx512", "avx512_bf16", "amx"]
    assert isas == order[:len(isas)]
    assert ("avx512" in isas) == f["avx512"]
    assert ("avx512_bf16" in isas) == (f["avx512"] and f["avx512_bf16"])
    assert ("amx" in isas) == (f["avx512"] and f["avx512_bf16"] and f["amx_bf16"])


def test_flashpage_isa_forces_a_level():
    for isa in _core.cpu_supported_isas():
        out = subprocess.run([sys.executable, "-c", "from flashpage import _core; print(_core.cpu_isa())"],
                             env={**os.environ, "FLASHPAGE_ISA": isa}, check=True, capture_output=True,
                             text=True).stdout.strip()
        assert out == isa
    higher = subprocess.run([sys.executable, "-c", "from flashpage import _core; print(_core.cpu_isa())"],
                            env={**os.environ, "FLASHPAGE_ISA": "amx"}, check=True, capture_output=True,
                            text=True).stdout.strip()
    assert higher == _core.cpu_supported_isas()[-1]  # never above what the CPU has


@pytest.mark.parametrize("dim", [1, 7, 64, 100, 576, 2048])
def test_rms_norm_matches_reference_on_every_isa(dim):
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((3, dim)).astype(np.float32)
    w = rng.standard_normal(dim).astype(np.float32)
    res = rng.standard_normal((3, dim)).astype(np.float32)
    want, want_res = _core.rms_norm("ref", x, res, w, 1e-5)
    # independent numpy check of the reference itself
    r = (res + x).astype(np.float64)
    np.testing.assert_allclose(want, r / np.sqrt((r * r).mean(-1, keepdims=True) + 1e-5) * w,
                               rtol=1e-5, atol=1e-5)
    for isa in _core.cpu_supported_isas():
        got, got_res = _core.rms_norm(isa, x, res, w, 1e-5)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got_res, want_res)
        plain, none = _core.rms_norm(isa, x, None, w, 1e-5)
        assert none is None
        np.testing.assert_allclose(plain, _core.rms_norm("ref", x, None, w, 1e-5)[0], rtol=1e-5, atol=1e-6)


def test_rms_norm_rejects_bad_shapes_and_isas():
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="weight"):
        _core.rms_norm("ref", x, None, np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="sse9"):
        _core.rms_norm("sse9", x, None, np.zeros(8, np.float32))


def test_cuda_backend_loads_only_with_a_gpu():
    info = _core.cuda_info()
    if not info["driver_found"]:
        assert not info["available"] and "driver" in info["reason"]
        assert not flashpage.cuda_available()
        with pytest.raises(RuntimeError, match="not available"):
            _core.cuda_axpy(2.0, [1.0], [1.0])
    else:
        assert info["available"] == (info["device_count"] > 0), info


@pytest.mark.skipif(not flashpage.cuda_available(), reason="needs a CUDA GPU")
def test_cuda_placeholder_kernel_runs_on_the_gpu():
    x = [float(i) for i in range(1000)]
    y = [1.0] * 1000
    assert _core.cuda_axpy(2.0, x, y) == [2.0 * i + 1.0 for i in range(1000)]
    with pytest.raises(ValueError, match="elements"):
        _core.cuda_axpy(1.0, [1.0], [1.0, 2.0])


def test_cli_info_and_bench_smoke():
    out = subprocess.run([sys.executable, "-m", "flashpage.cli", "info"], check=True,
                         capture_output=True, text=True).stdout
    assert '"cpu_isa"' in out
    bench = subprocess.run(
        [sys.executable, "-m", "flashpage.cli", "bench", "scheduler", "--seqs", "32",
         "--steps", "5", "--repeats", "1", "--json"], check=True, capture_output=True, text=True)
    assert '"us_per_step"' in bench.stdout
    bad = subprocess.run([sys.executable, "-m", "flashpage.cli", "bench", "scheduler", "--bogus"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
