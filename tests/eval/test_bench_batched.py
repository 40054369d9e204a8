"""Issue 19 in stage=bench: mixed-size routed batches with throughput, and the router variants' cost."""

import json

import pytest
from omegaconf.errors import ConfigKeyError
from stage_config import compose_run

from avglab.run import run

FAST = ["stage.repeats=1", "stage.warmup=0", "stage.inputs=1", "stage.max_new_tokens=3"]
FAST += ["stage.tables_at=[2]", "router.k=4"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    ws = tmp_path_factory.mktemp("bench19")
    variants = "stage.compare_routers=[{input_levels:[0,1,2]},{width:32}]"
    cfg = compose_run(
        ws, f"{ws}/run", "stage=bench", *FAST, "stage.batch_sizes=[1,5]", "stage.batch_mixed=true", variants
    )
    return ws / "run", run(cfg)


def test_mixed_batches_route_each_sample_and_report_throughput(bench):
    run_dir, result = bench
    assert json.loads((run_dir / "bench.json").read_text())["tables"] == result["tables"]
    batched = [t for t in result["tables"] if t["batch_size"] == 5]
    assert [t["max_new_tokens"] for t in batched] == [2, 3]
    modes = batched[-1]["modes"]
    assert set(modes) == {"hf_generate", "avglab_full", "avglab_routed", "avglab_routed_grouped"}
    # five AnyRes sizes in one batch: 3 to 4 tiles per image, and HF decodes what avglab full decodes
    assert batched[-1]["hf_same_tokens"]
    full, routed, grouped = modes["avglab_full"], modes["avglab_routed"], modes["avglab_routed_grouped"]
    assert full["batch_visual_tokens"] == modes["hf_generate"]["batch_visual_tokens"] > 5 * 200
    assert routed["batch_visual_tokens"] == grouped["batch_visual_tokens"] < full["batch_visual_tokens"]
    for row in (full, routed, grouped, modes["hf_generate"]):
        assert row["samples_per_s"] > 0 and row["visual_tokens_per_s"] > 0
    assert full["throughput_vs_full"] == 1.0
    # the bound is the FLOP ratio of the unpadded prompt sets, > 1 when the router saves tokens
    assert routed["flop_bound"] == grouped["flop_bound"] > 1
    assert "avglab_routed_grouped_throughput_vs_bound" in batched[-1]["targets"]
    assert "hf_decode_per_token" not in routed  # no HF loop at a mix of levels


def test_router_variants_are_timed_side_by_side(bench):
    rows = bench[1]["routers"]["modes"]
    assert list(rows) == ["none", "paper", "input_levels=[0, 1, 2]", "width=32"]
    paper, coarse, narrow = rows["paper"], rows["input_levels=[0, 1, 2]"], rows["width=32"]
    assert paper["seq_len"] == 4 + 8 + 16 + 32 + 64 + 4 and coarse["seq_len"] == 4 + 8 + 16 + 4
    assert narrow["parameters"] < paper["parameters"] / 4
    assert coarse["router_flops"] < paper["router_flops"] and narrow["router_flops"] < paper["router_flops"]
    assert rows["none"]["parameters"] == 0 and set(paper["routing_share"]) == {2, 3}


def test_a_misspelt_router_variant_fails(tmp_path):
    cfg = compose_run(tmp_path, f"{tmp_path}/run", "stage=bench", *FAST, "stage.compare_routers=[{widht:32}]")
    with pytest.raises(ConfigKeyError, match="widht"):
        run(cfg)
