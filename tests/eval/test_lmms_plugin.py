"""The lmms-eval model answers hand-built requests exactly as avglab's own evaluation path does."""

import io
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from stage_config import compose_config

from avglab.build import build_core, synth_config
from avglab.data.collate import collate
from avglab.data.processor import SampleProcessor
from avglab.data.synth import make_sample
from avglab.lmms.model import AvgLabLMM, parse_selector
from avglab.stages.evaluate import EvalStage


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
    generated = plugin.generate_until([Request((question, {"until": []}, visual, 7, "synth", "test"))])
    assert generated == [ours["prediction"]]
    assert plugin.request_stats[-1]["visual_tokens"] == ours["visual_tokens"] > 0

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
    [text] = plugin.generate_until([Request((question, {}, lambda doc: [doc], 0, "t", "s"))])
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
    assert answers[1] == answers[3]


def test_bad_selector_names_the_model_arg():
    with pytest.raises(ValueError, match="selector="):
        parse_selector("fine", [4, 8, 16])


def test_entry_point_is_declared_for_lmms_eval():
    text = Path(__file__).parents[2].joinpath("pyproject.toml").read_text()
    section = text.split('[project.entry-points."lmms_eval.models"]', 1)[1].split("\n[", 1)[0]
    assert 'avglab = "avglab.lmms.registration:manifest"' in section
    from avglab.lmms import registration

    assert registration.CLASS_PATH == f"{AvgLabLMM.__module__}.{AvgLabLMM.__name__}"
