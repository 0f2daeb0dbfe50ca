"""cpu_model's rounds: engines measured in turn, combined as medians (no engine is run here)."""

from flashpage.bench import cpu_model as cm

NAMES = cm.metrics([256])


def _result(scale: float) -> dict:
    return {m: 100.0 * scale for m in NAMES} | {"other_load_cores": 0.01 * scale}


def test_rounds_combine_as_medians_and_ratios_per_round():
    rounds = [
        {"flashpage": _result(1.0), "vllm": _result(1.0)},   # a slow minute for both
        {"flashpage": _result(2.0), "vllm": _result(1.0)},
        {"flashpage": _result(3.0), "vllm": _result(2.0)},
    ]
    combined, ratios = cm.combine_rounds(rounds, NAMES)
    assert combined["flashpage"]["prefill256"] == 200.0
    assert combined["vllm"]["decode"] == 100.0
    assert combined["flashpage"]["other_load_cores"] == 0.03  # the worst round's
    # The median of 1.0, 2.0, 1.5, not 200 / 100.
    assert ratios["vllm"]["batch32"] == 1.5


def test_rounds_skip_an_engine_where_it_was_unavailable():
    rounds = [
        {"flashpage": _result(1.0), "vllm": {"unavailable": "timed out"}},
        {"flashpage": _result(3.0), "vllm": _result(2.0)},
    ]
    combined, ratios = cm.combine_rounds(rounds, NAMES)
    assert combined["flashpage"]["prefill256"] == 200.0
    assert combined["vllm"]["prefill256"] == 200.0
    assert ratios["vllm"]["prefill256"] == 1.5  # only the round both completed
    lost = cm.combine_rounds([{"flashpage": _result(1.0), "vllm": {"unavailable": "no venv"}}], NAMES)
    assert lost[0]["vllm"] == {"unavailable": "no venv"} and lost[1] == {}


def test_table_prints_the_given_ratios():
    shape = cm.SHAPES["smollm2"]
    combined, ratios = cm.combine_rounds(
        [{"flashpage": _result(3.0), "vllm": _result(2.0)}, {"flashpage": _result(1.0), "vllm": _result(1.0)}], NAMES)
    text = cm.table(shape, 250.0, 900.0, [256], combined, ratios)
    last = text.splitlines()[-1]
    assert last.startswith("| flashpage / vLLM (bf16) | 1.25x | 1.25x")
    assert len(text.splitlines()) == 5  # header, rule, two engines, one ratio row
