"""The installed ``recsys`` command and the spark-submit job files, as real processes."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RECSYS = Path(sys.executable).parent / "recsys"


def run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS")}
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_help_lists_every_command_and_every_job_has_one() -> None:
    from recsys_spark.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    result = run(str(RECSYS), "--help")
    assert result.returncode == 0
    # argparse lists each command at an indent of four (its wrapped help text further in)
    listed = {line.split()[0] for line in result.stdout.splitlines()
              if line.startswith("    ") and not line.startswith("     ")}
    assert listed == set(commands)
    # every spark-submit entry point runs a command the CLI has, by its own name
    for job in (REPO / "jobs").glob("*.py"):
        called = re.search(r'run_job\("([\w-]+)"\)', job.read_text())
        assert called and called.group(1) in commands, job.name


@pytest.mark.parametrize(
    "argv",
    [
        (str(RECSYS), "ingest"),
        (sys.executable, str(REPO / "jobs" / "ingest.py")),
    ],
)
def test_missing_input_is_one_line_error_without_starting_spark(argv: tuple[str, ...], tmp_path: Path) -> None:
    result = run(*argv, "--format", "taobao", "--input", str(tmp_path / "nope.csv"),
                 "--root", str(tmp_path / "lake"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: input not found: {tmp_path / 'nope.csv'}"
    assert not (tmp_path / "lake").exists()


def test_unknown_config_key_exits_2_naming_it(tmp_path: Path) -> None:
    result = run(str(RECSYS), "config", "--set", "features.max_seq=3", "--root", str(tmp_path))
    assert result.returncode == 2
    assert "unknown config key 'features.max_seq'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_json_is_the_last_stdout_line(tmp_path: Path) -> None:
    out = tmp_path / "log.csv"
    result = run(str(RECSYS), "generate", "--users", "50", "--items", "40", "--days", "1",
                 "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["lines"] == len(out.read_text().splitlines()) > 0
    resolved = run(str(RECSYS), "config", "--json", "--root", str(tmp_path))
    assert json.loads(resolved.stdout.strip().splitlines()[-1])["root"] == str(tmp_path)
    explained = run(str(RECSYS), "config", "--explain", "--json")
    keys = json.loads(explained.stdout.strip().splitlines()[-1])["keys"]
    assert {"key": "storage.engine", "default": "'auto'"}.items() <= next(
        k for k in keys if k["key"] == "storage.engine").items()


def test_generate_daily_writes_one_folder_per_day(tmp_path: Path) -> None:
    result = run(str(RECSYS), "generate", "--users", "50", "--items", "40", "--days", "3", "--daily",
                 "--out", str(tmp_path / "landing"), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    days = sorted(p.name for p in (tmp_path / "landing").iterdir())
    assert days == ["date=2017-11-25", "date=2017-11-26", "date=2017-11-27"] and report["files"] == 3
    lines = sum(len((tmp_path / "landing" / d / "events.csv").read_text().splitlines()) for d in days)
    assert lines == report["lines"] > 0


@pytest.mark.parametrize(
    "argv",
    [
        ("generate", "--users", "0", "--out", "x.csv"),
        ("generate", "--users", "many", "--out", "x.csv"),
        ("generate", "--seed", "-1", "--out", "x.csv"),
        ("generate",),
        ("recommend", "--user", "abc"),
        ("features", "--silver-version", "-1"),
        ("replay", "--input", "x", "--format", "jsonl", "--landing", "l", "--rate", "nan"),
        ("stream", "--timeout", "inf"),
        ("history", "events"),  # not <layer>/<name>: refused before Spark starts
        ("maintain", "silver/events", "../x", "--vacuum"),
        ("maintain", "silver/events"),  # neither --optimize nor --vacuum
        ("maintain", "silver/events", "--vacuum", "../x"),  # names after the options are checked too
        ("config", "extra"),
        ("baselines", "nope"),
        ("no-such-command",),
    ],
)
def test_usage_mistakes_are_one_line_errors(argv: tuple[str, ...], tmp_path: Path) -> None:
    result = run(str(RECSYS), *argv, cwd=tmp_path)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "_int" not in line
    assert not list(tmp_path.iterdir())
    with_json = run(str(RECSYS), *argv, "--json", cwd=tmp_path)
    assert json.loads(with_json.stdout.strip().splitlines()[-1])["exit_code"] == 2


def test_generate_into_a_folder_is_one_line_error(tmp_path: Path) -> None:
    result = run(str(RECSYS), "generate", "--users", "20", "--items", "10", "--days", "1",
                 "--out", str(tmp_path))
    assert result.returncode == 1
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: cannot write") and str(tmp_path) in line
    assert not list(tmp_path.iterdir())


def test_root_that_cannot_be_created_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "log.csv").write_text("1,2,3,pv,1511539200\n")
    result = run(str(RECSYS), "ingest", "--format", "taobao", "--input", str(tmp_path / "log.csv"),
                 "--root", str(tmp_path / "file" / "lake"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: cannot create {tmp_path / 'file' / 'lake' / '_work'}: Not a directory"


@pytest.mark.parametrize("argv", [("tables",), ("history", "silver/events"), ("recommend", "--user", "1"),
                                  ("maintain", "--vacuum"), ("evaluate",), ("promote", "--version", "1"), ("ui",),
                                  ("gate",), ("stream-status",)])
def test_a_mistyped_root_fails_instead_of_becoming_an_empty_lakehouse(argv: tuple[str, ...], tmp_path: Path) -> None:
    result = run(str(RECSYS), *argv, "--root", str(tmp_path / "typo"), "--json")
    message = f"no lakehouse at {tmp_path / 'typo'}: check --root, or run `recsys ingest` first"
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {message}"
    # with --json the last line of standard output says so too
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"error": message, "exit_code": 1,
                                                                  "error_type": "RecsysError"}
    assert not (tmp_path / "typo").exists()



def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    stack = [pid]
    while stack:
        parent = stack.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            stack += sorted(children - found)
            found |= children
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.mlflow
@pytest.mark.parametrize("stop_signal", ["SIGTERM", "SIGKILL"])
def test_terminating_ui_stops_the_whole_mlflow_server(tmp_path: Path, stop_signal: str) -> None:
    # SIGKILL: recsys ui cannot clean up, and the server (a session of its own) must still go.
    import signal
    import socket
    import time
    import urllib.request

    (tmp_path / "lake" / "silver").mkdir(parents=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS")}
    ui = subprocess.Popen([str(RECSYS), "ui", "--root", str(tmp_path / "lake"), "--port", str(port)],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server: set[int] = set()
    try:
        deadline = time.monotonic() + 90
        while True:
            assert ui.poll() is None, "recsys ui exited before serving"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the MLflow UI never answered"
                time.sleep(0.5)
        server = _descendants(ui.pid)
        assert server, "the UI runs in child processes"
        ui.send_signal(getattr(signal, stop_signal))
        ui.wait(timeout=30)
        deadline = time.monotonic() + 15
        while {p for p in server if _alive(p)} and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not {p for p in server if _alive(p)}, "server processes outlived recsys ui"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        for pid in {ui.pid, *server, *_descendants(ui.pid)}:  # a failed run must not leave a server
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
