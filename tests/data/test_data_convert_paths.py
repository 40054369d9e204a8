"""The converter reads only under --images, never unbounded, and skips (never aborts on) any one bad record.

Every case is one record of a JSON-lines file converted by the converter's ``main(argv)``: the kept
ones must land in the shards, the others must be skipped under the named reason, and no byte of the
file outside the image folder may reach a shard.
"""

import io
import json
import os
import random
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from avglab.data import convert as convert_module
from avglab.data.convert import main

QUESTION = [{"from": "human", "value": "<image>\nwhat color is it?"}, {"from": "gpt", "value": "red"}]
TEXT_ONLY = [{"from": "human", "value": "what color is snow?"}, {"from": "gpt", "value": "white"}]
KEPT = "kept"
MAX_MB = 0.05  # --max-image-mb for these cases: big.png (random pixels, ~120 KB) is over it


def png(size=(32, 32), color=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buffer, format="PNG")
    return buffer.getvalue()


def write_images(root: Path, secret: Path) -> None:
    """The image folder (with its traps) and a file outside it that must never be read."""
    for folder in ("imgs", "coco/train", "links"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_bytes(png((48, 40), (1, 2, 3)))
    (root / "imgs/a.png").write_bytes(png())
    Image.new("RGB", (40, 24), (30, 30, 200)).save(root / "coco/train/b.jpg", format="JPEG")
    Image.new("RGB", (24, 24), (30, 200, 30)).save(root / "imgs/c.gif", format="GIF")
    (root / "imgs/ünï.png").write_bytes(png())
    noise = random.Random(0).randbytes(200 * 200 * 3)
    Image.frombytes("RGB", (200, 200), noise).save(root / "imgs/big.png", format="PNG")
    (root / "imgs/corrupt.png").write_bytes(png()[:60])
    (root / "imgs/empty.png").write_bytes(b"")
    (root / "imgs/bomb.png").write_bytes(png((20000, 9000), mode="1"))  # 180 M pixels in a few KB
    os.mkfifo(root / "imgs/pipe.png")  # opening it would block forever
    (root / "links/inside.png").symlink_to("../imgs/a.png")
    (root / "links/out.png").symlink_to(secret)
    (root / "links/zero").symlink_to("/dev/zero")
    (root / "links/dangling.png").symlink_to("../imgs/gone.png")
    (root / "links/loop1").symlink_to("loop2")
    (root / "links/loop2").symlink_to("loop1")


def cases(root: Path, secret: Path) -> list[tuple[str, object, str]]:
    """(id, the record or a raw JSON line, expected: ``kept`` or the skip reason)."""
    images = [
        ("ok-png", "imgs/a.png", KEPT),
        ("ok-jpg-nested", "coco/train/b.jpg", KEPT),
        ("ok-gif-as-png", "imgs/c.gif", KEPT),
        ("ok-dot-prefix", "./imgs/a.png", KEPT),
        ("ok-dotdot-inside", "coco/../imgs/a.png", KEPT),
        ("ok-symlink-inside", "links/inside.png", KEPT),
        ("ok-absolute-inside", str(root / "imgs/a.png"), KEPT),
        ("ok-list-of-one", ["imgs/a.png"], KEPT),
        ("ok-unicode-name", "imgs/ünï.png", KEPT),
        ("up-and-out", "../secret/x.png", "image_outside_root"),
        ("absolute-outside", str(secret), "image_outside_root"),
        ("symlink-out", "links/out.png", "image_outside_root"),
        ("dev-zero", "/dev/zero", "image_outside_root"),
        ("symlink-to-dev-zero", "links/zero", "image_outside_root"),
        ("fifo-inside", "imgs/pipe.png", "image_not_a_file"),
        ("folder-inside", "imgs", "image_not_a_file"),
        ("too-large", "imgs/big.png", "image_too_large"),
        ("nul-byte", "imgs/a\0.png", "bad_image_field"),
        ("missing", "imgs/nope.png", "image_file_missing"),
        ("dangling-symlink", "links/dangling.png", "image_file_missing"),
        ("symlink-loop", "links/loop1", "image_unreadable"),
        ("corrupt", "imgs/corrupt.png", "image_unreadable"),
        ("empty-file", "imgs/empty.png", "image_unreadable"),
        ("name-too-long", "imgs/" + "x" * 300 + ".png", "image_unreadable"),
        ("file-as-folder", "imgs/a.png/x.png", "image_unreadable"),
        ("decompression-bomb", "imgs/bomb.png", "image_unreadable"),
        ("image-is-a-number", 5, "bad_image_field"),
        ("two-images", ["imgs/a.png", "imgs/a.png"], "several_images"),
    ]
    out: list[tuple[str, object, str]] = [
        (rid, {"id": rid, "image": image, "conversations": QUESTION}, expected)
        for rid, image, expected in images
    ]
    out.append(("ok-text-only", {"id": "ok-text-only", "conversations": TEXT_ONLY}, KEPT))
    out.append(("bad-json-line", '{"id": "bad-json-line", "conversations": [', "bad_json"))
    out.append(("too-deep", '{"id": "too-deep", "v": ' + "[" * 100_000 + "]" * 100_000 + "}", "bad_json"))
    out.append(("not-an-object", "[1, 2]", "bad_record"))
    return out


def write_source(path: Path, rows: list[tuple[str, object, str]]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for _, row, _ in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture()
def trap(tmp_path):
    root, secret = tmp_path / "images", tmp_path / "secret" / "x.png"
    write_images(root, secret)
    rows = cases(root, secret)
    return root, secret, rows, write_source(tmp_path / "data.jsonl", rows)


def run_converter(source: Path, root: Path, out: Path, *extra: str) -> dict:
    argv = [
        str(source),
        "--images",
        str(root),
        "--out",
        str(out),
        "--max-skip-fraction",
        "1",
        "--no-progress",
    ]
    return main([*argv, "--max-image-mb", str(MAX_MB), "--workers", "2", *extra])


def test_every_case_is_kept_or_skipped_under_its_reason(trap, tmp_path):
    root, secret, rows, source = trap
    manifest = run_converter(source, root, tmp_path / "out")
    by_index = {s["index"]: s for s in manifest["skipped"]}
    samples = list(wds.DataPipeline(wds.SimpleShardList(sorted(map(str, (tmp_path / "out").glob("*.tar")))),
                                    wds.tarfile_to_samples()))  # fmt: skip
    kept = {json.loads(s["json"])["id"] for s in samples}
    got = {
        rid: (KEPT if rid in kept else by_index.get(i, {}).get("reason"))
        for i, (rid, _, _) in enumerate(rows)
    }
    assert got == {rid: expected for rid, _, expected in rows}
    assert manifest["records"] == len(rows) == 32
    leaked = secret.read_bytes()
    assert not any(leaked in value for s in samples for value in s.values() if isinstance(value, bytes))
    details = {s["id"]: s["detail"] for s in manifest["skipped"]}
    assert (
        "outside the image folder" in details["up-and-out"] and "--max-image-mb=0.05" in details["too-large"]
    )


def test_an_unexpected_error_in_one_record_is_a_skip_naming_it(trap, tmp_path, monkeypatch, caplog):
    root, _, rows, source = trap
    real_read = convert_module.read_image

    def read(path, *args):
        if path.name == "c.gif":
            raise ZeroDivisionError("a bug met by one record")
        return real_read(path, *args)

    monkeypatch.setattr(convert_module, "read_image", read)
    manifest = run_converter(source, root, tmp_path / "out")
    skip = next(s for s in manifest["skipped"] if s["id"] == "ok-gif-as-png")
    assert (
        skip["reason"] == "unexpected_error"
        and "ZeroDivisionError: a bug met by one record" in skip["detail"]
    )
    assert "ok-gif-as-png" in caplog.text
    assert manifest["samples"] == sum(expected == KEPT for *_, expected in rows) - 1
