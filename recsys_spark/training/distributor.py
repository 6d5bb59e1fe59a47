"""Spark's ``TorchDistributor`` with its listening sockets on one address, not every interface.

Out of the box, torchrun's rendezvous stores (whose state torch unpickles) listen on all
interfaces, and in cluster mode so does the driver's log-streaming server. Here ranks start
under ``bound_torchrun``: in local mode every store and gloo socket is on 127.0.0.1; on a
cluster the stores are on the address of the executor that hosts rank 0 (``MASTER_ADDR``,
Spark's own choice) and the log server on ``spark.driver.host``. Ports are picked free by the
OS, two per training run on the rank-0 host (rendezvous and the ranks' shared store) plus
gloo's pair sockets, so a firewall between executors must allow ephemeral TCP ports.

pyspark's ``run`` names ``TorchDistributor._run_training_on_pytorch_file`` explicitly, so the
hook is ``run`` itself, not the command builders it calls.
"""

from __future__ import annotations

import os
import socketserver
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyspark.ml.torch.distributor as spark_distributor
from pyspark import TaskContext
from pyspark.ml.torch.distributor import TorchDistributor
from pyspark.ml.torch.log_communication import (  # type: ignore[attr-defined]
    _SERVER_POLL_INTERVAL,
    LogStreamingServer,
    WriteLogToStdout,
)

from recsys_spark.training.bound_torchrun import GLOO_FLAG

LOOPBACK = "127.0.0.1"


class BoundTorchDistributor(TorchDistributor):
    """``TorchDistributor`` whose ranks start under ``bound_torchrun`` (see module docstring)."""

    def run(self, train_object: Any, *args: Any, **kwargs: Any) -> Any:
        return self._run(train_object, BoundTorchDistributor._run_training_on_pytorch_file, *args, **kwargs)

    @staticmethod
    def _run_training_on_pytorch_file(input_params: dict[str, Any], train_path: str, *args: Any,
                                      **kwargs: Any) -> None:
        if kwargs:
            raise ValueError("a training file takes positional arguments only")
        command = BoundTorchDistributor._torchrun_command(input_params, train_path, *args)
        with _rank_environment(_threads_per_rank(input_params)):
            TorchDistributor._execute_command(command, log_streaming_client=input_params.get("log_streaming_client"))

    @staticmethod
    def _torchrun_command(input_params: dict[str, Any], train_path: str, *args: Any) -> list[str]:
        local = input_params["local_mode"]
        torchrun_args, per_node = TorchDistributor._get_torchrun_args(local, input_params["num_processes"])
        launcher = []
        if local:  # the ranks' shared store and MASTER_ADDR on loopback too, and gloo with them
            torchrun_args = [*torchrun_args, f"--local-addr={LOOPBACK}"]
            launcher = [f"{GLOO_FLAG}lo"]
        return [sys.executable, "-m", "recsys_spark.training.bound_torchrun", *launcher, *torchrun_args,
                f"--nproc_per_node={per_node}", train_path, *map(str, args)]

    def _run_distributed_training(self, *args: Any, **kwargs: Any) -> Any:
        spark_distributor.LogStreamingServer = _BoundLogStreamingServer  # looked up by name there
        try:
            return super()._run_distributed_training(*args, **kwargs)
        finally:
            spark_distributor.LogStreamingServer = LogStreamingServer


def _threads_per_rank(input_params: dict[str, Any]) -> int:
    """The CPUs each rank started here may use: its Spark task's (``spark.task.cpus``) on a
    cluster, the driver's cores shared among the ranks in local mode."""
    per_node = input_params["num_processes"] if input_params["local_mode"] else 1  # one rank per task on CPU
    context = TaskContext.get()
    cpus = context.cpus() if context is not None else len(os.sched_getaffinity(0))
    return max(1, cpus // per_node)


@contextmanager
def _rank_environment(threads: int) -> Iterator[None]:
    """Environment of the torchrun launcher, undone afterwards (Spark reuses its Python workers).

    * ``OMP_NUM_THREADS``: the ranks' thread count, read by torch at start-up (and by torchrun,
      which would otherwise force 1 whenever a node runs several ranks);
    * ``PYTHONPATH``: this task's ``sys.path``, so the ranks import the same code as the task that
      starts them, including a package shipped with ``--py-files``, which Spark puts on the task's
      path only.
    """
    saved = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "PYTHONPATH")}
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in sys.path if p))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _BoundLogStreamingServer(LogStreamingServer):
    """pyspark's log server for cluster ranks, on the driver's Spark address only."""

    server: socketserver.ThreadingTCPServer | None

    def start(self, spark_host_address: str = "") -> None:
        if self.server:
            raise RuntimeError("the log server is already running")
        self.port = LogStreamingServer._get_free_port(spark_host_address)

        def serve(port: int) -> None:
            with socketserver.ThreadingTCPServer((spark_host_address, port), WriteLogToStdout) as server:
                self.server = server
                server.is_active = True  # type: ignore[attr-defined]  # read by pyspark's handler
                server.serve_forever(poll_interval=_SERVER_POLL_INTERVAL)

        self.serve_thread = threading.Thread(target=serve, args=(self.port,), daemon=True)
        self.serve_thread.start()
