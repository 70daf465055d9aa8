"""Tensor-parallel processes: rank 0 drives, ranks 1..N-1 follow.

Rank 0 is the user's process (the CLI, the server, `llavakit.LLM`): it schedules and samples. `start` gives
it the N-1 workers, either spawned here (no launcher needed; they share rank 0's load arguments) or, under
`torchrun --nproc-per-node N`, the processes torchrun started (every rank runs the same command; ranks
above 0 turn into workers inside `llavakit.load`). Each worker loads its shard, then loops on rank 0's
messages: build a model runner (its own KV cache, its share of the heads), run a prepared step, release,
exit. All ranks run the same model steps, so the collectives inside the model pair up.

Teardown, whatever ends rank 0: at a normal exit it tells the workers to exit and joins them; spawned
workers are also terminated at exit and watch their parent, so Ctrl-C (which workers ignore, leaving it to
rank 0), SIGTERM or SIGKILL of rank 0 leaves no process behind.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from llavakit.engine.model_runner import EngineDeadError, build_runner
from llavakit.parallel.group import TPGroup, init_group, rank_device, torchrun_world

PARENT_POLL_S = 0.5


class WorkerLostError(EngineDeadError):
    """A tensor-parallel worker stopped: the model cannot run any more in this process."""


class Workers:
    """Rank 0's handle on the group: messages to the workers, and the workers' processes (when spawned)."""

    def __init__(self, tp: TPGroup, processes: list[multiprocessing.Process]):
        self.tp, self.processes = tp, processes
        self.runners = 0
        self.busy = False  # inside a step's collectives (an exit message then would not pair up)
        self.closed = False
        self.lost: str | None = None
        atexit.register(self.close)

    def call(self, *message: Any) -> None:
        """Send a message to every worker (the caller then runs the same step)."""
        self.check()
        try:
            self.tp.send(message)
        except RuntimeError as e:
            raise self.lost_error(e) from None

    def check(self) -> None:
        if self.lost:
            raise WorkerLostError(self.lost)
        dead = [f"rank {i + 1} (exit code {p.exitcode})" for i, p in enumerate(self.processes) if not p.is_alive()]
        if dead:
            self.lost = f"tensor-parallel worker {', '.join(dead)} stopped; restart llavakit"
            raise WorkerLostError(self.lost)

    def lost_error(self, error: Exception) -> WorkerLostError:
        """A collective failed: a worker is gone (its error, in words)."""
        try:
            self.check()
        except WorkerLostError as e:
            return e
        self.lost = f"a tensor-parallel collective failed ({str(error).splitlines()[0][:200]}); restart llavakit"
        return WorkerLostError(self.lost)

    def close(self) -> None:
        """Tell the workers to exit and wait for them; terminate any that do not."""
        if self.closed:
            return
        self.closed = True
        if not self.busy and not self.lost:
            with contextlib.suppress(Exception):  # a worker already gone: terminated below
                self.tp.send(("exit",))
        deadline = time.monotonic() + 5
        for p in self.processes:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
        if self.processes and dist.is_initialized():  # spawned here: free the group for a later load
            dist.destroy_process_group()


def start(size: int, device: torch.device, load_args: dict, load_shard: Callable[[TPGroup, dict], Any]
          ) -> tuple[TPGroup, Workers | None]:
    """This process's TPGroup, spawning workers 1..size-1 unless a launcher started them; a spawned worker
    runs `load_shard(its group, load_args)` -> its model shard (None: loading failed), then follows rank 0.
    Returns (group, Workers on rank 0; None on a torchrun worker rank)."""
    world = torchrun_world()
    if world is not None:
        rank, n = world
        if n != size:
            raise ValueError(f"torchrun started {n} processes but the tensor-parallel size is {size}; pass "
                             f"--tensor-parallel-size {n} (or start torchrun with --nproc-per-node {size})")
        tp = init_group(rank, n, rank_device(device, rank))
        return tp, (Workers(tp, []) if rank == 0 else None)
    check_devices(size, device)
    if dist.is_initialized():
        raise ValueError("this process already belongs to a torch.distributed group; start it with torchrun "
                         f"--nproc-per-node {size} for tensor parallelism, or load without tensor_parallel_size")
    port = _free_port()
    init_method = f"tcp://127.0.0.1:{port}"
    ctx = multiprocessing.get_context("spawn")
    processes = [ctx.Process(target=worker_main, name=f"llavakit-tp{r}", daemon=True,
                             args=(r, size, init_method, str(device), load_shard, load_args, os.getpid()))
                 for r in range(1, size)]
    for p in processes:
        p.start()
    try:
        tp = init_group(0, size, rank_device(device, 0), init_method)
    except BaseException:
        for p in processes:
            p.kill()
        raise
    return tp, Workers(tp, processes)


def check_devices(size: int, device: torch.device) -> None:
    if device.type == "cuda" and size > torch.cuda.device_count():
        raise ValueError(f"tensor-parallel size {size} needs {size} GPUs but {torch.cuda.device_count()} "
                         "are visible; use a smaller --tensor-parallel-size (or check CUDA_VISIBLE_DEVICES)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_main(rank: int, size: int, init_method: str, device: str, load_shard, load_args: dict,
                parent: int) -> None:
    """A spawned worker: join the group, load this rank's shard, then follow rank 0 until told to exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every process; rank 0 decides
    os.environ["TQDM_DISABLE"] = "1"  # rank 0 shows the progress
    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock (a named semaphore to leak)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="llavakit-tp-parent").start()
    tp = init_group(rank, size, rank_device(torch.device(device), rank), init_method)
    model = load_shard(tp, load_args)
    if model is None:
        return
    try:
        follow(tp, model)
    except Exception as e:  # noqa: BLE001 - rank 0 failed or left without a word: say so once, quietly if it is gone
        if os.getppid() == parent:
            print(f"llavakit tensor-parallel worker {rank}: stopping: {str(e).splitlines()[0][:300]}",
                  file=sys.stderr, flush=True)
        os._exit(1)


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(0)  # rank 0 is gone (killed): nobody will send another step


def follow(tp: TPGroup, model) -> None:
    """A worker's loop: run what rank 0 runs, on this rank's shard, until "exit" (then leave the process)."""
    runners = {}
    while True:
        message = tp.receive()
        op = message[0]
        if op == "step":
            runners[message[1]].run(message[2])
        elif op == "runner":
            _, key, cfg, max_model_len = message
            runners[key] = build_runner(model, cfg, max_model_len)
        elif op == "release":
            runners.pop(message[1]).release()
        elif op == "exit":
            break
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # at once: tearing the group down from this side would wait on rank 0, which waits on us
