"""Training end to end on tiny synthetic data: TorchDistributor DDP, MLflow, registry gating,
resume after a real kill, evaluation, baselines and bad input."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from models.losses import full_softmax
from models.sasrec import SASRec, SASRecConfig
from recsys_spark.constants import GOLD_TRAINING_EXAMPLES, TRAIN
from recsys_spark.modeling.batches import EvalBatch, SequenceBatch
from recsys_spark.modeling.tasks import TASKS, LossModule, LossOptions, ModelSpec
from tests.conftest import build_gold_lakehouse, make_settings, run_cli

REGISTERED = "recsys-recommender"
TINY = [
    "--set", "training.epochs=3",
    "--set", "training.batch_size=64",
    "--set", "training.sasrec.dim=16",
    "--set", "training.sasrec.ffn_dim=32",
    "--set", "training.mf.dim=16",
    "--set", "training.two_tower.dim=16",
    "--set", "training.two_tower.hidden=32",
    "--set", "logging.level=WARNING",
    "--set", "training.num_processes=2",  # CI proves DDP; tests that need one rank say so after this
]
UNTRAINED = ["--set", "training.learning_rate=1e-7", "--set", "training.epochs=1",
             "--set", "training.num_processes=1"]


@pytest.fixture(scope="module")
def gold_root(spark, tmp_path_factory) -> str:
    return build_gold_lakehouse(tmp_path_factory.mktemp("training"), users=300, items=200, seed=3)


def store(tmp_path: Path) -> list[str]:
    """A private MLflow store per test, so registry assertions see only that test's models."""
    return ["--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "--set", f"mlflow.artifact_location={(tmp_path / 'artifacts').as_uri()}"]


def client_for(tmp_path: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def train(capsys, root: str, tmp_path: Path, *extra: str) -> dict:
    code, result, err = run_cli(capsys, "train", "--root", root, "--json", *TINY, *store(tmp_path), *extra)
    assert code == 0, err[-3000:]
    return result


# --- models and tasks: plain PyTorch ---------------------------------------------------------------


@pytest.mark.parametrize("rows,block_rows", [(37, 8), (37, 256), (0, 8)])
def test_blockwise_full_softmax_equals_plain_cross_entropy(rows: int, block_rows: int) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    catalogue = torch.randn(23, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(1, 24, (rows,), generator=generator)
    value = full_softmax(hidden, catalogue, targets, block_rows=block_rows)
    value.backward()
    if rows == 0:  # a batch without scored positions contributes nothing (plain cross-entropy: nan)
        assert float(value) == 0.0 and float(catalogue.grad.abs().sum()) == 0.0
        return
    reference_hidden = hidden.detach().clone().requires_grad_()
    reference_catalogue = catalogue.detach().clone().requires_grad_()
    reference = torch.nn.functional.cross_entropy(reference_hidden @ reference_catalogue.T, targets - 1)
    reference.backward()
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(hidden.grad, reference_hidden.grad)
    torch.testing.assert_close(catalogue.grad, reference_catalogue.grad)
    with torch.no_grad():
        torch.testing.assert_close(full_softmax(hidden, catalogue, targets, block_rows=block_rows), reference)
    with pytest.raises(ValueError, match=r"1\.\.23"):
        full_softmax(hidden, catalogue, targets - 1)


@pytest.mark.parametrize("lowpass_mix", [0.0, 0.5, 1.0])
def test_sasrec_position_sees_only_its_past_and_ignores_left_padding(lowpass_mix: float) -> None:
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=30, max_length=12, dim=16, heads=2, ffn_dim=32, lowpass_mix=lowpass_mix))
    model.eval()
    items = torch.tensor([[0, 0, 0, 0, 3, 7, 1, 9, 4, 22, 5, 8]])
    hidden = model(items)
    future_changed = items.clone()
    future_changed[0, 9:] = torch.tensor([11, 12, 13])
    # position t's output is the prediction of item t+1: it must not move when later items change
    torch.testing.assert_close(model(future_changed)[0, :9], hidden[0, :9])
    assert not torch.allclose(model(future_changed)[0, 9:], hidden[0, 9:])
    # padding is not history: a shorter window over the same events gives the same newest state
    torch.testing.assert_close(model(items[:, 4:])[0, -1], hidden[0, -1])
    mixed = [block.lowpass for block in model.encoder.blocks]
    assert all((m is None) == (lowpass_mix == 0.0) for m in mixed)


def _batch(num_items: int, rows: int = 16, length: int = 8) -> SequenceBatch:
    generator = torch.Generator().manual_seed(0)
    items = torch.randint(1, num_items + 1, (rows, length + 1), generator=generator)
    items[:4, :3] = 0  # some left padding
    inputs, targets = items[:, :-1], torch.where(items[:, :-1] > 0, items[:, 1:], 0)
    zeros = torch.zeros_like(inputs)
    return SequenceBatch(users=torch.arange(rows), inputs=inputs, targets=targets, behaviors=zeros, gaps=zeros)


@pytest.mark.parametrize("name,loss", [(n, "full_softmax") for n in TASKS] + [("sasrec", "sampled_softmax")])
def test_every_model_learns_a_fixed_batch_and_scores_the_catalogue(name: str, loss: str) -> None:
    torch.manual_seed(0)
    hyper = {"sasrec": {"dim": 16, "heads": 2, "ffn_dim": 32, "dropout": 0.0, "lowpass_mix": 0.5},
             "two_tower": {"dim": 16, "hidden": 32, "dropout": 0.0}, "mf": {"dim": 16}}[name]
    spec = ModelSpec(name=name, num_items=50, num_users=16, max_length=8, hyperparameters=hyper,
                     num_categories=5, item_categories=np.arange(51) % 6)
    task = TASKS[name]
    model = task.build(spec)
    log_q = torch.full((50,), -float(np.log(50)))
    module = LossModule(task, model, log_q, LossOptions(loss, 20, torch.Generator().manual_seed(1)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = _batch(50)
    losses = []
    for _ in range(40):
        value = module(batch)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(float(value.detach()))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    model.eval()
    evaluation = EvalBatch(users=batch.users, inputs=batch.inputs, behaviors=batch.behaviors, gaps=batch.gaps,
                           targets=batch.targets[:, -1:] - 1, seen=torch.full((16, 1), -1))
    scores = task.scores(model, evaluation)
    assert scores.shape == (16, 50) and torch.isfinite(scores).all()
    assert task.item_embeddings(model).shape[0] == 50


# --- recsys train: DDP, MLflow, registry -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.ddp
def test_train_logs_registers_and_gates_champion(gold_root: str, tmp_path: Path, capsys) -> None:
    client = client_for(tmp_path)
    first = train(capsys, gold_root, tmp_path, "--model", "mf", *UNTRAINED)
    assert first["model_version"] == "1" and first["promoted"]  # no champion yet

    better = train(capsys, gold_root, tmp_path, "--model", "sasrec")  # 2 DDP ranks by default
    for key in ("run_id", "model_name", "model_version", "hit@5", "ndcg@5", "hit@10", "ndcg@10",
                "hit@20", "ndcg@20", "mrr", "coverage@10"):
        assert key in better
    assert better["world_size"] == 2 and better["model_name"] == "sasrec"
    assert better["ndcg@10"] > first["ndcg@10"]
    assert better["promoted"] and better["champion_version"] == "1"
    assert str(client.get_model_version_by_alias(REGISTERED, "champion").version) == "2"

    run = client.get_run(better["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["training.sasrec.dim"] == "16"
    assert run.data.params["data.version"] == "0" and run.data.params["data.protocol"] == "temporal"
    assert "test_ndcg_at_10" in run.data.metrics and "best_val_ndcg_at_10" in run.data.metrics
    losses = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.step)]
    assert len(losses) == 3 and losses[-1] < losses[0]
    artifacts = {a.path for folder in ("plots", "config", "data")
                 for a in client.list_artifacts(run.info.run_id, folder)}
    assert {"plots/learning_curves.png", "plots/metrics_at_k.png", "config/resolved.json",
            "data/versions.json"} <= artifacts

    worse = train(capsys, gold_root, tmp_path, "--model", "mf", *UNTRAINED)
    assert not worse["promoted"]
    assert str(client.get_model_version_by_alias(REGISTERED, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(REGISTERED, "challenger").version) == "3"
    tags = client.get_model_version(REGISTERED, "3").tags
    assert tags["gate.decision"] == "kept champion" and tags["gate.champion_version"] == "2"
    assert abs(float(tags["gate.champion_value"]) - better["ndcg@10"]) < 1e-6  # same eval set

    # the registered pyfunc maps raw ids in and out and never returns the history
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    champion = mlflow.pyfunc.load_model(f"models:/{REGISTERED}@champion")
    history = _some_item_ids(gold_root)

    out = champion.predict(pd.DataFrame({"history": [history], "user_id": [1]}), params={"k": 7})
    assert len(out["item_ids"][0]) == 7 and not set(out["item_ids"][0]) & set(history)
    # k beyond the unseen items: the list is shorter, never padded with the history
    everything = _some_item_ids(gold_root, limit=None)
    out = champion.predict(pd.DataFrame({"history": [everything[:-2]]}), params={"k": 10})
    assert sorted(out["item_ids"][0]) == sorted(everything[-2:]) and len(out["scores"][0]) == 2
    # a history of items the model never saw: the most trained-on items, not item index order
    out = champion.predict(pd.DataFrame({"history": [[10**15]]}), params={"k": 5})
    counts = _train_counts(gold_root)
    assert [counts[i] for i in out["item_ids"][0]] == sorted(counts.values(), reverse=True)[:5]

    code, result, err = run_cli(capsys, "promote", "--version", "3", "--root", gold_root, "--json", *store(tmp_path))
    assert code == 0, err
    assert str(client.get_model_version_by_alias(REGISTERED, "champion").version) == "3"
    code, result, err = run_cli(capsys, "evaluate", "--root", gold_root, "--json", *TINY, *store(tmp_path),
                                "--set", "evaluation.batch_size=3")  # sums: any batch size, same means
    assert code == 0, err
    assert result["ndcg@10"] == pytest.approx(worse["ndcg@10"], rel=1e-6)  # Spark eval == training eval

    code, _, err = run_cli(capsys, "evaluate", "--version", "99", "--root", gold_root, *store(tmp_path))
    assert code == 1 and "error: registered model" in err and "no version '99'" in err

    # a diverged challenger (a non-finite metric) is never promoted, whatever the champion has
    from recsys_spark.tracking import record_gate

    settings = make_settings(Path(gold_root), *store(tmp_path)[1::2])
    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    assert not record_gate(client, settings, "1", float("inf"), champion, 0.1, "test")
    assert str(client.get_model_version_by_alias(REGISTERED, "champion").version) == "3"


def _train_counts(root: str) -> dict[int, int]:
    """Raw item id -> occurrences in the training histories of gold/training_examples."""
    from deltalake import DeltaTable

    examples = DeltaTable(f"{root}/gold/training_examples").to_pyarrow_table(columns=["split", "history_items"])
    raw = dict(zip(*DeltaTable(f"{root}/silver/item_index").to_pyarrow_table(columns=["item_idx", "item_id"])
                   .to_pydict().values(), strict=True))
    counts = dict.fromkeys(raw.values(), 0)
    for split, history in zip(*examples.to_pydict().values(), strict=True):
        for idx in history if split == "train" else ():
            counts[raw[idx]] += 1
    return counts


def _some_item_ids(root: str, limit: int | None = 5) -> list[int]:
    from deltalake import DeltaTable

    items = DeltaTable(f"{root}/silver/item_index").to_pyarrow_table(columns=["item_id"])
    return items.column("item_id").to_pylist()[:limit]


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields after "pid (comm)": state, ppid, pgrp, ...


def _descendants(root: int) -> set[int]:
    parents = {int(p.name): int(stat[1]) for p in Path("/proc").iterdir()
               if p.name.isdigit() and (stat := _stat(int(p.name)))}
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _process_group(leader: int) -> set[int]:
    return {pid for pid in _descendants(leader) if (stat := _stat(pid)) and int(stat[2]) == leader}


def _alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if (stat := _stat(pid)) and stat[0] != "Z"}


@pytest.mark.slow
def test_killed_training_resumes_from_its_checkpoint(gold_root: str, tmp_path: Path, capsys) -> None:
    epochs = 40
    settings = ["--root", gold_root, *TINY, *store(tmp_path), "--set", f"training.epochs={epochs}",
                "--set", "training.patience=1000", "--set", "training.num_processes=1",
                "--set", "training.lr_decay=0.5"]  # the schedule's state goes through the checkpoint too
    checkpoints = Path(gold_root) / "_work" / "checkpoints"
    before = set(checkpoints.glob("*")) if checkpoints.exists() else set()
    process = subprocess.Popen([sys.executable, "-m", "recsys_spark.cli", "train", "--model", "sasrec", *settings],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    epoch = 0
    try:
        while time.monotonic() < deadline and process.poll() is None:
            started = [p for p in checkpoints.glob("*") if p not in before and (p / "last.pt").exists()]
            if started:
                try:
                    epoch = torch.load(started[0] / "last.pt", weights_only=True)["epoch"]
                except (RuntimeError, EOFError, FileNotFoundError):
                    epoch = 0
                if epoch >= 2:
                    break
            time.sleep(0.05)
        ranks = _descendants(process.pid) - _process_group(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the driver and torchrun, mid-training
        process.wait()
    assert epoch >= 2, "training never checkpointed"
    # torchrun puts its ranks in their own session, so the kill above orphans them: they must notice
    # and stop rather than keep writing the checkpoints the resumed run is about to own.
    assert ranks, "expected torchrun ranks outside the driver's process group"
    deadline = time.monotonic() + 60
    while _alive(ranks) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(ranks), f"orphaned ranks still running: {_alive(ranks)}"
    run_id = started[0].name
    killed_at = torch.load(started[0] / "last.pt", weights_only=True)["epoch"]
    assert killed_at < epochs
    assert client_for(tmp_path).get_run(run_id).info.status == "RUNNING"

    code, result, err = run_cli(capsys, "train", "--model", "sasrec", "--resume", run_id, "--json", *settings)
    assert code == 0, err[-3000:]
    assert result["run_id"] == run_id and result["epochs_run"] == epochs
    assert client_for(tmp_path).get_run(run_id).info.status == "FINISHED"
    history = client_for(tmp_path).get_metric_history(run_id, "train_loss")
    assert {m.step for m in history} == set(range(epochs))  # no epoch lost across the kill


@pytest.mark.slow
def test_gate_survives_an_unusable_champion_and_a_resumed_run_registers_once(
        gold_root: str, tmp_path: Path, capsys) -> None:
    client = client_for(tmp_path)
    # A diverged model (NaN weights; its metrics look finite, NaN scores ranking last) is never
    # promoted, not even when there is no champion.
    diverged = train(capsys, gold_root, tmp_path, "--model", "mf", *UNTRAINED, "--set", "training.epochs=2",
                     "--set", "training.learning_rate=1e30")
    assert not diverged["promoted"] and diverged["model_version"] == "1"
    assert "diverged" in client.get_model_version(REGISTERED, "1").tags["gate.reason"]
    assert train(capsys, gold_root, tmp_path, "--model", "mf", *UNTRAINED)["promoted"]
    shutil.rmtree(tmp_path / "artifacts")  # the champion's files are gone: it can serve nobody
    second = train(capsys, gold_root, tmp_path, "--model", "mf", *UNTRAINED)
    assert second["model_version"] == "3" and second["promoted"]
    assert "champion could not be evaluated" in client.get_model_version(REGISTERED, "3").tags["gate.reason"]

    # A run that died after registering its model (say, in the gate) is resumed...
    run_id = second["run_id"]
    client.set_terminated(run_id, "FAILED")
    # ...only with the settings it was recorded with (where it runs may change)...
    code, _, err = run_cli(capsys, "train", "--model", "mf", "--resume", run_id, "--root", gold_root, *TINY,
                           *store(tmp_path), *UNTRAINED, "--set", "training.learning_rate=0.5")
    assert code == 2 and "training.learning_rate=1e-07 (now 0.5)" in err, err[-2000:]
    # ...and registers no second version of itself.
    resumed = train(capsys, gold_root, tmp_path, "--model", "mf", "--resume", run_id, *UNTRAINED,
                    "--set", "training.max_minutes=30")
    assert resumed["run_id"] == run_id and resumed["model_version"] == "3"
    assert sorted(int(v.version) for v in client.search_model_versions(f"name = '{REGISTERED}'")) == [1, 2, 3]
    assert client.get_run(run_id).info.status == "FINISHED"
    # it was promoted before it died: it stays champion, its gate record untouched
    assert resumed["promoted"] and str(client.get_model_version_by_alias(REGISTERED, "champion").version) == "3"
    assert "champion could not be evaluated" in client.get_model_version(REGISTERED, "3").tags["gate.reason"]
    # a version whose files are gone cannot be evaluated: one line, not a Spark task's traceback
    code, _, err = run_cli(capsys, "evaluate", "--version", "2", "--root", gold_root, *store(tmp_path))
    assert code == 1 and err.strip().splitlines()[-1].startswith("error: cannot load models:/")
    assert "Traceback" not in err


def test_a_tampered_registry_artifact_is_refused_and_runs_no_code(gold_root: str, tmp_path: Path, capsys) -> None:
    client = client_for(tmp_path)
    assert train(capsys, gold_root, tmp_path, "--model", "mf", *UNTRAINED)["promoted"]
    stored = tmp_path / "artifacts"
    # nothing the platform loads is a pickle: the pyfunc is code, the weights are plain arrays
    assert not list(stored.rglob("*.pkl")) and not list(stored.rglob("*.pt"))
    (weights,) = stored.rglob("weights.npz")
    (code_file,) = stored.rglob("pyfunc_code.py")
    assert "recsys.artifact_sha256" in client.get_model_version(REGISTERED, "1").tags

    from recsys_spark.errors import ModelIntegrityError
    from recsys_spark.modeling.package import load_registered_model as load_registered

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert load_registered(f"models:/{REGISTERED}@champion", uri).spec.name == "mf"
    marker = tmp_path / "ran"
    code_file.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n" + code_file.read_text())
    assert load_registered(f"models:/{REGISTERED}/1", uri).spec.name == "mf"  # the store's code never runs
    assert not marker.exists()

    with np.load(weights) as arrays:
        tampered = {name: np.zeros_like(arrays[name]) for name in arrays.files}
    np.savez(weights, **tampered)
    with pytest.raises(ModelIntegrityError, match=r"v1 refused: its artifact weights.npz differs"):
        load_registered(f"models:/{REGISTERED}@champion", uri)
    code, _, err = run_cli(capsys, "score-batch", "--root", gold_root, *TINY, *store(tmp_path))
    assert code == 1
    (line,) = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert "weights.npz differs from the file registered" in line


def _wildcard_listeners(pids: set[int]) -> set[tuple[int, str]]:
    """(pid, local address) of the TCP sockets in LISTEN state on every interface owned by ``pids``."""
    wildcard = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and set(address.split(":")[0]) == {"0"}:
                wildcard[inode] = address
    found = set()
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        found |= {(pid, wildcard[link[8:-1]]) for link in links
                  if link.startswith("socket:[") and link[8:-1] in wildcard}
    return found


@pytest.mark.ddp
def test_training_listens_on_loopback_only(gold_root: str, tmp_path: Path, capsys) -> None:
    # torchrun's rendezvous stores (whose state torch unpickles) bound every interface.
    import threading

    seen: set[tuple[int, str]] = set()
    ranks_seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            processes = _descendants(os.getpid())
            ranks_seen.update(p for p in processes if b"bound_torchrun" in _cmdline(p))
            seen.update(_wildcard_listeners(processes))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = train(capsys, gold_root, tmp_path, "--model", "mf", *UNTRAINED, "--set", "training.num_processes=2")
    finally:
        done.set()
        watcher.join()
    assert result["world_size"] == 2 and ranks_seen, "the ranks ran under bound_torchrun"
    assert not seen, f"listening on every interface: {seen}"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_resuming_a_run_that_stopped_early_trains_nothing_more(spark, gold_root: str, tmp_path: Path) -> None:
    from recsys_spark.modeling.gold import load_training_data
    from recsys_spark.storage import open_lakehouse
    from recsys_spark.training.loop import TrainJob, train_worker

    settings = make_settings(Path(gold_root), "training.epochs=100", "training.patience=1",
                             "training.learning_rate=0.3", "training.prefetch_batches=0")
    data = load_training_data(open_lakehouse(spark, settings), settings)
    spec = ModelSpec(name="mf", num_items=data.num_items, num_users=data.num_users, max_length=50,
                     hyperparameters={"dim": 8})
    folder = str(tmp_path / "checkpoint")
    first = train_worker(TrainJob.from_settings(settings, spec, data, checkpoint_dir=folder))
    assert first.stopped_early and first.epochs_run < 100
    again = train_worker(TrainJob.from_settings(settings, spec, data, checkpoint_dir=folder, resume=True))
    assert (again.epochs_run, again.best_epoch, again.test) == (first.epochs_run, first.best_epoch, first.test)


@pytest.mark.slow
@pytest.mark.ddp
def test_one_and_two_processes_give_the_same_metrics_within_noise(gold_root: str, tmp_path: Path, capsys) -> None:
    # Same seed, same global batch: two DDP ranks split each batch and average gradients, and
    # evaluation sums metric numerators across ranks, so the numbers must agree up to the
    # different shuffling of shards.
    runs = {n: train(capsys, gold_root, tmp_path / str(n), "--model", "mf", "--set", f"training.num_processes={n}",
                     "--set", "training.epochs=6", "--set", "training.learning_rate=0.01")
            for n in (1, 2)}
    one, two = runs[1]["test"], runs[2]["test"]
    for key in ("hit@10", "ndcg@10", "mrr"):
        assert one[key] > 0 and two[key] > 0
        assert abs(one[key] - two[key]) <= 0.02 + 0.15 * max(one[key], two[key]), (key, one[key], two[key])
    print({key: (one[key], two[key]) for key in ("hit@10", "ndcg@10", "mrr")})


def test_learning_rate_decays_after_evaluations_without_improvement(gold_root: str, tmp_path: Path, capsys) -> None:
    result = train(capsys, gold_root, tmp_path, "--model", "mf", "--set", "training.num_processes=1",
                   "--set", "training.epochs=12", "--set", "training.patience=1000",
                   "--set", "training.learning_rate=0.1", "--set", "training.lr_decay=0.5",
                   "--set", "training.lr_decay_patience=1")
    client = client_for(tmp_path)

    def history(key: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(result["run_id"], key), key=lambda m: m.step)]

    validation, rates = history("val_ndcg_at_10"), history("learning_rate")
    assert len(validation) == len(rates) == 12
    best, rate = float("-inf"), 0.1
    for score, logged in zip(validation, rates, strict=True):
        if score > best:
            best = score
        else:  # patience 1: every evaluation without a new best halves the rate
            rate /= 2
        assert logged == pytest.approx(rate), (validation, rates)
    assert rates[-1] < 0.1, "the run never plateaued, so the test proved nothing"


def test_train_json_from_library_matches_cli_contract_for_two_tower(gold_root: str, tmp_path: Path, capsys) -> None:
    result = train(capsys, gold_root, tmp_path, "--model", "two_tower", "--set", "training.num_processes=1",
                   "--set", "training.epochs=2")
    assert result["model_name"] == "two_tower" and result["world_size"] == 1
    assert result["epochs_run"] == 2 and result["best_epoch"] in (0, 1)
    # the contract: every test metric at the top level, equal to the nested one, in range
    metrics = {f"{m}@{k}" for m in ("hit", "ndcg", "recall", "coverage") for k in (5, 10, 20)} | {"mrr"}
    assert metrics <= set(result["test"]) and all(result[m] == result["test"][m] for m in metrics)
    assert all(0 <= result[m] <= 1 for m in metrics)
    assert result["ndcg@10"] <= result["hit@10"] <= result["hit@20"]
    assert result["promoted"] is True and result["model_version"] == "1"  # the first model
    # a two-tower model learns: better than the 1/I a constant scorer would earn by luck
    assert result["hit@20"] > 20 / result["data"]["num_items"]


# --- baselines -----------------------------------------------------------------------------------------


def test_baselines_log_to_the_models_experiment(gold_root: str, tmp_path: Path, capsys) -> None:
    code, result, err = run_cli(capsys, "baselines", "popularity", "itemcf", "--root", gold_root, "--json",
                                *TINY, *store(tmp_path))
    assert code == 0, err
    assert [r["baseline"] for r in result["baselines"]] == ["popularity", "itemcf"]
    client = client_for(tmp_path)
    experiment = client.get_experiment_by_name("recsys")
    runs = client.search_runs([experiment.experiment_id], "tags.`recsys.kind` = 'baseline'")
    assert len(runs) == 2 and all("test_ndcg_at_10" in r.data.metrics for r in runs)
    assert result["baselines"][0]["test"]["coverage@10"] <= 10 / 200  # one list for everyone


# --- bad input -----------------------------------------------------------------------------------------


def _registry_is_empty(tmp_path: Path) -> bool:
    if not (tmp_path / "mlflow.db").exists():
        return True
    return not client_for(tmp_path).search_registered_models()


def test_missing_gold_table_fails_clearly(spark, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty" / "silver").mkdir(parents=True)  # a lakehouse without gold tables (a missing one: see test_cli)
    code, _, err = run_cli(capsys, "train", "--root", str(tmp_path / "empty"), *TINY, *store(tmp_path))
    assert code != 0 and "recsys features" in err
    assert _registry_is_empty(tmp_path)


def test_empty_gold_table_fails_clearly(spark, gold_root: str, tmp_path: Path, capsys) -> None:
    from recsys_spark.storage import open_lakehouse

    source = open_lakehouse(spark, make_settings(Path(gold_root)))
    target = open_lakehouse(spark, make_settings(tmp_path / "lake"))
    meta = source.commit_metadata(GOLD_TRAINING_EXAMPLES, source.version(GOLD_TRAINING_EXAMPLES))
    target.write(source.read(GOLD_TRAINING_EXAMPLES).limit(0), GOLD_TRAINING_EXAMPLES,
                 partition_by=("split",), commit_info=meta)
    code, _, err = run_cli(capsys, "train", "--root", str(tmp_path / "lake"), *TINY, *store(tmp_path))
    assert code != 0 and f"no {TRAIN}ing rows" in err
    assert _registry_is_empty(tmp_path)


@pytest.mark.parametrize("override,key", [("training.max_length=0", "training.max_length"),
                                          ("features.max_sequence_length=-1", "features.max_sequence_length"),
                                          ("training.sasrec.heads=3", "training.sasrec")])
def test_config_that_cannot_fit_fails_before_anything(override: str, key: str, tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(capsys, "train", "--root", str(tmp_path), "--set", override, *store(tmp_path))
    assert code != 0 and key in err
    assert not (tmp_path / "mlflow.db").exists()


def test_unknown_model_is_rejected(gold_root: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(capsys, "train", "--model", "gpt", "--root", gold_root)
    assert exit_info.value.code == 2
    from recsys_spark.errors import ConfigError
    from recsys_spark.training.runner import resolve_model

    with pytest.raises(ConfigError, match="unknown model 'gpt'"):
        resolve_model(make_settings(tmp_path), "gpt")


def test_unreachable_tracking_store_fails_fast(gold_root: str, tmp_path: Path, capsys) -> None:
    started = time.monotonic()
    code, _, err = run_cli(capsys, "train", "--root", gold_root, *TINY,
                           "--set", "mlflow.tracking_uri=http://127.0.0.1:9")
    assert code != 0 and "unreachable" in err
    assert time.monotonic() - started < 60


def test_every_name_the_cli_and_config_offer_is_implemented() -> None:
    from recsys_spark.baselines import FITTERS
    from recsys_spark.config import TrainingSettings
    from recsys_spark.constants import BASELINE_NAMES, MODEL_NAMES

    assert set(TASKS) == set(MODEL_NAMES) and set(FITTERS) == set(BASELINE_NAMES)
    for name in MODEL_NAMES:  # each model has its hyperparameter section
        assert name in TrainingSettings.model_fields


def test_train_job_takes_every_value_from_the_settings(tmp_path: Path) -> None:
    import dataclasses
    from datetime import UTC, datetime

    from recsys_spark.modeling.gold import TrainingData
    from recsys_spark.records import GoldCommit
    from recsys_spark.training.loop import TrainJob

    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(TrainJob)), "TrainJob must not keep defaults of its own"
    data = TrainingData(root=str(tmp_path), version=3, rows={"train": 1, "validation": 1, "test": 1},
                        commit=GoldCommit("f", datetime.now(UTC), "temporal", {"silver/events": 1}, 10),
                        num_users=5, mask_seen=False)
    spec = ModelSpec(name="mf", num_items=10, num_users=5, max_length=50)
    settings = make_settings(tmp_path, "evaluation.gate_metric=hit@20", "training.weight_decay=0.25")
    job = TrainJob.from_settings(settings, spec, data, checkpoint_dir="x")
    t = settings.training
    assert (job.learning_rate, job.lr_decay, job.weight_decay) == (t.learning_rate, t.lr_decay, 0.25)
    assert job.stop_metric == "hit@20"  # early stopping follows the gate metric by default
    assert job.train.version == 3 and job.validation.split == "validation"
    job = TrainJob.from_settings(make_settings(tmp_path, "training.stop_metric=ndcg@5"), spec, data,
                                 checkpoint_dir="x")
    assert job.stop_metric == "ndcg@5"
    from recsys_spark.errors import ConfigError

    with pytest.raises(ConfigError, match=r"training\.stop_metric 'ndcg@7'"):
        make_settings(tmp_path, "training.stop_metric=ndcg@7")
