"""The engine for servers: steps run on one background thread; coroutines add requests, stream their
outputs and abort them (a client that goes away frees its KV blocks at once)."""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import AsyncIterator, Callable

from llavakit.engine.llm_engine import LLMEngine, RequestOutput
from llavakit.engine.model_runner import EngineDeadError
from llavakit.processing.prompt import PromptInputs
from llavakit.sampling import SamplingParams


class AsyncLLMEngine:
    """Wraps an LLMEngine; every engine call happens under one lock, steps on the worker thread."""

    def __init__(self, engine: LLMEngine, on_dead: Callable[[EngineDeadError], None] | None = None):
        """`on_dead`: called once, on the engine thread, when the model can no longer run (EngineDeadError)."""
        self.engine = engine
        self.on_dead = on_dead
        self.dead: EngineDeadError | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="llavakit-engine", daemon=True)
        self._thread.start()

    async def generate(self, inputs: PromptInputs, params: SamplingParams, request_id: str
                       ) -> AsyncIterator[RequestOutput]:
        """Yield snapshots of the request's output as tokens arrive; the last one has finished=True.
        Bad requests raise here (ValueError) before anything is queued."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        if self.dead is not None:
            raise self.dead
        with self._lock:
            self.engine.add_request(request_id, inputs, params)
            self._streams[request_id] = (loop, queue)
        self._wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer stopped early (client disconnect, cancellation)
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; a no-op for unknown or finished ids."""
        with self._lock:
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopped:
            with self._lock:
                busy = self.engine.has_unfinished()
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            self._step()

    def _step(self) -> None:
        with self._lock:
            try:
                outputs = self.engine.step()
            except EngineDeadError as e:  # nothing can run any more: fail everything, stop stepping
                self.dead, self._stopped = e, True
                for loop, queue in self._streams.values():
                    loop.call_soon_threadsafe(queue.put_nowait, e)
                self._streams = {}
                if self.on_dead is not None:
                    self.on_dead(e)
                return
            except Exception as e:  # a failed step fails its requests, not the server
                failed, self._streams = self._streams, {}
                for rid, (loop, queue) in failed.items():
                    self.engine.abort(rid)
                    loop.call_soon_threadsafe(queue.put_nowait, RuntimeError(f"generation failed: {type(e).__name__}"))
                return
            deliveries = []
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    deliveries.append((stream, copy.deepcopy(out)))
                    if out.finished:
                        self._streams.pop(out.request_id, None)
        for (loop, queue), snapshot in deliveries:
            loop.call_soon_threadsafe(queue.put_nowait, snapshot)
