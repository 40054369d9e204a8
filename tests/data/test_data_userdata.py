"""The user data set of tests/userdata.py: written deterministically, converted with the README's commands,
every record accounted for exactly once."""

import io
import json

import userdata
import webdataset as wds
from PIL import Image
from userdata import BAD_RECORDS, COLORS, FACTS, IMAGE_SIZES, SHAPES, user_llava, write_user_llava

from avglab.data.datamodule import ShardDataModule

user_llava_shards = userdata.user_llava_shards  # the session fixture, registered for this module


def stored(root, split) -> list[dict]:
    urls = sorted(str(p) for p in root.glob(f"{split}-*.tar"))
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def test_every_record_is_converted_or_skipped_exactly_once(tmp_path):
    data = user_llava(tmp_path, seed=1, extra_args=("--shard-samples", "16", "--no-progress"))
    raw = data.raw
    assert sorted(data.manifests) == ["test", "train", "val"]
    assert raw.skips["train"] == BAD_RECORDS and raw.skips["val"] == raw.skips["test"] == {}
    for split, manifest in data.manifests.items():
        written = [r["id"] for r in raw.records[split]]
        samples = stored(data.root, split)
        kept = [json.loads(s["json"])["id"] for s in samples]
        skipped = {s["id"]: s["reason"] for s in manifest["skipped"]}
        assert data.converted[split] + manifest["skipped_total"] == manifest["records"] == len(written)
        assert sorted(kept + list(skipped)) == sorted(written)  # each id once: kept or skipped
        assert skipped == raw.skips[split] and data.skipped[split] == raw.skipped_by_reason(split)
        assert sum(s["samples"] for s in manifest["shards"]) == len(samples) == data.converted[split]
    # Under the converter's default --max-skip-fraction (the README's command has none).
    assert data.manifests["train"]["skipped_total"] / data.manifests["train"]["records"] <= 0.05
    train = stored(data.root, "train")
    images = [Image.open(io.BytesIO(s.get("png") or s["jpg"])) for s in train if "png" in s or "jpg" in s]
    assert {im.size for im in images} == set(IMAGE_SIZES) and {im.format for im in images} == {"PNG", "JPEG"}
    records = [json.loads(s["json"]) for s in train]
    assert any("image" not in r for r in records) and any(len(r["conversations"]) > 2 for r in records)
    # The held-out eval file: LLaVA conversations, evaluated on their first exchange, one-word answers.
    test = [json.loads(s["json"]) for s in stored(data.root, "test")]
    assert raw.later_turns["test"] and all(len(r["conversations"]) == 2 for r in test)
    assert all(len(r["answers"]) == 1 and r["answers"][0].isalpha() for r in test)
    by_id = {r["id"]: r for r in raw.records["test"]}
    assert all(r["answers"] == [by_id[r["id"]]["conversations"][1]["value"]] for r in test)


def test_the_data_set_follows_from_the_seed(tmp_path):
    def files(folder):
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    first = write_user_llava(tmp_path / "a", seed=3, n_train=12, n_val=0, n_test=4)
    again = write_user_llava(tmp_path / "b", seed=3, n_train=12, n_val=0, n_test=4)
    other = write_user_llava(tmp_path / "c", seed=4, n_train=12, n_val=0, n_test=4)
    assert files(first.folder) == files(again.folder) != files(other.folder)
    assert sorted(first.sources) == ["test", "train"]
    answers = {t["value"] for r in first.records["train"] for t in r["conversations"][1::2]}
    vocabulary = {*COLORS, *SHAPES, "left", "right", *(a for _, a in FACTS)}
    assert answers - {" "} <= vocabulary  # one-word answers (" ": the bad record's empty answer)


def test_the_training_loader_reads_every_converted_sample(user_llava_shards, tokenizer, image_processor):
    urls = {
        s: sorted(str(p) for p in user_llava_shards.root.glob(f"{s}-*.tar")) for s in ("train", "val", "test")
    }
    dm = ShardDataModule(urls, tokenizer, image_processor, batch_size=8, max_skip_fraction=0.0)
    loaders = {"train": dm.train_dataloader(), "val": dm.val_dataloader(), "test": dm.test_dataloader()}
    read = {split: sum(len(b["ids"]) for b in loader) for split, loader in loaders.items()}
    assert read == user_llava_shards.converted and not dm.skipped


def test_the_denser_example_set_asks_every_question_of_each_training_image(tmp_path):
    raw = write_user_llava(tmp_path, n_train=20, n_val=4, n_test=4, bad=False, every_question=True)
    for split in ("train", "val"):
        with_image = [r for r in raw.records[split] if "image" in r]
        assert with_image
        for record in with_image:
            asked = [t["value"].replace("<image>", "").strip() for t in record["conversations"][::2]]
            assert len(asked) == 4 and "What shape is in the image?" in asked
