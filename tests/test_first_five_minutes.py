"""A new user's first commands, and a vLLM user's habits: the model that ships in the wheel,
vLLM's LLM(...) arguments and server flags, and CLI errors of one readable line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from flashpage import LLM, SamplingParams
from flashpage.models import EMBEDDED_MODEL, embedded_model_path, resolve_model
from model_fixtures import SHARED, STORIES

GREEDY = SamplingParams(temperature=0, max_tokens=12)
LILY = ", there was a little girl named Lily"  # transformers' greedy continuation (models/README.md)
SMOLLM_GGUF = os.path.join(SHARED, "models", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf")


def _cli(*args: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashpage.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, cwd=cwd)


def test_the_wheel_carries_a_model_and_its_licence():
    path = embedded_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "LICENSE"):
        assert os.path.isfile(os.path.join(path, name)), f"the package lacks {EMBEDDED_MODEL}/{name}"
    assert "MIT License" in open(os.path.join(path, "LICENSE")).read()
    import flashpage
    assert any(path.startswith(os.path.realpath(p)) or path.startswith(p) for p in flashpage.__path__)


def test_generate_with_no_model_tells_a_story_anywhere(tmp_path):
    run = _cli("generate", "Once upon a time", "--max-tokens", "12", cwd=str(tmp_path))  # no ../shared there
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(LILY)


def test_llm_without_a_model_and_by_the_embedded_name():
    for llm in (LLM(verbose=False), LLM(EMBEDDED_MODEL, verbose=False)):
        assert llm.generate("Once upon a time", GREEDY, use_tqdm=False)[0].outputs[0].text.startswith(LILY)


def test_a_vllm_style_call_runs_unchanged():
    llm = LLM(model=STORIES, tokenizer=None, tensor_parallel_size=1, gpu_memory_utilization=0.5, device="cpu",
              quantization=None, enforce_eager=True, trust_remote_code=True, max_num_seqs=8, max_model_len=256,
              scheduling_policy="fcfs", seed=0, dtype="half", verbose=False)
    out = llm.generate(["Once upon a time"], GREEDY, use_tqdm=False)
    assert out[0].outputs[0].text.startswith(LILY)


@pytest.mark.parametrize("dtype", ["half", "float16", "float", "float32", "bfloat16", "auto"])
def test_every_vllm_dtype_name_loads(dtype):
    llm = LLM(STORIES, dtype=dtype, verbose=False)
    text = llm.generate("Once upon a time", GREEDY, use_tqdm=False)[0].outputs[0].text
    if dtype != "bfloat16":  # float16 / float / auto keep this fp32 checkpoint's values exactly
        assert text.startswith(LILY)


@pytest.mark.parametrize("name", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_parallelism_beyond_one_device_is_refused_by_name(name):
    with pytest.raises(ValueError, match=f"{name}=2: flashpage runs a model on one device"):
        LLM(STORIES, **{name: 2})


def test_quantization_is_checked_against_the_checkpoint():
    with pytest.raises(ValueError, match="quantization='awq', but .* is not quantized"):
        LLM(STORIES, quantization="awq")
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM(STORIES, quantization="bitsandbytes")
    if os.path.isfile(SMOLLM_GGUF):
        with pytest.raises(ValueError, match="quantization='gptq_marlin', but .* holds gguf-quantized weights"):
            LLM(SMOLLM_GGUF, quantization="gptq_marlin")
    LLM(STORIES, quantization="auto", verbose=False)
    LLM(STORIES, quantization="none", verbose=False)


def test_model_paths_people_get_wrong(tmp_path):
    assert resolve_model("") == resolve_model(None) == embedded_model_path()
    with pytest.raises(FileNotFoundError, match="looks like a Hugging Face Hub id.*huggingface-cli download"):
        resolve_model("meta-llama/Llama-3.2-1B-Instruct")
    with pytest.raises(FileNotFoundError, match="a file, not a model: pass the directory"):
        resolve_model(os.path.join(STORIES, "config.json"))
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        resolve_model(str(tmp_path / "x.gguf"))
    with pytest.raises(FileNotFoundError, match="no such directory or .gguf file"):
        resolve_model(str(tmp_path / "missing"))


@pytest.mark.parametrize("argv, message", [
    (["generate", "/no/such/model", "hi"], "/no/such/model: no such directory"),
    (["generate", "Qwen/Qwen3-0.6B", "hi"], "looks like a Hugging Face Hub id"),
    (["serve", "--model", "/no/such/model"], "/no/such/model: no such directory"),
    (["serve", STORIES, "--model", "/elsewhere"], "two models given"),
    (["generate", "hi", "-tp", "2"], "tensor_parallel_size=2"),
])
def test_cli_mistakes_print_one_line_and_exit_1(argv, message):
    run = _cli(*argv)
    assert run.returncode == 1, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith(f"flashpage {argv[0]}: error:"), run.stderr


def test_debug_shows_the_traceback():
    assert "Traceback" in _cli("--debug", "generate", "/no/such/model", "hi").stderr
    assert "Traceback" in _cli("generate", "/no/such/model", "hi", "--debug").stderr
    assert "Traceback" in _cli("generate", "/no/such/model", "hi", env={"FLASHPAGE_DEBUG": "1"}).stderr


def _serves(cmd: list[str]) -> None:
    """Starts a server with `cmd` (+ a free port), waits for /v1/models, stops it with SIGTERM."""
    import httpx
    from test_openai_server import _free_port, wait_healthy

    port = _free_port()
    proc = subprocess.Popen([*cmd, "--port", str(port), "--grpc-port", "0", "--kv-cache-memory-bytes",
                             str(16 << 20)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == [EMBEDDED_MODEL]  # the directory's name, both ways
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert proc.returncode == 0, proc.stderr.read()


@pytest.mark.parametrize("how", ["embedded", "--model", "vllm-module"])
def test_the_server_starts_the_ways_vllm_users_start_it(how):
    pytest.importorskip("httpx")
    cmd = {"embedded": [sys.executable, "-m", "flashpage.cli", "serve"],
           "--model": [sys.executable, "-m", "flashpage.cli", "serve", "--model", STORIES, "--dtype", "half"],
           "vllm-module": [sys.executable, "-m", "flashpage.entrypoints.openai.api_server", "--model", STORIES,
                           "--tensor-parallel-size", "1", "--trust-remote-code", "--enforce-eager"]}[how]
    _serves(cmd)
