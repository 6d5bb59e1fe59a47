"""Torch beside Spark: one SASRec training epoch alone and beside a busy Spark job, with the rank's
threads at torch's default (every core) and at the CPUs its Spark task was given.

    python bench/cpu_sharing.py [--users 20000] [--repeats 2]

On a cluster a rank shares its executor's host with Spark tasks. torch's default is one intra-op
thread per core; beside a busy Spark task those threads wait on each other (each parallel region
ends at a barrier that the slowest, descheduled thread holds up), which is far worse than losing
the other task's share of the cores. recsys-spark starts each rank with ``OMP_NUM_THREADS`` = its
task's CPUs (``spark.task.cpus``; ``training/distributor.py``). The busy job here is a Spark
session with one core (``local[1]``) hashing numbers without pause, the "other executor"; the
epoch runs in its own process with the thread count under test. Same gold table as
bench/loader.py (built with the product's commands, or reused). Fastest of ``--repeats`` epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import REPO, machine, record

from loader import build_gold


def epoch_worker(root: str, threads: int) -> dict:
    from functools import partial

    import torch

    from recsys_spark.constants import GOLD_TRAINING_EXAMPLES, HISTORY_ITEMS
    from recsys_spark.modeling.batches import TRAIN_COLUMNS, sequence_batch
    from recsys_spark.modeling.loader import DeltaBatches, TableSlice, collate_with, prefetch
    from recsys_spark.modeling.tasks import LossModule, LossOptions, ModelSpec, get_task
    from recsys_spark.storage import read_table, table_version

    torch.set_num_threads(threads)
    version = table_version(root, GOLD_TRAINING_EXAMPLES)
    assert version is not None
    items = read_table(root, GOLD_TRAINING_EXAMPLES, version=version,
                       columns=[HISTORY_ITEMS]).column(HISTORY_ITEMS).combine_chunks()
    num_items = int(items.flatten().to_numpy().max()) + 1
    spec = ModelSpec(name="sasrec", num_items=num_items, num_users=1, max_length=50)
    task = get_task("sasrec")
    torch.manual_seed(0)
    model = task.build(spec)
    loss_module = LossModule(task, model, torch.zeros(num_items), LossOptions())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = DeltaBatches(TableSlice(root, GOLD_TRAINING_EXAMPLES, version, "train"), columns=TRAIN_COLUMNS,
                           batch_size=128, shuffle=True, bucket_by=HISTORY_ITEMS)
    batches.set_epoch(0)
    started, rows = time.perf_counter(), 0
    for batch in prefetch(collate_with(batches, partial(sequence_batch, max_length=50)), 4):
        loss = loss_module(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        rows += len(batch.users)
    return {"seconds": time.perf_counter() - started, "rows": rows, "threads": torch.get_num_threads()}


def busy_worker() -> None:
    """A Spark job on one core that never ends (stopped by the caller)."""
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false")
             .config("spark.driver.host", "127.0.0.1").getOrCreate())
    print("busy", flush=True)
    while True:
        spark.range(0, 400_000_000, numPartitions=4).selectExpr("sum(hash(id, id * 7))").collect()


def epoch(root: str, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--epoch", root, "--threads", str(threads)], env=env,
                         check=True, stdout=subprocess.PIPE, text=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epoch", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--busy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.busy:
        busy_worker()
        return
    if args.epoch:
        print(json.dumps(epoch_worker(args.epoch, args.threads)))
        return
    root = REPO / ".tmp" / f"bench-loader-{args.users}"
    build_gold(root, args.users)
    cores = len(os.sched_getaffinity(0))
    settings = [("torch's default: one thread per core", cores), ("the task's CPUs (spark.task.cpus=1)", 1)]
    results: dict[tuple[int, bool], list[float]] = {}
    for busy in (False, True):
        spark = None
        if busy:
            spark = subprocess.Popen([sys.executable, __file__, "--busy"], stdout=subprocess.PIPE, text=True,
                                     stderr=subprocess.DEVNULL, cwd=REPO)
            assert spark.stdout.readline().strip() == "busy"
            time.sleep(5)  # the job is running
        try:
            for _ in range(args.repeats):
                for _, threads in settings:
                    seconds = epoch(str(root), threads)
                    results.setdefault((threads, busy), []).append(seconds)
                    print(f"threads={threads} busy={busy}: {seconds:.1f} s", flush=True)
        finally:
            if spark is not None:
                spark.kill()
                spark.wait()
    lines = [
        f"One SASRec epoch (default config, batch 128) over the bench/loader.py gold table ({args.users:,} users), "
        f"in its own process, alone and beside a Spark job busy on one core (`local[1]`), fastest of "
        f"{args.repeats}. Machine: {machine()} ({cores} cores usable).",
        "",
        "| rank threads | alone s | beside a busy Spark job s | slowdown |",
        "|---|---:|---:|---:|",
    ]
    for label, threads in settings:
        alone, shared = min(results[(threads, False)]), min(results[(threads, True)])
        lines.append(f"| {threads} ({label}) | {alone:.1f} | {shared:.1f} | {shared / alone:.2f}x |")
    lines += ["", "All epochs (s): " + "; ".join(
        f"threads={t} {'busy' if b else 'alone'}: {', '.join(f'{s:.1f}' for s in v)}"
        for (t, b), v in sorted(results.items()))]
    record("cpu_sharing", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
