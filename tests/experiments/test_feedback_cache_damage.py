"""A damaged feedback cache is found on load and rebuilt (logged), or fails naming the folder and the fix."""

import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import avglab.avg.feedback_cache as fc
import avglab.avg.feedback_store as store


@pytest.fixture()
def stored(routed_core, batch, tmp_path):
    """A cache of 4 samples stored under tmp_path; the build calls are counted."""
    calls = []

    def build():
        calls.append(1)
        return fc.compute_cache(routed_core, iter([batch]), samples=4)

    spec = {"version": 1, "samples": 4, "granularities": list(routed_core.scaler.granularities)}
    first, built = store.load_or_build(tmp_path, spec, build)
    assert built and len(calls) == 1
    return spec, build, calls, first, store.cache_folder(tmp_path, spec)


def truncate(folder: Path) -> None:
    path = folder / "cache.safetensors"
    path.write_bytes(path.read_bytes()[:500])


def wrong_shape(folder: Path) -> None:
    path = folder / "cache.safetensors"
    tensors = load_file(str(path))
    tensors["feedback"] = tensors["feedback"][:, :3].contiguous()  # 3 levels where the spec has 5
    save_file(tensors, str(path))


def drop_tiles(folder: Path) -> None:
    path = folder / "cache.safetensors"
    tensors = load_file(str(path))
    tensors["tiles"] = tensors["tiles"][:-1].contiguous()
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (truncate, "cache.safetensors does not load"),
        (wrong_shape, r"feedback \(4, 3\) and tokens \(4, 5\) do not have one column per granularity \(5\)"),
        (drop_tiles, "tile counts add up to"),
    ],
)
def test_a_damaged_cache_is_rebuilt_and_says_why(stored, tmp_path, caplog, damage, why):
    spec, build, calls, first, folder = stored
    damage(folder)
    with caplog.at_level(logging.WARNING, logger="avglab.avg.feedback_store"):
        again, built = store.load_or_build(tmp_path, spec, build)
    assert built and len(calls) == 2
    assert f"feedback cache {folder} is damaged" in caplog.text
    assert re.search(why, caplog.text)
    assert torch.equal(again.feedback, first.feedback) and torch.equal(again.tiles, first.tiles)
    reused, built = store.load_or_build(tmp_path, spec, build)  # the rebuilt cache is whole again
    assert not built and len(calls) == 2 and torch.equal(reused.tokens, first.tokens)


def test_a_damaged_cache_that_cannot_be_cleared_names_the_folder_and_the_fix(stored, tmp_path, monkeypatch):
    spec, build, _, _, folder = stored
    truncate(folder)

    def refuse(self, target):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(Path, "rename", refuse)
    where = re.escape(str(folder))
    with pytest.raises(ValueError, match=rf"feedback cache {where} is damaged .*\(rm -r {where}\)"):
        store.load_or_build(tmp_path, spec, build)
