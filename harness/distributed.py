"""Process-group setup for every launcher: deepspeed, torchrun, Slurm srun, Ray Train, plain python.

DeepSpeed and torchrun export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT;
`deepspeed.init_distributed` does not read SLURM_* (docs/design.md §6), so under srun we derive
them; a plain `python harness/train.py` becomes a world of one on a free loopback port.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import random
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (never assume 29500)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from Slurm or for a single process."""
    env = os.environ if env is None else env
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _slurm_master_addr(env)
        # Same port on every task without talking to each other: derived from the job id.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
    if "RANK" not in env:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")
    return env


def _slurm_master_addr(env) -> str:
    """Address of the job's first node: scontrol's NodeAddr (node names need not resolve)."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                               text=True, check=True, timeout=30).stdout.split()[0]
        info = subprocess.run(["scontrol", "show", "node", first], capture_output=True,
                              text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError, IndexError):
        return "127.0.0.1"
    for token in info.split():
        if token.startswith("NodeAddr="):
            return token.split("=", 1)[1]
    return first


SOCKET_IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def bind_socket_ifname(env: dict[str, str] | None = None) -> str | None:
    """Point gloo and NCCL at the interface this node reaches MASTER_ADDR through, when unset.

    Left alone, gloo binds to whatever this host's name resolves to, which on a multi-homed or
    containerised node is often an address the other nodes cannot reach (or no local address at
    all: gloo then falls back to loopback and the ranks of other nodes hang). A master on
    loopback means a one-host run, where the defaults work. Returns the interface it set.
    """
    env = os.environ if env is None else env
    master = env.get("MASTER_ADDR", "")
    if all(env.get(var) for var in SOCKET_IFNAME_VARS) or not master or _is_loopback(master):
        return None
    name, local = interface_toward(master)
    if name is None:
        return None
    chosen = [var for var in SOCKET_IFNAME_VARS if not env.get(var)]
    for var in chosen:
        env[var] = name
    print(f"distributed: rank {env.get('RANK', '?')}: {'/'.join(chosen)}={name} (holds {local}, this node's "
          f"address toward MASTER_ADDR {master}); set {chosen[0]} to choose another", file=sys.stderr, flush=True)
    return name


def interface_toward(addr: str) -> tuple[str | None, str | None]:
    """(interface name, local IPv4 address) this host uses to reach `addr`, from the routing table."""
    try:
        target = socket.gethostbyname(addr)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))  # UDP connect sends nothing: it only picks the route and source
            local = s.getsockname()[0]
    except OSError:
        return None, None
    for _, name in socket.if_nameindex():
        if _ipv4_of(name) == local:
            return name, local
    return None, local


def _ipv4_of(name: str) -> str | None:
    """The IPv4 address of interface `name` (SIOCGIFADDR), None when it has none."""
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(addr)).is_loopback
    except (OSError, ValueError):
        return False


def init(backend: str | None = None) -> World:
    """Initialise torch.distributed through DeepSpeed, reusing a group that already exists (Ray)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        prepare_env()
        bind_socket_ifname()
    if _has_cuda():
        # Before NCCL starts: otherwise every rank of a node opens its communicator (and the first
        # barrier's buffers) on GPU 0.
        import torch

        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    backend = backend or ("nccl" if _has_cuda() else "gloo")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return World(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                 size=dist.get_world_size())


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def seed_everything(seed: int, rank: int) -> int:
    """Seed python, numpy and torch with a per-rank seed derived from the recipe seed."""
    import numpy as np
    import torch

    rank_seed = seed * 1000 + rank
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)
    return rank_seed


def rng_state() -> dict:
    """This process's RNG states in a form torch.load(weights_only=True) accepts."""
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def all_gather_object(obj) -> list:
    """Every rank's `obj`, indexed by rank (a list of one outside a process group)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_flag(*flags: bool) -> list[bool]:
    """Element-wise OR of boolean flags across ranks, so all ranks take the same branch."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(f) for f in flags], device=_reduce_device())
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sum across ranks (float64 so PSNR sums stay exact enough)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def _reduce_device():
    """Where small reductions live: NCCL reduces CUDA tensors only, gloo CPU tensors."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()



def shutdown() -> None:
    """Tear the process group down before the interpreter exits: left to the destructors, gloo's
    threads can abort the process ("terminate called without an active exception", exit -6)
    after a clean one-line error, and the launcher then reports a crash."""
    import torch.distributed as dist

    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _remove_shm_buffer()


def _remove_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce leaves a ~66 MB /dev/shm file per rank
    (`deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<local rank>`, docs/design.md §6): each
    rank removes its own at exit; peers keep their mappings, so this is safe at any moment."""
    port, local = os.environ.get("MASTER_PORT"), os.environ.get("LOCAL_RANK")
    if not port or local is None:
        return
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{local}"):
        with contextlib.suppress(OSError):
            path.unlink()

if __name__ == "__main__":
    # `python -m harness.distributed ifname ADDR`: the interface toward ADDR, for launch scripts
    # that must set GLOO_SOCKET_IFNAME before something else (Ray Train) builds the group.
    if len(sys.argv) != 3 or sys.argv[1] != "ifname":
        sys.exit("usage: python -m harness.distributed ifname ADDRESS")
    found, _ = interface_toward(sys.argv[2])
    if found is None:
        sys.exit(f"distributed: no local interface routes to {sys.argv[2]}")
    print(found)
