"""CPU Linear layers (fp32 and bf16 weights) on every ISA level against numpy."""

import numpy as np
import pytest

from flashpage import _core
from test_cpu_attention import from_bf16_bits, to_bf16_bits


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 96, 64), (3, 70, 37), (5, 33, 128), (8, 130, 576)])
@pytest.mark.parametrize("bf16", [False, True])
def test_linear_matches_numpy(M, N, K, bf16):
    rng = np.random.default_rng(M * 1000 + N)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    wk = to_bf16_bits(w) if bf16 else w
    wf = from_bf16_bits(wk) if bf16 else w
    want = x.astype(np.float64) @ wf.astype(np.float64).T + bias
    for isa in ["ref", *_core.cpu_supported_isas()]:
        for parallel in (False, True):
            got = _core.linear(isa, x, wk, bias, parallel)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.sqrt(K), err_msg=isa)
    np.testing.assert_allclose(_core.linear("avx2", x, wk), want - bias, rtol=1e-4, atol=1e-4 * np.sqrt(K))


def test_linear_rejects_bad_shapes():
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="same K"):
        _core.linear("ref", x, np.zeros((4, 7), np.float32))
    with pytest.raises(ValueError, match="bias must be"):
        _core.linear("ref", x, np.zeros((4, 8), np.float32), np.zeros(3, np.float32))
    assert _core.num_threads() >= 1
