"""A benchmark's own metric (``data.metric``) over evaluation records, with ``eval.benchmarks`` torchmetrics.

``data.metric`` names the rule lmms-eval scores that benchmark with (METHOD.md section 3); every
``conf/data/eval_*.yaml`` sets it, the embedded synth set uses ``exact_match``.
"""

from __future__ import annotations

from avglab.eval.benchmarks import ANLS, ExactMatch, MMEScore, POPEMetrics, RelaxedAccuracy, VQAAccuracy

# metric name -> (what the headline "score" is, how it is counted)
METRICS = {
    "exact_match": "share of exact matches (lowercase, punctuation removed; GQA)",
    "option": "share of correct option letters (ScienceQA, AI2D, MMBench)",
    "vqa_accuracy": "VQA accuracy, EvalAI normalisation, 10 leave-one-out subsets (TextVQA, VizWiz)",
    "anls": "average normalised Levenshtein similarity, 0 below 0.5 (DocVQA)",
    "relaxed_accuracy": "relaxed accuracy: numbers within 5% relative error, else exact (ChartQA)",
    "mme": "MME perception score (sum over 10 subtasks of 100 * (acc + acc+)); cognition in components",
    "pope": "POPE F1 with 'yes' positive; accuracy, precision, recall in components",
}


def check_metric(name: str) -> str:
    """Returns ``name`` or fails naming the config key and the choices."""
    if name not in METRICS:
        raise ValueError(f"data.metric={name!r}: choose one of {sorted(METRICS)}")
    return name


def mme_image_key(sample_id: str) -> str:
    """The image two MME questions share: the sample id up to an optional ``#<n>`` suffix.

    lmms-eval's MME ``question_id`` is the image path, so converting with ``--id-key question_id``
    gives both questions of an image the same key (the converter may append ``#<n>`` to repeats).
    """
    return sample_id.split("#", 1)[0]


def benchmark_score(name: str, records: list[dict]) -> dict:
    """Scores one selector's records with the benchmark's metric.

    Args:
        name: a key of ``METRICS``.
        records: per-sample dicts with ``prediction``, ``answers`` (list[str]), ``question_type``, ``id``.

    Returns:
        ``{"metric", "score", "components", "counted"}``; components holds every value the metric computes.
    """
    check_metric(name)
    predictions = [r["prediction"] for r in records]
    answers = [r["answers"] for r in records]
    if name in ("exact_match", "option"):
        metric = ExactMatch(mode="text" if name == "exact_match" else "option")
        metric.update(predictions, answers)
    elif name == "vqa_accuracy":
        metric = VQAAccuracy()
        metric.update(predictions, answers)
    elif name == "anls":
        metric = ANLS()
        metric.update(predictions, answers)
    elif name == "relaxed_accuracy":
        metric = RelaxedAccuracy()
        metric.update(predictions, answers)
    elif name == "pope":
        metric = POPEMetrics()
        metric.update(predictions, [a[0] for a in answers])
    else:  # mme
        images = {key: i for i, key in enumerate(dict.fromkeys(mme_image_key(r["id"]) for r in records))}
        metric = MMEScore(max_images=max(1, len(images)))
        metric.update(
            [images[mme_image_key(r["id"])] for r in records],
            [r["question_type"] for r in records],
            predictions,
            [a[0] for a in answers],
        )
    value = metric.compute()
    if isinstance(value, dict):
        components = {k: float(v) for k, v in value.items()}
        score = components["perception" if name == "mme" else "f1"]
    else:
        score, components = float(value), {}
    return {"metric": name, "score": score, "components": components, "counted": METRICS[name]}
