"""stage=eval with reductions: rows beside the selector, costs, Pareto figure; reduce=none unchanged."""

import json

import pytest
from stage_config import compose_run

from avglab.run import run

SMALL = [
    "data.synth.n_train=8",
    "data.synth.n_val=4",
    "data.synth.n_test=6",
    "stage.previous=null",
    "stage.eval_batch_size=3",
    "stage.latency_samples=2",
    "stage.max_new_tokens=3",
    "stage.compare_fixed=false",
    "router=fixed",
    "router.granularity=64",
]
COMPARE = (
    "stage.compare_reduce=[{name:fastv,layer:2},{name:vtw,layer:2},"
    "{name:fastv,layer:1,keep:0.5},{name:vtw,layer:1},prumerge_plus]"
)


def evaluate(workspace, name, *overrides):
    run_dir = workspace / name
    metrics = run(compose_run(workspace, run_dir, "stage=eval", *SMALL, *overrides))
    predictions = [
        json.loads(x)["prediction"] for x in (run_dir / "predictions.jsonl").read_text().splitlines()
    ]
    return run_dir, metrics, predictions


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ws = tmp_path_factory.mktemp("reduce")
    return {
        "plain": evaluate(ws, "plain"),
        "compared": evaluate(ws, "compared", COMPARE),
        "configured": evaluate(ws, "configured", "reduce=vtw", "reduce.layer=2"),
    }


def test_reductions_are_rows_beside_the_selector_with_their_costs(runs):
    _, metrics, _ = runs["compared"]
    rows = metrics["reductions"]
    assert list(rows) == [
        "fixed+fastv(K=2,keep=0.5)",
        "fixed+vtw(K=2)",
        "fixed+fastv(K=1,keep=0.5)",
        "fixed+vtw(K=1)",
        "fixed+prumerge_plus",
    ]
    assert not set(rows) & set(metrics["fixed_levels"])
    assert rows["fixed+vtw(K=1)"]["settings"] == {"name": "vtw", "layer": 1}
    assert metrics["prefill_flops_relative"] == pytest.approx(1.0)  # the finest level itself
    for name in ("fixed+fastv(K=2,keep=0.5)", "fixed+vtw(K=2)"):  # after the last layer: nothing pruned
        for key in ("accuracy", "accuracy_by_type", "visual_tokens_per_layer_mean", "prefill_flops_relative"):
            assert rows[name][key] == metrics[key], (name, key)
    fastv, vtw = rows["fixed+fastv(K=1,keep=0.5)"], rows["fixed+vtw(K=1)"]
    layer1, layer2 = fastv["visual_tokens_per_layer_mean"]
    assert layer2 == pytest.approx(layer1 / 2, abs=0.5) and vtw["visual_tokens_per_layer_mean"][1] == 0
    assert 1.0 > fastv["prefill_flops_relative"] > vtw["prefill_flops_relative"]
    prumerge = rows["fixed+prumerge_plus"]
    assert (
        prumerge["visual_tokens_mean"] < metrics["visual_tokens_mean"] and prumerge["batch1_agreement"] == 1.0
    )


def test_pareto_figure_in_the_run_folder_and_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = runs["compared"]
    assert (run_dir / "pareto.png").stat().st_size > 0
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "eval/pareto" in events.Tags()["images"]
    assert "eval/fixed+vtw(K=1)/prefill_flops_relative" in events.Tags()["scalars"]
    assert not (runs["plain"][0] / "pareto.png").exists()  # reduce=none alone: outputs as before


def test_reduce_none_rows_are_unchanged_by_comparisons_and_by_a_no_op_reduction(runs):
    _, plain, answers = runs["plain"]
    assert plain["reduction"] == {"name": "none"} and plain["reductions"] == {}
    for name in ("compared", "configured"):
        _, metrics, predictions = runs[name]
        assert predictions == answers
        for key in (
            "accuracy",
            "accuracy_by_type",
            "visual_tokens_mean",
            "benchmark",
            "granularity_histogram",
        ):
            assert metrics[key] == plain[key], (name, key)
    assert runs["configured"][1]["reduction"] == {"name": "vtw", "layer": 2}
