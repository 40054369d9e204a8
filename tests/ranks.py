"""Starting a test script as several ranks at once (importable: ``from ranks import launch``).

Each process gets a torchrun-style environment, so Lightning finds LOCAL_RANK/WORLD_SIZE set and joins
the ranks instead of re-executing the script for each (which would import everything one rank after
the other).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path


def launch(script: str | Path, args: list[str], processes: int, timeout: int = 600) -> list[tuple[int, str]]:
    """Runs ``python script *args`` as ``processes`` ranks; returns each rank's (exit code, stderr)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(processes)}
    common.update(NODE_RANK="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # 2 ranks on 2 cores
    logs = [tempfile.TemporaryFile("w+") for _ in range(processes)]  # a pipe could fill and stall a rank
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            env={**os.environ, **common, "LOCAL_RANK": str(rank), "RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )
        for rank, log in enumerate(logs)
    ]
    try:
        codes = [p.wait(timeout=timeout) for p in ranks]
    finally:
        for p in ranks:  # a failed rank leaves the other waiting in a collective
            if p.poll() is None:
                p.kill()
    out = []
    for code, log in zip(codes, logs, strict=True):
        log.seek(0)
        out.append((code, log.read()))
        log.close()
    return out


def leave_together() -> None:
    """End of a rank's script: a barrier, then the process group torn down before exit.

    A rank whose gloo threads are still alive at interpreter shutdown can abort ("terminate called
    without an active exception").
    """
    import torch.distributed

    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
