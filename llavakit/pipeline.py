"""`llavakit.load()`: a checkpoint ready to answer, with a plain KV-cached generation loop.

The returned `Pipeline` holds the model, tokenizer, image and video processing and conversation template:
`generate` / `stream` answer one prompt, `chat` / `stream_chat` a multi-turn conversation, `tokenize`
shows the exact input ids the model receives. Images and videos are lists; a "<image>" / "<video>" tag in
the text marks where each one goes, else the template puts them before the first question.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from llavakit.checkpoint_config import read_checkpoint_config
from llavakit.config import EngineConfig, VideoConfig, with_image_aspect_ratio
from llavakit.engine.llm_engine import LLMEngine
from llavakit.generation import Generation, GenerationOutput, Timings
from llavakit.models.llava import LlavaForConditionalGeneration
from llavakit.parallel.group import TPGroup, rank_device
from llavakit.parallel.tp import check_splittable
from llavakit.parallel.workers import follow
from llavakit.parallel.workers import start as start_workers
from llavakit.processing.conversation import get_template
from llavakit.processing.media import FetchPolicy
from llavakit.processing.prompt import PromptInputs, PromptProcessor, default_template_name
from llavakit.quant.config import QuantConfig
from llavakit.sampling import SamplingParams
from llavakit.weights.hub import resolve_model_dir
from llavakit.weights.loader import load_llava


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not one of auto, float32, float16, bfloat16")
    return names[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but CUDA is not available; use device='cpu' "
                         "(CLI: --device cpu)")
    return device


def load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ValueError(f"{directory} has no tokenizer files (tokenizer.json or tokenizer.model); "
                         "copy the tokenizer that belongs to this checkpoint into it")
    return AutoTokenizer.from_pretrained(directory)


def load(model: str | Path | None = "demo", dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
         *, vision_tower: str | Path | None = None, conv_mode: str | None = None, revision: str | None = None,
         fetch_policy: FetchPolicy | None = None, load_format: str = "auto",
         tokenizer: str | Path | None = None, num_frames: int | None = None,
         image_aspect_ratio: str | None = None, quantization: str | QuantConfig | None = None,
         tensor_parallel_size: int = 1) -> "Pipeline":
    """Load a LLaVA checkpoint (directory, hub id, alias, or "demo": the built-in model) in any layout.

    dtype: auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16. vision_tower: local CLIP
    directory for original checkpoints that do not contain their tower. conv_mode: override the
    conversation template chosen from the checkpoint's files. load_format="dummy": `model` names a preset
    (llavakit.presets) and the weights are random, for speed and memory measurements; `tokenizer`: a tokenizer
    directory matching the preset's vocabulary (default: the LLaMA tokenizer shipped in llavakit.assets, for
    the presets with a LLaMA vocabulary; the others need one).
    num_frames: frames sampled from each video (default: the checkpoint's, else 32).
    image_aspect_ratio: override how images are preprocessed (default None: what the checkpoint's files say):
    "pad" is what LLaVA-1.5 was trained and evaluated with (expand2square; llava-hf 1.5 repos ship a CLIP
    processor, so they crop unless told), "crop" what transformers' llava-hf processor does, "anyres"
    LLaVA-NeXT tiling (NeXT checkpoints only). pad / crop on a NeXT checkpoint give one view + image_newline
    instead of tiles (see llavakit.config.with_image_aspect_ratio).
    quantization: "w8a16" (int8 weights, one scale per output channel), "w4a16" (int4, one scale per 128
    inputs) or a QuantConfig (group size, LM head): the language model's Linear layers are quantized as they
    are read, so peak memory is the quantized model plus one float layer. A compressed-tensors checkpoint
    (`llavakit convert --quantization`) loads quantized without it.
    tensor_parallel_size: split the language model over N processes (one per GPU on CUDA; on the CPU, N
    processes sharing it): llavakit starts the N-1 workers itself, or under `torchrun --nproc-per-node N` uses
    the processes torchrun started (ranks above 0 never return from here). See docs/parallel.md.
    """
    args = dict(model=model, dtype=dtype, device=device, vision_tower=vision_tower, conv_mode=conv_mode,
                revision=revision, fetch_policy=fetch_policy, load_format=load_format, tokenizer=tokenizer,
                num_frames=num_frames, image_aspect_ratio=image_aspect_ratio, quantization=quantization)
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
    if tensor_parallel_size == 1:
        return _load(**args)
    _check_splittable(model, load_format, revision, vision_tower, quantization, tensor_parallel_size)
    worker_args = {**args, "fetch_policy": None}  # workers load weights only; rank 0 reads the media
    tp, workers = start_workers(tensor_parallel_size, resolve_device(device), worker_args, load_shard)
    pipe = _load_in_group(tp, args, workers)
    if workers is None:  # a worker rank under torchrun: follow rank 0, then leave
        follow(tp, pipe.model)
    pipe.model.tp_workers = workers
    return pipe


def _check_splittable(model, load_format: str, revision, vision_tower, quantization, size: int) -> None:
    """Refuse a size the model cannot be split into before any worker starts (config files only)."""
    if load_format == "dummy":
        from llavakit.presets import preset_config

        cfg = preset_config(str(model))
    else:
        cfg = read_checkpoint_config(resolve_model_dir(model, revision), vision_tower=vision_tower)
    check_splittable(cfg.text, size, QuantConfig.parse(quantization))


def _load(model, dtype, device, *, vision_tower, conv_mode, revision, fetch_policy, load_format, tokenizer,
          num_frames, image_aspect_ratio, quantization, tp: TPGroup | None = None) -> "Pipeline":
    quant = QuantConfig.parse(quantization)
    dev = resolve_device(device) if tp is None else rank_device(resolve_device(device), tp.rank)
    if load_format == "dummy":
        return _load_dummy(str(model), dtype, dev, tokenizer, conv_mode, num_frames, image_aspect_ratio, quant, tp)
    directory = resolve_model_dir(model, revision)
    processor = load_processor(directory, vision_tower=vision_tower, conv_mode=conv_mode, fetch_policy=fetch_policy,
                               num_frames=num_frames, image_aspect_ratio=image_aspect_ratio)
    net = load_llava(processor.cfg, directory, resolve_dtype(dtype, dev), dev, quantization=quant, tp=tp)
    return Pipeline(net, processor)


def _load_in_group(tp: TPGroup, args: dict, workers) -> "Pipeline | None":
    """Every rank loads its shard; one rank's failure is every rank's (rank 0 raises it, in words)."""
    try:
        pipe, error = _load(**args, tp=tp), None
    except Exception as e:  # noqa: BLE001 - reported to every rank below
        pipe, error = None, e
    errors = tp.gather_errors(None if error is None else str(error).splitlines()[0])
    if errors:
        if workers is not None:
            workers.close()
        if error is not None:
            raise error
        raise ValueError(f"tensor-parallel loading failed: {'; '.join(errors)}")
    return pipe


def load_shard(tp: TPGroup, args: dict):
    """A spawned worker's shard of the model (None when any rank failed to load: rank 0 reports it)."""
    try:
        return _load_in_group(tp, args, None).model
    except Exception:  # noqa: BLE001 - rank 0 raises the error for everyone
        return None


def _load_dummy(preset: str, dtype, device, tokenizer_dir, conv_mode, num_frames,
                image_aspect_ratio: str | None = None, quantization: QuantConfig | None = None,
                tp: TPGroup | None = None) -> "Pipeline":
    from llavakit.presets import preset_config, preset_tokenizer_dir
    from llavakit.weights.loader import random_llava

    cfg = with_image_aspect_ratio(preset_config(preset), image_aspect_ratio)
    cfg.video = _with_frames(cfg.video, num_frames)
    tokenizer_dir = tokenizer_dir or preset_tokenizer_dir(preset)
    if tokenizer_dir is None:
        raise ValueError(f"the {preset} preset needs a tokenizer whose vocabulary fits its {cfg.text.vocab_size} "
                         "tokens: pass tokenizer= (CLI: --tokenizer DIR), e.g. that model's tokenizer directory")
    dev = resolve_device(device)
    tok = load_tokenizer(Path(tokenizer_dir))
    template = get_template(conv_mode or default_template_name(cfg, tok))
    net = random_llava(cfg, resolve_dtype(dtype, dev), dev, quantization=quantization, tp=tp)
    return Pipeline(net, PromptProcessor(cfg, tok, template))


def load_processor(directory: Path, *, vision_tower: str | Path | None = None, conv_mode: str | None = None,
                   fetch_policy: FetchPolicy | None = None, num_frames: int | None = None,
                   image_aspect_ratio: str | None = None) -> PromptProcessor:
    """Config, tokenizer and template of a checkpoint directory, without its weights; image_aspect_ratio
    overrides the image processing its files name (see `load`)."""
    cfg = with_image_aspect_ratio(read_checkpoint_config(directory, vision_tower=vision_tower),
                                  image_aspect_ratio)
    cfg.video = _with_frames(cfg.video, num_frames)
    tokenizer = load_tokenizer(directory)
    template = get_template(conv_mode or default_template_name(cfg, tokenizer))
    return PromptProcessor(cfg, tokenizer, template, fetch_policy)


def _with_frames(video: VideoConfig, num_frames: int | None) -> VideoConfig:
    """The video settings with another frame count (checked), or unchanged when None."""
    return video if num_frames is None else VideoConfig(num_frames=num_frames, frame=video.frame)


def _sampling(max_new_tokens: int = 256, **kw) -> SamplingParams:
    if "max_tokens" in kw:
        max_new_tokens = kw.pop("max_tokens")
    params = SamplingParams(max_tokens=max_new_tokens, **kw)
    if params.n != 1 or params.logprobs is not None:
        asked = "n > 1" if params.n != 1 else "logprobs"
        raise ValueError(f"Pipeline answers once, without logprobs ({asked} was asked); llavakit.LLM does both: "
                         "LLM(model).generate(prompts, SamplingParams(n=..., logprobs=...))")
    return params


class Pipeline:
    """A loaded checkpoint; sampling keywords are those of SamplingParams (max_new_tokens = max_tokens)."""

    def __init__(self, model: LlavaForConditionalGeneration, processor: PromptProcessor):
        self.model, self.processor = model, processor
        self.config, self.tokenizer = processor.cfg, processor.tokenizer
        self._tp_engine: LLMEngine | None = None
        self.device = next(model.parameters()).device

    @property
    def template(self):
        return self.processor.template

    def close(self) -> None:
        """Stop the worker processes of a tensor-parallel model now (they also stop when this process exits);
        a no-op otherwise."""
        workers = getattr(self.model, "tp_workers", None)
        if workers is not None:
            workers.close()

    def tokenize(self, prompt: str, images: list[Any] | None = None, conv_mode: str | None = None, *,
                 videos: list[Any] | None = None) -> list[int]:
        """The exact input ids `generate` would feed the model."""
        return self.inputs(prompt, images, conv_mode, videos=videos).ids

    def inputs(self, prompt: str, images: list[Any] | None = None, conv_mode: str | None = None, *,
               videos: list[Any] | None = None) -> PromptInputs:
        """What `generate` would feed the model: input ids and the preprocessed media, each prepared once."""
        return self.processor.prompt_inputs(prompt, images or (), videos or (), conv_mode)

    def generate(self, prompt: str, images: list[Any] | None = None, conv_mode: str | None = None, *,
                 videos: list[Any] | None = None, **sampling) -> GenerationOutput:
        """Answer `prompt` (the first user turn of the template, or verbatim with conv_mode="raw")."""
        return self._run(lambda: self.inputs(prompt, images, conv_mode, videos=videos), sampling).run()

    def stream(self, prompt: str, images: list[Any] | None = None, conv_mode: str | None = None, *,
               videos: list[Any] | None = None, **sampling) -> Iterator[str]:
        """Like generate, yielding text as it is produced."""
        yield from self._run(lambda: self.inputs(prompt, images, conv_mode, videos=videos), sampling)

    def chat(self, messages: list[dict[str, str]], images: list[Any] | None = None, conv_mode: str | None = None,
             *, videos: list[Any] | None = None, **sampling) -> GenerationOutput:
        """Answer the last user message of a conversation ({"role", "content"} dicts)."""
        return self._run(lambda: self.processor.chat_inputs(messages, images or (), videos or (), conv_mode),
                         sampling).run()

    def stream_chat(self, messages: list[dict[str, str]], images: list[Any] | None = None,
                    conv_mode: str | None = None, *, videos: list[Any] | None = None, **sampling) -> Iterator[str]:
        yield from self._run(lambda: self.processor.chat_inputs(messages, images or (), videos or (), conv_mode),
                             sampling)

    def _run(self, build: Callable[[], PromptInputs], sampling: dict) -> Generation:
        """Sampling checked first, then the inputs built (timed as preprocessing)."""
        params = _sampling(**sampling)
        start = time.perf_counter()
        inputs = build()
        timings = Timings(preprocess_ms=(time.perf_counter() - start) * 1e3)
        if getattr(self.model, "tp_workers", None) is not None:
            return EngineGeneration(self._engine(), self.tokenizer, inputs, params, timings)
        return Generation(self.model, self.tokenizer, inputs, params, timings)

    def _engine(self) -> LLMEngine:
        """The engine a tensor-parallel model answers through (built on first use, one sequence at a time)."""
        if self._tp_engine is None:
            self._tp_engine = LLMEngine(self.model, self.tokenizer, EngineConfig(max_num_seqs=1))
        return self._tp_engine


class EngineGeneration(Generation):
    """A Generation whose tokens come from the engine: how a tensor-parallel model runs `generate` (its
    workers follow the engine's steps; the plain loop has no workers to drive). Timings: prefill_ms is the
    time to the first token, decode_ms the rest."""

    def __init__(self, engine: LLMEngine, tokenizer: Any, inputs: PromptInputs, params: SamplingParams,
                 timings: Timings):
        super().__init__(engine.model, tokenizer, inputs, params, timings)
        self.engine = engine

    def _tokens(self) -> Iterator[int]:
        request_id = self.engine.new_request_id("pipeline")
        self.engine.add_request(request_id, self.inputs, self.params)
        seen, start, finished = 0, time.perf_counter(), False
        try:
            while not finished:
                for out in self.engine.step():
                    ids, finished = out.outputs[0].token_ids, out.finished
                    now = time.perf_counter()
                    if seen == 0 and ids:
                        self.timings.prefill_ms = (now - start) * 1e3
                    elif ids[seen:]:
                        self.timings.decode_ms = (now - start) * 1e3 - self.timings.prefill_ms
                    yield from ids[seen:]
                    seen = len(ids)
        finally:
            if not finished:  # the caller stopped early (a stop string, max tokens): free the KV blocks
                self.engine.abort(request_id)
