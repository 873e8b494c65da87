"""torch.distributed setup for the trainer: a rendezvous that listens on loopback only.

DeepSpeed needs a process group even for one process. torch's ``env://`` rendezvous
starts an unauthenticated key-value server (a ``TCPStore``) that listens on every
interface whatever ``MASTER_ADDR`` says, and gloo (NCCL) opens its own listening socket
on the address the host name resolves to: anyone who can reach the machine could connect
and read or write the rendezvous keys. So where every rank runs on this machine, the
process group is built here instead:

* no launcher (``store train`` in one process): a ``TCPStore`` server on a socket this
  module binds to ``127.0.0.1`` (port 0: no race for a free port), world size 1;
* a launcher that set a loopback ``MASTER_ADDR`` (``deepspeed`` on one node sets
  ``127.0.0.1``): rank 0 serves the store on a socket bound to that address and port,
  the other ranks connect to it;
* and in both cases ``GLOO_SOCKET_IFNAME`` (``NCCL_SOCKET_IFNAME`` with CUDA) names the
  loopback interface unless the user set it, so the collective backend listens there too
  (process groups DeepSpeed creates later read it again, so it stays set).

A non-loopback ``MASTER_ADDR`` (several nodes: the user asked for a network address) and
``torchrun`` (its agent owns the store) keep torch's own rendezvous. The variables set
here are listed by :func:`variables_set_here` so that a launcher started from this
process does not inherit them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from datetime import timedelta

import torch

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
#: How long a rank waits for the store (the other ranks to start), as torch's default.
STORE_TIMEOUT = timedelta(minutes=30)

_set_here: dict[str, str] = {}


def rank() -> int:
    """This process's rank: from torch.distributed, else the launcher's RANK, else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_rank())
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of ranks (1 when torch.distributed is not initialised)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(torch.distributed.get_world_size())
    return 1


def barrier() -> None:
    """Wait for every rank (a no-op in one process without a process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def variables_set_here() -> dict[str, str]:
    """The environment variables :func:`ensure_distributed` set in this process."""
    return dict(_set_here)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) resolves to a loopback address only."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )


def loopback_interface() -> str | None:
    """The name of the network interface that holds 127.0.0.1 (``lo`` on Linux)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOOPBACK for a in addresses):
            return name
    return None


def _set(key: str, value: str) -> None:
    os.environ[key] = value
    _set_here[key] = value


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket bound to ``host:port`` (port 0: any free one)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    return sock


def _loopback_store(host: str, port: int, rank_: int, world: int) -> torch.distributed.Store:
    """The rendezvous store, served by rank 0 on a socket bound to ``host`` (loopback)."""
    if rank_ != 0:
        return torch.distributed.TCPStore(
            host, port, world_size=world, is_master=False, timeout=STORE_TIMEOUT
        )
    sock = _listen(host, port)
    bound = int(sock.getsockname()[1])
    store = torch.distributed.TCPStore(
        host,
        bound,
        world_size=world,
        is_master=True,
        timeout=STORE_TIMEOUT,
        master_listen_fd=sock.detach(),
    )
    if port == 0:
        _set("MASTER_PORT", str(bound))
    return store


def ensure_distributed() -> None:
    """Initialise torch.distributed (and DeepSpeed's view of it) once per process.

    One process without a launcher gets ``RANK=0 WORLD_SIZE=1`` and a rendezvous bound to
    127.0.0.1; a launcher's loopback ``MASTER_ADDR`` is honoured with a loopback-only
    store; other addresses use torch's ``env://`` rendezvous (see the module docstring).
    Raises what torch raises when the store cannot bind or the ranks do not meet
    (RuntimeError, OSError), e.g. a ``MASTER_PORT`` already in use.
    """
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "WORLD_SIZE" not in os.environ:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            _set(key, value)
        _set("MASTER_ADDR", LOOPBACK)
        _set("MASTER_PORT", "0")
    host = os.environ.get("MASTER_ADDR", "")
    if "TORCHELASTIC_USE_AGENT_STORE" in os.environ or not is_loopback(host):
        logger.info("rendezvous through torch's env:// at %s (not loopback-only)", host)
        deepspeed.init_distributed(dist_backend=backend)
        return
    ifname_key = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    interface = loopback_interface()
    if interface is not None and ifname_key not in os.environ:
        _set(ifname_key, interface)
    rank_, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = _loopback_store(host, int(os.environ.get("MASTER_PORT", "0")), rank_, world)
    torch.distributed.init_process_group(backend, store=store, rank=rank_, world_size=world)
    deepspeed.init_distributed(dist_backend=backend)
