"""The training function every DDP rank runs under TorchDistributor.

``train_worker`` is top-level and picklable and takes one small ``TrainJob``; it imports nothing
from Spark. Each rank streams its shard of the gold table, trains with DDP (gloo on CPU, NCCL on
GPUs), evaluates its shard of the validation users after every epoch and all-reduces the metric
sums, so every rank takes the same early-stopping decision and returns the same result (which is
what TorchDistributor hands back: the value of whichever rank finished last).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import ReduceLROnPlateau

from recsys_spark.constants import HISTORY_ITEMS, TEST, TRAIN, VALIDATION, metric_key
from recsys_spark.evaluation.evaluate import evaluate_scorer
from recsys_spark.logs import configure_logging, get_logger, log_event
from recsys_spark.modeling.batches import TRAIN_COLUMNS, SequenceBatch, sequence_batch
from recsys_spark.modeling.loader import DeltaBatches, TableSlice, collate_with, prefetch
from recsys_spark.modeling.tasks import LossKind, LossModule, LossOptions, ModelSpec, Task, get_task
from recsys_spark.training.placement import rank_placement

if TYPE_CHECKING:
    from recsys_spark.config import Settings
    from recsys_spark.modeling.gold import TrainingData

log = get_logger("train")

LAST = "last.pt"
BEST = "best.pt"


@dataclass(frozen=True)
class TrainJob:
    """One training run, as shipped to every rank: built from the settings (``from_settings``),
    so every value has one default, the config's."""

    spec: ModelSpec
    train: TableSlice
    validation: TableSlice
    test: TableSlice
    checkpoint_dir: str
    epochs: int
    patience: int
    max_minutes: float | None
    batch_size: int
    learning_rate: float
    lr_decay: float
    lr_decay_patience: int
    weight_decay: float
    grad_clip: float
    loss: LossKind
    num_negatives: int
    seed: int
    buffer_rows: int
    prefetch_batches: int
    ks: tuple[int, ...]
    stop_metric: str
    eval_batch_size: int
    mask_seen: bool
    resume: bool
    tracking_uri: str | None
    run_id: str | None
    log_level: str

    @classmethod
    def from_settings(
        cls, settings: Settings, spec: ModelSpec, data: TrainingData, *, checkpoint_dir: str, resume: bool = False,
        tracking_uri: str | None = None, run_id: str | None = None,
    ) -> TrainJob:
        t = settings.training
        return cls(
            spec=spec, train=data.slice(TRAIN), validation=data.slice(VALIDATION), test=data.slice(TEST),
            checkpoint_dir=checkpoint_dir, epochs=t.epochs, patience=t.patience, max_minutes=t.max_minutes,
            batch_size=t.batch_size, learning_rate=t.learning_rate, lr_decay=t.lr_decay,
            lr_decay_patience=t.lr_decay_patience, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
            loss=t.loss, num_negatives=t.num_negatives, seed=t.seed, buffer_rows=t.buffer_rows,
            prefetch_batches=t.prefetch_batches, ks=tuple(settings.evaluation.ks),
            stop_metric=settings.stop_metric, eval_batch_size=settings.evaluation.batch_size,
            mask_seen=data.mask_seen, resume=resume, tracking_uri=tracking_uri, run_id=run_id,
            log_level=settings.logging.level,
        )


@dataclass(frozen=True)
class TrainResult:
    """What ``train_worker`` returns, identical on every rank (metrics are all-reduced)."""

    test: dict[str, float]
    validation: dict[str, float]  # of the best epoch
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]]
    best_state_path: str
    world_size: int


@dataclass
class _State:
    epoch: int = 0  # next epoch to run
    best: float = -math.inf
    best_epoch: int = -1
    waited: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class _Rank:
    rank: int
    world: int
    device: torch.device
    launcher: int  # pid of the torchrun agent that started this rank

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def stop_if_orphaned(self) -> None:
        # torchrun starts ranks in their own session, so killing the driver's process group leaves
        # them running; an orphan would keep overwriting the checkpoints a resumed run now owns.
        if os.getppid() != self.launcher:
            raise RuntimeError(f"rank {self.rank}: its launcher (pid {self.launcher}) is gone; stopping")


def _start() -> _Rank:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if not cuda:
        # Exactly the CPUs this rank was given: the launcher sets OMP_NUM_THREADS to its Spark
        # task's CPUs (cluster) or the driver's cores shared among the local ranks. More threads
        # than cores spin against each other and against Spark's own tasks.
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // world)))
    log_event(log, "train.rank", **rank_placement())
    return _Rank(rank, world, device, os.getppid())


def _all_sum(values: np.ndarray, rank: _Rank) -> np.ndarray:
    if rank.world == 1:
        return values
    tensor = torch.as_tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.numpy()


def evaluate(task: Task, model: nn.Module, source: TableSlice, job: TrainJob, rank: _Rank) -> dict[str, float]:
    """Full-ranking metrics of ``source``'s rows; each rank scores its shard, sums combine."""
    model.eval()
    sums = evaluate_scorer(partial(task.scores, model), source, num_items=job.spec.num_items,
                           max_length=job.spec.max_length, ks=job.ks, mask_seen=job.mask_seen,
                           batch_size=job.eval_batch_size, rank=rank.rank, world_size=rank.world,
                           prefetch_batches=job.prefetch_batches)
    sums.from_vector(_all_sum(sums.as_vector(), rank))
    return sums.means()


def _save(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, schedule: ReduceLROnPlateau | None,
          state: _State) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # never shared, even with a stray writer
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict() if schedule is not None else {},
            "epoch": state.epoch,
            "best": state.best,
            "best_epoch": state.best_epoch,
            "waited": state.waited,
            "history": state.history,
            "torch_rng": torch.get_rng_state(),
        },
        tmp,
    )
    tmp.replace(path)  # a crash mid-save never leaves a torn checkpoint


def _load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
          schedule: ReduceLROnPlateau | None = None) -> _State:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["model"])
    if schedule is not None and saved.get("schedule"):
        schedule.load_state_dict(saved["schedule"])
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(saved["torch_rng"])
    return _State(saved["epoch"], saved["best"], saved["best_epoch"], saved["waited"], saved["history"])


def _log_epoch(job: TrainJob, record: dict[str, float], epoch: int) -> None:
    if not (job.tracking_uri and job.run_id):
        return
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(metric_key(key), float(value), now, epoch) for key, value in record.items() if key != "epoch"]
    MlflowClient(job.tracking_uri).log_batch(job.run_id, metrics=metrics)


@dataclass
class _Trainer:
    """A rank's model with its loss (DDP-wrapped on several ranks), optimizer and schedule."""

    task: Task
    model: nn.Module
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: ReduceLROnPlateau | None


def _build_trainer(job: TrainJob, rank: _Rank) -> _Trainer:
    torch.manual_seed(job.seed)  # same initial weights on every rank
    task = get_task(job.spec.name)
    model = task.build(job.spec).to(rank.device)
    log_q = torch.as_tensor(job.spec.log_q if job.spec.log_q is not None else
                            np.full(job.spec.num_items, -math.log(job.spec.num_items)), dtype=torch.float32)
    generator = torch.Generator().manual_seed(job.seed + rank.rank)
    loss_module = LossModule(task, model, log_q, LossOptions(job.loss, job.num_negatives, generator)).to(rank.device)
    loss: nn.Module = DistributedDataParallel(loss_module) if rank.world > 1 else loss_module
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.learning_rate, weight_decay=job.weight_decay,
                                  betas=(0.9, 0.98))
    # Every rank sees the same all-reduced validation metric, so their rates stay equal.
    schedule = ReduceLROnPlateau(
        optimizer, mode="max", factor=job.lr_decay, patience=job.lr_decay_patience - 1, threshold=0.0
    ) if job.lr_decay < 1 else None
    return _Trainer(task, model, loss, optimizer, schedule)


def _train_epoch(trainer: _Trainer, batches: Iterable[SequenceBatch], job: TrainJob, rank: _Rank) -> float:
    """One pass over this rank's shard; the mean training loss over every rank's steps."""
    trainer.loss.train()
    loss_sum = np.zeros(2)
    join = trainer.loss.join() if isinstance(trainer.loss, DistributedDataParallel) else nullcontext()
    with join:
        for batch in batches:
            rank.stop_if_orphaned()
            loss = trainer.loss(batch)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(trainer.model.parameters(), job.grad_clip)
            trainer.optimizer.step()
            loss_sum += (float(loss.detach()), 1.0)
    loss_sum = _all_sum(loss_sum, rank)
    return float(loss_sum[0] / max(loss_sum[1], 1.0))


def _end_epoch(trainer: _Trainer, state: _State, record: dict[str, float], metrics: dict[str, float],
               job: TrainJob, rank: _Rank) -> None:
    """Early-stopping and learning-rate bookkeeping; the leader checkpoints and logs the epoch."""
    state.history.append(record)
    improved = metrics[job.stop_metric] > state.best
    if improved:
        state.best, state.best_epoch, state.waited = float(metrics[job.stop_metric]), state.epoch, 0
    else:
        state.waited += 1
    if trainer.schedule is not None:
        trainer.schedule.step(metrics[job.stop_metric])
        record["learning_rate"] = float(trainer.optimizer.param_groups[0]["lr"])
    state.epoch += 1
    rank.stop_if_orphaned()
    if rank.leader:
        folder = Path(job.checkpoint_dir)
        if improved:
            torch.save(trainer.model.state_dict(), folder / BEST)
        _save(folder / LAST, trainer.model, trainer.optimizer, trainer.schedule, state)
        _log_epoch(job, record, state.epoch - 1)
        log_event(log, "train.epoch", epoch=state.epoch - 1, loss=round(record["train_loss"], 4),
                  **{f"val_{job.stop_metric}": round(metrics[job.stop_metric], 5)},
                  best=round(state.best, 5), seconds=round(record["epoch_seconds"], 1),
                  validation_seconds=round(record["validation_seconds"], 1))
    if rank.world > 1:
        dist.barrier()  # checkpoints are on disk before any rank moves on


def _out_of_time(deadline: float | None, rank: _Rank) -> bool:
    """Whether the time budget is spent, decided by all ranks together (a rank that stopped
    alone would leave the others waiting in a collective forever)."""
    if deadline is None:
        return False
    return bool(_all_sum(np.array([float(time.monotonic() >= deadline)]), rank)[0] > 0)


def train_worker(job: TrainJob) -> TrainResult:
    """Train, early-stop on validation ``job.stop_metric``, evaluate the best model on test."""
    configure_logging(job.log_level)
    rank = _start()
    trainer = _build_trainer(job, rank)
    folder = Path(job.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    resuming = job.resume and (folder / LAST).exists()
    state = _load(folder / LAST, trainer.model, trainer.optimizer, trainer.schedule) if resuming else _State()
    if job.resume and rank.leader:
        log_event(log, "train.resume", epoch=state.epoch, best=state.best)
    torch.manual_seed(job.seed + 1000 * state.epoch + rank.rank)  # dropout stream per rank/epoch

    rows = DeltaBatches(job.train, columns=TRAIN_COLUMNS, batch_size=max(1, job.batch_size // rank.world),
                        shuffle=True, seed=job.seed, buffer_rows=job.buffer_rows, rank=rank.rank,
                        world_size=rank.world, bucket_by=HISTORY_ITEMS)
    collate = partial(sequence_batch, max_length=job.spec.max_length)
    deadline = None if job.max_minutes is None else time.monotonic() + 60 * job.max_minutes
    # The patience test heads the loop: a resumed run that had already stopped early trains no
    # further epoch (its best model may already be registered).
    while state.epoch < job.epochs and state.waited < job.patience:
        started = time.perf_counter()
        rows.set_epoch(state.epoch)
        train_loss = _train_epoch(trainer, prefetch(collate_with(rows, collate), job.prefetch_batches), job, rank)
        trained = time.perf_counter()
        metrics = evaluate(trainer.task, trainer.model, job.validation, job, rank)
        # Plain floats: checkpoints are loaded with weights_only=True, which refuses numpy scalars.
        record = {"epoch": state.epoch, "train_loss": train_loss,
                  **{f"val_{k}": float(v) for k, v in metrics.items()},
                  "epoch_seconds": time.perf_counter() - started, "validation_seconds": time.perf_counter() - trained}
        _end_epoch(trainer, state, record, metrics, job, rank)
        if _out_of_time(deadline, rank):
            if rank.leader:
                log_event(log, "train.time_budget", minutes=job.max_minutes, epochs=state.epoch)
            break

    trainer.model.load_state_dict(torch.load(folder / BEST, map_location=rank.device, weights_only=True))
    test = evaluate(trainer.task, trainer.model, job.test, job, rank)
    best_validation = state.history[state.best_epoch] if state.best_epoch >= 0 else {}
    if rank.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(
        test=test,
        validation={k[4:]: v for k, v in best_validation.items() if k.startswith("val_")},
        best_epoch=state.best_epoch,
        epochs_run=state.epoch,
        stopped_early=state.waited >= job.patience,
        history=state.history,
        best_state_path=str(folder / BEST),
        world_size=rank.world,
    )
