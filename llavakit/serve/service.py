"""The server's side of the engine, shared by every API format: admission (a bounded queue), image, video
and prompt preparation off the event loop, the context-length check, sampling parameters, metrics, and
aborting a request whose client went away.

A request's life: `admit` (or 503) -> `prepare` on a worker thread (fetch, decode, tokenize) ->
`sampling` (or 400 context_length_exceeded) -> `generate` (engine snapshots) -> released when done,
failed or abandoned, whichever comes first.

Decoding is what costs memory (a 16-megapixel image takes 100-150 MB while it is prepared), so at most
`max_decoding_images` requests prepare their images or videos at once, each one image at a time, and the
memory each one freed is handed back to the operating system when it is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request

from llavakit.config import EngineConfig
from llavakit.engine.async_engine import AsyncLLMEngine
from llavakit.engine.llm_engine import LLMEngine, RequestOutput
from llavakit.engine.model_runner import EngineDeadError
from llavakit.pipeline import Pipeline
from llavakit.processing.prompt import PreparedImage, PreparedVideo, PromptInputs
from llavakit.sampling import SamplingParams
from llavakit.serve.config import ServeConfig
from llavakit.serve.errors import APIError, bad_request, overloaded
from llavakit.serve.images import ImageLimits, prepare_images
from llavakit.serve.metrics import ServerMetrics
from llavakit.serve.middleware import current_request
from llavakit.serve.videos import VideoSettings, prepare_videos

log = logging.getLogger("llavakit.serve")

T = TypeVar("T")

# Temperatures or top_p below this mean greedy, and are sampled so: dividing logits by a tiny temperature
# overflows to inf, and a tiny top_p can filter out every token (float error in the cumulative sum), either
# of which would fail the engine step and every request batched in it.
_GREEDY_BELOW = 1e-5


class DecodeSlots:
    """At most `n` holders at once (a media worker waits for its turn). As each holder leaves, the memory
    its pixels took is returned to the operating system: glibc keeps freed memory in the arena of the
    thread that used it, so without this every media worker would keep a decode's worth, and the server's
    RSS would stay at its peak after a burst."""

    def __init__(self, n: int):
        self._slots = threading.BoundedSemaphore(n)

    @contextmanager
    def hold(self) -> Iterator[None]:
        try:
            with self._slots:
                yield
        finally:
            _release_free_memory()


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(None).malloc_trim  # the process's own symbols, the C library's among them
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _release_free_memory() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class ClientDisconnected(Exception):
    """The client closed the connection; its request has been aborted."""


class Ticket:
    """A request's place among the admitted ones; `release` is idempotent."""

    def __init__(self, service: Service, size: int):
        self._service, self.size, self._held = service, size, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._service._in_flight -= self.size


@dataclass(slots=True)
class Run:
    """An admitted request: its engine snapshots, prompt ids, sampling parameters and place in the queue.
    Whoever consumes `stream` calls `aclose` when done, which also covers a stream never started."""

    stream: AsyncIterator[RequestOutput]
    prompt_ids: list[int]
    params: SamplingParams
    ticket: Ticket

    async def aclose(self) -> None:
        try:
            await self.stream.aclose()
        finally:
            self.ticket.release()


class Service:
    """One loaded model behind the HTTP APIs."""

    def __init__(self, pipe: Pipeline, engine_cfg: EngineConfig, cfg: ServeConfig):
        self.cfg = cfg
        self.llm = LLMEngine(pipe.model, pipe.tokenizer, engine_cfg)
        self._close_model = pipe.close
        self.engine = AsyncLLMEngine(self.llm, on_dead=self._on_engine_dead)
        self.processor = pipe.processor
        # No token spans more characters than the longest vocabulary entry, so a text longer than
        # max_seq_len * this many characters is over any token limit without tokenizing it.
        self.max_token_chars = max(len(t) for t in pipe.tokenizer.get_vocab())
        self.image_limits = ImageLimits(cfg.fetch, cfg.max_image_pixels, cfg.max_image_aspect_ratio)
        self.video_settings = VideoSettings.of(cfg.fetch, cfg.max_video_bytes, cfg.max_video_seconds)
        self.max_seq_len = self.llm.scheduler.max_seq_len
        self.capacity = self.llm.scheduler.max_running + cfg.max_queue
        self.created = int(time.time())
        self.draining = False
        self._in_flight = 0
        self._pool = ThreadPoolExecutor(cfg.media_workers, thread_name_prefix="llavakit-media")
        self.decode_slots = DecodeSlots(cfg.max_decoding_images)
        self.metrics = ServerMetrics(self.llm.stats, lambda: self._in_flight)

    # --- admission ---------------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.cfg.model_name:
            raise APIError(404, f"model {name[:100]!r} is not served here; this server serves "
                                f"{self.cfg.model_name!r} (see /v1/models)", param="model", code="model_not_found")

    def admit(self, n: int) -> Ticket:
        """Room for a request of n sequences, or 503 with Retry-After (queue full, or shutting down)."""
        if self.engine.dead is not None:
            raise engine_dead()
        if self.draining:
            self.metrics.rejected.labels("shutting_down").inc()
            raise overloaded("the server is shutting down; retry on another instance", self.cfg.retry_after)
        if self._in_flight + n > self.capacity:
            self.metrics.rejected.labels("queue_full").inc()
            raise overloaded(f"the server is at capacity ({self.capacity} sequences running or queued); "
                             f"retry after {self.cfg.retry_after} s", self.cfg.retry_after)
        self._in_flight += n
        return Ticket(self, n)

    def start_draining(self) -> None:
        """Refuse new requests from now on (SIGTERM); admitted ones run to the end."""
        self.draining = True

    # --- preparation -------------------------------------------------------------------------------------

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on a media worker thread: media fetches, decoding and tokenization never block the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def load_images(self, sources: list[str], param: str) -> list[PreparedImage]:
        if len(sources) > self.cfg.max_images_per_request:
            raise bad_request(f"the request has {len(sources)} images; at most {self.cfg.max_images_per_request} "
                              "are allowed per request", param, "too_many_images")
        if not sources:
            return []
        return prepare_images(sources, self.processor, self.image_limits, param, self.decode_slots.hold)

    def check_videos(self, count: int, param: str) -> None:
        """Refuse, before admission and before any fetch, videos this model cannot take or too many of them."""
        if count and not self.processor.cfg.supports_video:
            raise bad_request(f"the request has {count} video(s) but the model {self.cfg.model_name!r} "
                              f"({self.processor.cfg.model_type}) takes no videos; send images, or serve a "
                              "LLaVA-NeXT-Video (llava_next_video) checkpoint", param, "invalid_request")
        if count > self.cfg.max_videos_per_request:
            raise bad_request(f"the request has {count} videos; at most {self.cfg.max_videos_per_request} "
                              "are allowed per request", param, "too_many_videos")

    def load_videos(self, sources: list[str], param: str) -> list[PreparedVideo]:
        self.check_videos(len(sources), param)
        if not sources:
            return []
        with self.decode_slots.hold():
            return prepare_videos(sources, self.processor, self.video_settings, param)

    def inputs(self, text: str, images: list[PreparedImage] = (), videos: list[PreparedVideo] = ()) -> PromptInputs:
        """The request's PromptInputs from the text the template rendered (`prompts`), with the template's stop
        string; refuses without tokenizing a text that cannot fit the context in any case (a token holds at most
        max_token_chars characters; the factor 4 leaves room for normalizers that merge characters), so a body
        of megabytes of text costs no tokenizer time."""
        if len(text) > 4 * self.max_seq_len * self.max_token_chars:
            raise context_exceeded(f"The prompt is {len(text)} characters, more than this model's context of "
                                   f"{self.max_seq_len} tokens can hold.")
        return self.processor.encode_prompt(text, images, videos, self.processor.template.stop_str)

    def sampling(self, prompt_len: int, max_tokens: int | None, **kw: Any) -> SamplingParams:
        """SamplingParams with max_tokens defaulting to the rest of the context; 400 when the prompt plus
        max_tokens exceeds the context or a value is out of range."""
        room = self.max_seq_len - prompt_len
        if max_tokens is None:
            max_tokens = room
        if max_tokens > room or room < 1:
            raise context_exceeded(f"This model's maximum context length is {self.max_seq_len} tokens. However, "
                                   f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                                   f"{max_tokens} for the completion). Reduce the prompt or max_tokens.")
        kw = {k: v for k, v in kw.items() if v is not None}
        if kw.get("temperature", 1.0) < _GREEDY_BELOW or kw.get("top_p", 1.0) < _GREEDY_BELOW:
            kw["temperature"], kw["top_p"] = 0.0, 1.0
        try:
            return SamplingParams(max_tokens=max_tokens, **kw)
        except ValueError as e:
            raise bad_request(str(e), code="invalid_sampling_parameter") from None

    # --- generation --------------------------------------------------------------------------------------

    async def start(self, request: Request, n: int, build: Callable[[], PromptInputs], max_tokens: int | None,
                    sampling: dict[str, Any]) -> Run:
        """Admit a request of n sequences, build its PromptInputs (parsing, media fetch and decoding,
        tokenization) on a worker thread, check them against the context and queue it in the engine. The Run's
        stream owns the admission from then on."""
        arrived = time.monotonic()
        ticket = self.admit(n)
        try:
            inputs = await self.until_disconnect(request, self.run_blocking(build))
            params = self.sampling(len(inputs.ids), max_tokens, n=n, **sampling)
            return Run(self.generate(inputs, params, ticket, arrived), inputs.ids, params, ticket)
        except BaseException:
            ticket.release()
            raise

    async def generate(self, inputs: PromptInputs, params: SamplingParams, ticket: Ticket,
                       arrived: float) -> AsyncIterator[RequestOutput]:
        """Engine snapshots of one request; the ticket is released and the request aborted (if unfinished)
        when this generator ends in any way. The engine refuses a request with ValueError (a 400 here) and
        fails a step with RuntimeError (a 500 that says nothing of the cause)."""
        request_id = f"req-{uuid.uuid4().hex}"
        stream = self.engine.generate(inputs, params, request_id)
        ids = inputs.ids
        self.metrics.prompt_tokens.inc(len(ids))
        record = current_request.get()  # the request log line's counts
        if record is not None:
            record.prompt_tokens += len(ids)
        generated, outcome = 0, "abandoned"
        try:
            async for out in stream:
                tokens = sum(len(o.token_ids) for o in out.outputs)
                if tokens and not generated:
                    self.metrics.ttft.observe(time.monotonic() - arrived)
                self.metrics.add_tokens(tokens - generated)
                if record is not None:
                    record.completion_tokens += tokens - generated
                generated = tokens
                if out.finished:
                    outcome = "finished"
                    self.metrics.latency.observe(time.monotonic() - arrived)
                yield out
        except ValueError as e:
            outcome = "refused"
            raise bad_request(str(e)) from None
        except EngineDeadError:
            outcome = "failed"
            raise engine_dead() from None
        except RuntimeError:
            outcome = "failed"
            raise APIError(500, "generation failed on the server; retry the request", type="server_error",
                           code="generation_failed") from None
        finally:
            self.metrics.requests.labels(outcome).inc()
            await stream.aclose()
            ticket.release()

    async def until_disconnect(self, request: Request, work: Awaitable[T]) -> T:
        """Await `work`, but cancel it (which aborts its engine request) if the client disconnects first."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # this handler itself was cancelled (shutdown timeout): take the work along
            task.cancel()
            raise
        finally:
            watcher.cancel()
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected

    def _on_engine_dead(self, error: EngineDeadError) -> None:
        """The model cannot run any more (a tensor-parallel worker stopped): refuse work and stop the server
        (SIGTERM to this process: uvicorn's graceful shutdown), so a supervisor restarts it."""
        log.error("%s; the server is shutting down", error)
        self.start_draining()
        os.kill(os.getpid(), signal.SIGTERM)

    def close(self) -> None:
        self.engine.shutdown()
        self._close_model()  # tensor-parallel workers: before uvicorn re-raises the signal that stopped it
        self._pool.shutdown(wait=False, cancel_futures=True)


def engine_dead() -> APIError:
    return APIError(503, "the model's worker processes stopped; this server is shutting down, retry on another "
                         "instance", type="server_error", code="engine_dead")


def context_exceeded(message: str) -> APIError:
    return bad_request(message, "messages", "context_length_exceeded")


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body has been read, so only that message remains)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
