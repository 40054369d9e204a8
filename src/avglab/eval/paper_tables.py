"""Multirun outputs -> the rows of the paper's Tables 3 and 4 and the k / alpha / token-cost sweeps.

A run is one evaluation ``metrics.json`` (the eval stage's format) found under the given folders:
``<job>/metrics.json`` of an eval job or ``<job>/eval/metrics.json`` of a train-then-evaluate job
(``eval_after``). What the job was (Table 4 row, k, alpha, ...) is read from the job's
``.hydra/`` files. Runs of different base checkpoints or test data are never mixed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, median

from omegaconf import OmegaConf

ROWS = {  # Table 4 in the paper's order: ablation config -> row label
    "full": "AVG-LLaVA (RGLF)",
    "fixed": "(a) fixed granularity",
    "random": "(b) random router",
    "image_only": "(c) image-only router input",
    "granularity_set": "(d) granularities {coarsest, middle, finest}",
    "gumbel": "(e) Gumbel-Softmax through the LMM loss",
    "no_rank": "(f) w/o ranking loss",
    "no_ce": "(g) w/o CE loss",
}
SWEEPS = ("k", "alpha", "token_cost")
DEFAULTS = {  # the paper's setting
    "k": 32,
    "alpha": 0.1,
    "token_cost": 0.0,
    "token_cost_scale": "linear",
    "rank_weight": 1.0,
}


class MixedRunsError(ValueError):
    """Runs from different base checkpoints or data sets were given to one report."""


@dataclass
class Run:
    """One evaluated job.

    Attributes:
        path: the job folder.
        metrics: its evaluation metrics.json.
        ablation: the ``ablation`` config chosen (None outside Table 4 rows).
        stage: the stage that produced the evaluated model (eval = nothing trained).
        router: router kind.
        params: k, alpha, token_cost, token_cost_scale, rank_weight, granularities of the job.
        predictions: per-sample records (predictions.jsonl), possibly empty.
    """

    path: Path
    metrics: dict
    ablation: str | None
    stage: str
    router: str
    params: dict
    predictions: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The Table 4 row label, else stage/router and parameters."""
        return ROWS.get(self.ablation or "", "") or f"{self.stage}/{self.router} {self.params}"


def find_metrics(folders: list[Path]) -> list[Path]:
    """Evaluation metrics.json files below the folders (train metrics.json files are skipped)."""
    found = []
    for folder in folders:
        if not Path(folder).exists():
            raise FileNotFoundError(f"{folder}: no such multirun or run folder")
        for path in sorted(Path(folder).rglob("metrics.json")):
            data = json.loads(path.read_text())
            if "accuracy" in data and "fingerprint" in data:
                found.append(path)
    if not found:
        raise FileNotFoundError(f"no evaluation metrics.json under {[str(f) for f in folders]}")
    return found


def job_folder(metrics_path: Path) -> Path:
    """The Hydra job folder of a metrics.json (the one holding ``.hydra/``)."""
    for folder in (metrics_path.parent, metrics_path.parent.parent):
        if (folder / ".hydra" / "config.yaml").is_file():
            return folder
    return metrics_path.parent


def load_run(metrics_path: Path) -> Run:
    """A :class:`Run` from a metrics.json and its job's ``.hydra`` files."""
    metrics = json.loads(metrics_path.read_text())
    job = job_folder(metrics_path)
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml") if (job / ".hydra").is_dir() else OmegaConf.create()
    hydra_file = job / ".hydra" / "hydra.yaml"
    choices = OmegaConf.load(hydra_file).hydra.runtime.choices if hydra_file.is_file() else {}

    def pick(key: str, default=None):
        try:
            value = OmegaConf.select(cfg, key, default=default, throw_on_resolution_failure=True)
        except Exception:  # an interpolation only Hydra can resolve: treat as unknown
            return default
        return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value

    kind = pick("router.kind", metrics.get("selector", "none"))
    params = {
        "k": 0 if kind == "image_only" else pick("router.k", DEFAULTS["k"]),
        "alpha": pick("stage.alpha", DEFAULTS["alpha"]),
        "token_cost": pick("router.token_cost", DEFAULTS["token_cost"]),
        "token_cost_scale": pick("router.token_cost_scale", DEFAULTS["token_cost_scale"]),
        "rank_weight": pick("stage.rank_weight", DEFAULTS["rank_weight"]),
        "granularities": metrics.get("granularities"),
    }
    predictions_file = metrics_path.parent / "predictions.jsonl"
    predictions = (
        [json.loads(line) for line in predictions_file.read_text().splitlines() if line.strip()]
        if predictions_file.is_file()
        else []
    )
    ablation = choices.get("ablation") if hasattr(choices, "get") else None
    return Run(job, metrics, ablation, pick("stage.name", "eval"), kind, params, predictions)


def check_same_base(runs: list[Run]) -> dict:
    """Refuses runs of different base checkpoints or test data; returns the shared identity.

    Raises:
        MixedRunsError: naming the differing runs and what differs.
    """

    def identity(run: Run) -> dict:
        prints = run.metrics["fingerprint"]
        base = prints.get("base_checkpoint") or {}
        digest = prints.get("data_digest") or {}
        if not base.get("sha256") or not digest.get("test"):
            raise MixedRunsError(
                f"{run.path}: metrics.json records no base checkpoint / test data digest (fingerprint."
                "base_checkpoint, fingerprint.data_digest); re-run it with this avglab version"
            )
        return {"base_sha256": base["sha256"], "data": prints.get("data"), "test_sha256": digest["test"]}

    first = identity(runs[0])
    for run in runs[1:]:
        other = identity(run)
        differs = [k for k in first if first[k] != other[k]]
        if differs:
            raise MixedRunsError(
                f"refusing to mix runs: {runs[0].path} and {run.path} differ in {differs} "
                f"({[first[k] for k in differs]} vs {[other[k] for k in differs]}); report them separately"
            )
    first["base_path"] = runs[0].metrics["fingerprint"]["base_checkpoint"].get("path")
    return first


def collect(folders: list[Path]) -> tuple[list[Run], dict]:
    """All evaluated runs under ``folders`` and their shared identity (see :func:`check_same_base`)."""
    runs = [load_run(p) for p in find_metrics([Path(f) for f in folders])]
    return runs, check_same_base(runs)


def pct(x: float) -> str:
    """A share as a percentage with one decimal."""
    return f"{100 * x:.1f}"


def table4(runs: list[Run]) -> str:
    """Markdown in the shape of the paper's Table 4: one row per ablation, accuracy per question type."""
    rows = {r.ablation: r for r in runs if r.ablation in ROWS}
    types = sorted({t for r in rows.values() for t in r.metrics["accuracy_by_type"]})
    head = ["method", "accuracy", *[f"acc {t}" for t in types], "visual tokens", "% of full"]
    # in-LLM pruning keeps the first layer's count: the mean over layers and the prefill FLOPs compare it
    head += ["visual tokens, mean over layers", "prefill FLOPs (% of finest)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, label in ROWS.items():
        if name not in rows:
            continue
        m = rows[name].metrics
        lines.append(
            "| "
            + " | ".join(
                [
                    label,
                    pct(m["accuracy"]),
                    *[pct(m["accuracy_by_type"].get(t, float("nan"))) for t in types],
                    f"{m['visual_tokens_mean']:.1f}",
                    pct(1 - m["token_reduction"]),
                    *layer_costs(m),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def layer_costs(metrics: dict) -> list[str]:
    """Visual tokens averaged over the LLM's layers and relative prefill FLOPs ("-" for older runs)."""
    per_layer, flops = metrics.get("visual_tokens_per_layer_mean"), metrics.get("prefill_flops_relative")
    return [
        f"{sum(per_layer) / len(per_layer):.1f}" if per_layer else "-",
        pct(flops) if flops is not None else "-",
    ]


def per_type(run: Run) -> dict[str, dict]:
    """Tokens kept, median latency and accuracy per question type (and "all") from predictions."""
    groups: dict[str, list[dict]] = {"all": run.predictions}
    for p in run.predictions:
        groups.setdefault(p["question_type"], []).append(p)
    out = {}
    for name, recs in groups.items():
        if not recs:
            continue
        full = mean(p["visual_tokens_full"] for p in recs)
        timed = [p["latency_ms"]["total"] for p in recs if p.get("latency_ms")]  # latency_samples only
        out[name] = {
            "tokens_kept": mean(p["visual_tokens"] for p in recs) / full if full else float("nan"),
            "latency_ms": median(timed) if timed else None,
            "latency_samples": len(timed),
            "accuracy": mean(bool(p["correct"]) for p in recs),
        }
    return out


def table3(runs: list[Run]) -> str:
    """Markdown in the shape of the paper's Table 3: visual tokens kept and speed vs the full model.

    Rows are question types (our "benchmarks"); the speed baseline is the fixed-finest row
    (ablation=fixed, LLaVA-NeXT after stage 3), both measured at the eval stage's latency setting.
    """
    rows = {r.ablation: r for r in runs if r.ablation}
    if "full" not in rows or not rows["full"].predictions:
        return "(Table 3 needs the ablation=full run with its predictions.jsonl)"
    ours = per_type(rows["full"])
    base = per_type(rows["fixed"]) if "fixed" in rows and rows["fixed"].predictions else {}
    lines = [
        "| question type | tokens kept (% of full) | speed vs fixed finest (timed samples) | accuracy "
        "| fixed-finest accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, m in ours.items():
        b = base.get(name)
        timed = b and b["latency_ms"] and m["latency_ms"]
        speed = f"{b['latency_ms'] / m['latency_ms']:.2f}x ({m['latency_samples']})" if timed else "n/a"
        lines.append(
            f"| {name} | {pct(m['tokens_kept'])}% | {speed} | {pct(m['accuracy'])} | "
            f"{pct(b['accuracy']) if b else 'n/a'} |"
        )
    return "\n".join(lines)


def base_params(runs: list[Run]) -> dict:
    """The setting sweeps vary around: the ablation=full run's, else the paper's defaults."""
    full = next((r for r in runs if r.ablation == "full"), None)
    return {k: full.params[k] for k in DEFAULTS} if full else dict(DEFAULTS)


def sweep_runs(runs: list[Run], name: str) -> dict[float, list[Run]]:
    """RGLF-trained runs that differ from the base setting in ``name`` only, grouped by its value.

    A value can have several runs: the Table 4 full row joins every sweep, and a sweep member can
    repeat the base setting (e.g. the recipe's token cost inside the token-cost sweep). The full row
    comes first in its group.
    """
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; choose from {SWEEPS}")
    base = base_params(runs)
    full_set = max((r.params["granularities"] or [] for r in runs), key=len, default=[])
    groups: dict[float, list[Run]] = {}
    for r in sorted(runs, key=lambda r: r.ablation != "full"):
        if not r.stage.startswith("rglf") or r.params["granularities"] != full_set:
            continue
        if all(r.params[k] == base[k] for k in DEFAULTS if k != name):
            groups.setdefault(r.params[name], []).append(r)
    return dict(sorted(groups.items()))


def first_runs(groups: dict[float, list[Run]]) -> list[tuple[float, Run]]:
    """One (value, run) per swept value: the first of each ``sweep_runs`` group, sorted by the value."""
    return [(value, group[0]) for value, group in groups.items()]


def sweep(runs: list[Run], name: str) -> list[tuple[float, Run]]:
    """One run per swept value of ``name`` (see ``sweep_runs``), sorted by the value."""
    return first_runs(sweep_runs(runs, name))


def repeats_note(groups: dict[float, list[Run]], name: str) -> str:
    """A line per value that has more than one run: which one the table shows and every accuracy."""
    lines = []
    for value, group in groups.items():
        if len(group) > 1:
            accs = ", ".join(f"{pct(r.metrics['accuracy'])} ({r.path})" for r in group)
            lines.append(
                f"- {name}={value}: {len(group)} runs with the same settings, shown the first: {accs}"
            )
    return "\n".join(lines)


def sweep_table(points: list[tuple[float, Run]], name: str) -> str:
    """Markdown: one row per swept value."""
    types = sorted({t for _, r in points for t in r.metrics["accuracy_by_type"]})
    head = [name, "accuracy", *[f"acc {t}" for t in types], "visual tokens", "% of full"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for value, r in points:
        m = r.metrics
        cells = [
            str(value),
            pct(m["accuracy"]),
            *[pct(m["accuracy_by_type"].get(t, float("nan"))) for t in types],
        ]
        cells += [f"{m['visual_tokens_mean']:.1f}", pct(1 - m["token_reduction"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def routing_share(run: Run) -> dict[str, list[float]]:
    """Share of each question type's samples routed to each granularity, coarsest first.

    Returns:
        question type -> one share per level of the run's granularity list (sums to 1).
    """
    levels = run.params["granularities"]  # the evaluation's own list (collect)
    out = {}
    for qtype, hist in sorted(run.metrics["granularity_histogram_by_type"].items()):
        total = sum(hist.values())
        out[qtype] = [hist.get(str(g), 0) / total if total else float("nan") for g in levels]
    return out


def routing_table(rows: list[tuple[str, Run]]) -> str:
    """Markdown: per labelled run, the % of each question type's samples at each granularity."""
    types = sorted({t for _, r in rows for t in r.metrics["granularity_histogram_by_type"]})
    head = ["run", "granularities", *[f"{t}: % per level" for t in types]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in rows:
        shares = routing_share(r)
        levels = r.params["granularities"]
        cells = [" / ".join(f"{100 * s:.0f}" for s in shares[t]) if t in shares else "n/a" for t in types]
        lines.append("| " + " | ".join([label, " / ".join(map(str, levels)), *cells]) + " |")
    return "\n".join(lines)
