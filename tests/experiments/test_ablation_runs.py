"""Ablation configs compose to the intended rows; one job trains then evaluates; the cache is reused."""

import json
from pathlib import Path

import pytest
from stage_config import SMALL_SYNTH, compose_run

from avglab.cli import CONFIG_DIR
from avglab.eval.paper_tables import collect, table4
from avglab.run import run
from avglab.tools.report import write_report

ROWS = {  # ablation -> (stage output name, router kind, alpha, rank_weight, granularities)
    # RGLF rows take the tiny stage-4 recipe's alpha (0.5; the paper's 0.1 on other models)
    "full": ("rglf", "avg", 0.5, 1.0, [4, 8, 16, 32, 64]),
    "fixed": ("eval", "fixed", None, None, [4, 8, 16, 32, 64]),
    "random": ("eval", "random", None, None, [4, 8, 16, 32, 64]),
    "image_only": ("rglf", "image_only", 0.5, 1.0, [4, 8, 16, 32, 64]),
    "granularity_set": ("rglf", "avg", 0.5, 1.0, [4, 16, 64]),
    "gumbel": ("gumbel", "avg", None, None, [4, 8, 16, 32, 64]),
    "no_rank": ("rglf", "avg", 1.0, 0.0, [4, 8, 16, 32, 64]),
    "no_ce": ("rglf", "avg", 0.0, 1.0, [4, 8, 16, 32, 64]),
}
TINY = [*SMALL_SYNTH, "trainer.limit_val_batches=1"]


def cfg(workspace: Path, name: str, *overrides: str):
    return compose_run(workspace, f"{workspace}/runs/{name}", *TINY, *overrides)


def test_every_table4_row_has_a_config_and_composes_to_its_row(tmp_path):
    assert {p.stem for p in Path(CONFIG_DIR, "ablation").glob("*.yaml")} == set(ROWS)
    for row, (stage, kind, alpha, rank_weight, levels) in ROWS.items():
        c = cfg(tmp_path, row, "experiment=ablations", f"ablation={row}")
        assert (c.stage.name, c.router.kind, list(c.router.granularities)) == (stage, kind, levels), row
        assert (c.stage.get("alpha"), c.stage.get("rank_weight")) == (alpha, rank_weight), row
        assert c.eval_after.name == "eval" and c.eval_after.compare_fixed is False
        if stage != "eval":
            assert c.stage.max_steps == 300 and c.stage.batch_size == 16  # the tiny_<stage> recipe


@pytest.fixture(scope="module")
def stage3(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    for stage in ("pretrain", "multigran"):
        run(
            cfg(
                ws,
                stage,
                f"stage={stage}",
                "stage.max_steps=1",
                "stage.val_every=1",
                "stage.batch_size=4",
                "stage.previous=null" if stage == "pretrain" else "stage.previous=pretrain",
            )
        )
    return ws


def test_ablation_jobs_train_then_evaluate_and_the_report_reads_them(stage3):
    small = [
        "stage.max_steps=2",
        "stage.val_every=2",
        "stage.batch_size=4",
        "++stage.cache_train_samples=8",
        "++stage.cache_val_samples=4",
        "router.k=4",
    ]
    full = run(cfg(stage3, "full", "experiment=ablations", "ablation=full", *small))
    assert full["feedback_cache/train_built"] == 1.0
    assert json.loads((stage3 / "runs/full/eval/metrics.json").read_text())["samples"] == 6
    again = run(
        cfg(stage3, "k2", "experiment=ablations", "ablation=full", "router.k=2", "stage.alpha=0.5", *small)
    )
    assert again["feedback_cache/train_built"] == 0.0  # another k and alpha reuse the same feedback
    assert not (stage3 / "stages" / "rglf.json").exists()  # sweep members do not become the stage-4 output
    fixed = run(cfg(stage3, "fixed", "experiment=ablations", "ablation=fixed"))
    base = json.loads((stage3 / "stages" / "multigran.json").read_text())["path"]
    assert fixed["fingerprint"]["base_checkpoint"]["path"] == base
    assert full["eval"]["fingerprint"]["base_checkpoint"] == fixed["fingerprint"]["base_checkpoint"]
    runs, identity = collect([stage3 / "runs" / "full", stage3 / "runs" / "fixed"])
    assert {r.ablation for r in runs} == {None}  # no .hydra here: rows come from a multirun's choices
    assert identity["base_path"] == base and "| " in table4(runs)
    # the report on these real evaluations: accuracy against prefill FLOPs of every evaluated mode
    written = write_report([stage3 / "runs" / "full", stage3 / "runs" / "fixed"], stage3 / "report", False)
    assert "pareto_prefill_flops.png" in written["figures"]
    tables = (stage3 / "report" / "tables.md").read_text()
    flops = tables.split("### Accuracy against prefill FLOPs")[1].split("###")[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[-1][:-2] for line in flops.splitlines()[4:] if line}
    assert rows["fixed"] == "100.0" and float(rows["eval"]) < 100  # the routed run costs less than the finest
