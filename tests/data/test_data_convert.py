"""LLaVA JSON / eval sets -> shards: manifest, LLaVA's record rules, bad input, streaming and resuming."""

import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from data_llava_helpers import llava_records, write_llava_source

from avglab.data import convert as convert_module
from avglab.data.convert import convert, main
from avglab.data.datamodule import ShardDataModule
from avglab.data.jsonstream import iter_records
from avglab.data.skips import SkipLimitError


def shard_samples(out: Path, split: str = "train") -> list[dict]:
    urls = sorted(str(p) for p in out.glob(f"{split}-*.tar"))
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def test_llava_json_becomes_shards_with_a_manifest(llava_shards):
    out, manifest = llava_shards
    assert manifest["records"] == manifest["samples"] == 24 and manifest["skipped_total"] == 0
    assert [s["samples"] for s in manifest["shards"]] == [3] * 8
    assert [(s["start"], s["end"]) for s in manifest["shards"]][:2] == [(0, 3), (3, 6)]
    assert len(manifest["source"]["sha256"]) == 64 and manifest["kind"] == "instruct"
    assert json.loads((out / "train.manifest.json").read_text()) == manifest
    samples = shard_samples(out)
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(24)]
    by_id = {json.loads(s["json"])["id"]: s for s in samples}
    assert "png" not in by_id["rec6"] and "png" in by_id["rec0"]  # text-only records stay text-only
    assert json.loads(by_id["rec1"]["json"]) == llava_records(24)[1]  # the record is stored as given


def test_bad_records_are_skipped_with_reasons_and_listed(tmp_path):
    records = llava_records(6)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    bad = [
        {"id": "corrupt", "image": "imgs/corrupt.png", "conversations": records[0]["conversations"]},
        {"id": "missing", "image": "imgs/nowhere.jpg", "conversations": records[0]["conversations"]},
        {"id": "noconv", "image": "imgs/1.png"},
        {"id": "empty", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "  "}]},
        {
            "id": "placeholder",
            "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
        },
        {
            "id": "two",
            "image": "imgs/0.png",
            "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "a"}],
        },
        ["not", "a", "record"],
    ]
    path = write_llava_source(tmp_path, records + bad)
    # A caption with bytes that are not UTF-8, spliced into the JSON list.
    raw = path.read_bytes()[:-1] + b', {"id": "latin1", "conversations": [{"from": "human", "value": "q"}, '
    path.write_bytes(raw + b'{"from": "gpt", "value": "caf\xe9"}]}]')
    manifest = convert(path, tmp_path / "out", samples_per_shard=4, max_skip_fraction=1.0, progress=False)
    reasons = {s["id"]: s["reason"] for s in manifest["skipped"]}
    assert reasons == {
        "corrupt": "image_unreadable",
        "missing": "image_file_missing",
        "noconv": "no_conversation",
        "empty": "empty_answer",
        "placeholder": "image_missing",
        "two": "several_images",
        "#12": "bad_record",
        "latin1": "non_utf8_text",
    }
    assert manifest["samples"] == 6 and manifest["records"] == 14 and manifest["skipped_total"] == 8
    assert manifest["skipped_by_reason"]["image_unreadable"] == 1
    assert "nowhere.jpg" in next(s["detail"] for s in manifest["skipped"] if s["id"] == "missing")
    with pytest.raises(SkipLimitError, match="8 of 14 records skipped.*image_unreadable"):
        convert(path, tmp_path / "strict", max_skip_fraction=0.1, progress=False)


def test_jsonl_input_and_bad_lines(tmp_path):
    path = write_llava_source(tmp_path, llava_records(5), fmt="jsonl")
    with open(path, "ab") as f:
        f.write(b'{"id": "cut", "conversations": [\n')
        turns = b'[{"from": "human", "value": "\xe9"}, {"from": "gpt", "value": "a"}]'
        f.write(b'{"id": "latin1", "conversations": ' + turns + b"}\n")
    manifest = convert(path, tmp_path / "out", max_skip_fraction=1.0, progress=False)
    assert manifest["samples"] == 5
    assert {s["id"]: s["reason"] for s in manifest["skipped"]} == {
        "#5": "bad_json",
        "latin1": "non_utf8_text",
    }


def test_eval_set_with_vqa_answer_lists(tmp_path):
    write_llava_source(tmp_path, llava_records(2))
    answers = [{"answer": a, "answer_confidence": "yes"} for a in ["two"] * 6 + ["2"] * 3 + ["three"]]
    rows = [
        {
            "question_id": 7,
            "image": "imgs/0.png",
            "question": "How many cats?",
            "answers": answers,
            "category": "count",
        },
        {"question_id": 8, "image": "imgs/1.png", "text": "<image>\nIs it red?", "answer": "yes"},
        {"question_id": 9, "image": "imgs/0.png", "question": "Unanswered?"},
    ]
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = convert(
        path,
        tmp_path / "out",
        split="test",
        kind="eval",
        prompt_suffix="\nAnswer briefly.",
        max_skip_fraction=1.0,
        progress=False,
    )
    assert manifest["samples"] == 2 and manifest["skipped"][0]["reason"] == "no_answer"
    first, second = (json.loads(s["json"]) for s in shard_samples(tmp_path / "out", "test"))
    assert first["id"] == "7" and first["question_type"] == "count" and len(first["answers"]) == 10
    assert first["conversations"] == [
        {"from": "human", "value": "<image>\nHow many cats?\nAnswer briefly."},
        {"from": "gpt", "value": "two"},  # the most frequent reference answer
    ]
    assert second["answers"] == ["yes"] and second["question_type"] == "unknown"
    assert second["conversations"][0]["value"] == "<image>\nIs it red?\nAnswer briefly."


def test_json_list_is_streamed(tmp_path):
    path = write_llava_source(tmp_path, llava_records(400))
    entries = iter_records(path, chunk_bytes=4096)
    first = next(entries)
    assert first.value["id"] == "rec0" and first.offset <= 4096 < path.stat().st_size // 10
    assert sum(1 for _ in entries) == 399


def test_rerun_after_interruption_keeps_finished_shards(tmp_path, monkeypatch):
    path = write_llava_source(tmp_path, llava_records(20))
    reference = convert(path, tmp_path / "reference", samples_per_shard=4, workers=2, progress=False)
    calls = []
    real_read = convert_module.read_image

    def crashing_read(image, *args):
        calls.append(image)
        if len(calls) == 12:
            raise KeyboardInterrupt  # an interruption (a failing record would only be skipped)
        return real_read(image, *args)

    monkeypatch.setattr(convert_module, "read_image", crashing_read)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(path, out, samples_per_shard=4, workers=1, progress=False)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.tar")}
    assert 1 <= len(finished) < 5 and not (out / "train.manifest.json").exists()
    calls.clear()
    manifest = convert(path, out, samples_per_shard=4, workers=2, progress=False)
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished  # not rewritten
    rest = llava_records(20)[4 * len(finished) :]
    assert len(calls) == sum(1 for r in rest if "image" in r)  # only records after the finished shards
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert not list(out.glob("*.partial"))
    with pytest.raises(ValueError, match="other options.*--overwrite"):
        convert(path, out, samples_per_shard=5, progress=False)


def test_command_line(tmp_path, capsys):
    path = write_llava_source(tmp_path, llava_records(4))
    manifest = main([str(path), "--out", str(tmp_path / "out"), "--shard-samples", "2", "--no-progress"])
    assert manifest["samples"] == 4 and len(list((tmp_path / "out").glob("train-*.tar"))) == 2
    with tarfile.open(tmp_path / "out" / "train-00000.tar") as tar:
        assert tar.getnames() == ["000000000.json", "000000000.png", "000000001.json", "000000001.png"]
    with pytest.raises(SystemExit, match="no input file"):
        main([str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")])


def test_eval_set_from_llava_conversations_on_the_command_line(tmp_path, tokenizer, image_processor):
    write_llava_source(tmp_path, llava_records(2))

    def turns(*values):
        return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]

    rows = [
        {
            "id": "one",
            "image": "imgs/0.png",
            "conversations": turns("<image>\nWhat color is the square?", "red"),
        },
        {  # a dialogue: its first exchange is evaluated, the later turns are dropped
            "id": "dialogue",
            "image": "imgs/1.png",
            "conversations": turns("What shape is it?\n<image>", "circle", "And its color?", "blue"),
        },
        {"id": "text", "conversations": turns("What color is grass?", " green ")},
        {  # a leading gpt turn is passed over, as LLaVA does
            "id": "lead",
            "image": "imgs/0.png",
            "conversations": [{"from": "gpt", "value": "hi"}, *turns("<image>\nIs it big?", "yes")],
        },
        {
            "id": "listed",
            "image": "imgs/0.png",
            "conversations": turns("<image>\nHow many?", "2"),
            "answers": ["two", "2"],
        },
        {"id": "unanswered", "image": "imgs/0.png", "conversations": turns("<image>\nWhy?")},
        {"id": "answer-first", "conversations": [{"from": "gpt", "value": "red"}]},
        {"id": "empty", "image": "imgs/0.png", "conversations": turns("<image>\nWhat color?", "  ")},
        {"id": "no-question", "image": "imgs/0.png", "conversations": turns("<image>", "red")},
        {"id": "imageless", "conversations": turns("<image>\nWhat color is the square?", "red")},
    ]
    path = tmp_path / "heldout.json"
    path.write_text(json.dumps(rows))
    out = tmp_path / "out"
    argv = [str(path), "--kind", "eval", "--split", "test", "--images", str(tmp_path), "--out", str(out)]
    manifest = main([*argv, "--max-skip-fraction", "1", "--no-progress"])
    assert manifest["records"] == len(rows) and manifest["samples"] == 5
    assert {s["id"]: s["reason"] for s in manifest["skipped"]} == {
        "unanswered": "no_exchange",
        "answer-first": "no_exchange",
        "empty": "no_answer",
        "no-question": "no_question",
        "imageless": "image_missing",
    }
    stored = {r["id"]: r for r in (json.loads(s["json"]) for s in shard_samples(out, "test"))}
    assert stored["one"]["conversations"] == [
        {"from": "human", "value": "<image>\nWhat color is the square?"},
        {"from": "gpt", "value": "red"},
    ]  # as an eval record of a question set: placeholder first, then the question
    assert stored["dialogue"]["conversations"] == [
        {"from": "human", "value": "<image>\nWhat shape is it?"},
        {"from": "gpt", "value": "circle"},
    ]
    assert stored["text"]["conversations"][0] == {"from": "human", "value": "What color is grass?"}
    assert "image" not in stored["text"] and stored["lead"]["answers"] == ["yes"]
    # The eval path's reader: the question set's answers and ids, every kept record once.
    urls = {"test": sorted(str(p) for p in out.glob("test-*.tar"))}
    dm = ShardDataModule(urls, tokenizer, image_processor, batch_size=2, max_skip_fraction=0.0)
    read = {
        i: a for batch in dm.test_dataloader() for i, a in zip(batch["ids"], batch["answers"], strict=True)
    }
    assert read == {
        "one": ["red"],
        "dialogue": ["circle"],
        "text": ["green"],
        "lead": ["yes"],
        "listed": ["two", "2"],
    }
    assert not dm.skipped
