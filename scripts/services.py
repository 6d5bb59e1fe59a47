"""Start and stop the services the cluster path runs against, on this machine, on 127.0.0.1 only:
a Spark standalone cluster (one master, N workers) and an MLflow tracking server.

    python scripts/services.py cluster-up [--port 7077] [--ui-port 8080] [--workers 2] [--cores 1] [--memory 2g]
    python scripts/services.py cluster-down
    python scripts/services.py mlflow-up [--port 5000]
    python scripts/services.py mlflow-down
    python scripts/services.py status

A development and test harness, not part of the platform: recsys-spark runs on the cluster a user
already has (standalone, YARN, Kubernetes, Databricks); this starts one from the installed pyspark
(``spark-class ...Master`` / ``...Worker``) so that the cluster path can be run and tested here.
Standard library only, run with the project's Python (``make cluster-up``, ``make mlflow-server``;
the test fixtures call it the same way).

Pids, logs and the services' data live under ``--state`` (default ``.cluster/``, git-ignored).
``*-up`` is idempotent: what already runs is kept, what died is started again, and it returns once
every worker is registered with the master (read from the master's JSON endpoint) or the server
answers ``/health``; otherwise it prints the log's tail, stops what it started and exits 1.
``*-down`` stops the processes it recorded (SIGTERM, then SIGKILL after 15 s).

``--private PATH`` (cluster-up, repeatable) starts the workers in a mount namespace of their own
in which PATH is an empty folder: their executors cannot see what the driver keeps there, as on
a real cluster whose executors run on other hosts (needs unshare(1) and the right to mount). The
workers' temp folder (TMPDIR) is then private to them too, so the driver cannot read what only
an executor wrote there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
STOP_SECONDS = 15.0
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
# A worker logs its RPC address once it listens; the master lists workers by that address.
WORKER_STARTED = re.compile(r"Starting Spark worker 127\.0\.0\.1:(\d+)")


class ServiceError(Exception):
    """A service could not be started or stopped; the message says which and why."""


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).resolve().parent


def _pid_alive(pid: int, marker: str) -> bool:
    """Whether ``pid`` runs and is the process we started (its command line holds ``marker``)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return marker in cmdline


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (not exited, not a zombie: this script is the parent of what it
    started and never waits for it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _read_pid(pid_file: Path, marker: str) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid, marker) else None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _get(url: str, timeout: float = 2.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - our own loopback URL
            return response.read()
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _stop(pid: int, marker: str, *, group: bool = False) -> None:
    kill = os.killpg if group else os.kill
    try:
        kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_SECONDS
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.2)
    if _running(pid):
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGKILL)


def _start(command: list[str], log: Path, env: dict[str, str]) -> int:
    """Start ``command`` detached (a session of its own), output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True, cwd=log.parent)
    return process.pid


# --- the Spark standalone cluster -------------------------------------------------------------


def _spark_env(state: Path) -> dict[str, str]:
    env = dict(os.environ)
    home = spark_home()
    conf_dir = state / "spark" / "conf"  # empty: no spark-defaults.conf of the user's leaks in
    conf_dir.mkdir(parents=True, exist_ok=True)
    env.update({
        "SPARK_HOME": str(home),
        "SPARK_CONF_DIR": str(conf_dir),
        # Every socket of the daemons, their web UIs and the executors they start, on loopback.
        "SPARK_LOCAL_IP": HOST,
        "SPARK_PUBLIC_DNS": HOST,
        "SPARK_DAEMON_MEMORY": "512m",
        # A lost worker is noticed in 20 s instead of 60; no REST submission server.
        "SPARK_MASTER_OPTS": "-Dspark.worker.timeout=20 -Dspark.master.rest.enabled=false",
        # Finished applications' folders (jars, py-files, executor logs) go after a day.
        "SPARK_WORKER_OPTS": "-Dspark.worker.cleanup.enabled=true -Dspark.worker.cleanup.appDataTtl=86400",
    })
    return env


def _private_wrapper(paths: list[str]) -> list[str]:
    """A command prefix that runs the rest in a mount namespace where ``paths`` are empty."""
    if not paths:
        return []
    mounts = " && ".join(f'mount -t tmpfs -o size=1g,mode=700 recsys-private "${i + 1}"' for i in range(len(paths)))
    return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            f'{mounts} && shift {len(paths)} && exec "$@"', "sh", *paths]


def _worker_tmp(state: Path) -> Path:
    """The workers' (and their executors') temp folder when the driver's folders are private:
    a tmpfs of their own namespace, so that the driver cannot read what only they wrote."""
    return (state / "spark" / "worker-tmp").resolve()


def _check_private(paths: list[str]) -> None:
    for path in paths:
        if not Path(path).is_dir():
            raise ServiceError(f"--private {path}: no such folder")
    probe = subprocess.run([*_private_wrapper(paths), "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise ServiceError(f"cannot hide {', '.join(paths)} from the workers (unshare/mount refused: "
                           f"{probe.stderr.strip() or probe.returncode})")


def _cluster_file(state: Path) -> Path:
    return state / "cluster.json"


def cluster_up(state: Path, *, port: int, ui_port: int, workers: int, cores: int, memory: str,
               worker_ui_port: int, private: list[str], timeout: float) -> dict:
    spark_dir = state / "spark"
    spark_dir.mkdir(parents=True, exist_ok=True)
    recorded = json.loads(_cluster_file(state).read_text()) if _cluster_file(state).exists() else None
    if recorded and (recorded["port"], recorded["ui_port"]) != (port, ui_port) and _read_pid(
            spark_dir / "master.pid", recorded["marker"]):
        raise ServiceError(f"a cluster from {state} already runs at {recorded['master_url']}; "
                           "run cluster-down first")
    hidden = []
    env = _spark_env(state)
    if private:
        _worker_tmp(state).mkdir(parents=True, exist_ok=True)
        hidden = [*private, str(_worker_tmp(state))]
        _check_private(hidden)
    spark_class = str(spark_home() / "bin" / "spark-class")
    master_url = f"spark://{HOST}:{port}"
    marker = f"-Drecsys.services={state.resolve()}"
    info = {"master_url": master_url, "port": port, "ui_port": ui_port, "ui": f"http://{HOST}:{ui_port}",
            "workers": workers, "cores": cores, "memory": memory, "private": private, "marker": marker,
            "state": str(state.resolve())}
    _cluster_file(state).write_text(json.dumps(info, indent=2))
    started: list[tuple[int, str]] = []
    try:
        if _read_pid(spark_dir / "master.pid", f"{marker}/master") is None:
            pid = _start([spark_class, MASTER_CLASS, "--host", HOST, "--port", str(port), "--webui-port",
                          str(ui_port)], spark_dir / "master.log",
                         env | {"SPARK_DAEMON_JAVA_OPTS": f"{marker}/master"})
            (spark_dir / "master.pid").write_text(str(pid))
            started.append((pid, f"{marker}/master"))
        for i in range(1, workers + 1):
            name = f"worker-{i}"
            if _read_pid(spark_dir / f"{name}.pid", f"{marker}/{name}") is not None:
                continue
            log = spark_dir / f"{name}.log"
            log.unlink(missing_ok=True)  # its RPC port is read from this log
            command = [*_private_wrapper(hidden), spark_class, WORKER_CLASS, "--host", HOST, "--cores", str(cores),
                       "--memory", memory, "--webui-port", str(worker_ui_port + i - 1),
                       "--work-dir", str((spark_dir / name).resolve()), master_url]
            worker_env = env | {"SPARK_DAEMON_JAVA_OPTS": f"{marker}/{name}"}
            if hidden:
                worker_env["TMPDIR"] = str(_worker_tmp(state))
            pid = _start(command, log, worker_env)
            (spark_dir / f"{name}.pid").write_text(str(pid))
            started.append((pid, f"{marker}/{name}"))
        _wait_for_workers(state, info, timeout)
    except BaseException:
        for pid, mark in reversed(started):
            _stop(pid, mark)
        raise
    return info


def _worker_ports(state: Path, info: dict) -> dict[str, int | None]:
    ports: dict[str, int | None] = {}
    for i in range(1, info["workers"] + 1):
        name = f"worker-{i}"
        found = WORKER_STARTED.search((state / "spark" / f"{name}.log").read_text(errors="replace")) if (
            state / "spark" / f"{name}.log").exists() else None
        ports[name] = int(found.group(1)) if found else None
    return ports


def registered_workers(info: dict) -> list[dict]:
    """The workers the master lists as ALIVE (its JSON endpoint); [] while it does not answer."""
    body = _get(f"{info['ui']}/json/")
    if body is None:
        return []
    return [w for w in json.loads(body).get("workers", []) if w.get("state") == "ALIVE"]


def _wait_for_workers(state: Path, info: dict, timeout: float) -> None:
    spark_dir = state / "spark"
    deadline = time.monotonic() + timeout
    # Liveness by pid alone: a daemon just started is still the spark-class shell, without the
    # marker, for a second or two.
    pids = {name: int((spark_dir / f"{name}.pid").read_text())
            for name in ["master"] + [f"worker-{i}" for i in range(1, info["workers"] + 1)]}
    while True:
        for name, pid in pids.items():
            if not _running(pid):
                raise ServiceError(f"Spark {name} exited:\n{_tail(spark_dir / f'{name}.log')}")
        ports = _worker_ports(state, info)
        alive = {(w.get("host"), w.get("port")) for w in registered_workers(info)}
        missing = [name for name, p in ports.items() if p is None or (HOST, p) not in alive]
        if not missing:
            return
        if time.monotonic() > deadline:
            name = missing[0]
            raise ServiceError(f"{name} did not register with {info['master_url']} within {timeout:.0f} s:\n"
                               f"{_tail(spark_dir / f'{name}.log')}")
        time.sleep(0.5)


def cluster_down(state: Path) -> list[str]:
    if not _cluster_file(state).exists():
        return []
    info = json.loads(_cluster_file(state).read_text())
    spark_dir = state / "spark"
    stopped = []
    names = [f"worker-{i}" for i in range(1, info["workers"] + 1)] + ["master"]
    for name in names:  # workers first: they stop their executors
        pid = _read_pid(spark_dir / f"{name}.pid", f"{info['marker']}/{name}")
        if pid is not None:
            _stop(pid, f"{info['marker']}/{name}")
            stopped.append(name)
        (spark_dir / f"{name}.pid").unlink(missing_ok=True)
    return stopped


# --- the MLflow tracking server -----------------------------------------------------------------


def _mlflow_file(state: Path) -> Path:
    return state / "mlflow.json"


def mlflow_up(state: Path, *, port: int, timeout: float) -> dict:
    folder = (state / "mlflow").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{folder / 'mlflow.db'}"
    info = {"tracking_uri": f"http://{HOST}:{port}", "port": port, "backend_store_uri": store,
            "artifacts_destination": str(folder / "artifacts"), "marker": store}
    recorded = json.loads(_mlflow_file(state).read_text()) if _mlflow_file(state).exists() else None
    pid = _read_pid(folder / "server.pid", store)
    if pid is not None and recorded and recorded["port"] != port:
        raise ServiceError(f"an MLflow server from {state} already runs at {recorded['tracking_uri']}; "
                           "run mlflow-down first")
    _mlflow_file(state).write_text(json.dumps(info, indent=2))
    started = None
    if pid is None:
        # The server's own database for runs and the registry; artifacts it stores under
        # artifacts_destination and serves over HTTP (mlflow-artifacts:/), so no client ever needs
        # that folder.
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
                   "--serve-artifacts", "--artifacts-destination", info["artifacts_destination"],
                   "--host", HOST, "--port", str(port), "--workers", "2"]
        started = pid = _start(command, folder / "server.log", dict(os.environ))
        (folder / "server.pid").write_text(str(pid))
    deadline = time.monotonic() + timeout
    while _get(f"{info['tracking_uri']}/health") != b"OK":
        if not _running(pid) or time.monotonic() > deadline:
            if started is not None:
                _stop(started, store, group=True)
            raise ServiceError(f"the MLflow server at {info['tracking_uri']} did not answer /health within "
                               f"{timeout:.0f} s:\n{_tail(folder / 'server.log')}")
        time.sleep(0.5)
    return info


def mlflow_down(state: Path) -> bool:
    folder = state / "mlflow"
    if not _mlflow_file(state).exists():
        return False
    marker = json.loads(_mlflow_file(state).read_text())["marker"]
    pid = _read_pid(folder / "server.pid", marker)
    if pid is not None:
        _stop(pid, marker, group=True)  # the server's workers are in its process group
    (folder / "server.pid").unlink(missing_ok=True)
    return pid is not None


def status(state: Path) -> dict:
    result: dict = {"state": str(state.resolve())}
    if _cluster_file(state).exists():
        info = json.loads(_cluster_file(state).read_text())
        names = ["master"] + [f"worker-{i}" for i in range(1, info["workers"] + 1)]
        result["cluster"] = {
            "master_url": info["master_url"], "ui": info["ui"],
            "processes": {n: _read_pid(state / "spark" / f"{n}.pid", f"{info['marker']}/{n}") for n in names},
            "registered_workers": len(registered_workers(info)),
        }
    if _mlflow_file(state).exists():
        info = json.loads(_mlflow_file(state).read_text())
        result["mlflow"] = {"tracking_uri": info["tracking_uri"],
                            "pid": _read_pid(state / "mlflow" / "server.pid", info["marker"]),
                            "healthy": _get(f"{info['tracking_uri']}/health") == b"OK"}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state", type=Path, default=REPO / ".cluster", help="pids, logs and data (default .cluster/)")
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("cluster-up", help="start (or complete) the Spark standalone cluster")
    up.add_argument("--port", type=int, default=7077, help="master RPC port")
    up.add_argument("--ui-port", type=int, default=8080, help="master web UI port (its /json/ is the readiness check)")
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--cores", type=int, default=1, help="cores each worker offers")
    up.add_argument("--memory", default="2g", help="memory each worker offers to executors")
    up.add_argument("--worker-ui-port", type=int, default=8081, help="web UI port of the first worker (+1 each)")
    up.add_argument("--private", action="append", default=[], metavar="PATH",
                    help="a folder the workers and executors must not see (mount namespace)")
    up.add_argument("--timeout", type=float, default=120.0)
    commands.add_parser("cluster-down", help="stop the workers and the master")
    ml = commands.add_parser("mlflow-up", help="start the MLflow tracking server")
    ml.add_argument("--port", type=int, default=5000)
    ml.add_argument("--timeout", type=float, default=90.0)
    commands.add_parser("mlflow-down", help="stop the MLflow tracking server")
    commands.add_parser("status", help="what runs, as JSON")
    args = parser.parse_args(argv)
    state: Path = args.state
    state.mkdir(parents=True, exist_ok=True)
    try:
        if args.command == "cluster-up":
            info = cluster_up(state, port=args.port, ui_port=args.ui_port, workers=args.workers, cores=args.cores,
                              memory=args.memory, worker_ui_port=args.worker_ui_port, private=args.private,
                              timeout=args.timeout)
            print(f"Spark master {info['master_url']} with {info['workers']} workers "
                  f"({info['cores']} core, {info['memory']} each); UI {info['ui']}; logs in {state / 'spark'}")
        elif args.command == "cluster-down":
            stopped = cluster_down(state)
            print(f"stopped {', '.join(stopped)}" if stopped else "no cluster running")
        elif args.command == "mlflow-up":
            info = mlflow_up(state, port=args.port, timeout=args.timeout)
            print(f"MLflow tracking server {info['tracking_uri']} (store {info['backend_store_uri']}, "
                  f"artifacts served from {info['artifacts_destination']})")
        elif args.command == "mlflow-down":
            print("stopped the MLflow server" if mlflow_down(state) else "no MLflow server running")
        else:
            print(json.dumps(status(state), indent=2))
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
