"""The training wrapper of each model: how to build it, its loss on a batch, its scores.

Architectures live in ``models/`` (plain PyTorch); everything about batches and losses lives
here. ``TASKS`` is the one registry of trainable model names; a test builds, trains a step and
scores with every entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast

import numpy as np
import torch
from torch import nn

from models.losses import full_softmax, in_batch_softmax, sampled_softmax
from models.mf import MatrixFactorization, MFConfig
from models.sasrec import SASRec, SASRecConfig
from models.two_tower import TwoTower, TwoTowerConfig
from recsys_spark.modeling.batches import EvalBatch, SequenceBatch

LossKind = Literal["full_softmax", "sampled_softmax"]


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a model: name, data sizes, hyperparameters.

    ``item_categories`` (I + 1,) maps item id 1..I to a dense category 1..C (0 unknown);
    ``log_q`` (I,) is the log sampling probability of each item, from training frequencies.
    """

    name: str
    num_items: int
    num_users: int
    max_length: int
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    num_categories: int = 0
    item_categories: np.ndarray | None = None
    log_q: np.ndarray | None = None

    def architecture(self) -> dict[str, Any]:
        """What a saved model needs to be rebuilt (no arrays: those are in the state dict)."""
        return {
            "name": self.name,
            "num_items": self.num_items,
            "num_users": self.num_users,
            "max_length": self.max_length,
            "num_categories": self.num_categories,
            "hyperparameters": dict(self.hyperparameters),
        }


@dataclass
class LossOptions:
    kind: LossKind = "full_softmax"
    num_negatives: int = 256
    generator: torch.Generator | None = None


class Task(Protocol):
    name: str
    # What a prediction is personalised by: the item history (sequence models) or the user.
    personalised_by: Literal["history", "user"]

    def build(self, spec: ModelSpec) -> nn.Module: ...

    def loss(
        self, model: nn.Module, batch: SequenceBatch, log_q: torch.Tensor, options: LossOptions
    ) -> torch.Tensor: ...

    def scores(self, model: nn.Module, batch: EvalBatch) -> torch.Tensor: ...

    def item_embeddings(self, model: nn.Module) -> torch.Tensor: ...


def _softmax_loss(
    hidden: torch.Tensor, catalogue: torch.Tensor, targets: torch.Tensor, log_q: torch.Tensor, options: LossOptions
) -> torch.Tensor:
    if options.kind == "sampled_softmax":
        return sampled_softmax(hidden, catalogue, targets, num_negatives=options.num_negatives,
                               log_q=log_q, generator=options.generator)
    return full_softmax(hidden, catalogue, targets)


class SASRecTask:
    """Next-item prediction at every position of the training sequence (SASRec's objective,
    with softmax cross-entropy instead of the paper's one-negative BCE)."""

    name = "sasrec"
    personalised_by: Literal["history", "user"] = "history"

    def build(self, spec: ModelSpec) -> nn.Module:
        return SASRec(SASRecConfig(num_items=spec.num_items, max_length=spec.max_length, **spec.hyperparameters))

    def loss(self, model: nn.Module, batch: SequenceBatch, log_q: torch.Tensor, options: LossOptions) -> torch.Tensor:
        sasrec = cast(SASRec, model)
        hidden = sasrec(batch.inputs, batch.behaviors, batch.gaps)
        scored = batch.targets > 0
        return _softmax_loss(hidden[scored], sasrec.items.catalogue(), batch.targets[scored], log_q, options)

    def scores(self, model: nn.Module, batch: EvalBatch) -> torch.Tensor:
        sasrec = cast(SASRec, model)
        return sasrec.score(sasrec.last_hidden(batch.inputs, batch.behaviors, batch.gaps))

    def item_embeddings(self, model: nn.Module) -> torch.Tensor:
        return cast(SASRec, model).items.catalogue()


class TwoTowerTask:
    """One random cut per sequence: the prefix feeds the user tower, the next item is the
    positive; the batch's other positives are the negatives (log-Q corrected)."""

    name = "two_tower"
    personalised_by: Literal["history", "user"] = "history"

    def build(self, spec: ModelSpec) -> nn.Module:
        model = TwoTower(TwoTowerConfig(num_items=spec.num_items, num_categories=spec.num_categories,
                                        **spec.hyperparameters))
        if spec.item_categories is not None:
            model.set_item_categories(torch.as_tensor(spec.item_categories, dtype=torch.long))
        return model

    def loss(self, model: nn.Module, batch: SequenceBatch, log_q: torch.Tensor, options: LossOptions) -> torch.Tensor:
        towers = cast(TwoTower, model)
        valid = batch.targets > 0
        rows = valid.any(1)
        valid, inputs, targets = valid[rows], batch.inputs[rows], batch.targets[rows]
        cut = torch.multinomial(valid.float(), 1, generator=options.generator).squeeze(1)
        positions = torch.arange(inputs.shape[1], device=inputs.device)
        prefix = inputs.masked_fill(positions.unsqueeze(0) > cut.unsqueeze(1), 0)
        positive = targets.gather(1, cut.unsqueeze(1)).squeeze(1)
        return in_batch_softmax(towers.user_vectors(prefix), towers.item_vectors(positive), positive,
                                log_q, towers.config.temperature)

    def scores(self, model: nn.Module, batch: EvalBatch) -> torch.Tensor:
        return cast(TwoTower, model).score(batch.inputs)

    def item_embeddings(self, model: nn.Module) -> torch.Tensor:
        return cast(TwoTower, model).catalogue()


class MFTask:
    """Every (user, item) of the training sequences is a positive; softmax over items."""

    name = "mf"
    personalised_by: Literal["history", "user"] = "user"

    def build(self, spec: ModelSpec) -> nn.Module:
        return MatrixFactorization(MFConfig(num_users=spec.num_users, num_items=spec.num_items,
                                            **spec.hyperparameters))

    def loss(self, model: nn.Module, batch: SequenceBatch, log_q: torch.Tensor, options: LossOptions) -> torch.Tensor:
        mf = cast(MatrixFactorization, model)
        # inputs hold items 1..n-1 of each row, the last target column item n.
        items = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)
        positive = items > 0
        users = batch.users.unsqueeze(1).expand_as(items)[positive]
        vectors, user_bias = mf.user_vectors(users), mf.user_biases(users)
        catalogue = mf.items.weight[1:]
        bias = mf.item_bias.weight[1:, 0]
        if options.kind == "sampled_softmax":
            # p_u·q_i + b_i + b_u as one dot product: [p_u, 1, b_u] · [q_i, b_i, 1]
            return sampled_softmax(torch.cat([vectors, torch.ones_like(user_bias), user_bias], 1),
                                   torch.cat([catalogue, bias.unsqueeze(1), torch.ones_like(bias).unsqueeze(1)], 1),
                                   items[positive], num_negatives=options.num_negatives, log_q=log_q,
                                   generator=options.generator)
        return torch.nn.functional.cross_entropy(vectors @ catalogue.T + bias + user_bias, items[positive] - 1)

    def scores(self, model: nn.Module, batch: EvalBatch) -> torch.Tensor:
        return cast(MatrixFactorization, model).score(batch.users)

    def item_embeddings(self, model: nn.Module) -> torch.Tensor:
        return cast(MatrixFactorization, model).items.weight[1:]


TASKS: dict[str, Task] = {task.name: task for task in (SASRecTask(), TwoTowerTask(), MFTask())}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(sorted(TASKS))}") from None


class LossModule(nn.Module):
    """The model plus its task's loss in ``forward``, so DDP wraps one module whose output is
    the loss (gradients of every used parameter, tied ones included, are then synchronised)."""

    def __init__(self, task: Task, model: nn.Module, log_q: torch.Tensor, options: LossOptions) -> None:
        super().__init__()
        self.task = task
        self.model = model
        self.log_q: torch.Tensor
        self.register_buffer("log_q", log_q)
        self.options = options

    def forward(self, batch: SequenceBatch) -> torch.Tensor:
        return self.task.loss(self.model, batch, self.log_q, self.options)
