"""stage=bench with stage.compare_reduce: each reduction timed beside its FLOP bound."""

import json

from stage_config import compose_run

from avglab.run import run

COMPARE = "[{name:fastv,layer:1},{name:vtw,layer:1},prumerge_plus]"


def test_bench_times_each_reduction_beside_its_flop_bound(tmp_path, capsys):
    fast = ["stage.repeats=1", "stage.warmup=0", "stage.inputs=1", "stage.max_new_tokens=3", "router.k=4",
            "stage.tables_at=[2]", f"stage.compare_reduce={COMPARE}"]  # fmt: skip
    result = run(compose_run(tmp_path, f"{tmp_path}/run", "stage=bench", *fast))
    modes = result["reductions"]["modes"]
    assert list(modes) == ["none", "fastv(K=1,keep=0.5)", "vtw(K=1)", "prumerge_plus"]
    none, fastv, vtw = modes["none"], modes["fastv(K=1,keep=0.5)"], modes["vtw(K=1)"]
    assert none["flop_bound"] == 1.0 and none["prefill_speedup"] == 1.0
    text = none["llm_tokens_per_layer"][0] - none["visual_tokens"]
    assert fastv["llm_tokens_per_layer"] == [
        text + none["visual_tokens"],
        text + round(none["visual_tokens"] / 2),
    ]
    assert vtw["llm_tokens_per_layer"] == [text + none["visual_tokens"], text]
    assert 1.0 < fastv["flop_bound"] < vtw["flop_bound"]
    assert modes["prumerge_plus"]["visual_tokens"] < none["visual_tokens"]
    for row in modes.values():
        assert row["prefill"] > 0 and row["decode_per_token"] > 0 and row["efficiency"] > 0
    saved = json.loads((tmp_path / "run" / "bench.json").read_text())
    assert saved["reductions"]["settings"]["vtw(K=1)"] == {"name": "vtw", "layer": 1}
    assert "FLOP bound" in capsys.readouterr().out
