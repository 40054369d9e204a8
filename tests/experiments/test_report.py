"""``python -m avglab.tools.report``: tables and figures from multirun folders, and refusal to mix bases."""

import json

import pytest
from omegaconf import OmegaConf

from avglab.eval.paper_tables import MixedRunsError, collect, routing_share, routing_table, sweep, table4
from avglab.tools.report import main

BASE = {"path": "/ws/runs/multigran/x/model", "sha256": "a" * 64}


def write_job(
    folder,
    ablation,
    stage,
    router,
    accuracy,
    tokens,
    k=32,
    alpha=0.1,
    cost=0.0,
    scale="linear",
    base=BASE,
    test="t1",
):
    """A fake Hydra job: .hydra files, and an evaluation metrics.json (in eval/ after a fit)."""
    (folder / ".hydra").mkdir(parents=True)
    cfg = {
        "stage": {"name": stage, "alpha": alpha, "rank_weight": 1.0},
        "router": {"kind": router, "k": k, "token_cost": cost, "token_cost_scale": scale},
    }
    OmegaConf.save(OmegaConf.create(cfg), folder / ".hydra" / "config.yaml")
    OmegaConf.save(
        OmegaConf.create({"hydra": {"runtime": {"choices": {"ablation": ablation}}}}),
        folder / ".hydra" / "hydra.yaml",
    )
    out = folder / "eval" if stage != "eval" else folder
    out.mkdir(exist_ok=True)
    hist = {"glance": {"4": 3, "64": 1}, "gaze": {"4": 0, "64": 4}}
    metrics = {
        "accuracy": accuracy,
        "accuracy_by_type": {"glance": accuracy, "gaze": accuracy / 2},
        "visual_tokens_mean": tokens,
        "token_reduction": 1 - tokens / 250,
        "granularities": [4, 8, 16, 32, 64],
        "granularity_histogram_by_type": hist,
        "fingerprint": {"base_checkpoint": base, "data": "synth", "data_digest": {"test": test}},
    }
    if stage != "eval":  # newer evaluations: per-layer tokens, prefill FLOPs (older lack them)
        metrics |= {"visual_tokens_per_layer_mean": [tokens, tokens / 2], "prefill_flops_relative": 0.5}
        vtw = {"accuracy": 0.4 if ablation == "no_ce" else 0.5, "prefill_flops_relative": 0.55}
        metrics["reductions"] = {"none+vtw(K=1)": vtw | {"visual_tokens_per_layer_mean": [tokens, 0]}}
    (out / "metrics.json").write_text(json.dumps(metrics))
    record = {
        "question_type": "glance",
        "visual_tokens": tokens,
        "visual_tokens_full": 250,
        "correct": True,
        "latency_ms": {"total": tokens / 10},
    }
    (out / "predictions.jsonl").write_text(json.dumps(record) + "\n")


@pytest.fixture
def multirun(tmp_path):
    write_job(tmp_path / "0", "full", "rglf_cached", "avg", 0.8, 100)
    write_job(tmp_path / "1", "fixed", "eval", "fixed", 0.85, 250)
    write_job(tmp_path / "2", "no_ce", "rglf_cached", "avg", 0.7, 120, alpha=0.0)
    for i, k in enumerate((1, 4)):
        write_job(tmp_path / "k" / str(i), None, "rglf_cached", "avg", 0.6 + k / 100, 90, k=k)
    for i, cost in enumerate((0.001, 0.01)):
        write_job(
            tmp_path / "c" / str(i), None, "rglf_cached", "avg", 0.7 - cost, 80 - 1000 * cost, cost=cost
        )
    return tmp_path


def test_tables_and_sweeps_are_collected(multirun):
    runs, identity = collect([multirun])
    assert identity["base_sha256"] == "a" * 64 and len(runs) == 7
    text = table4(runs)
    assert text.index("AVG-LLaVA") < text.index("(a) fixed") < text.index("(g) w/o CE")
    assert "| AVG-LLaVA (RGLF) | 80.0 | 40.0 | 80.0 | 100.0 | 40.0 | 75.0 | 50.0 |" in text
    assert "| (a) fixed granularity | 85.0 | 42.5 | 85.0 | 250.0 | 100.0 | - | - |" in text
    assert [v for v, _ in sweep(runs, "k")] == [1, 4, 32]  # the full row joins every sweep
    assert [v for v, _ in sweep(runs, "alpha")] == [0.0, 0.1]
    assert [v for v, _ in sweep(runs, "token_cost")] == [0.0, 0.001, 0.01]


def test_a_cost_on_another_scale_is_not_a_point_of_the_token_cost_sweep(multirun):
    write_job(multirun / "c" / "log", None, "rglf_cached", "avg", 0.75, 60, cost=0.03, scale="log2")
    runs, _ = collect([multirun])
    assert [v for v, _ in sweep(runs, "token_cost")] == [0.0, 0.001, 0.01]


def test_report_writes_tables_figures_and_tensorboard(multirun, tmp_path):
    out = tmp_path / "report"
    assert main([str(multirun), "--out", str(out)]) == 0
    text = (out / "tables.md").read_text()
    assert (
        "Table 4" in text and "Table 3" in text and "sweep: k" in text and "| glance | 40.0% | 2.50x" in text
    )
    assert "### sweep: token_cost (router.token_cost_scale=linear)" in text
    flops = text.split("### Accuracy against prefill FLOPs")[1].split("###")[0]
    # the runs with prefill FLOPs (the fixed row's older evaluation has none), each run's reduction once
    assert "| AVG-LLaVA (RGLF) | 80.0 |" in flops and "| (a) fixed granularity |" not in flops
    assert flops.count("| none+vtw(K=1) | 50.0 |") == 1 and "| none+vtw(K=1) [2] | 40.0 |" in flops
    for png in (
        "fig5_routing.png",
        "fig6_k.png",
        "fig7_alpha.png",
        "pareto_token_cost.png",
        "pareto_prefill_flops.png",
    ):
        assert (out / png).stat().st_size > 0
    stale = out / "tensorboard" / "events.out.tfevents.0.old.0"
    stale.write_bytes(b"")
    assert main([str(multirun), "--out", str(out)]) == 0  # a rewritten report replaces its events
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0] != stale


def test_routing_shares_per_question_type_and_level(multirun, tmp_path):
    runs, _ = collect([multirun])
    full = next(r for r in runs if r.ablation == "full")
    assert routing_share(full) == {"gaze": [0, 0, 0, 0, 1.0], "glance": [0.75, 0, 0, 0, 0.25]}
    assert "| full | 4 / 8 / 16 / 32 / 64 | 0 / 0 / 0 / 0 / 100 | 75 / 0 / 0 / 0 / 25 |" in routing_table(
        [("full", full)]
    )
    out = tmp_path / "report"
    assert main([str(multirun), "--out", str(out)]) == 0
    text = (out / "tables.md").read_text()
    routing = text[text.index("### Routing") :]
    # Table 4 rows first, then each sweep's members; the full row is not repeated in the sweeps
    assert (
        routing.index("| AVG-LLaVA (RGLF) |")
        < routing.index("| k=1 |")
        < routing.index("| token_cost=0.01 |")
    )
    assert "| k=32 |" not in routing
    saved = json.loads((out / "runs.json").read_text())["runs"]
    assert all(r["granularity_histogram_by_type"]["glance"] == {"4": 3, "64": 1} for r in saved)


@pytest.mark.parametrize("what", ["base", "data"])
def test_report_refuses_to_mix_base_checkpoints_or_data(multirun, tmp_path, capsys, what):
    if what == "base":
        write_job(
            multirun / "9", "random", "eval", "random", 0.5, 130, base={"path": "/other", "sha256": "b" * 64}
        )
    else:
        write_job(multirun / "9", "random", "eval", "random", 0.5, 130, test="t2")
    with pytest.raises(MixedRunsError, match="base_sha256" if what == "base" else "test_sha256"):
        collect([multirun])
    assert main([str(multirun), "--out", str(tmp_path / "r")]) == 2
    assert "refusing to mix runs" in capsys.readouterr().err


def test_runs_without_a_base_checkpoint_record_are_refused(multirun):
    write_job(multirun / "9", "random", "eval", "random", 0.5, 130, base=None)
    with pytest.raises(MixedRunsError, match="records no base checkpoint"):
        collect([multirun])


def test_a_sweep_member_that_repeats_the_full_row_is_listed_not_doubled(multirun, tmp_path):
    # a token-cost member with the full row's settings (cost 0): a second run of the same point
    write_job(multirun / "c" / "2", None, "rglf_cached", "avg", 0.78, 101, cost=0.0)
    runs, _ = collect([multirun])
    points = sweep(runs, "token_cost")
    assert [v for v, _ in points] == [0.0, 0.001, 0.01]
    assert points[0][1].ablation == "full"  # the Table 4 row is the one shown
    assert [v for v, _ in sweep(runs, "k")] == [1, 4, 32]
    out = tmp_path / "report"
    assert main([str(multirun), "--out", str(out)]) == 0
    text = (out / "tables.md").read_text()
    assert "- token_cost=0.0: 2 runs with the same settings" in text and "78.0" in text
