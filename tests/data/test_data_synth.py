import io
import json
import math
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from avglab.data.synth import generator as synth
from avglab.data.synth.config import SynthConfig
from avglab.data.synth.generator import ensure_synth_shards, make_sample, synth_vocabulary
from avglab.data.synth.scene import local_tile_boxes

PINPOINTS = [[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]]


def read_shards(urls: list[str]) -> list[tuple[str, bytes]]:
    members = []
    for url in urls:
        with tarfile.open(url) as tar:
            members += [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    return members


def records(urls: list[str]) -> list[dict]:
    return [json.loads(data) for name, data in read_shards(urls) if name.endswith(".json")]


def test_same_seed_gives_identical_shards(synth_cfg, synth_urls, tmp_path):
    again = ensure_synth_shards(synth_cfg, tmp_path)
    for split in synth.SPLITS:
        assert [Path(u).name for u in again[split]] == [Path(u).name for u in synth_urls[split]]
        for a, b in zip(again[split], synth_urls[split], strict=True):
            assert Path(a).read_bytes() == Path(b).read_bytes()
    other = ensure_synth_shards(replace(synth_cfg, seed=synth_cfg.seed + 1), tmp_path)
    assert read_shards(other["train"]) != read_shards(synth_urls["train"])


def test_manifest_counts_match_shards(synth_cfg, synth_urls):
    manifest = json.loads((Path(synth_urls["train"][0]).parent / "manifest.json").read_text())
    sizes = {"train": synth_cfg.n_train, "val": synth_cfg.n_val, "test": synth_cfg.n_test}
    for split, n in sizes.items():
        recs = records(synth_urls[split])
        entry = manifest["splits"][split]
        assert len(recs) == entry["samples"] == n
        assert len(synth_urls[split]) == -(-n // synth_cfg.samples_per_shard)
        by_type = {t: sum(r["question_type"] == t for r in recs) for t in ("glance", "gaze")}
        assert by_type == entry["question_type"]
        assert by_type["gaze"] == math.floor(n * synth_cfg.split_gaze_fraction(split))  # the mix is exact
        assert len({r["id"] for r in recs}) == n
    assert manifest["config"]["seed"] == synth_cfg.seed


def test_samples_have_key_png_json_and_llava_records(synth_urls):
    names = [name for name, _ in read_shards(synth_urls["val"])]
    keys = {name.rsplit(".", 1)[0] for name in names}
    assert sorted(names) == sorted([f"{k}.png" for k in keys] + [f"{k}.json" for k in keys])
    for rec in records(synth_urls["val"]):
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and rec["answers"] == [gpt["value"]] and " " not in gpt["value"]
        assert rec["question_type"] in ("glance", "gaze")


def test_second_call_does_not_rewrite(synth_cfg, tmp_path, monkeypatch):
    urls = ensure_synth_shards(synth_cfg, tmp_path)
    stamps = {u: Path(u).stat().st_mtime_ns for split in urls.values() for u in split}

    def fail(*args, **kwargs):
        raise AssertionError("shards were rewritten")

    monkeypatch.setattr(synth, "write_split", fail)
    assert ensure_synth_shards(synth_cfg, tmp_path) == urls
    assert {u: Path(u).stat().st_mtime_ns for split in urls.values() for u in split} == stamps


def test_interrupted_write_leaves_nothing_and_is_redone(synth_cfg, tmp_path, monkeypatch):
    real = synth.write_split

    def crash_on_test(cfg, split, count, folder):
        if split == "test":
            raise KeyboardInterrupt
        return real(cfg, split, count, folder)

    monkeypatch.setattr(synth, "write_split", crash_on_test)
    with pytest.raises(KeyboardInterrupt):
        ensure_synth_shards(synth_cfg, tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synth, "write_split", real)
    urls = ensure_synth_shards(synth_cfg, tmp_path)
    assert len(records(urls["test"])) == synth_cfg.n_test


def test_local_tile_boxes_follow_anyres_padding():
    # 96x128 is padded to 128x128 (16 px above and below): tile rows meet at image row 48.
    boxes = local_tile_boxes(96, 128, 64, PINPOINTS)
    assert boxes == [(0, 0, 64, 48), (64, 0, 128, 48), (0, 48, 64, 96), (64, 48, 128, 96)]
    assert local_tile_boxes(64, 128, 64, PINPOINTS) == [(0, 0, 64, 64), (64, 0, 128, 64)]


@pytest.mark.parametrize("size", [(64, 128), (128, 64), (128, 128), (96, 128), (128, 96)])
def test_bar_fills_one_pooling_window_of_one_local_tile_away_from_shape(image_processor, size):
    cfg = SynthConfig(seed=1, image_sizes=[size])
    patch = cfg.patch_size
    for index in range(16):
        scene = make_sample(cfg, "train", index)["json"]["synth"]
        x0, y0, x1, y1 = scene["marker_box"]
        sx0, sy0, sx1, sy1 = scene["shape_box"]
        assert x1 <= sx0 or x0 >= sx1 or y1 <= sy0 or y0 >= sy1
        assert (x1 - x0, y1 - y0) == (2 * cfg.marker_size, cfg.marker_size)
        # Only the bar, white on black, through the real AnyRes processor: one local tile shows it,
        # on exactly one 2-patch window of the (1, 2) pooling, each half on one patch.
        probe = Image.new("RGB", (scene["width"], scene["height"]))
        ImageDraw.Draw(probe).rectangle((x0, y0, x1 - 1, y1 - 1), fill=(255, 255, 255))
        tiles = image_processor(probe, return_tensors="pt")["pixel_values"][0, 1:]  # drop the global view
        lit = [i for i, tile in enumerate(tiles) if (tile > 1.0).any()]
        assert lit == [scene["marker_tile"]]
        rows, cols = np.nonzero((tiles[lit[0]] > 1.0).any(0).numpy())
        assert rows.min() % patch == 0 and rows.max() + 1 == rows.min() + patch
        assert cols.min() % (2 * patch) == 0 and cols.max() + 1 == cols.min() + 2 * patch


def test_image_content_matches_record():
    cfg = SynthConfig(seed=5)
    for index in range(8):
        sample = make_sample(cfg, "val", index)
        scene = sample["json"]["synth"]
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        assert pixels.shape == (scene["height"], scene["width"], 3)
        x0, y0, x1, y1 = scene["marker_box"]
        # The gaze answer is the flat bar's colour: cell m x m, flat bar m x m/2, upright m/2 x m.
        m, q = cfg.marker_size, cfg.marker_size // 4
        flat_x, up_x = (x0, x0 + m) if scene["flat_left"] else (x0 + m, x0)
        assert (pixels[y0 + q : y1 - q, flat_x : flat_x + m] == cfg.colors[scene["marker_color"]]).all()
        assert (pixels[y0:y1, up_x + q : up_x + m - q] == cfg.colors[scene["upright_color"]]).all()
        assert (pixels[y0 : y0 + q, flat_x : flat_x + m] == cfg.colors[scene["background"]]).all()
        assert (pixels[y0:y1, up_x : up_x + q] == cfg.colors[scene["background"]]).all()
        assert scene["marker_color"] != scene["upright_color"]
        sx0, sy0, sx1, sy1 = scene["shape_box"]
        assert (pixels[(sy0 + sy1) // 2 + 2, (sx0 + sx1) // 2] == cfg.colors[scene["shape_color"]]).all()
        outside = np.ones(pixels.shape[:2], dtype=bool)
        outside[sy0:sy1, sx0:sx1] = outside[y0:y1, x0:x1] = False  # the bars' window holds bg too
        assert (pixels[outside] == cfg.colors[scene["background"]]).all()
        assert scene["background"] not in (scene["marker_color"], scene["shape_color"])
        kind = scene["question"]
        expected = {"background_color": "background", "shape": "shape"}.get(kind, kind)
        assert sample["json"]["answers"] == [scene[expected]]


def test_training_dialogues_ask_more_kinds_without_changing_the_set():
    kinds = ["background_color", "shape", "shape_color", "marker_color"]
    one, four = SynthConfig(question_kinds=kinds), SynthConfig(question_kinds=kinds, train_questions=4)
    answer_of = {"background_color": "background", "shape": "shape"}
    text_of = {q.text: q.kind for q in synth.QUESTIONS}
    for index in range(6):
        single, dense = make_sample(one, "train", index), make_sample(four, "train", index)
        assert dense["png"] == single["png"]  # the same image and first turn as the one-question set
        turns = dense["json"]["conversations"]
        assert turns[:2] == single["json"]["conversations"] and len(turns) == 8
        scene = dense["json"]["synth"]
        asked = [text_of[t["value"].removeprefix("<image>\n")] for t in turns[::2]]
        assert sorted(asked) == sorted(kinds)  # every kind once
        for kind, reply in zip(asked, turns[1::2], strict=True):
            assert reply["value"] == scene[answer_of.get(kind, kind)]
    assert (
        make_sample(four, "test", 0)["json"]["conversations"]
        == make_sample(one, "test", 0)["json"]["conversations"]
    )  # val and test ask one question each


def test_vocabulary_covers_every_record(synth_cfg, synth_urls, tokenizer):
    vocab = set(synth_vocabulary(synth_cfg))
    assert {"what", "color", "flat", "bar", "square", "assistant", "user", "?", ":"} <= vocab
    assert not {"<", "</", ">", "image"} & vocab  # special tokens are not words
    for rec in records(synth_urls["train"]):
        text = " ".join(turn["value"] for turn in rec["conversations"])
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids


def test_bad_config_is_rejected_with_the_key_to_fix():
    with pytest.raises(ValueError, match="marker_palette"):
        SynthConfig(marker_palette=["pink"])
    with pytest.raises(ValueError, match="shape_palette"):
        SynthConfig(background_palette=["red"], shape_palette=["red"])
    with pytest.raises(RuntimeError, match="shape_fraction"):
        make_sample(SynthConfig(image_sizes=[(64, 64)], shape_fraction=0.99), "train", 0)
    with pytest.raises(ValueError, match="marker_size"):
        SynthConfig(marker_size=9)
    with pytest.raises(ValueError, match="patch_size"):
        SynthConfig(patch_size=12)
    with pytest.raises(ValueError, match="train_questions"):
        SynthConfig(train_questions=4)  # three question kinds by default
