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
from llavakit.config import VideoConfig, with_image_aspect_ratio
from llavakit.generation import Generation, GenerationOutput, Timings
from llavakit.models.llava import LlavaForConditionalGeneration
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
         image_aspect_ratio: str | None = None, quantization: str | QuantConfig | None = None) -> "Pipeline":
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
    """
    quant = QuantConfig.parse(quantization)
    if load_format == "dummy":
        return _load_dummy(str(model), dtype, device, tokenizer, conv_mode, num_frames, image_aspect_ratio, quant)
    directory = resolve_model_dir(model, revision)
    processor = load_processor(directory, vision_tower=vision_tower, conv_mode=conv_mode, fetch_policy=fetch_policy,
                               num_frames=num_frames, image_aspect_ratio=image_aspect_ratio)
    dev = resolve_device(device)
    net = load_llava(processor.cfg, directory, resolve_dtype(dtype, dev), dev, quantization=quant)
    return Pipeline(net, processor)


def _load_dummy(preset: str, dtype, device, tokenizer_dir, conv_mode, num_frames,
                image_aspect_ratio: str | None = None, quantization: QuantConfig | None = None) -> "Pipeline":
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
    net = random_llava(cfg, resolve_dtype(dtype, dev), dev, quantization=quantization)
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
        self.device = next(model.parameters()).device

    @property
    def template(self):
        return self.processor.template

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
        return Generation(self.model, self.tokenizer, inputs, params, timings)
