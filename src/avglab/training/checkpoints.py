"""Lightning checkpoints that are never torn: atomic saves, and a resume that takes the newest intact one.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in the
system temp folder; committing it is a copy when that folder is on another file system, so a kill
during the copy leaves a torn ``last.ckpt`` (and a kill before it a full-size file in /tmp).
:class:`AtomicCheckpointIO` writes beside the target and renames. :func:`checkpoint_problem` tells an
intact checkpoint from a torn one without loading it, and :func:`newest_intact` picks what
``ckpt_path=last`` resumes from.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import uuid
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

log = logging.getLogger(__name__)
TMP_MARK = ".tmp-"  # .<name>.tmp-<host>-<pid>-<random>: a save in progress (or killed)
CRC_CHECK_BYTES = 1 << 30  # files up to this size also get every member's CRC checked (reads them once)
STEP = re.compile(r"step=(\d+)")


class CheckpointError(ValueError):
    """A checkpoint to resume from is missing or torn; the message names it and the intact alternatives."""


def temp_path(path: Path) -> Path:
    """A temporary name beside ``path`` that says which host and process writes it."""
    return path.with_name(
        f".{path.name}{TMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes to a temporary file in the target's folder, then renames it.

    A save that fails or is interrupted (an exception, Ctrl-C) deletes its temporary file; one killed
    outright leaves it, named after its host and process, and :func:`remove_stale_temps` deletes it
    when the run is resumed. The target is either the old complete file or the new complete file.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Saves ``checkpoint`` to ``path`` atomically (remote paths: Lightning's own save).

        Raises:
            TypeError: ``storage_options`` given (as ``TorchCheckpointIO``).
        """
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def use_atomic_saves(trainer) -> None:
    """Gives the trainer's strategy :class:`AtomicCheckpointIO` where it saves through plain torch files.

    Strategies with their own writer (DeepSpeed, distributed FSDP folders) keep it; their folders are
    checked on resume by :func:`checkpoint_problem`.
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Deletes the temporary files of killed saves in ``folder`` (this host's, whose process is gone).

    Returns:
        The deleted files.
    """
    removed = []
    host = socket.gethostname()
    for tmp in folder.glob(f".*{TMP_MARK}*"):
        owner = tmp.name.rsplit(TMP_MARK, 1)[1].rsplit("-", 2)
        if len(owner) != 3 or owner[0] != host or not owner[1].isdigit() or _pid_alive(int(owner[1])):
            continue  # another machine's or a live save: not ours to judge
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
        log.warning("removed %s, the temporary file of a checkpoint save that was killed", tmp)
    return removed


def _file_problem(path: Path) -> str | None:
    """Why a ``torch.save`` zip file cannot be loaded, or None (structure always, CRCs of small files)."""
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if not any(m.filename.endswith("/data.pkl") or m.filename == "data.pkl" for m in members):
                return "not a torch checkpoint (no data.pkl)"
            beyond = [m.filename for m in members if m.header_offset + m.compress_size > size]
            if beyond:
                return f"cut short: {len(beyond)} member(s) end past the file's {size} bytes"
            if size <= CRC_CHECK_BYTES:
                bad = archive.testzip()
                if bad is not None:
                    return f"member {bad} is corrupt (CRC mismatch)"
    except zipfile.BadZipFile as exn:
        return f"torn or not a checkpoint ({exn}; {size} bytes)"
    except (OSError, EOFError, ValueError) as exn:
        return f"unreadable ({exn!r})"
    return None


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be resumed from, or None when it looks intact.

    A file must be a complete ``torch.save`` zip (central directory, members inside the file, CRCs of
    files up to :data:`CRC_CHECK_BYTES`); a folder (a distributed FSDP/FSDP2 or DeepSpeed checkpoint)
    must hold the index its writer writes last (``.metadata`` or ``latest``), and its ``meta.pt`` if
    present must be intact.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / ".metadata").is_file() and not (path / "latest").is_file():
            return "a checkpoint folder without its index (.metadata or latest): an interrupted save"
        meta = path / "meta.pt"
        problem = _file_problem(meta) if meta.is_file() else None
        return f"meta.pt: {problem}" if problem else None
    if not path.is_file():
        return "does not exist"
    return _file_problem(path)


def _newest_first(path: Path) -> tuple[int, int, float]:
    """Sort key: ``last*.ckpt`` first (saved after its step's checkpoint), then by step, then by time."""
    step = STEP.search(path.name)
    return (int(path.name.startswith("last")), int(step.group(1)) if step else -1, path.stat().st_mtime)


def checkpoints_in(folder: Path) -> list[Path]:
    """The checkpoints of a run's ``checkpoints/`` folder, newest first (temporary files excluded)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.endswith(".ckpt") and not p.name.startswith(".")]
    return sorted(found, key=_newest_first, reverse=True)


def newest_intact(folders: Iterable[Path]) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The first intact checkpoint, folders in the order given and each newest first.

    Args:
        folders: ``checkpoints/`` folders, the preferred (newest run) first.

    Returns:
        The checkpoint (None if none is intact) and the torn ones passed over, with why.
    """
    skipped: list[tuple[Path, str]] = []
    for folder in folders:
        remove_stale_temps(folder)
        for path in checkpoints_in(folder):
            problem = checkpoint_problem(path)
            if problem is None:
                return path, skipped
            skipped.append((path, problem))
    return None, skipped


def check_explicit(path: str | Path) -> str:
    """``ckpt_path=<file>``: the file when intact.

    Raises:
        CheckpointError: naming the file, what is wrong and the intact checkpoints beside it.
    """
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is None:
        return str(path)
    if path.parent.is_dir():
        remove_stale_temps(path.parent)
    intact = [str(p) for p in checkpoints_in(path.parent) if p != path and checkpoint_problem(p) is None]
    others = f"intact checkpoints beside it: {intact}" if intact else "no intact checkpoint beside it"
    raise CheckpointError(
        f"ckpt_path={path} cannot be resumed from: {problem}. {others}; pass one as ckpt_path=<file>, "
        "or ckpt_path=last for this stage's newest intact checkpoint"
    )
