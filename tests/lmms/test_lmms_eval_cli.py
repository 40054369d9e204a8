"""The real ``python -m lmms_eval --model avglab`` on a local task: answers equal avglab's own path.

Needs lmms-eval (``make test-lmms`` builds ``.venv-lmms`` with ``pip install -e '.[dev,lmms]'``); skipped
where it is not importable. Everything is made here, offline: a tiny random model, saved as a stage output
and exported with ``python -m avglab.tools.export``; a few generated images and questions written as an
``imagefolder`` data set; a task YAML for ``--include_path``. A random model's answers are arbitrary, so
they are checked against avglab's evaluation path (``EvalStage.answer``) on the same questions.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from stage_config import compose_config

from avglab.core.weights import save_core
from avglab.data.collate import collate
from avglab.data.processor import SampleProcessor
from avglab.data.synth.generator import make_sample
from avglab.stages.evaluate import EvalStage
from avglab.tools.export import load_pretrained
from avglab.training.build import build_core, synth_config

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None,
    reason="lmms-eval is not installed: `make test-lmms` runs this test in .venv-lmms",
)

TASK = "avglab_local"
N_DOCS, MAX_NEW = 5, 4
TASK_YAML = f"""\
task: {TASK}
dataset_path: imagefolder
dataset_kwargs:
  data_dir: {{data_dir}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {MAX_NEW}
  until: ["\\n\\n"]
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""
TASK_UTILS = """\
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() == doc["answer"].lower())}
"""
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
}


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """An export of a tiny random model, a local imagefolder task and its documents (file name order)."""
    root = tmp_path_factory.mktemp("lmms_cli")
    cfg = compose_config(f"workspace={root}", f"run_dir={root}/run", "router.k=4")
    torch.manual_seed(0)
    _, _, core = build_core(cfg)
    stage = save_core(core, root / "stage")  # what a stage writes: weights + the resolved config
    OmegaConf.save(cfg, stage / "config.yaml", resolve=True)
    export = root / "export"
    subprocess.run([sys.executable, "-m", "avglab.tools.export", str(stage), str(export)], check=True)

    data = root / "data" / "test"
    data.mkdir(parents=True)
    docs = []
    for i in range(N_DOCS):
        sample = make_sample(synth_config(cfg.data), "test", i)
        record = sample["json"]
        (data / f"{record['id']}.png").write_bytes(sample["png"])
        question = record["conversations"][0]["value"].removeprefix("<image>\n")
        docs.append(
            {"file_name": f"{record['id']}.png", "question": question, "answer": record["answers"][0]}
        )
    (data / "metadata.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(data_dir=data.parent))
    (tasks / "utils.py").write_text(TASK_UTILS)
    return root, export, tasks, sorted(docs, key=lambda d: d["file_name"]), data


def run_lmms_eval(root: Path, export: Path, tasks: Path, selector: str, *extra: str):
    """``python -m lmms_eval --model avglab`` offline: its logged samples, its results, the stats folder."""
    out, stats = root / f"out-{selector}", root / f"stats-{selector}"
    model_args = ",".join([f"pretrained={export}", f"selector={selector}", f"stats_dir={stats}", *extra])
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "avglab", "--model_args", model_args]
    cmd += ["--tasks", TASK, "--include_path", str(tasks), "--device", "cpu"]
    cmd += ["--log_samples", "--output_path", str(out)]
    if selector != "16":  # "16" keeps lmms-eval's default --batch_size and sets batch_size in model_args
        cmd += ["--batch_size", "2"]
    env = {**os.environ, **OFFLINE, "HF_HOME": str(root / "hf")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    found = sorted(out.rglob(f"*_samples_{TASK}.jsonl")), sorted(out.rglob("*_results.json"))
    # lmms-eval 0.7.3 exits 0 even when the evaluation raised: its output files are the evidence
    assert done.returncode == 0 and all(len(f) == 1 for f in found), done.stdout[-3000:] + done.stderr[-8000:]
    [samples_file], [results_file] = found
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return sorted(samples, key=lambda s: s["doc_id"]), json.loads(results_file.read_text()), stats


def avglab_answers(export: Path, docs: list[dict], data: Path, selector: str) -> list[dict]:
    """avglab's own evaluation path, one question at a time: processor, collate, ``EvalStage.answer``."""
    tokenizer, image_processor, core = load_pretrained(export)
    levels = {"router": None, "full": core.scaler.num_levels - 1}
    level = levels[selector] if selector in levels else core.scaler.granularities.index(int(selector))
    processor = SampleProcessor(tokenizer, image_processor, "vicuna_v1")
    stage = EvalStage(core, tokenizer, Path("."), selector, compare_fixed=False, max_new_tokens=MAX_NEW)
    out = []
    for doc in docs:
        turns = [{"from": "human", "value": "<image>\n" + doc["question"]}]
        record = {"id": doc["file_name"], "conversations": turns, "answers": [doc["answer"]]}
        batch = collate([processor(record, Image.open(data / doc["file_name"]).convert("RGB"))], 0)
        [answer] = stage.answer(batch, level)
        # the LLM's prompt: its text tokens, the <image> placeholder replaced by the visual tokens
        answer["input_tokens"] = int(batch["prompt_attention_mask"].sum()) - 1 + answer["visual_tokens"]
        out.append(answer)
    return out


@pytest.mark.parametrize("selector", ["router", "16", "full"])
def test_lmms_eval_cli_answers_as_avglab_and_reports_tokens(local_task, selector):
    root, export, tasks, docs, data = local_task
    extra = ["batch_size=2"] if selector == "16" else []  # the README's old form: no longer a TypeError
    samples, results, stats = run_lmms_eval(root, export, tasks, selector, *extra)
    ours = avglab_answers(export, docs, data, selector)

    # doc_id is the row of the imagefolder data set: its files in name order
    assert [(s["doc_id"], s["input"], s["target"]) for s in samples] == [
        (i, d["question"], d["answer"]) for i, d in enumerate(docs)
    ]
    lines = [json.loads(line) for line in (stats / "avglab_requests.jsonl").read_text().splitlines()]
    requests = {r["doc_id"]: r for r in lines}
    assert len(lines) == len(requests) == N_DOCS
    for s, mine in zip(samples, ours, strict=True):
        assert s["filtered_resps"] == mine["prediction"].split("\n\n")[0], s["doc_id"]
        assert s["exact_match"] == float(mine["prediction"].strip().lower() == s["target"].lower())
        [counts] = s["token_counts"]  # lmms-eval's own per-sample token counts
        assert counts["input_tokens"] == mine["input_tokens"] and 1 <= counts["output_tokens"] <= MAX_NEW
        routed = requests[s["doc_id"]]  # avglab's routing file, next to lmms-eval's results
        assert (routed["task"], routed["selector"], routed["granularity"], routed["visual_tokens"]) == (
            TASK, selector, mine["granularity"], mine["visual_tokens"]
        )  # fmt: skip
        assert [routed["input_tokens"], routed["output_tokens"]] == [
            counts["input_tokens"],
            counts["output_tokens"],
        ]

    granularities = json.loads((export / "avglab.json").read_text())["granularities"]
    chosen = {r["granularity"] for r in lines}
    if selector == "router":
        assert chosen <= set(granularities)
    else:  # a fixed level, or the finest one (full): every request at it
        assert chosen == {int(selector) if selector.isdigit() else max(granularities)}
    if selector == "full":
        assert all(r["visual_tokens"] == r["visual_tokens_full"] for r in lines)

    efficiency = results["efficiency"]["by_task"][TASK]  # lmms-eval's sums of the reported counts
    assert efficiency["docs_with_token_counts"] == N_DOCS
    assert efficiency["total_input_tokens"] == sum(a["input_tokens"] for a in ours)
    accuracy = sum(s["exact_match"] for s in samples) / N_DOCS
    assert results["results"][TASK]["exact_match,none"] == pytest.approx(accuracy)
    summary = json.loads((stats / "avglab_summary.json").read_text())["by_task"][TASK]
    assert summary["requests"] == N_DOCS and sum(summary["granularity_counts"].values()) == N_DOCS
    assert summary["input_tokens"] == efficiency["total_input_tokens"]
    assert summary["output_tokens"] == efficiency["total_output_tokens"]
