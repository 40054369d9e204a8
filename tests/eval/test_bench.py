"""stage=bench on the tiny model: every mode timed, HF and avglab agree, FLOPs and targets reported."""

import json

import pytest
from stage_config import compose_run
from transformers import LlamaConfig

from avglab.run import run
from avglab.tools.bench.flops import prefill_flops


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    ws = tmp_path_factory.mktemp("bench")
    fast = ["stage.repeats=1", "stage.warmup=0", "stage.inputs=1", "stage.max_new_tokens=2", "router.k=4"]
    cfg = compose_run(ws, f"{ws}/run", "stage=bench", *fast)
    result = run(cfg)
    return ws / "run", result


def test_bench_times_every_mode_on_the_same_weights(bench):
    run_dir, result = bench
    assert json.loads((run_dir / "bench.json").read_text())["modes"].keys() == result["modes"].keys()
    modes = result["modes"]
    expected = {"hf_generate", "avglab_full", "avglab_routed", "avglab_routed_full"}
    expected |= {f"avglab_fixed@{g}" for g in (4, 8, 16, 32)}
    assert set(modes) == expected
    assert result["hf_same_tokens"]  # HF generate and avglab at full granularity decode the same ids
    # the largest pinpoint (128x128) at full granularity: 64 global + 16x16 local + 16 newlines
    assert modes["avglab_full"]["visual_tokens"] == modes["hf_generate"]["visual_tokens"] == 336
    assert modes["avglab_routed_full"]["levels_chosen"] == [4]
    for name in ("avglab_fixed@4", "avglab_full"):
        for phase in ("vision_projector", "prefill", "decode_per_token", "end_to_end", "llm_forward"):
            assert modes[name][phase] > 0
    flops = [modes[f"avglab_fixed@{g}"]["flop_bound"] for g in (4, 8, 16, 32)]
    assert flops == sorted(flops, reverse=True) and flops[-1] > 1
    targets = {"full_vs_hf", "routing_share_when_finest", "pipeline_efficiency_worst_level"}
    assert set(result["targets"]) == targets
    assert 0 < result["router_flop_share"] < 1


def test_prefill_flops_count_linear_maps_and_causal_attention():
    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=10)  # fmt: skip
    # per token and layer: q,o 2*8*8 + k,v 2*8*4 -> 192 weights; MLP 3*8*16 = 384; x2 FLOPs
    linear = 2 * 3 * (192 + 384)
    attention = 2 * 2 * 8 * 3 * 4 / 2  # QK^T and AV over the 6 visible pairs of 3 tokens
    assert prefill_flops(config, 3) == 2 * (linear + attention) + 2 * 8 * 10
