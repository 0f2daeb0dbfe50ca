"""The C ABI of libflashpage_cuda is one table (cpp/src/runtime/cuda_abi.h): flashpage.cuda_ops'
ctypes mirror of it must match the header entry by entry (name, order, return and argument
types), and every entry the facade calls must exist. Runs without a GPU."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

from flashpage import cuda_ops

HEADER = Path(__file__).resolve().parents[1] / "cpp" / "src" / "runtime" / "cuda_abi.h"
C_TYPES = {"int": ctypes.c_int, "float": ctypes.c_float, "int64_t": ctypes.c_int64, "size_t": ctypes.c_size_t,
           "uint32_t": ctypes.c_uint32, "int*": ctypes.POINTER(ctypes.c_int)}


def _ctype(decl: str):
    """A C parameter declaration ("const int32_t* slot_mapping") as its ctypes type."""
    decl = re.sub(r"\bconst\b", "", decl).strip()
    base = decl.split()[0].rstrip("*")
    pointer = "*" in decl
    if pointer:
        return C_TYPES["int*"] if base == "int" else ctypes.c_void_p
    assert base in C_TYPES, decl
    return C_TYPES[base]


def _header_table() -> tuple[int, list[tuple[str, object, list]]]:
    text = HEADER.read_text()
    version = int(re.search(r"#define FLASHPAGE_CUDA_ABI_VERSION (\d+)", text).group(1))
    body = re.search(r"struct flashpage_cuda_ops \{(.*?)\n\};", text, re.S).group(1)
    body = re.sub(r"//[^\n]*", "", body)
    entries = []
    for decl in (d.strip() for d in body.split(";") if d.strip()):
        m = re.match(r"^([\w]+)\s*\(\*(\w+)\)\((.*)\)$", " ".join(decl.split()), re.S)
        if m is None:
            assert re.match(r"^uint32_t (abi_version|size)$", decl), decl
            continue
        ret, name, args = m.groups()
        params = [] if args.strip() == "void" else [_ctype(a) for a in args.split(",")]
        entries.append((name, C_TYPES[ret], params))
    return version, entries


def _same(a, b) -> bool:
    if a is b:
        return True
    return hasattr(a, "_type_") and hasattr(b, "_type_") and a._type_ is b._type_ and \
        issubclass(a, ctypes._Pointer) == issubclass(b, ctypes._Pointer)


def test_the_facade_matches_the_header_entry_by_entry():
    version, header = _header_table()
    assert cuda_ops.ABI_VERSION == version
    assert [n for n, _, _ in cuda_ops.OPS_TABLE] == [n for n, _, _ in header]
    for (name, ret, args), (_, hret, hargs) in zip(cuda_ops.OPS_TABLE, header):
        assert _same(ret, hret), f"{name}: returns {ret}, the header says {hret}"
        assert len(args) == len(hargs), f"{name}: {len(args)} arguments, the header has {len(hargs)}"
        for k, (a, h) in enumerate(zip(args, hargs)):
            assert _same(a, h), f"{name}: argument {k} is {a}, the header says {h}"
    names = [f[0] for f in cuda_ops.CudaOps._fields_]
    assert names[:2] == ["abi_version", "size"] and ctypes.sizeof(cuda_ops.CudaOps) == 8 + 8 * len(header)


def test_every_entry_the_facade_calls_is_in_the_table():
    source = Path(cuda_ops.__file__).read_text()
    called = set(re.findall(r'_call\("(\w+)"', source)) | set(re.findall(r"_ops\(\)\.(\w+)\(", source)) \
        | set(re.findall(r'_quantize_per_token\([^)]*"(\w+)"\)', source))
    table = {n for n, _, _ in cuda_ops.OPS_TABLE}
    assert called and called <= table, called - table


def test_the_library_exports_one_symbol_and_the_loader_looks_up_only_it():
    loader = (HEADER.parent / "cuda_loader.cc").read_text()
    assert "FLASHPAGE_CUDA_GET_OPS" in loader and loader.count("dlsym(") == 1
    exports = []
    for cu in (HEADER.parents[3] / "cuda").glob("*.cu"):
        exports += re.findall(r"FLASHPAGE_EXPORT [^(]*?(\w+)\(", cu.read_text())
    assert exports == ["flashpage_cuda_get_ops"]


def test_the_built_library_serves_its_table_without_a_gpu():
    """Where pip built libflashpage_cuda (nvcc present), its table loads and the entries that
    need no device answer: the ABI itself is checked on CI's CPU machine."""
    import pytest

    from flashpage import _core

    path = Path(_core.cuda_info()["library_path"])
    if not path.is_file():
        pytest.skip(f"{path} was not built (no nvcc)")
    lib = ctypes.CDLL(str(path))
    get_ops = lib.flashpage_cuda_get_ops
    get_ops.restype = ctypes.POINTER(cuda_ops.CudaOps)
    ops = get_ops().contents
    assert ops.abi_version == cuda_ops.ABI_VERSION and ops.size == ctypes.sizeof(cuda_ops.CudaOps)
    count, err = ctypes.c_int(-1), ctypes.create_string_buffer(512)
    assert ops.device_count(ctypes.byref(count), err, 512) == 0 and count.value >= 0, err.value
    assert ops.w4a16_num_configs() > 0
    assert ops.fp8_linear_workspace(16, 4096) >= 0


def test_the_gpu_check_script_names_what_exists():
    """tools/gpu_check.sh runs on the device with minutes to spare: a renamed test file or
    benchmark must fail here, not there."""
    import importlib.util
    import subprocess

    root = HEADER.parents[3]
    script = root / "tools" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for test in re.findall(r"tests/\w+\.py", text):
        assert (root / test).is_file(), test
    for module in re.findall(r"-m (flashpage\.[\w.]+)", text):
        assert importlib.util.find_spec(module) is not None, module
