"""Data path: one training epoch streamed Delta -> DeltaBatches -> DataLoader versus the same
epoch over batches already in memory as tensors — same model, same rows, same process.

    python bench/loader.py [--users 20000] [--epochs 3]

Builds a synthetic gold table with the product's own commands (or reuses it), then alternates
``--epochs`` epochs of each path and compares the fastest epoch of each: interference from the
rest of the machine only ever adds time, so the minimum is the least disturbed measurement.
Target: streamed ≤ 1.3 times in-memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
from common import REPO, machine, record

from recsys_spark.constants import GOLD_TRAINING_EXAMPLES, HISTORY_ITEMS
from recsys_spark.modeling.batches import TRAIN_COLUMNS, sequence_batch
from recsys_spark.modeling.loader import DeltaBatches, TableSlice, collate_with, prefetch
from recsys_spark.modeling.tasks import LossModule, LossOptions, ModelSpec, get_task
from recsys_spark.storage import read_table, table_version


def recsys(*argv: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "recsys_spark.cli", *argv, "--json"], check=True,
                         stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def build_gold(root: Path, users: int) -> None:
    if (root / "gold" / "training_examples").exists():
        return
    log = root.parent / f"loader-{users}.csv"
    recsys("generate", "--users", str(users), "--items", str(users // 2), "--days", "30", "--out", str(log))
    recsys("ingest", "--format", "taobao", "--input", str(log), "--root", str(root))
    recsys("features", "--root", str(root))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    root = REPO / ".tmp" / f"bench-loader-{args.users}"
    build_gold(root, args.users)
    version = table_version(str(root), GOLD_TRAINING_EXAMPLES)
    assert version is not None
    source = TableSlice(str(root), GOLD_TRAINING_EXAMPLES, version, "train")
    items = read_table(str(root), GOLD_TRAINING_EXAMPLES, version=version,
                       columns=[HISTORY_ITEMS]).column(HISTORY_ITEMS).combine_chunks()
    num_items = int(items.flatten().to_numpy().max()) + 1
    spec = ModelSpec(name="sasrec", num_items=num_items, num_users=args.users, max_length=50)
    task = get_task("sasrec")
    torch.manual_seed(0)
    model = task.build(spec)
    loss_module = LossModule(task, model, torch.zeros(num_items), LossOptions())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch) -> None:
        loss = loss_module(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    batches = DeltaBatches(source, columns=TRAIN_COLUMNS, batch_size=args.batch_size, shuffle=True,
                           bucket_by=HISTORY_ITEMS)
    collate = partial(sequence_batch, max_length=50)

    def streamed_epoch(epoch: int) -> tuple[float, int]:
        batches.set_epoch(epoch)
        started, rows = time.perf_counter(), 0
        for batch in prefetch(collate_with(batches, collate), 4):
            step(batch)
            rows += len(batch.users)
        return time.perf_counter() - started, rows

    batches.set_epoch(0)
    in_memory = list(collate_with(batches, collate))  # the same batches, as tensors, up front

    def memory_epoch() -> tuple[float, int]:
        started, rows = time.perf_counter(), 0
        for batch in in_memory:
            step(batch)
            rows += len(batch.users)
        return time.perf_counter() - started, rows

    pairs = []
    for epoch in range(args.epochs):  # alternate, so warm-up and drift hit both alike
        streamed, rows = streamed_epoch(epoch)
        memory, memory_rows = memory_epoch()
        pairs.append((streamed, memory))
        print(f"epoch {epoch}: streamed {streamed:.1f} s, in memory {memory:.1f} s, rows {rows}/{memory_rows}",
              flush=True)
    streamed, memory = min(s for s, _ in pairs), min(m for _, m in pairs)
    ratio = streamed / memory
    lines = [
        f"One SASRec (default config) training epoch over `gold/training_examples` train rows of a synthetic "
        f"log ({args.users:,} users, {rows:,} rows, {num_items:,} items, batch {args.batch_size}), fastest of "
        f"{args.epochs} alternating epochs of each (all epochs, streamed / in memory: "
        f"{', '.join(f'{s:.1f} / {m:.1f} s' for s, m in pairs)}). Machine: {machine()}.",
        "",
        "| path | epoch seconds |",
        "|---|---:|",
        "| Delta → `DeltaBatches` (row-group units, shuffle buffer, length buckets) → prefetch thread | "
        f"{streamed:.1f} |",
        f"| the same batches as tensors already in memory | {memory:.1f} |",
        f"| **ratio** | **{ratio:.2f}** (target ≤ 1.3: {'met' if ratio <= 1.3 else 'NOT met'}) |",
    ]
    record("loader", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
