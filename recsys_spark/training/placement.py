"""Where a DDP rank runs: host, process, and the Spark executor that hosts it.

A rank is a grandchild of a Spark task's Python worker, whose ancestor is the executor's JVM
(``CoarseGrainedExecutorBackend ... --executor-id N``, on standalone, YARN and Kubernetes alike).
Read from ``/proc``; where that is unavailable (not Linux) or the rank runs on the driver (local
mode), the executor fields are None.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

EXECUTOR_CLASS = "org.apache.spark.executor.CoarseGrainedExecutorBackend"


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def executor_process(pid: int | None = None) -> tuple[int, str] | None:
    """(pid, executor id) of the Spark executor JVM among ``pid``'s ancestors, if any."""
    current = _parent(pid or os.getpid())
    while current and current > 1:
        args = _cmdline(current)
        if EXECUTOR_CLASS in args and "--executor-id" in args:
            return current, args[args.index("--executor-id") + 1]
        current = _parent(current)
    return None


def rank_placement() -> dict[str, Any]:
    """This rank's host, pid, thread count, rendezvous address and executor (for the logs)."""
    import torch

    executor = executor_process()
    return {
        "rank": int(os.environ.get("RANK", "0")),
        "world": int(os.environ.get("WORLD_SIZE", "1")),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
        "rendezvous": f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}",
        "executor_id": executor[1] if executor else None,
        "executor_pid": executor[0] if executor else None,
    }
