"""`flashpage bench serve`: the metrics on synthetic records, the arrival process, the length
distributions, the SLO and rate parsers, bad input (one line, exit status 2), and a sweep at
two rates against a real `flashpage serve` of stories260K."""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics

import numpy as np
import pytest

from flashpage.bench.serve import carries_tokens, main
from flashpage.bench.serve_compare import free_port as _free_port
from flashpage.bench.serve_metrics import (BenchError, RequestRecord, compute_metrics, parse_rates, parse_slos,
                                           rate_from_json)
from flashpage.bench.serve_workload import (PRODUCTION_MU, PRODUCTION_SIGMA, LengthSpec, arrival_times,
                                            lognormal_quantile, load_vocab, make_prompts, rng_for)
from flashpage.bench.stats import percentile, summarize
from model_fixtures import STORIES


# ---- metrics --------------------------------------------------------------------------------

def test_percentile_interpolates_like_numpy():
    rng = np.random.default_rng(0)
    xs = rng.exponential(size=101).tolist()
    for q in (0, 50, 90, 95, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)
    assert summarize([1.0, 3.0], 1e3) == {"mean": 2000.0, "p50": 2000.0, "p90": 2800.0, "p95": 2900.0,
                                         "p99": 2980.0}


def _record(i: int, chunks: list[float], e2e: float, tokens: int, **kw) -> RequestRecord:
    return RequestRecord(index=i, prompt_len=10, max_tokens=tokens, chunk_times=chunks, e2e=e2e,
                         output_tokens=tokens, prompt_tokens=10, usage_reported=True, success=True, status=200, **kw)


def test_ttft_tpot_itl_e2e_and_goodput_from_records():
    a = _record(0, [0.1, 0.2, 0.3, 0.5], 0.5, 4)          # TTFT 100 ms, TPOT (500-100)/3 ms
    b = _record(1, [0.2, 0.6], 0.6, 5)                     # one chunk carried 4 tokens: one ITL gap
    c = _record(2, [0.05], 0.05, 1)                        # one token: no TPOT, no ITL
    bad = RequestRecord(index=3, prompt_len=10, max_tokens=4, status=400, error="HTTP 400: too long")
    m = compute_metrics([a, b, c, bad], duration=2.0, slos={"ttft": 150, "tpot": 120})
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["errors"] == {"HTTP 400: too long": 1}
    assert m["total_output_tokens"] == 10 and m["total_input_tokens"] == 30
    assert m["output_throughput"] == pytest.approx(5.0)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["total_token_throughput"] == pytest.approx(20.0)
    assert m["ttft_ms"]["mean"] == pytest.approx((100 + 200 + 50) / 3)
    assert m["ttft_ms"]["p50"] == pytest.approx(100)
    tpots = [400 / 3, 400 / 4]
    assert m["tpot_ms"]["mean"] == pytest.approx(sum(tpots) / 2)
    itls = [100, 100, 200, 400]
    assert m["itl_ms"]["mean"] == pytest.approx(sum(itls) / 4)
    assert m["itl_ms"]["p50"] == pytest.approx(150)
    assert m["e2e_ms"]["p99"] == pytest.approx(percentile([500, 600, 50], 99))
    # a: TTFT 100, TPOT 133 > 120 -> missed; b: TTFT 200 > 150 -> missed; c: met (no TPOT); bad: missed
    g = m["goodput"]
    assert g["good"] == 1 and g["requests_per_s"] == pytest.approx(0.5) and g["fraction"] == pytest.approx(0.25)
    assert compute_metrics([a], 1.0)["goodput"] is None


def test_record_round_trips_through_json():
    a = _record(0, [0.1, 0.2], 0.2, 2)
    d = json.loads(json.dumps(a.to_json()))
    assert d["ttft"] == pytest.approx(0.1) and d["tpot"] == pytest.approx(0.1)
    assert RequestRecord.from_json(d) == a


def test_which_stream_chunks_carry_tokens():
    assert carries_tokens({"text": "a", "finish_reason": None}, chat=False)
    assert carries_tokens({"text": "", "finish_reason": None}, chat=False)  # half a UTF-8 character
    assert carries_tokens({"text": "a", "finish_reason": "length"}, chat=False)
    assert not carries_tokens({"text": "", "finish_reason": "length"}, chat=False)
    assert not carries_tokens({"delta": {"role": "assistant", "content": ""}, "finish_reason": None}, chat=True)
    assert carries_tokens({"delta": {"content": "hi"}, "finish_reason": None}, chat=True)
    assert carries_tokens({"delta": {"reasoning_content": "hm"}, "finish_reason": None}, chat=True)
    assert not carries_tokens({"delta": {}, "finish_reason": "stop"}, chat=True)


# ---- workload -------------------------------------------------------------------------------

@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_arrivals_have_mean_gap_one_over_rate(burstiness):
    rate, n = 4.0, 20000
    times = arrival_times(n, rate, burstiness, rng_for(0, "arrivals"))
    assert times[0] == 0.0 and times == sorted(times)
    gaps = np.diff(times)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.04)
    # a gamma of shape k has a squared coefficient of variation of 1/k (1: Poisson)
    assert (gaps.std() / gaps.mean()) ** 2 == pytest.approx(1 / burstiness, rel=0.1)
    assert arrival_times(n, rate, burstiness, rng_for(0, "arrivals")) == times  # seeded
    assert arrival_times(5, math.inf, burstiness, rng_for(0, "arrivals")) == [0.0] * 5


def test_production_lengths_follow_the_trace_unclipped():
    # the fit: mean and p95 exact, p99 within 10 % of the trace's 4,100
    assert lognormal_quantile(PRODUCTION_MU, PRODUCTION_SIGMA, 0.95) == pytest.approx(2400)
    assert math.exp(PRODUCTION_MU + PRODUCTION_SIGMA ** 2 / 2) == pytest.approx(820)
    assert lognormal_quantile(PRODUCTION_MU, PRODUCTION_SIGMA, 0.99) == pytest.approx(4100, rel=0.1)
    spec = LengthSpec("production", input_len=1, output_len=64)
    lengths = [n for n, _ in spec.sample(100_000, rng_for(1, "lengths"))]
    assert statistics.fmean(lengths) == pytest.approx(820, rel=0.04)
    assert percentile(lengths, 95) == pytest.approx(2400, rel=0.05)
    assert percentile(lengths, 99) == pytest.approx(4100, rel=0.12)


def test_production_lengths_fit_the_context():
    spec = LengthSpec("production", input_len=1, output_len=128, range_ratio=0.5, max_model_len=2048)
    spec.validate()
    assert spec.production_scale() == pytest.approx((2048 - 192) / lognormal_quantile(PRODUCTION_MU, PRODUCTION_SIGMA,
                                                                                      0.99))
    pairs = spec.sample(20_000, rng_for(2, "lengths"))
    assert all(n_in >= 1 and 64 <= n_out <= 192 and n_in + n_out <= 2048 for n_in, n_out in pairs)
    # the shape is kept: p99 of the prompts sits near the room left for output, not everywhere at it
    ins = [n for n, _ in pairs]
    assert percentile(ins, 99) == pytest.approx(2048 - 192, rel=0.12)
    assert statistics.fmean(ins) < 0.3 * (2048 - 192)


def test_random_lengths_and_prompts():
    spec = LengthSpec("random", input_len=100, output_len=10, range_ratio=0.2, max_model_len=256)
    spec.validate()
    pairs = spec.sample(2000, rng_for(0, "p"))
    assert {n for n, _ in pairs} <= set(range(80, 121)) and {o for _, o in pairs} <= set(range(8, 13))
    assert min(n for n, _ in pairs) == 80 and max(n for n, _ in pairs) == 120
    vocab = load_vocab(STORIES, None) if os.path.isdir(STORIES) else load_vocab(None, 512)
    prompts = make_prompts(pairs, vocab, rng_for(0, "p"))
    assert [len(p) for p in prompts] == [n for n, _ in pairs]
    assert not {0, 1, 2} & {t for p in prompts for t in p}  # special ids stay out
    assert max(t for p in prompts for t in p) < 512
    assert make_prompts(pairs, vocab, rng_for(0, "p")) == prompts  # seeded
    with pytest.raises(BenchError, match="do not fit"):
        LengthSpec("random", input_len=240, output_len=10, range_ratio=0.1, max_model_len=256).validate()
    with pytest.raises(BenchError, match="--vocab-size"):
        load_vocab(None, None)


@pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")
def test_vocab_from_a_tokenizer_excludes_its_special_tokens():
    vocab = load_vocab(os.path.join(STORIES, "tokenizer.json"), None)
    assert vocab.size == 512 and vocab.special == {0, 1, 2}
    assert load_vocab(None, 1000).special == {0, 1, 2}


# ---- parsers and bad input ------------------------------------------------------------------

def test_slo_parser():
    assert parse_slos(["ttft:500", "tpot:100", "e2el:20000"]) == {"ttft": 500.0, "tpot": 100.0, "e2e": 20000.0}
    assert parse_slos(["E2E:1.5"]) == {"e2e": 1.5}
    assert parse_slos(None) == {}
    for bad, msg in [("ttft", "KEY:MILLISECONDS"), ("itl:5", "unknown SLO"), ("ttft:fast", "number"),
                     ("tpot:-1", "positive"), ("tpot:0", "positive")]:
        with pytest.raises(BenchError, match=msg):
            parse_slos([bad])


def test_rate_parser():
    assert parse_rates("0.5, 1,inf") == [0.5, 1.0, math.inf]
    assert rate_from_json("inf") == math.inf
    for bad in ("0", "-1", "fast", "1,,2", "nan"):
        with pytest.raises(BenchError):
            parse_rates(bad)


@pytest.mark.parametrize("argv, message", [
    (["--request-rate", "0"], "--request-rate must be > 0"),
    (["--request-rate", "1,-2"], "--request-rate must be > 0"),
    (["--goodput", "latency:5"], "unknown SLO 'latency'"),
    (["--num-prompts", "0"], "--num-prompts"),
    (["--burstiness", "0"], "--burstiness"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, capsys):
    assert main(["--port", str(_free_port()), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("flashpage bench serve: ")


def test_an_unreachable_server_is_one_line_and_status_2(capsys):
    from flashpage.cli import main as cli_main

    port = _free_port()  # nothing listens there
    assert cli_main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--vocab-size", "100"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the server at http://127.0.0.1:{port}/v1/models" in err and err.count("\n") == 1


def test_compare_refuses_files_that_are_not_results(tmp_path, capsys):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"hello": 1}))
    assert main(["--compare", str(path), str(path)]) == 2
    assert "is not a result of flashpage bench serve" in capsys.readouterr().err


# ---- end to end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stories_server():
    if not os.path.isdir(STORIES):
        pytest.skip("../shared/models/stories260K is not present")
    pytest.importorskip("httpx")
    from flashpage import LLM
    from flashpage.serving.server import start

    llm = LLM(STORIES, kv_cache_memory_bytes=64 << 20, max_model_len=256, verbose=False)
    args = argparse.Namespace(model=STORIES, host="127.0.0.1", port=_free_port(), grpc_port=0,
                              served_model_name="stories", api_key="k", max_waiting_requests=1024,
                              max_tokens_limit=None, max_body_bytes=64 << 10)
    servers = start(args, llm)
    yield f"http://127.0.0.1:{args.port}"
    servers.stop(drain_seconds=2)


def test_a_sweep_against_flashpage_serve(stories_server, tmp_path, capsys):
    try:
        import matplotlib  # noqa: F401
        plot = tmp_path / "sweep.png"
    except ImportError:
        plot = None
    out = tmp_path / "sweep.json"
    argv = ["--base-url", stories_server, "--api-key", "k", "--tokenizer", STORIES, "--request-rate", "20,inf",
            "--num-prompts", "5", "--input-len", "24", "--output-len", "8", "--range-ratio", "0.25",
            "--warmup", "1", "--goodput", "ttft:60000", "tpot:60000", "--label", "flashpage", "--seed", "3",
            "--result-json", str(out)] + (["--plot", str(plot)] if plot else [])
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "TTFT (ms)" in table and "goodput req/s" in table
    result = json.loads(out.read_text())
    assert result["schema"] == "flashpage-bench-serve/1" and result["label"] == "flashpage"
    assert result["server"]["model"] == "stories" and result["server"]["max_model_len"] == 256
    assert result["workload"]["vocab_size"] == 512 and result["workload"]["special_ids_excluded"] == [0, 1, 2]
    assert result["settings"]["request_rate"] == "20,inf" and "api_key" not in result["settings"]
    assert [r["request_rate"] for r in result["runs"]] == [20.0, "inf"]
    for run in result["runs"]:
        m = run["metrics"]
        assert (m["completed"], m["failed"]) == (5, 0)
        assert m["goodput"]["fraction"] == 1.0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(m[key]) == {"mean", "p50", "p90", "p95", "p99"} and m[key]["p50"] > 0
        assert m["output_throughput"] > 0 and m["duration_s"] > 0
        for req in run["requests"]:
            assert req["success"] and req["status"] == 200 and req["error"] == ""
            assert req["usage_reported"] and req["output_tokens"] == req["max_tokens"]
            assert 6 <= req["max_tokens"] <= 10 and 18 <= req["prompt_len"] <= 30
            assert req["prompt_tokens"] == req["prompt_len"]
            assert 1 <= len(req["chunk_times"]) <= req["output_tokens"]
            assert req["chunk_times"][0] == req["ttft"] and req["e2e"] >= req["chunk_times"][-1]
    sent = [r["prompt_len"] for run in result["runs"] for r in run["requests"]]
    assert len(set(sent)) > 1  # the range ratio varies the lengths
    if plot:
        assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"
    # the comparison of two results (here the same one twice)
    cmp_png = tmp_path / "cmp.png"
    assert main(["--compare", str(out), str(out), "--labels", "a,b"] + (["--plot", str(cmp_png)] if plot else [])) == 0
    text = capsys.readouterr().out
    assert "request rate 20 req/s" in text and "request rate inf req/s" in text and "1.00x" in text
    if plot:
        assert cmp_png.stat().st_size > 10_000


def test_a_wrong_api_key_is_one_line_and_status_2(stories_server, capsys):
    assert main(["--base-url", stories_server, "--api-key", "wrong", "--vocab-size", "500"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and err.count("\n") == 1


# ---- the side-by-side driver ----------------------------------------------------------------

def test_compare_driver_commands_and_env():
    from flashpage.bench import serve_compare as sc

    args = sc.build_parser().parse_args(["/m", "--max-model-len", "512", "--flashpage-args", "--max-num-seqs 8",
                                         "--vllm-args=--enforce-eager", "--vllm-env", "LD_PRELOAD=/x.so A=b"])
    cmd, _ = sc.server_command("flashpage", args, 1234)
    assert cmd[1:5] == ["-m", "flashpage.cli", "serve", "/m"] and cmd[-2:] == ["--max-num-seqs", "8"]
    assert "--max-model-len" in cmd and "512" in cmd and "1234" in cmd
    cmd, env = sc.server_command("vllm", args, 1234)
    assert cmd[:3] == [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[-1] == "--enforce-eager" and "bfloat16" in cmd
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4" and env["LD_PRELOAD"] == "/x.so" and env["A"] == "b"
    assert sc.main(["/m", "--vllm-env", "novalue"]) == 2
    assert sc.main(["/m", "--servers", "tgi"]) == 2


@pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")
def test_compare_driver_runs_flashpage_serve_and_stops_it(tmp_path):
    from flashpage.bench import serve_compare as sc

    assert sc.main([STORIES, "--servers", "flashpage", "--rates", "inf", "--num-prompts", "2", "--input-len", "8",
                    "--output-len", "4", "--max-model-len", "256", "--warmup", "0", "--startup-timeout", "120",
                    "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "flashpage.json").read_text())
    assert result["runs"][0]["metrics"]["completed"] == 2 and result["server_startup_s"] > 0
    assert set(result["machine"]["cpu_flags"]) >= {"avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"}
    assert result["server_command"][3:5] == ["serve", STORIES]
    assert "serving" in (tmp_path / "flashpage-server.log").read_text()
