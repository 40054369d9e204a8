"""The printed result table: every column's unit in its header, shares in percent, "n/a" for no level."""

from avglab.eval.summary import format_table


def test_result_table_states_units_and_uses_one_scale():
    row = {
        "accuracy": 0.5,
        "accuracy_by_type": {"color": 0.75},
        "visual_tokens_mean": 10.0,
        "token_reduction": 0.5,
        "visual_tokens_per_grid_mean": None,
        "per_grid_kept": None,
        "latency_ms": {},
    }
    table = format_table({"focus_both": {**row, "benchmark": {"metric": "exact_match", "score": 0.5}}})
    head, _, line = table.splitlines()
    assert "accuracy (%)" in head and "exact_match (%)" in head and "vs full (%)" in head
    assert line.split(" | ")[1:4] == ["50.0", "50.0", "75.0"]  # accuracy and the benchmark share alike
    assert "| n/a |" in line  # no level chosen
    mme = format_table({"avg": {**row, "benchmark": {"metric": "mme", "score": 1500.0}}})
    assert "mme (points)" in mme and "| 1500 |" in mme  # MME's score is points, not a share
