"""recsys-spark on a real Spark standalone cluster with an MLflow tracking server.

The module starts, through ``scripts/services.py`` (what ``make cluster-up`` and ``make
mlflow-server`` run), one master and two workers (1 core each) on 127.0.0.1 and an MLflow server
with ``--serve-artifacts``, on ports from ``$RECSYS_TEST_PORT_BASE`` (default 17000) so that a
user's ``make cluster-up`` on 7077 never collides. Every stage is then submitted with
``spark-submit --master spark://... jobs/<stage>.py --config conf/standalone.yaml``, the package
shipped as ``--py-files dist/recsys_spark-0.1.0.zip`` to executors whose Python has the
dependencies but not the project, Delta's jars with ``--jars``.

The workers run in a mount namespace in which the driver's working directory and temp folder
are empty (and their own temp folder is invisible to the driver), as if they ran on other
hosts: everything they need must come from the shared lakehouse root or the MLflow server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from recsys_spark.storage import Lakehouse, resolve_engine
from tests.conftest import (
    HAVE_DELTA_JARS,
    JARS_DIR,
    NO_DELTA_JARS,
    PIPELINE_BASELINES,
    PIPELINE_SETTINGS,
    REPO,
    assert_same_rows,
    land,
)

pytestmark = [pytest.mark.cluster, pytest.mark.delta_spark, pytest.mark.slow,
              pytest.mark.skipif(not HAVE_DELTA_JARS, reason=NO_DELTA_JARS)]

PORT_BASE = int(os.environ.get("RECSYS_TEST_PORT_BASE", "17000"))
MASTER_PORT, MASTER_UI, WORKER_UI, MLFLOW_PORT = PORT_BASE + 77, PORT_BASE + 80, PORT_BASE + 81, PORT_BASE + 500
UNUSED_PORT = PORT_BASE + 999  # nothing listens there: the wrong master / tracking server
MASTER = f"spark://127.0.0.1:{MASTER_PORT}"
TRACKING = f"http://127.0.0.1:{MLFLOW_PORT}"
VENV_BIN = Path(sys.executable).parent
ETL_TABLES = ("bronze/events_raw", "quarantine/events", "silver/events", "silver/user_index", "silver/item_index",
              "gold/user_features", "gold/item_features", "gold/user_sequences", "gold/training_examples")
GOLD_TABLES = tuple(t for t in ETL_TABLES if t.startswith("gold/"))
REGISTERED = "recsys-recommender"


class Services:
    """The cluster and the MLflow server of this module, driven by scripts/services.py."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.driver = state / "driver"  # the driver's working directory and temp folder live here
        self.shared = state / "shared"  # what every process sees: inputs, the lakehouse root
        self.hidden = False

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(REPO / "scripts" / "services.py"), "--state", str(self.state),
                               *args], capture_output=True, text=True, timeout=300)

    def cluster_up(self, *, private: bool) -> subprocess.CompletedProcess:
        extra = ["--private", str(self.driver)] if private else []
        return self.run("cluster-up", "--port", str(MASTER_PORT), "--ui-port", str(MASTER_UI),
                        "--worker-ui-port", str(WORKER_UI), *extra)

    def pid(self, name: str) -> int:
        return int((self.state / "spark" / f"{name}.pid").read_text())


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory):
    s = Services(tmp_path_factory.mktemp("services"))
    for folder in (s.driver / "cwd", s.driver / "tmp", s.shared):
        folder.mkdir(parents=True)
    up = s.cluster_up(private=True)
    s.hidden = up.returncode == 0
    if up.returncode != 0 and "cannot hide" in up.stderr:  # no mount namespaces here: same disk for all
        up = s.cluster_up(private=False)
    try:
        if up.returncode != 0:
            pytest.skip(f"the Spark standalone cluster could not start: {up.stderr.strip()[-1500:]}")
        ml = s.run("mlflow-up", "--port", str(MLFLOW_PORT))
        if ml.returncode != 0:
            pytest.skip(f"the MLflow server could not start: {ml.stderr.strip()[-1500:]}")
        yield s
    finally:
        s.run("cluster-down")
        s.run("mlflow-down")


@pytest.fixture(scope="module")
def shipped(services: Services) -> dict[str, Path]:
    """The package as a user ships it (`make dist`), and an executor Python with the project's
    dependencies but not the project (its site-packages reached through a .pth line, so the
    editable install's own .pth is not processed)."""
    dist = services.state / "dist"
    made = subprocess.run(["make", "-s", "dist", f"DIST={dist}", f"PY={sys.executable}"], cwd=REPO,
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    env = services.state / "executor-python"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    purelib = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    site = next((env / "lib").glob("python3*/site-packages"))
    (site / "project-dependencies.pth").write_text(purelib + "\n")
    python = env / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import torch, pyspark, mlflow, deltalake; import recsys_spark"],
                           capture_output=True, text=True, cwd=env, env={k: v for k, v in os.environ.items()
                                                                        if k != "PYTHONPATH"})
    assert "No module named 'recsys_spark'" in probe.stderr, probe.stderr  # only the shipped zip has it
    return {"zip": dist / "recsys_spark-0.1.0.zip", "python": python}


def spark_submit(services: Services, shipped: dict[str, Path], job: str, *args: str, master: str = MASTER,
                 jars: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """``spark-submit`` of ``jobs/<job>.py`` as the README shows it, from the driver's private folder."""
    command = [str(VENV_BIN / "spark-submit"), "--master", master]
    if jars:
        command += ["--jars", ",".join(sorted(str(p) for p in JARS_DIR.glob("*.jar")))]
    command += ["--py-files", str(shipped["zip"]), "--conf", f"spark.pyspark.python={shipped['python']}",
                str(REPO / "jobs" / f"{job}.py"), "--config", str(REPO / "conf" / "standalone.yaml"),
                "--set", f"mlflow.tracking_uri={TRACKING}", *args, "--json"]
    return subprocess.run(command, cwd=services.driver / "cwd", env=submit_env(services), capture_output=True,
                          text=True, timeout=timeout)


def submit_env(services: Services) -> dict[str, str]:
    """A user's environment: the venv's spark-submit first, the driver's own temp folder, and no
    engine forced (the tests' own setting): the config file decides."""
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(services.driver / "tmp"))
    env.pop("RECSYS__STORAGE__ENGINE", None)
    return env


def result_of(done: subprocess.CompletedProcess) -> dict:
    """The JSON result line (spark-submit merges the driver's stderr into its stdout)."""
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line of a failed command."""
    assert done.returncode != 0, done.stdout[-3000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, (done.stdout + done.stderr)[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def cluster_run(services: Services, shipped: dict[str, Path], pipeline_input: dict[str, Path]) -> dict:
    """Every stage on the cluster, on the same input as the local runs; results and seconds."""
    root = str(services.shared / "lake")
    events = services.shared / "events.csv"
    common = ["--root", root, *(a for kv in PIPELINE_SETTINGS for a in ("--set", kv))]
    stages = [
        ("generate", ["--users", "200", "--items", "150", "--days", "6", "--seed", "5", "--malformed-rate", "0.03",
                      "--out", str(events)]),
        ("ingest", ["--format", "taobao", "--input", str(events), *common]),
        ("build_features", common),
        ("train", ["--model", "sasrec", *common]),
        ("baselines", [*PIPELINE_BASELINES, *common]),
        ("evaluate", common),
        ("score_batch", common),
        ("stream_score", ["--until-idle", "3", "--timeout", "300", *common]),
        ("maintain", ["gold/item_features", "--optimize", "--vacuum", *common]),
    ]
    run: dict = {"root": root, "events": events, "seconds": {}, "output": {}}
    for job, args in stages:
        if job == "stream_score":
            land(pipeline_input["fresh"], Path(root) / "_landing")
        started = time.perf_counter()
        done = spark_submit(services, shipped, job, *args)
        run["seconds"][job] = round(time.perf_counter() - started, 1)
        run["output"][job] = done.stdout
        run[job] = result_of(done)
    print(f"\ncluster stages (seconds): {run['seconds']}")
    return run


def test_every_stage_runs_under_spark_submit_and_the_tables_equal_the_local_run(
        spark, cluster_run, local_pipeline, pipeline_input) -> None:
    # generate is deterministic: the cluster's input is the local runs' input
    assert cluster_run["events"].read_bytes() == pipeline_input["events"].read_bytes()
    local = local_pipeline("delta-spark")
    engine = resolve_engine(spark, "delta-spark")
    on_cluster, in_local = Lakehouse(cluster_run["root"], engine), Lakehouse(local["root"], engine)
    for table in ETL_TABLES:
        assert_same_rows(on_cluster.read(table), in_local.read(table), table)
    assert cluster_run["ingest"]["rows_in"] == local["ingest"]["rows_in"]
    # the baselines are deterministic too; the model is not comparable (two ranks against one)
    assert [b["test"] for b in cluster_run["baselines"]["baselines"]] == [
        b["test"] for b in local["baselines"]["baselines"]]
    assert cluster_run["evaluate"]["hit@10"] == pytest.approx(cluster_run["train"]["hit@10"])
    assert cluster_run["stream_score"]["batches"] >= 1


def test_two_ranks_ran_as_barrier_tasks_on_two_executors_with_their_task_cpus(services, cluster_run) -> None:
    output = cluster_run["output"]["train"]
    assert cluster_run["train"]["world_size"] == 2
    app = re.search(r" spark.session .*app_id=(\S+)", output).group(1)
    ranks = {}
    for line in output.splitlines():
        if " train.rank " in line:
            fields = dict(re.findall(r"(\w+)=(\S+)", line))
            ranks[int(fields["rank"])] = fields
    assert sorted(ranks) == [0, 1], output[-3000:]
    assert ranks[0]["executor_id"] != ranks[1]["executor_id"]
    # each executor belongs to another worker: the workers keep one folder per executor of an app
    homes = {rank: [w for w in ("worker-1", "worker-2")
                    if (services.state / "spark" / w / app / fields["executor_id"]).is_dir()]
             for rank, fields in ranks.items()}
    assert sorted(h for found in homes.values() for h in found) == ["worker-1", "worker-2"], homes
    for fields in ranks.values():
        assert fields["threads"] == "1"  # spark.task.cpus of conf/standalone.yaml
        assert fields["rendezvous"].startswith("127.0.0.1:")  # rank 0's executor, on loopback


def test_executors_never_see_the_drivers_folders_and_checkpoints_are_shared(services, cluster_run) -> None:
    if not services.hidden:
        pytest.skip("this machine refuses mount namespaces (unshare), so the driver's folders could not be "
                    "hidden from the workers")
    marker = services.driver / "cwd" / "marker"
    marker.write_text("the driver's")
    # in the workers' mount namespace the driver's folder (its working directory and temp folder
    # inside) is an empty folder
    seen = subprocess.run(["nsenter", "-t", str(services.pid("worker-1")), "-m", "ls", "-A",
                           str(services.driver)], capture_output=True, text=True)
    assert seen.returncode == 0 and seen.stdout.strip() == "", seen
    # rank 0's checkpoints, which the driver registered the model from, are under the shared root
    run_id = cluster_run["train"]["run_id"]
    assert (Path(cluster_run["root"]) / "_work" / "checkpoints" / run_id / "best.pt").is_file()


def test_the_registered_model_is_served_over_rest_and_loads_as_champion_elsewhere(cluster_run, shipped) -> None:
    query = urllib.parse.urlencode({"name": REGISTERED})
    with urllib.request.urlopen(f"{TRACKING}/api/2.0/mlflow/registered-models/get?{query}", timeout=30) as r:
        model = json.load(r)["registered_model"]
    champion = {a["alias"]: a["version"] for a in model.get("aliases", [])}["champion"]
    assert champion == cluster_run["train"]["model_version"]
    query = urllib.parse.urlencode({"name": REGISTERED, "version": champion})
    with urllib.request.urlopen(f"{TRACKING}/api/2.0/mlflow/model-versions/get?{query}", timeout=30) as r:
        version = json.load(r)["model_version"]
    assert version["source"].startswith(("mlflow-artifacts:", "models:/")), version["source"]  # served, not a path
    # another process, with nothing but the tracking URI: the executor Python and the shipped zip
    script = (
        "import mlflow, pandas as pd, json\n"
        f"model = mlflow.pyfunc.load_model('models:/{REGISTERED}@champion')\n"
        "out = model.predict(pd.DataFrame({'history': [[1, 2, 3]]}), params={'k': 5})\n"
        "print(json.dumps(len(out['item_ids'][0])))\n"
    )
    env = dict(os.environ, MLFLOW_TRACKING_URI=TRACKING, PYTHONPATH=str(shipped["zip"]))
    loaded = subprocess.run([str(shipped["python"]), "-c", script], capture_output=True, text=True, env=env,
                            cwd=shipped["zip"].parent, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == 5


def test_score_batch_on_the_cluster_writes_every_user_once(cluster_run) -> None:
    from deltalake import DeltaTable

    root = cluster_run["root"]
    batch = [r for r in DeltaTable(f"{root}/serving/recommendations").to_pyarrow_table().to_pylist()
             if r["source"] == "batch"]
    users = DeltaTable(f"{root}/gold/user_sequences").to_pyarrow_table().column("user_id").to_pylist()
    assert sorted(r["user_id"] for r in batch) == sorted(users)
    assert cluster_run["score_batch"]["users"] == len(users)


def _files(root: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if "/_work" not in str(p))


def _runs() -> int:
    """How many runs the tracking server holds, asked through its REST API."""
    experiments = json.load(urllib.request.urlopen(urllib.request.Request(
        f"{TRACKING}/api/2.0/mlflow/experiments/search", data=json.dumps({"max_results": 100}).encode(),
        headers={"Content-Type": "application/json"}), timeout=30))["experiments"]
    body = json.dumps({"experiment_ids": [e["experiment_id"] for e in experiments], "max_results": 1000}).encode()
    found = json.load(urllib.request.urlopen(urllib.request.Request(
        f"{TRACKING}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}),
        timeout=30))
    return len(found.get("runs", []))


def test_bad_master_missing_jars_and_unreachable_tracking_fail_at_once(services, shipped, cluster_run) -> None:
    root = cluster_run["root"]
    before, runs = _files(root), _runs()
    common = ["--root", root]
    wrong_master = spark_submit(services, shipped, "build_features", *common,
                                master=f"spark://127.0.0.1:{UNUSED_PORT}", timeout=120)
    assert "spark.master" in error_line(wrong_master) and "unreachable" in error_line(wrong_master)
    no_jars = spark_submit(services, shipped, "build_features", *common, jars=False, timeout=300)
    assert "storage.engine" in error_line(no_jars) and "jars" in error_line(no_jars)
    no_tracking = spark_submit(services, shipped, "train", *common, "--set",
                               f"mlflow.tracking_uri=http://127.0.0.1:{UNUSED_PORT}", timeout=120)
    assert "mlflow.tracking_uri" in error_line(no_tracking)
    assert _files(root) == before and _runs() == runs  # nothing written


def _delta_log_is_whole(table: Path) -> list[int]:
    """The versions of a Delta log; each commit file a complete JSON-lines commit."""
    versions = []
    for commit in sorted((table / "_delta_log").glob("*.json")):
        actions = [json.loads(line) for line in commit.read_text().splitlines() if line.strip()]
        assert any("commitInfo" in a for a in actions), commit
        versions.append(int(commit.stem))
    assert versions == list(range(len(versions))), versions
    return versions


def test_a_lost_worker_is_survived_or_reported_and_a_rerun_gives_the_same_tables(
        spark, services, shipped, cluster_run, local_pipeline) -> None:
    root = cluster_run["root"]
    command = [str(VENV_BIN / "spark-submit"), "--master", MASTER, "--jars",
               ",".join(sorted(str(p) for p in JARS_DIR.glob("*.jar"))), "--py-files", str(shipped["zip"]),
               "--conf", f"spark.pyspark.python={shipped['python']}", str(REPO / "jobs" / "build_features.py"),
               "--config", str(REPO / "conf" / "standalone.yaml"), "--set", f"mlflow.tracking_uri={TRACKING}",
               "--root", root, "--json"]
    features = subprocess.Popen(command, cwd=services.driver / "cwd", env=submit_env(services), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    output = []
    for line in features.stdout:  # kill worker-2's JVM once the features job is writing gold tables
        output.append(line)
        if "features.write" in line or "delta.write" in line:
            os.kill(services.pid("worker-2"), signal.SIGKILL)
            break
    output += features.stdout.readlines()
    code = features.wait(timeout=900)
    text = "".join(output)
    if code != 0:  # Spark gave up: the reason is one line, not a traceback
        assert sum(line.startswith("error: ") for line in text.splitlines()) == 1, text[-3000:]
    # training needs a task slot per rank; one worker is gone: it fails at once, writing nothing
    runs = _runs()
    lost = spark_submit(services, shipped, "train", "--root", root, "--set", "spark.executor_wait_seconds=15",
                        timeout=300)
    assert "training.num_processes" in error_line(lost) and "offer 1" in error_line(lost)
    assert _runs() == runs
    # the worker comes back (cluster-up is idempotent), and a rerun rebuilds the same tables
    assert services.cluster_up(private=services.hidden).returncode == 0
    rerun = spark_submit(services, shipped, "build_features", "--root", root)
    result_of(rerun)
    engine = resolve_engine(spark, "delta-spark")
    on_cluster = Lakehouse(root, engine)
    in_local = Lakehouse(local_pipeline("delta-spark")["root"], engine)
    for table in GOLD_TABLES:
        _delta_log_is_whole(Path(root) / table)
        assert_same_rows(on_cluster.read(table), in_local.read(table), table)
