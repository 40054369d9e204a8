"""stage=bench on the tiny model: every mode timed, HF and avglab agree, FLOPs and targets reported."""

import json
import logging

import pytest
from stage_config import compose_run
from transformers import LlamaConfig

from avglab.run import run
from avglab.tools.bench.flops import prefill_flops
from avglab.tools.bench.inputs import bench_inputs
from avglab.tools.bench.runner import check_bench, decode_per_token, end_to_end
from avglab.tools.bench.timing import avglab_run, hf_inputs, hf_run
from avglab.training.build import build_core, saved_tokenizer


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    ws = tmp_path_factory.mktemp("bench")
    fast = ["stage.repeats=2", "stage.warmup=0", "stage.inputs=1", "stage.max_new_tokens=4", "router.k=4",
            "stage.tables_at=[2]", "stage.batch_sizes=[1,3]"]  # fmt: skip
    cfg = compose_run(ws, f"{ws}/run", "stage=bench", *fast)
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("avglab.tools.bench.runner")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        result = run(cfg)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return ws / "run", result, lines


def test_bench_shows_progress_with_an_eta(bench):
    repeats = [line for line in bench[2] if line.startswith("bench batch size 1, repeat")]
    assert [line.split(" (")[0] for line in repeats] == [
        "bench batch size 1, repeat 1/2",
        "bench batch size 1, repeat 2/2",
    ]
    assert repeats[0].endswith("ETA ?)") and "ETA ?" not in repeats[1]  # an estimate once a repeat is done


def test_bench_times_every_mode_on_the_same_weights(bench):
    run_dir, result, _ = bench
    assert json.loads((run_dir / "bench.json").read_text())["tables"] == result["tables"]
    tables = {(t["batch_size"], t["max_new_tokens"]): t for t in result["tables"]}
    assert list(tables) == [(1, 2), (1, 4), (3, 2), (3, 4)]  # one table per batch size and new-token count
    modes = tables[1, 4]["modes"]
    expected = {"hf_generate", "avglab_full", "avglab_routed", "avglab_routed_full"}
    expected |= {f"avglab_fixed@{g}" for g in (4, 8, 16, 32)}
    assert set(modes) == expected
    assert set(tables[3, 4]["modes"]) == {"hf_generate", "avglab_full"}  # batched: HF vs avglab full
    # HF generate and avglab at full granularity decode the same ids, alone and in a left-padded batch,
    # and HF's loop on avglab's prompt of every coarser level decodes what avglab decodes
    assert result["hf_same_tokens"] and all(t["hf_same_tokens"] for t in tables.values())
    # the largest pinpoint (128x128) at full granularity: 64 global + 16x16 local + 16 newlines
    assert modes["avglab_full"]["visual_tokens"] == modes["hf_generate"]["visual_tokens"] == 336
    assert modes["avglab_routed_full"]["levels_chosen"] == [4]
    for name in ("avglab_fixed@4", "avglab_full"):
        for phase in ("vision_projector", "prefill", "decode_per_token", "hf_decode_per_token", "end_to_end",
                      "llm_forward"):  # fmt: skip
            assert modes[name][phase] > 0
        assert (
            modes[name]["decode_vs_hf"]
            == modes[name]["hf_decode_per_token"] / modes[name]["decode_per_token"]
        )
    for table in tables.values():  # the same runs read at 2 and 4 tokens: more tokens take longer
        assert table["modes"]["avglab_full"]["end_to_end"] > table["modes"]["avglab_full"]["ttft"]
    assert (
        tables[1, 4]["modes"]["hf_generate"]["end_to_end"]
        > tables[1, 2]["modes"]["hf_generate"]["end_to_end"]
    )
    flops = [modes[f"avglab_fixed@{g}"]["flop_bound"] for g in (4, 8, 16, 32)]
    assert flops == sorted(flops, reverse=True) and flops[-1] > 1
    targets = {"full_vs_hf", "decode_vs_hf", "routing_share_when_finest", "pipeline_efficiency_worst_level"}
    assert set(tables[1, 4]["targets"]) == targets
    assert set(tables[3, 4]["targets"]) == {"full_vs_hf", "decode_vs_hf"}
    assert 0 < result["router_flop_share"] < 1


def test_hf_generate_decodes_past_the_models_eos_as_avglab_does(tmp_path):
    cfg = compose_run(tmp_path, f"{tmp_path}/run", "stage=bench")
    tokenizer, image_processor, core = build_core(cfg, saved_tokenizer(cfg, None))
    core.eval()
    batch = bench_inputs(cfg, tokenizer, image_processor, core.config.image_grid_pinpoints)[0]
    finest, pad = core.scaler.num_levels - 1, tokenizer.pad_token_id
    ours = avglab_run(core, batch, finest, 4, route=False)["tokens"]
    # the model's eos = the first token it answers: generate would stop there (its config fills eos in)
    core.llava.generation_config.eos_token_id = eos = ours[0][0]
    assert hf_run(core, hf_inputs(core, batch, pad), 4, pad)["tokens"] == ours
    assert core.llava.generation_config.eos_token_id == eos  # the model's config is left as it was


def test_tables_read_the_first_n_tokens_of_one_run():
    run_ = {"ttft": 10.0, "step_ms": [1.0, 2.0, 3.0, 6.0]}
    assert decode_per_token(run_, 3) == 1.5 and decode_per_token(run_, 5) == 3.0
    assert end_to_end(run_, 2) == 11.0 and end_to_end(run_, 5) == 22.0


@pytest.mark.parametrize(
    ("key", "value"),
    [("max_new_tokens", 1), ("tables_at", [1]), ("tables_at", [200]), ("batch_sizes", [0]), ("repeats", 0)],
)
def test_bench_config_errors_name_the_key(key, value):
    stage = {
        "repeats": 1,
        "inputs": 1,
        "warmup": 0,
        "max_new_tokens": 128,
        "tables_at": [8],
        "batch_sizes": [1],
    }
    check_bench(stage)
    with pytest.raises(ValueError, match=key):
        check_bench({**stage, key: value})


def test_prefill_flops_count_linear_maps_and_causal_attention():
    config = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=10)  # fmt: skip
    # per token and layer: q,o 2*8*8 + k,v 2*8*4 -> 192 weights; MLP 3*8*16 = 384; x2 FLOPs
    linear = 2 * 3 * (192 + 384)
    attention = 2 * 2 * 8 * 3 * 4 / 2  # QK^T and AV over the 6 visible pairs of 3 tokens
    assert prefill_flops(config, 3) == 2 * (linear + attention) + 2 * 8 * 10
