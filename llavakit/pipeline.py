"""`llavakit.load()`: a checkpoint ready to answer, with a plain KV-cached generation loop.

The returned `Pipeline` holds the model, tokenizer, image processing and conversation template:
`generate` / `stream` answer one prompt, `chat` / `stream_chat` a multi-turn conversation, `tokenize`
shows the exact input ids the model receives.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llavakit.config import LlavaConfig
from llavakit.layers.attention import AttentionMetadata, KVCache
from llavakit.layers.sampler import apply_repetition_penalty, sample_token
from llavakit.models.llava import LlavaForConditionalGeneration
from llavakit.processing.conversation import get_template
from llavakit.processing.detokenizer import IncrementalDetokenizer
from llavakit.processing.media import FetchPolicy
from llavakit.processing.prompt import PreparedImage, PromptProcessor, default_template_name
from llavakit.sampling import SamplingParams
from llavakit.weights.hub import resolve_model_dir
from llavakit.weights.loader import load_llava


@dataclass(slots=True)
class GenerationOutput:
    """The generated part only: `text` (stop strings cut off) and `token_ids` (EOS included)."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


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
        raise ValueError("device 'cuda' was asked for but CUDA is not available; use device='cpu'")
    return device


def load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ValueError(f"{directory} has no tokenizer files (tokenizer.json or tokenizer.model); "
                         "copy the tokenizer that belongs to this checkpoint into it")
    return AutoTokenizer.from_pretrained(directory)


def load(model: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto", *,
         vision_tower: str | Path | None = None, conv_mode: str | None = None, revision: str | None = None,
         fetch_policy: FetchPolicy | None = None) -> "Pipeline":
    """Load a LLaVA checkpoint (directory or hub id) in any supported layout.

    dtype: auto (float16 on CUDA, float32 on CPU), float32, float16 or bfloat16. vision_tower: local CLIP
    directory for original checkpoints that do not contain their tower. conv_mode: override the
    conversation template chosen from the checkpoint's files.
    """
    directory = resolve_model_dir(model, revision)
    cfg = LlavaConfig.from_pretrained(directory, vision_tower=vision_tower)
    dev = resolve_device(device)
    net = load_llava(cfg, directory, resolve_dtype(dtype, dev), dev)
    tokenizer = load_tokenizer(directory)
    template = get_template(conv_mode or default_template_name(cfg, tokenizer))
    return Pipeline(net, cfg, tokenizer, PromptProcessor(cfg, tokenizer, template, fetch_policy))


def _sampling(max_new_tokens: int = 256, **kw) -> SamplingParams:
    if "max_tokens" in kw:
        max_new_tokens = kw.pop("max_tokens")
    return SamplingParams(max_tokens=max_new_tokens, **kw)


class Pipeline:
    """A loaded checkpoint; sampling keywords are those of SamplingParams (max_new_tokens = max_tokens)."""

    def __init__(self, model: LlavaForConditionalGeneration, cfg: LlavaConfig, tokenizer: Any,
                 processor: PromptProcessor):
        self.model, self.config, self.tokenizer, self.processor = model, cfg, tokenizer, processor
        self.device = next(model.parameters()).device

    @property
    def template(self):
        return self.processor.template

    def tokenize(self, prompt: str, images: list[Any] | None = None, conv_mode: str | None = None) -> list[int]:
        """The exact input ids `generate` would feed the model."""
        return self._inputs(self.processor.render_prompt(prompt, len(images or []), conv_mode), images)[0]

    def generate(self, prompt: str, images: list[Any] | None = None, conv_mode: str | None = None,
                 **sampling) -> GenerationOutput:
        """Answer `prompt` (the first user turn of the template, or verbatim with conv_mode="raw")."""
        run = self._run(self.processor.render_prompt(prompt, len(images or []), conv_mode), images, sampling)
        for _ in run:
            pass
        return run.output

    def stream(self, prompt: str, images: list[Any] | None = None, conv_mode: str | None = None,
               **sampling) -> Iterator[str]:
        """Like generate, yielding text as it is produced."""
        yield from self._run(self.processor.render_prompt(prompt, len(images or []), conv_mode), images, sampling)

    def chat(self, messages: list[dict[str, str]], images: list[Any] | None = None, conv_mode: str | None = None,
             **sampling) -> GenerationOutput:
        """Answer the last user message of a conversation ({"role", "content"} dicts)."""
        run = self._run(self.processor.render_messages(messages, len(images or []), conv_mode), images, sampling)
        for _ in run:
            pass
        return run.output

    def stream_chat(self, messages: list[dict[str, str]], images: list[Any] | None = None,
                    conv_mode: str | None = None, **sampling) -> Iterator[str]:
        yield from self._run(self.processor.render_messages(messages, len(images or []), conv_mode), images, sampling)

    def _inputs(self, text: str, images: list[Any] | None) -> tuple[list[int], list[PreparedImage]]:
        prepared = self.processor.prepare_images(list(images or []))
        return self.processor.tokenize(text, prepared), prepared

    def _run(self, text: str, images: list[Any] | None, sampling: dict) -> "_Run":
        params = _sampling(**sampling)
        ids, prepared = self._inputs(text, images)
        return _Run(self, ids, prepared, params)

    @torch.inference_mode()
    def token_stream(self, ids: list[int], images: list[PreparedImage], params: SamplingParams) -> Iterator[int]:
        """Sampled token ids, one per step, prefilling once then decoding over a contiguous KV cache."""
        model, cfg = self.model, self.config.text
        limit = cfg.context_length
        if len(ids) >= limit:
            raise ValueError(f"the prompt is {len(ids)} tokens but the model's context is {limit}; "
                             "shorten the text or use fewer / smaller images")
        max_len = min(len(ids) + params.max_tokens, limit)
        dtype = model.lm_head.weight.dtype
        cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, max_len, cfg.head_dim, dtype, self.device)
        feats = None
        if images:
            feats = model.encode_images([im.pixel_values.to(self.device) for im in images], [im.size for im in images])
        seen = torch.tensor(ids, device=self.device)
        hidden = model(model.embed_inputs(seen[None], feats), torch.arange(len(ids), device=self.device)[None], cache)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        for pos in range(len(ids), max_len + 1):
            logits = apply_repetition_penalty(model.compute_logits(hidden[0, -1]).float(), seen, params.repetition_penalty)
            token = sample_token(logits, params.temperature, params.top_k, params.top_p, generator)
            yield token
            if pos == max_len:
                return
            step = torch.tensor([[token]], device=self.device)
            seen = torch.cat([seen, step[0]])
            hidden = model(model.embed_inputs(step), torch.tensor([[pos]], device=self.device), cache,
                           AttentionMetadata(start_pos=pos))


class _Run:
    """One generation: iterating yields text deltas; `output` holds the result when done."""

    def __init__(self, pipe: Pipeline, ids: list[int], images: list[PreparedImage], params: SamplingParams):
        self.pipe, self.ids, self.images, self.params = pipe, ids, images, params
        self.stops = list(params.stop) + ([pipe.template.stop_str] if pipe.template.stop_str else [])
        eos = [] if params.ignore_eos else pipe.config.text.eos_token_ids + [pipe.tokenizer.eos_token_id]
        self.stop_ids = {i for i in eos + list(params.stop_token_ids) if i is not None}
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[str]:
        detok = IncrementalDetokenizer(self.pipe.tokenizer)
        tokens: list[int] = []
        emitted, finish, cut = 0, "length", None
        for token in self.pipe.token_stream(self.ids, self.images, self.params):
            tokens.append(token)
            if token in self.stop_ids:
                finish = "stop"
                break
            detok.push(token)
            cut = _find_stop(detok.text, self.stops)
            if cut is not None:
                finish = "stop"
                break
            safe = len(detok.text) - _partial_stop(detok.text, self.stops)
            if safe > emitted:
                yield detok.text[emitted:safe]
                emitted = safe
            if len(tokens) >= self.params.max_tokens:
                break
        text = detok.text if cut is None else detok.text[:cut]
        if len(text) > emitted:
            yield text[emitted:]
        self.output = GenerationOutput(text, tokens, self.ids, finish)


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that could be the start of a stop string (held back)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
