"""experiments/embedded_default/seed_table.py: the core issue's routing figures from one evaluation."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "experiments" / "embedded_default" / "seed_table.py"
spec = importlib.util.spec_from_file_location("seed_table", SCRIPT)
seed_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_table)


def metrics(glance: dict, gaze: dict, accuracy: float = 0.88, reduction: float = 0.6) -> dict:
    return {
        "granularities": [4, 8, 16, 32, 64],
        "granularity_histogram_by_type": {"glance": glance, "gaze": gaze},
        "accuracy": accuracy,
        "token_reduction": reduction,
        "visual_tokens_mean": 100.0,
    }


def test_shares_count_the_two_coarsest_for_glance_and_the_finest_for_gaze():
    f = seed_table.routing_figures(metrics({"4": 80, "8": 10, "16": 10}, {"32": 1, "64": 9}), 88.0)
    assert (f["glance_coarse"], f["gaze_finest"], f["met"]) == (90.0, 90.0, True)


def test_each_figure_can_fail_on_its_own():
    good_glance, good_gaze = {"4": 9, "8": 1}, {"64": 10}
    assert not seed_table.routing_figures(metrics({"4": 8, "16": 2}, good_gaze), 88.0)["met"]
    assert not seed_table.routing_figures(metrics(good_glance, {"32": 2, "64": 8}), 88.0)["met"]
    assert not seed_table.routing_figures(metrics(good_glance, good_gaze, reduction=0.4), 88.0)["met"]
    assert not seed_table.routing_figures(metrics(good_glance, good_gaze, accuracy=0.868), 88.0)["met"]
    assert seed_table.routing_figures(metrics(good_glance, good_gaze, accuracy=0.87), 88.0)["met"]
