"""stage=eval end to end on a tiny random model: batched accuracy, batch-1 latency, metric, TensorBoard."""

import json
from pathlib import Path

import pytest
from stage_config import compose_run

from avglab.cli import CONFIG_DIR
from avglab.eval.scoring import METRICS, benchmark_score
from avglab.run import run

SMALL = [
    "data.synth.n_train=8",
    "data.synth.n_val=4",
    "data.synth.n_test=7",  # 4 + 3: the last batch is smaller
    "stage.previous=null",  # random weights: no training needed to test the plumbing
    "stage.eval_batch_size=4",
    "stage.latency_samples=5",  # spans two batches
    "stage.max_new_tokens=3",
    "router=fixed",  # a learned router would need stage-4 weights (run.check_selector_loaded)
    "router.granularity=16",
]


def compose_cfg(workspace: Path, *overrides: str, small: bool = True):
    return compose_run(workspace, f"{workspace}/run", "stage=eval", *(SMALL if small else []), *overrides)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    ws = tmp_path_factory.mktemp("eval")
    return ws / "run", run(compose_cfg(ws))


def test_accuracy_is_batched_and_latency_is_timed_alone(evaluated):
    _, metrics = evaluated
    assert metrics["samples"] == 7
    protocol = metrics["latency_protocol"]
    assert protocol["batch_size"] == 1 and protocol["accuracy_batch_size"] == 4
    assert protocol["warmup_passes"] == 1
    assert metrics["latency_samples"] == 5 and "batch size 1" in metrics["latency_note"]
    assert set(metrics["latency_ms"]) == {"vision_projector", "selection", "prefill", "decode", "total"}
    assert metrics["batch1_agreement"] == 1.0  # alone, every timed sample answers as in its batch
    for fixed in metrics["fixed_levels"].values():
        assert fixed["latency_samples"] == 5 and fixed["batch1_agreement"] == 1.0


def test_results_carry_metric_tokens_and_fingerprint(evaluated):
    run_dir, metrics = evaluated
    assert metrics["benchmark"]["metric"] == "exact_match"  # synth has no data.metric
    assert 0.0 <= metrics["benchmark"]["score"] <= 1.0
    assert {"config_sha256", "versions"} <= set(metrics["fingerprint"])
    assert "newline" in metrics["token_counting"] and "per_grid" in metrics["token_counting"]
    finest = metrics["fixed_levels"]["fixed@64"]
    assert finest["visual_tokens_per_grid_mean"] == 64 and finest["per_grid_kept"] == 1.0
    assert metrics["fixed_levels"]["fixed@16"]["per_grid_kept"] == 0.25
    # first-layer counts include the newlines, so they exceed tiles x per-grid tokens
    assert finest["visual_tokens_mean"] > finest["visual_tokens_per_grid_mean"]
    records = [json.loads(x) for x in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert sum(r["latency_ms"] is not None for r in records) == 5


def test_tensorboard_gets_scalars_and_the_routing_figure(evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = evaluated
    assert (run_dir / "granularity_histogram.png").stat().st_size > 0
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    tags = ("accuracy", "exact_match", "latency_ms_total", "share_64", "visual_tokens_per_grid_mean")
    for tag in [f"eval/fixed/{t}" for t in tags] + ["eval/fixed@4/visual_tokens_per_grid_mean"]:
        assert tag in scalars
    assert "eval/granularity_histogram" in events.Tags()["images"]


def test_every_benchmark_config_names_a_known_metric(tmp_path):
    names = sorted(p.stem for p in Path(CONFIG_DIR, "data").glob("eval_*.yaml"))
    assert len(names) == 9
    for name in names:
        cfg = compose_cfg(tmp_path, f"data={name}", small=False)
        assert cfg.data.metric in METRICS, name


def test_unknown_metric_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="data.metric"):
        benchmark_score("bleu", [])


def record(prediction, answers, qtype="t", sample_id="x"):
    return {"prediction": prediction, "answers": answers, "question_type": qtype, "id": sample_id}


def test_scoring_uses_each_benchmarks_rule():
    ten = ["two"] * 2 + ["three"] * 8
    assert benchmark_score("vqa_accuracy", [record("2", ten)])["score"] == pytest.approx(0.6)
    assert benchmark_score("relaxed_accuracy", [record("10.4", ["10"])])["score"] == 1.0
    assert benchmark_score("option", [record("(B) cat", ["B"]), record("A", ["C"])])["score"] == 0.5
    pope = benchmark_score("pope", [record("Yes", ["yes"]), record("yes", ["no"]), record("no", ["no"])])
    assert pope["components"]["precision"] == 0.5 and pope["components"]["recall"] == 1.0
    mme = [
        record("yes", ["yes"], "existence", "img1.jpg#0"),
        record("no", ["no"], "existence", "img1.jpg#1"),
        record("yes", ["no"], "existence", "img2.jpg#0"),
        record("no", ["no"], "existence", "img2.jpg#1"),
    ]
    # accuracy 3/4, accuracy+ 1/2 (only img1 has both right): 100 * (0.75 + 0.5)
    assert benchmark_score("mme", mme)["score"] == pytest.approx(125.0)
