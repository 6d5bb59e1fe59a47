"""``torchrun`` whose rendezvous stores listen on one address, not on every interface.

torch's c10d ``TCPStore`` server binds the wildcard address whatever ``host_name`` says (its
C++ listener asks for a passive address; the libuv one binds ``::``/``0.0.0.0``), and the
rendezvous state read from it is unpickled. The one way to choose the address is to hand the
store a socket already listening there (``master_listen_fd``). So this launcher, run in place
of ``python -m torch.distributed.run``, swaps torch's ``TCPStore`` for a subclass that does
that: servers listen on the address their ``host_name`` resolves to (IPv4 first), or on
``$RECSYS_STORE_BIND_ADDR``. ``--gloo-socket-ifname=IF`` (first argument, optional) sets
``GLOO_SOCKET_IFNAME`` for the ranks. Like pyspark's own wrapper, it ends torchrun when its
parent (the Spark task) dies.

It depends on how torch names ``TCPStore`` inside ``torch.distributed``; a test checks that
no training process listens on a wildcard address, so a torch upgrade that breaks it fails.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import torch.distributed as dist

BIND_ADDRESS_ENV = "RECSYS_STORE_BIND_ADDR"
GLOO_FLAG = "--gloo-socket-ifname="
_TORCH_STORE = dist.TCPStore
_STORE_PARAMETERS = ("host_name", "port", "world_size", "is_master", "timeout", "wait_for_workers",
                     "multi_tenant", "master_listen_fd", "use_libuv")


def _bind_address(host: str) -> str:
    chosen = os.environ.get(BIND_ADDRESS_ENV)
    if chosen:
        return chosen
    found = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    found.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(found[0][4][0])


class BoundTCPStore(_TORCH_STORE):
    """A ``TCPStore`` whose server listens on ``host_name``'s address only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = dict(zip(_STORE_PARAMETERS, args, strict=False)) | kwargs
        if options.get("is_master") and options.get("master_listen_fd") is None:
            address = _bind_address(options["host_name"])
            listener = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind((address, int(options["port"])))
                listener.listen(4096)
            except OSError as exc:
                listener.close()
                # the c10d rendezvous backend then joins as a client, as with torch's own store
                raise RuntimeError(f"cannot listen on {address}:{options['port']}: {exc}") from exc
            options["port"] = listener.getsockname()[1]
            options["master_listen_fd"] = listener.detach()  # the store owns the socket now
        super().__init__(**options)


def install() -> None:
    """Put ``BoundTCPStore`` wherever torch.distributed refers to ``TCPStore``."""
    import torch.distributed.elastic.rendezvous.c10d_rendezvous_backend
    import torch.distributed.elastic.rendezvous.dynamic_rendezvous
    import torch.distributed.elastic.rendezvous.static_tcp_rendezvous
    import torch.distributed.elastic.utils.distributed
    import torch.distributed.rendezvous  # noqa: F401

    for name, module in list(sys.modules.items()):
        if name.startswith("torch.distributed") and getattr(module, "TCPStore", None) is _TORCH_STORE:
            module.TCPStore = BoundTCPStore  # type: ignore[attr-defined]


def _end_when_parent_dies() -> None:
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)  # torchrun's agent stops its ranks on SIGTERM


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1].startswith(GLOO_FLAG):
        os.environ["GLOO_SOCKET_IFNAME"] = sys.argv.pop(1).removeprefix(GLOO_FLAG)
    install()
    threading.Thread(target=_end_when_parent_dies, daemon=True).start()
    from torch.distributed.run import main

    main()
