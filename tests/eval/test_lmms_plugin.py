"""The lmms-eval model answers hand-built requests exactly as avglab's own evaluation path does."""

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from stage_config import compose_config

from avglab.data.collate import collate
from avglab.data.processor import SampleProcessor
from avglab.data.synth.generator import make_sample
from avglab.lmms.model import AvgLabLMM, parse_selector
from avglab.stages.evaluate import EvalStage
from avglab.training.build import build_core, synth_config


@dataclass
class Request:
    """What lmms-eval's ``Instance`` offers a simple model: ``.args``."""

    args: tuple


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    ws = tmp_path_factory.mktemp("lmms")
    cfg = compose_config(f"workspace={ws}", "router.k=4")
    torch.manual_seed(0)
    tokenizer, image_processor, core = build_core(cfg)
    return cfg, tokenizer, image_processor, core.eval()


def synth_doc(cfg, index):
    sample = make_sample(synth_config(cfg.data), "test", index)
    record = sample["json"]
    question = record["conversations"][0]["value"].removeprefix("<image>\n")
    return record, Image.open(io.BytesIO(sample["png"])).convert("RGB"), question


def test_generation_and_loglikelihood_match_avglabs_evaluation_path(parts):
    cfg, tokenizer, image_processor, core = parts
    record, image, question = synth_doc(cfg, 1)
    # avglab's path: the datamodule's processor + collate, then the eval stage's batched answer
    processor = SampleProcessor(tokenizer, image_processor, cfg.data.template, cfg.data.max_length)
    batch = collate([processor(record, image)], tokenizer.pad_token_id)
    stage = EvalStage(core, tokenizer, Path("."), "avg", compare_fixed=False, max_new_tokens=4)
    ours = stage.answer(batch, None)[0]

    plugin = AvgLabLMM.from_parts(core, tokenizer, image_processor, selector="router", max_new_tokens=4)
    plugin.task_dict = {"synth": {"test": {7: {"image": image}}}}
    visual = lambda doc: [doc["image"]]  # noqa: E731 - lmms-eval's doc_to_visual
    [generated] = plugin.generate_until([Request((question, {"until": []}, visual, 7, "synth", "test"))])
    assert generated.text == ours["prediction"]
    stats = plugin.request_stats[-1]
    assert stats["visual_tokens"] == ours["visual_tokens"] > 0
    assert stats["granularity"] == ours["granularity"]
    assert stats["visual_tokens_full"] == ours["visual_tokens_full"]
    # lmms-eval's token counts: the LLM's prompt (text and visual tokens), the generated tokens with EOS
    text_tokens = int(batch["prompt_attention_mask"].sum()) - 1  # the <image> placeholder is replaced
    assert generated.token_counts.input_tokens == stats["input_tokens"] == text_tokens + ours["visual_tokens"]
    answer_tokens = len(tokenizer.encode(ours["prediction"], add_special_tokens=False))
    assert 1 <= generated.token_counts.output_tokens == stats["output_tokens"] <= 4
    assert answer_tokens <= generated.token_counts.output_tokens

    answer = record["answers"][0]
    [(score, greedy)] = plugin.loglikelihood([Request((question, answer, visual, 7, "synth", "test"))])
    # avglab's scoring path on the same sample with its reference answer: per-token log-probs (Eq. 4's terms)
    out = core(batch)
    token_logprob, _ = core.answer_scores(core.hidden_states(out.spliced), out.spliced.labels)
    n = len(tokenizer.encode(" " + answer, add_special_tokens=False))
    assert 0 < n < len(token_logprob)  # the end-of-turn token is scored by avglab but not by lmms-eval
    torch.testing.assert_close(torch.tensor(score), token_logprob[:n].sum(), rtol=1e-5, atol=1e-5)
    assert score < 0 and greedy == (ours["prediction"].split()[:n] == answer.split())


def test_greedy_flag_is_true_for_the_models_own_answer(parts):
    cfg, tokenizer, image_processor, core = parts
    _, image, question = synth_doc(cfg, 2)
    plugin = AvgLabLMM.from_parts(core, tokenizer, image_processor, selector="16", max_new_tokens=2)
    plugin.task_dict = {"t": {"s": {0: image}}}
    [text] = [
        r.text for r in plugin.generate_until([Request((question, {}, lambda doc: [doc], 0, "t", "s"))])
    ]
    if not text:
        pytest.skip("the random model ended at once; nothing to score")
    [(_, greedy)] = plugin.loglikelihood([Request((question, text, lambda doc: [doc], 0, "t", "s"))])
    assert greedy and plugin.request_stats[-1]["granularity"] == 16


def test_batched_generation_requests_answer_as_single_ones(parts):
    cfg, tokenizer, image_processor, core = parts
    docs = [synth_doc(cfg, i) for i in range(3)]
    task = {"t": {"s": {i: img for i, (_, img, _) in enumerate(docs)}}}
    requests = [
        Request((q, {"max_new_tokens": 3}, lambda d: [d], i, "t", "s")) for i, (_, _, q) in enumerate(docs)
    ]
    answers = {}
    for size in (1, 3):
        plugin = AvgLabLMM.from_parts(core, tokenizer, image_processor, selector="full", batch_size=size)
        plugin.task_dict = task
        answers[size] = plugin.generate_until(requests)
    assert answers[1] == answers[3]  # text and token counts


def test_bad_selector_names_the_model_arg():
    with pytest.raises(ValueError, match="selector="):
        parse_selector("fine", [4, 8, 16])


def test_entry_point_is_declared_for_lmms_eval():
    text = Path(__file__).parents[2].joinpath("pyproject.toml").read_text()
    section = text.split('[project.entry-points."lmms_eval.models"]', 1)[1].split("\n[", 1)[0]
    assert 'avglab = "avglab.lmms.registration:manifest"' in section
    from avglab.lmms import registration

    assert registration.CLASS_PATH == f"{AvgLabLMM.__module__}.{AvgLabLMM.__name__}"


class Captured(AvgLabLMM):
    """Records the constructor kwargs instead of loading an export."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


def test_lmms_evals_own_batch_size_and_device_do_not_collide_with_model_args():
    # lmms-eval always hands its --batch_size (default 1), --max_batch_size and --device to the model
    cli = {"batch_size": 1, "max_batch_size": None, "device": "cpu"}
    plain = Captured.create_from_arg_string("pretrained=/x,selector=router", cli).kwargs
    assert plain == {"pretrained": "/x", "selector": "router", "batch_size": 1, "device": "cpu"}
    both = Captured.create_from_arg_string("pretrained=/x,batch_size=8", {**cli, "batch_size": "2"}).kwargs
    assert str(both["batch_size"]) == "8" and both["device"] == "cpu"  # model_args win, no TypeError


def test_batch_size_must_be_a_number(parts):
    _, tokenizer, image_processor, core = parts
    for bad in ("auto", "auto:4", "0"):
        with pytest.raises(ValueError, match="batch_size"):
            AvgLabLMM.from_parts(core, tokenizer, image_processor, batch_size=bad)


def test_batches_go_to_the_models_device(parts):
    cfg, tokenizer, image_processor, core = parts
    record, image, _ = synth_doc(cfg, 0)
    plugin = AvgLabLMM.from_parts(core, tokenizer, image_processor, selector="full")
    assert plugin.device == next(core.parameters()).device
    plugin.device = torch.device("meta")  # stands for an accelerator: every tensor must follow
    batch = plugin.batch([plugin.processor(record, image)])
    tensors = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    assert {"input_ids", "pixel_values", "image_sizes", "has_image"} <= set(tensors)
    assert all(v.device.type == "meta" for v in tensors.values())
    assert batch["ids"] == [record["id"]]  # lists stay as they are


def test_routing_and_token_counts_are_written_next_to_the_results(parts, tmp_path):
    cfg, tokenizer, image_processor, core = parts
    docs = [synth_doc(cfg, i) for i in range(3)]
    plugin = AvgLabLMM.from_parts(
        core,
        tokenizer,
        image_processor,
        selector="router",
        batch_size=2,
        max_new_tokens=3,
        stats_dir=tmp_path,
    )
    plugin.task_dict = {"t": {"s": {i: img for i, (_, img, _) in enumerate(docs)}}}
    results = plugin.generate_until(
        [Request((q, {}, lambda d: [d], i, "t", "s")) for i, (_, _, q) in enumerate(docs)]
    )
    lines = [json.loads(line) for line in (tmp_path / "avglab_requests.jsonl").read_text().splitlines()]
    assert [(x["task"], x["doc_id"], x["selector"]) for x in lines] == [("t", i, "router") for i in range(3)]
    assert [x["input_tokens"] for x in lines] == [r.token_counts.input_tokens for r in results]
    assert all(x["granularity"] in core.scaler.granularities and 0 < x["visual_tokens"] for x in lines)
    summary = json.loads((tmp_path / "avglab_summary.json").read_text())
    task = summary["by_task"]["t"]
    assert task["requests"] == 3 and sum(task["granularity_counts"].values()) == 3
    assert task["output_tokens"] == sum(r.token_counts.output_tokens for r in results)
    assert 0 < task["visual_token_share_of_full"] <= 1
