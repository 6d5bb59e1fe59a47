"""Shared benchmark plumbing: run a measured worker in its own process, sample the memory of its
whole process tree (Python driver + the JVM it starts), and record results in
docs/benchmarks.md between per-benchmark markers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO / "docs" / "benchmarks.md"
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class WorkerResult:
    result: dict
    peak_total_bytes: int
    peak_python_bytes: int
    peak_jvm_bytes: int
    wall_seconds: float


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def _rss(pid: int) -> tuple[int, str]:
    try:
        with open(f"/proc/{pid}/statm") as statm, open(f"/proc/{pid}/comm") as comm:
            return int(statm.read().split()[1]) * _PAGE, comm.read().strip()
    except OSError:
        return 0, ""


def _tree_rss(root: int) -> tuple[int, int]:
    """(python bytes, jvm bytes) resident in ``root`` and all its descendants."""
    python = jvm = 0
    stack = [root]
    while stack:
        pid = stack.pop()
        rss, name = _rss(pid)
        if name == "java":
            jvm += rss
        else:
            python += rss
        stack.extend(_children(pid))
    return python, jvm


def run_worker(args: list[str], *, timeout: float = 3600) -> WorkerResult:
    """Run ``python <args>`` and return the JSON it prints last, with peak memory of its tree."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    peaks = {"total": 0, "python": 0, "jvm": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            python, jvm = _tree_rss(process.pid)
            peaks["python"] = max(peaks["python"], python)
            peaks["jvm"] = max(peaks["jvm"], jvm)
            peaks["total"] = max(peaks["total"], python + jvm)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        done.set()
        sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"worker {args} failed ({process.returncode}):\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return WorkerResult(result, peaks["total"], peaks["python"], peaks["jvm"],
                        time.perf_counter() - start)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def record(section: str, markdown: str) -> None:
    """Replace (or append) ``section``'s block in docs/benchmarks.md."""
    begin, end = f"<!-- bench:{section}:begin -->", f"<!-- bench:{section}:end -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    BENCHMARKS_MD.write_text(text)


def machine() -> str:
    cores = os.cpu_count()
    with open("/proc/meminfo") as handle:
        total = int(handle.readline().split()[1]) * 1024
    return f"{cores} cores, {gib(total)} RAM, Python {sys.version.split()[0]}"
