"""`llavakit serve --tensor-parallel-size 2`: the same answer as one process; no worker outlives the server,
however it ends (SIGTERM, SIGKILL); a worker that dies makes the server answer 503 and exit, not hang."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from .harness import ServeProcess

CHAT = {"model": "tiny", "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "user", "content": "Say something about shapes."}]}


def _descendants(pid: int) -> dict[int, str]:
    """Every live process below `pid`: pid -> command line."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, pp in parents.items():
            if pp == parent and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                except OSError:
                    continue
                todo.append(child)
    return found


def _workers(pid: int) -> list[int]:
    return [p for p, cmd in _descendants(pid).items() if "spawn_main" in cmd]


def _gone(pids, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(_state(p) in ("gone", "Z") for p in pids):  # a zombie has exited, unreaped
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def test_answers_as_one_process_and_sigterm_leaves_no_worker(checkpoint, pipe):
    expected = pipe.chat(CHAT["messages"], max_new_tokens=12, temperature=0).text
    with ServeProcess(checkpoint, "--tensor-parallel-size", "2") as server:
        workers = _workers(server.proc.pid)
        assert len(workers) == 1
        reply = httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=60)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == expected
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(30)  # graceful (uvicorn re-raises the signal once it has shut down)
        assert b"Traceback" not in server.proc.stderr.read()
        assert _gone(workers)


def test_killing_the_server_leaves_no_worker(checkpoint):
    with ServeProcess(checkpoint, "--tensor-parallel-size", "2") as server:
        left = list(_descendants(server.proc.pid))
        assert _workers(server.proc.pid)
        server.proc.kill()
        server.proc.wait(10)
    assert _gone(left)  # the worker notices its parent is gone; multiprocessing's tracker too


def test_a_lost_worker_gives_503_and_the_server_exits(checkpoint):
    with ServeProcess(checkpoint, "--tensor-parallel-size", "2") as server:
        (worker,) = _workers(server.proc.pid)
        os.kill(worker, signal.SIGKILL)
        assert _gone([worker])
        reply = httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=60)
        assert reply.status_code == 503, reply.text
        error = reply.json()["error"]
        assert error["code"] == "engine_dead" and "worker processes stopped" in error["message"]
        server.proc.wait(30)  # it shuts itself down (a supervisor restarts it) instead of hanging
        assert b"tensor-parallel worker rank 1" in server.proc.stderr.read()
