"""The only owner of the device: paged KV-cache tensors, batch preparation, the vision-feature cache,
and the model call for one scheduled step.

One step is a flat batch: every scheduled sequence contributes its new tokens (a prompt chunk or one
decode token) to a single row of N tokens; attention finds each sequence's context through its block
table. Images and videos are encoded once per content hash (all of a step's new ones in one call per kind)
and kept in an LRU cache, so a repeated image or video or a resumed prompt never runs the tower again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import accumulate

import torch

from llavakit.config import EngineConfig
from llavakit.engine.cuda_graphs import DecodeGraphs
from llavakit.engine.scheduler import ScheduledBatch
from llavakit.layers.attention import PagedAttentionMetadata
from llavakit.models.llama import fuse_projections
from llavakit.models.llava import LlavaForConditionalGeneration
from llavakit.processing.prompt import Media, PreparedVideo


class EngineDeadError(RuntimeError):
    """The model can no longer run in this process (a tensor-parallel worker stopped): every request fails
    and a server should answer 503 and exit."""


@dataclass(slots=True)
class StepInputs:
    """One step as plain lists: the flat batch's tokens, where their keys and values go, which rows sample,
    and the image/video features they read ((content hash, a, b): rows [a, b) of that item's features)."""

    graph: bool = False  # every row one decode token: the CUDA-graph path runs it
    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # indexes of the sequences whose last token samples
    sampling_seq_ids: list[int] = field(default_factory=list)
    media: list[tuple[str, int, int]] = field(default_factory=list)
    new_media: dict[str, Media] = field(default_factory=dict)  # the media no runner has encoded yet


def kv_block_bytes(model: LlavaForConditionalGeneration, block_size: int) -> int:
    """Bytes one KV block takes over all layers (keys and values) in this process."""
    t = model.cfg.text
    per_token = model.language_model.num_kv_heads * t.head_dim * model.dtype.itemsize
    return 2 * t.num_hidden_layers * block_size * per_token


# Without CUDA and without num_kv_blocks / kv_cache_memory, the KV cache never takes more than this.
HOST_KV_CACHE_LIMIT = 4 << 30


def blocks_for_full_batch(cfg: EngineConfig, max_model_len: int) -> int:
    """Blocks that let every sequence the scheduler may run at once (max_num_seqs, fewer when
    max_num_batched_tokens is smaller) reach max_model_len tokens: ceil(max_model_len / block_size) each."""
    running = min(cfg.max_num_seqs, cfg.max_num_batched_tokens)
    return -(-max_model_len // cfg.block_size) * running


def num_kv_blocks(model: LlavaForConditionalGeneration, cfg: EngineConfig, max_model_len: int) -> int:
    """Blocks for the KV cache: as configured, from kv_cache_memory, from free GPU memory on CUDA, or elsewhere
    (CPU) what max_num_seqs full-length sequences need, at most HOST_KV_CACHE_LIMIT bytes."""
    if cfg.num_kv_blocks:
        return cfg.num_kv_blocks
    per_block = kv_block_bytes(model, cfg.block_size)
    device = model.device
    if cfg.kv_cache_memory:
        blocks = cfg.kv_cache_memory // per_block
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        blocks = int(free - (1 - cfg.gpu_memory_utilization) * total) // per_block
    else:  # the cache is zero-filled up front: allocate what the limits can use, not the whole budget
        blocks = min(blocks_for_full_batch(cfg, max_model_len), HOST_KV_CACHE_LIMIT // per_block)
    if blocks * cfg.block_size < max_model_len:
        raise ValueError(f"the KV cache holds {blocks * cfg.block_size} tokens, less than max_model_len "
                         f"{max_model_len}; give it more memory (kv_cache_memory / gpu_memory_utilization)")
    return int(blocks)


def resolve_backend(name: str, device: torch.device) -> str:
    """The paged-attention backend for `name` ("auto": triton on CUDA when it imports; on the CPU the C kernel,
    which falls back to torch by itself where it cannot run; else torch)."""
    from llavakit.layers.triton_ops import triton_available

    if name == "auto":
        if device.type == "cpu":
            return "cpu"
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton" and not triton_available():
        raise ValueError("attention_backend='triton' (CLI: --attention-backend triton) needs the triton package "
                         "(it comes with CUDA builds of torch); use 'torch' or 'auto'")
    return name


class ModelRunner:
    """Runs scheduled steps of one model on its device."""

    def __init__(self, model: LlavaForConditionalGeneration, cfg: EngineConfig, num_blocks: int,
                 max_model_len: int | None = None):
        self.model, self.cfg = model, cfg
        t = model.cfg.text
        self.device, dtype = model.device, model.dtype
        self.backend = resolve_backend(cfg.attention_backend, self.device)
        # One spare block past the block manager's range: CUDA-graph padding rows write their KV there.
        self.num_blocks = num_blocks
        self.trash_block = num_blocks
        # (blocks, slots, H_kv, D): this rank's KV heads only under tensor parallelism
        shape = (num_blocks + 1, cfg.block_size, model.language_model.num_kv_heads, t.head_dim)
        self.kv_cache = [(torch.zeros(shape, dtype=dtype, device=self.device),
                          torch.zeros(shape, dtype=dtype, device=self.device)) for _ in range(t.num_hidden_layers)]
        self.features: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.images_encoded = 0
        self.videos_encoded = 0
        self.graphs: DecodeGraphs | None = None
        if (cfg.cuda_graphs and self.device.type == "cuda" and self.backend == "triton"
                and t.rope.kind != "dynamic"):  # dynamic NTK reads the longest position on the host
            fuse_projections(model.language_model)
            self.graphs = self.decode_graphs(max_model_len or t.context_length, capture=True)

    def release(self) -> None:
        """Free the device memory this runner holds (KV cache, graphs, cached image features)."""
        self.graphs = None
        self.kv_cache.clear()  # the list is shared with the graphs' buffers
        self.features.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def decode_graphs(self, max_model_len: int, capture: bool) -> DecodeGraphs:
        """Static decode buffers (and, with capture, CUDA graphs) for up to max_num_seqs rows."""
        blocks = -(-max_model_len // self.cfg.block_size)
        return DecodeGraphs(self.model, self.kv_cache, self.backend, self.cfg.block_size, self.trash_block,
                            self.cfg.max_num_seqs, blocks, capture)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, media: dict[str, Media]) -> tuple[list[int], torch.Tensor]:
        """Compute one step; returns the seq_ids that sample and their next-token logits (S', V), fp32."""
        step = self.prepare(batch, media)
        return step.sampling_seq_ids, self.run(step)

    def prepare(self, batch: ScheduledBatch, media: dict[str, Media]) -> StepInputs:
        """A step as plain lists (what tensor-parallel workers receive instead of the scheduler's objects)."""
        bs = self.cfg.block_size
        step = StepInputs(graph=self.graphs is not None and self._graphable(batch))
        for item in batch.items:
            seq, end = item.seq, item.start + item.num_tokens
            step.token_ids += seq.token_ids[item.start:end]
            step.positions += range(item.start, end)
            step.slots += [seq.block_table[p // bs] * bs + p % bs for p in range(item.start, end)]
            step.query_lens.append(item.num_tokens)
            step.context_lens.append(end)
            step.block_tables.append(seq.block_table)
            step.media += [(span.content_hash, a, b) for span, a, b in seq.media_in(item.start, end)]
            if item.samples:
                step.sample_rows.append(len(step.query_lens) - 1)
                step.sampling_seq_ids.append(seq.seq_id)
        step.new_media = {h: media[h] for h, _, _ in step.media if h not in self.features}
        return step

    @torch.inference_mode()
    def run(self, step: StepInputs) -> torch.Tensor:
        """The model call for a prepared step -> logits of its sampling rows (S', V), fp32."""
        if step.graph:
            return self.graphs.run(step.token_ids, step.positions, step.slots, step.block_tables)
        self._encode_missing(step)
        feats = [self.features[h][a:b] for h, a, b in step.media]
        meta = self._metadata(step)
        input_ids = torch.tensor([step.token_ids], device=self.device)
        embeds = self.model.embed_inputs(input_ids, feats or None)
        hidden = self.model(embeds, torch.tensor([step.positions], device=self.device), self.kv_cache, meta)
        return self.model.compute_logits(self._sampled(hidden[0], step)).float()

    def _sampled(self, hidden: torch.Tensor, step: StepInputs) -> torch.Tensor:
        """The hidden states (N, D) of the rows that sample: each sampling sequence's last new token. A step
        where every row is one sampling token takes them all without a copy."""
        if len(step.sample_rows) == len(step.token_ids) == len(step.query_lens):
            return hidden
        ends = list(accumulate(step.query_lens))
        rows = torch.tensor([ends[i] - 1 for i in step.sample_rows], dtype=torch.long, device=self.device)
        return hidden.index_select(0, rows)

    def _graphable(self, batch: ScheduledBatch) -> bool:
        """Every row one token that samples and is no image placeholder, at most max_num_seqs rows."""
        return len(batch.items) <= self.graphs.max_batch and all(
            item.num_tokens == 1 and item.samples and not item.seq.media_in(item.start, item.start + 1)
            for item in batch.items)

    def _metadata(self, step: StepInputs) -> PagedAttentionMetadata:
        query_lens = step.query_lens
        context_lens = step.context_lens
        width = max(len(t) for t in step.block_tables)
        tables = [t + [0] * (width - len(t)) for t in step.block_tables]
        starts = [0, *accumulate(query_lens)]
        dev = self.device
        return PagedAttentionMetadata(
            slot_mapping=torch.tensor(step.slots, dtype=torch.long, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.long, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.long, device=dev),
            block_size=self.cfg.block_size, query_lens=query_lens, context_lens_list=context_lens,
            may_skip_slots=min(step.slots, default=0) < 0,  # known here: no per-layer filter when none is -1
            decode_only=all(n == 1 for n in query_lens), backend=self.backend)

    def _encode_missing(self, step: StepInputs) -> None:
        """Encode the step's images and videos the cache does not hold; the cache order follows use."""
        for h, _, _ in step.media:
            if h in self.features:
                self.features.move_to_end(h)
        todo = {h: m for h, m in step.new_media.items() if h not in self.features}
        if not todo:
            return
        items = list(todo.values())
        encoded = self.model.encode_media([m.pixel_values.to(self.device) for m in items], [m.size for m in items])
        videos = sum(isinstance(p, PreparedVideo) for p in todo.values())
        self.videos_encoded += videos
        self.images_encoded += len(todo) - videos
        for key, feats in zip(todo, encoded, strict=True):
            self.features[key] = feats
        while len(self.features) > max(self.cfg.vision_cache_images, len(todo)):
            self.features.popitem(last=False)


def shared_kv_blocks(model: LlavaForConditionalGeneration, cfg: EngineConfig, max_model_len: int) -> int:
    """num_kv_blocks; under tensor parallelism the fewest any rank can hold (a collective: every rank calls it)."""
    blocks = num_kv_blocks(model, cfg, max_model_len)
    tp = getattr(model, "tp", None)
    return blocks if tp is None else tp.min(blocks)


def build_runner(model: LlavaForConditionalGeneration, cfg: EngineConfig, max_model_len: int) -> ModelRunner:
    """This process's runner, its KV cache sized to what fits on every rank."""
    return ModelRunner(model, cfg, shared_kv_blocks(model, cfg, max_model_len), max_model_len)


def make_runner(model: LlavaForConditionalGeneration, cfg: EngineConfig, max_model_len: int) -> ModelRunner:
    """The engine's runner: rank 0's under tensor parallelism (it sends each step to the workers first)."""
    workers = getattr(model, "tp_workers", None)
    return build_runner(model, cfg, max_model_len) if workers is None else DrivingRunner(model, cfg, max_model_len)


class DrivingRunner(ModelRunner):
    """Rank 0's runner under tensor parallelism: each prepared step goes to the workers, which run it on their
    shards while this rank runs it on its own (the model's collectives pair the ranks up)."""

    def __init__(self, model: LlavaForConditionalGeneration, cfg: EngineConfig, max_model_len: int):
        self.workers = model.tp_workers
        self.key = self.workers.runners
        self.workers.runners += 1
        self.workers.call("runner", self.key, cfg, max_model_len)
        super().__init__(model, cfg, shared_kv_blocks(model, cfg, max_model_len), max_model_len)

    def run(self, step: StepInputs) -> torch.Tensor:
        self.workers.call("step", self.key, step)
        self.workers.busy = True
        try:
            return super().run(step)
        except RuntimeError as e:  # a collective failed: a worker is gone
            raise self.workers.lost_error(e) from None
        finally:
            self.workers.busy = False

    def release(self) -> None:
        if not self.workers.lost and not self.workers.closed:
            self.workers.call("release", self.key)
        super().release()
