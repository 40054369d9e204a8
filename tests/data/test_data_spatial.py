"""The generated spatial set (``python -m avglab.data.spatial``): scenes, answers, LLaVA files, conversion."""

import json
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from avglab.data import spatial
from avglab.data.spatial import COUNT_WORDS, SHAPES, SpatialConfig, draw_scene, sample_scene


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("spatial")
    spatial.main(
        [str(out), "--train", "12", "--val", "3", "--test", "9", "--convert", "--shard-samples", "5"]
    )
    return out


def scenes(n: int, cfg: SpatialConfig | None = None):
    cfg = cfg or SpatialConfig()
    return [sample_scene(random.Random(i), cfg) for i in range(n)]


def test_answers_are_balanced_and_true_to_the_scene():
    drawn = scenes(600)
    value = {kind: Counter(s.questions[kind][1].split()[-1] for s in drawn) for kind in spatial.KINDS}
    assert set(value["shape"]) == set(SHAPES) and min(value["shape"].values()) > 600 / 4 * 0.7
    assert set(value["count"]) == set(COUNT_WORDS) and min(value["count"].values()) > 600 / 3 * 0.7
    assert set(value["position"]) == {"left", "right", "above", "below"}
    assert value["position"]["left"] + value["position"]["right"] > 600 * 0.3
    assert value["position"]["above"] + value["position"]["below"] > 600 * 0.3
    for scene in drawn:
        things = {t.color: t for t in scene.things}
        assert len(things) == len(scene.things)  # one colour per object: a colour names one object
        question, answer = scene.questions["shape"]
        assert answer.split() == [question.split()[4], things[question.split()[4]].shape]
        question, answer = scene.questions["count"]
        counted = next(s for s in SHAPES if spatial.PLURALS[s] == question.split()[2])
        assert answer.split() == [
            question.split()[2],
            COUNT_WORDS[sum(t.shape == counted for t in scene.things) - 1],
        ]
        words = scene.questions["position"][0].split()
        a, b = things[words[2]].center, things[words[-2]].center
        axis = 0 if "left" in words else 1
        expected = ("left", "right") if axis == 0 else ("above", "below")
        assert abs(a[axis] - b[axis]) >= SpatialConfig().min_separation * SpatialConfig().scale(
            scene.height, scene.width
        )
        said = [words[2], words[-2], expected[0 if a[axis] < b[axis] else 1]]
        assert scene.questions["position"][1].split() == said


def test_named_answers_put_the_question_key_right_before_the_value_and_bare_ones_are_the_value():
    """Named: the value's input position holds the question's (last) key word; bare: the value alone."""
    for named, bare in zip(scenes(40), scenes(40, SpatialConfig(answer_style="bare")), strict=True):
        for kind in spatial.KINDS:
            (question, answer), (bare_question, bare_answer) = named.questions[kind], bare.questions[kind]
            assert question == bare_question and answer.split()[-1] == bare_answer == bare_answer.split()[0]
            key = answer.split()[-2]
            assert key in question.split() and key in set(spatial.COLORS) | set(spatial.PLURALS.values())
    with pytest.raises(ValueError, match="answer_style must be one of"):
        SpatialConfig(answer_style="long")


@pytest.mark.parametrize("layout", sorted(spatial.LAYOUTS))
def test_objects_span_several_patches_apart_and_are_drawn(layout):
    for scene in scenes(50, SpatialConfig(**spatial.LAYOUTS[layout])):
        assert (scene.height, scene.width) in spatial.LAYOUTS[layout]["image_sizes"]
        image = np.asarray(draw_scene(scene))
        assert image.shape[:2] == (scene.height, scene.width)
        boxes = [t.box for t in scene.things]
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert x1 - x0 >= 2 * 8 and 0 <= x0 and x1 <= scene.width and 0 <= y0 and y1 <= scene.height
            for u0, v0, u1, v1 in boxes[i + 1 :]:
                assert x1 <= u0 or u1 <= x0 or y1 <= v0 or v1 <= y0  # no overlap
        for thing in scene.things:
            x, y = (int(v) for v in thing.center)
            assert tuple(image[y, x]) == spatial.COLORS[thing.color]


def test_written_files_are_llava_records_and_convert(written):
    train = json.loads((written / "train.json").read_text())
    test = json.loads((written / "test.json").read_text())
    assert len(train) == 12 and len(test) == 9
    for record in train:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * len(turns[::2]) and 4 <= len(turns[::2]) <= 6
        assert turns[0]["value"].startswith("<image>\n") and "<image>" not in "".join(
            t["value"] for t in turns[1:]
        )
        assert Image.open(written / "images" / record["image"]).size == (64, 64)  # the laptop layout
    assert Counter(r["question_type"] for r in test) == {"shape": 3, "count": 3, "position": 3}
    for split, n in {"train": 12, "val": 3, "test": 9}.items():
        manifest = json.loads((written / "shards" / f"{split}.manifest.json").read_text())
        assert manifest["samples"] == n and manifest["skipped_total"] == 0
    assert len(list((written / "shards").glob("train-*.tar"))) == 3


def test_questions_per_kind_ask_about_other_objects_and_keep_the_test_split(written, tmp_path):
    spatial.main([str(tmp_path), "--train", "12", "--val", "3", "--test", "9", "--questions-per-kind", "1"])
    for one, two in zip(
        *(json.loads((d / "train.json").read_text()) for d in (tmp_path, written)), strict=True
    ):
        asked = [[t["value"].removeprefix("<image>\n") for t in r["conversations"][::2]] for r in (one, two)]
        assert len(asked[0]) == 3 and len(asked[1]) == len(set(asked[1])) >= 4  # the default asks 2 per kind
        assert sum(q.startswith("what shape") for q in asked[1]) == 2  # every scene has >= 2 objects
        assert set(asked[0]) < set(asked[1])
    assert (tmp_path / "test.json").read_bytes() == (written / "test.json").read_bytes()


def test_extra_count_questions_ask_about_the_distractors_and_are_true():
    """After the balanced count question the default asks a distractor shape's count, if the scene has one."""
    asked = 0
    for scene in scenes(200):
        counted = scene.questions["count"][0]
        extra = [(q, a) for kind, q, a in scene.more if kind == "count"]
        distractors = {spatial.PLURALS[t.shape] for t in scene.things} - {counted.split()[2]}
        assert len(extra) == min(1, len(distractors))  # questions_per_kind=2: one more, where there is one
        for question, answer in extra:
            plural, value = answer.split()
            shape = next(s for s in SHAPES if spatial.PLURALS[s] == plural)
            assert question != counted and question == f"how many {plural} are there?"
            assert COUNT_WORDS.index(value) + 1 == sum(t.shape == shape for t in scene.things)
            asked += 1
    assert asked > 150


def test_same_seed_same_set(written, tmp_path):
    spatial.main([str(tmp_path), "--train", "12", "--val", "3", "--test", "9"])
    for split in ("train", "val", "test"):
        assert (tmp_path / f"{split}.json").read_bytes() == (written / f"{split}.json").read_bytes()
    assert (tmp_path / "images/test/000004.png").read_bytes() == (
        written / "images/test/000004.png"
    ).read_bytes()


def test_bad_settings_fail_early():
    with pytest.raises(ValueError, match="kinds"):
        SpatialConfig(kinds=["colour"])
    with pytest.raises(ValueError, match="max_objects"):
        SpatialConfig(max_objects=9)


def test_the_number_of_objects_does_not_give_the_count_away():
    """Counting every object, whatever its shape, is no better than chance (61% when the two were tied)."""
    by_total: dict[int, Counter] = {}
    for scene in scenes(900):
        by_total.setdefault(len(scene.things), Counter())[scene.questions["count"][1].split()[-1]] += 1
    assert set(by_total) == {3, 4}
    best_guess = sum(max(answers.values()) for answers in by_total.values()) / 900
    assert best_guess < 0.40  # chance: 1/3
    with pytest.raises(ValueError, match="3 <= min_objects"):
        SpatialConfig(min_objects=2)
