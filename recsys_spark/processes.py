"""Process-level helpers: environment variables set for a block only, and child servers (the
MLflow UI) that never outlive the command that started them.

A server runs in a process group of its own under a small supervisor (``python -m
recsys_spark.processes -- COMMAND``), the group's leader. SIGTERM or Ctrl-C to the parent stops
the whole group; when the parent dies without a word (``kill -9``), the kernel sends the
supervisor SIGTERM (Linux's parent-death signal) and it stops the group. The server's own
workers (the MLflow server forks uvicorn workers and huey consumers) are in the group too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence

GRACE_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def environment(values: dict[str, str], *, keep_existing: bool = False) -> Iterator[None]:
    """Set environment variables for the block and restore what was there afterwards;
    ``keep_existing``: a variable the user already set keeps its value."""
    previous = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if not (keep_existing and previous[name] is not None):
            os.environ[name] = value
    try:
        yield
    finally:
        for name, old in previous.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def run_process_group(command: Sequence[str], grace_seconds: float = GRACE_SECONDS) -> int:
    """Run ``command`` supervised in a process group of its own and wait for it; SIGTERM or
    Ctrl-C to this process, or its death, stops the whole group."""
    process = subprocess.Popen(
        [sys.executable, "-m", "recsys_spark.processes", str(os.getpid()), "--", *command],
        start_new_session=True,
    )

    def stop_group(*_: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop_group) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_group()  # workers the server left behind when it exited on its own
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _supervise(parent: int, command: Sequence[str]) -> int:
    """The group leader: runs ``command``; on SIGTERM (from the parent, or the kernel when the
    parent died) it stops every process of the group, with SIGKILL after a grace period."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the signal was armed
        return 1
    child = subprocess.Popen(list(command))

    def stop(*_: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM reaches us too
        os.killpg(0, signal.SIGTERM)
        try:
            child.wait(timeout=GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(0, signal.SIGKILL)  # this supervisor included
        sys.exit(128 + signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = child.wait()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)  # workers the server left behind
    return code


if __name__ == "__main__":
    parent_pid, separator, *argv = sys.argv[1:]
    if separator != "--" or not argv:
        sys.exit("usage: python -m recsys_spark.processes PARENT_PID -- COMMAND...")
    sys.exit(_supervise(int(parent_pid), argv))
