"""The comparison table and Pareto figure of experiments/baselines/ from the evaluations' metrics.json.

python experiments/baselines/collect.py --out experiments/baselines \
    stage2=<eval dir> stage3=<eval dir> random=<eval dir> focus=<eval dir> router_seed0=<dir> ...

Each ``tag=dir`` contributes every row of that evaluation (selector, fixed levels, reductions), named
``tag: row``; the router seeds are summarised as mean and range.
"""

import argparse
import json
from pathlib import Path

from avglab.reduce.report import format_cost_table, pareto_figure


def rows_of(tag: str, folder: Path) -> dict[str, dict]:
    """One evaluation's rows (selector, fixed levels, reductions) as ``tag: row``; a seed's selector only."""
    m = json.loads((folder / "metrics.json").read_text())
    rows = {f"{tag}: {m['selector']}": m}
    if tag.startswith("router_seed"):
        return rows
    rows.update({f"{tag}: {k}": v for k, v in m.get("fixed_levels", {}).items()})
    rows.update({f"{tag}: {k}": v for k, v in m.get("reductions", {}).items()})
    return rows


def main() -> None:
    """Reads the ``tag=dir`` evaluations, writes ``table.md`` and ``pareto.png`` into ``--out``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("runs", nargs="+", help="tag=eval run dir")
    args = parser.parse_args()
    rows: dict[str, dict] = {}
    for item in args.runs:
        tag, folder = item.split("=", 1)
        rows.update(rows_of(tag, Path(folder)))
    seeds = {k: v for k, v in rows.items() if k.startswith("router_seed")}
    table = format_cost_table(rows)
    if len(seeds) > 1:
        acc = [100 * v["accuracy"] for v in seeds.values()]
        flops = [100 * v["prefill_flops_relative"] for v in seeds.values()]
        table += (
            f"\n\nrouter over {len(seeds)} stage-4 seeds: accuracy {sum(acc) / len(acc):.1f} "
            f"({min(acc):.1f}-{max(acc):.1f}), prefill FLOPs {sum(flops) / len(flops):.1f}% "
            f"({min(flops):.1f}-{max(flops):.1f})"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(table + "\n")
    shown = {k.replace("none+", "").replace("fixed@", "@"): v for k, v in rows.items()}
    pareto_figure(shown, "embedded default: accuracy vs LLM prefill FLOPs").savefig(
        args.out / "pareto.png", dpi=110
    )
    print(table)


if __name__ == "__main__":
    main()
