"""Request and response bodies of every API the server speaks, as pydantic models.

Requests are strict: an unknown field is a 400 (as OpenAI answers), numbers must be finite, and every
sampling value has its range in the schema, so /openapi.json documents the limits and a bad value is
refused before it reaches the engine. Types are strict as OpenAI's are: a boolean is true or false (not
"yes" or 1), an integer is a JSON integer (not true or "3"), a number is a JSON number. (TGI's `parameters`
is the exception in one way: TGI clients send every field they know, so unknown ones are ignored there.)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, Tag

from llavakit.sampling import MAX_LOGPROBS
from llavakit.serve.config import MAX_N

MAX_SEED = 2**63 - 1 - MAX_N  # request i of n is seeded with seed + i, and torch seeds are int64
MAX_TOKENS = 1_000_000  # far above any context; the context check gives the real limit
MAX_STOPS = 16

Number = Annotated[float, pydantic.Strict()]  # a JSON number: 1 is taken, true and "1" are not
StopText = Annotated[str, Field(min_length=1, max_length=256)]
Stop = StopText | Annotated[list[StopText], Field(max_length=MAX_STOPS)] | None
Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None
MaxTokens = Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)] | None
ImageSources = Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                              Field(max_length=64)] | None


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SamplingFields(Strict):
    """Sampling fields shared by the OpenAI and vLLM bodies (top_k, min_p, repetition_penalty and
    ignore_eos are vLLM's extensions)."""

    temperature: Number | None = Field(None, ge=0, le=2, description="0 is greedy; default 1 (OpenAI)")
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0, le=MAX_TOKENS, description="0 disables it")
    min_p: Number | None = Field(None, ge=0, le=1)
    repetition_penalty: Number | None = Field(None, ge=0.01, le=10)
    presence_penalty: Number = Field(0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(0.0, ge=-2, le=2)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stop: Stop = None
    seed: Seed = None
    ignore_eos: StrictBool = False


# --- OpenAI chat completions ------------------------------------------------------------------------------


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str = Field(min_length=1, description="https://..., http://... or data:image/...;base64,...")
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(Strict):
    url: str = Field(min_length=1, description="https://..., http://... or data:video/mp4;base64,... "
                                               "(LLaVA-NeXT-Video models only)")


class VideoPart(Strict):
    type: Literal["video_url"]
    video_url: VideoURL


_PART_TAGS = {"text": "TextPart", "image_url": "ImagePart", "video_url": "VideoPart"}


def _part_type(part: Any) -> str | None:
    return _PART_TAGS.get(part.get("type") if isinstance(part, dict) else getattr(part, "type", None))


# Tagged by class name, which error messages leave out of a field's path ("content.0.image_url.url", not
# "content.0.image_url.image_url.url" as the "type" value for a tag would give).
ContentPart = Annotated[Annotated[TextPart, Tag("TextPart")] | Annotated[ImagePart, Tag("ImagePart")]
                        | Annotated[VideoPart, Tag("VideoPart")],
                        Discriminator(_part_type, custom_error_type="invalid_part",
                                      custom_error_message="a content part is an object whose type is 'text', "
                                                           "'image_url' or 'video_url'")]


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[ContentPart], Field(max_length=256)] | None = None
    name: str | None = None


class StreamOptions(Strict):
    include_usage: StrictBool = True


class ChatCompletionRequest(SamplingFields):
    model: str | None = Field(None, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: MaxTokens = None
    max_completion_tokens: MaxTokens = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# --- OpenAI (legacy) completions --------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    model: str | None = Field(None, max_length=256)
    prompt: str = Field(description="raw text, no chat template; images are not taken here")
    max_tokens: MaxTokens = 16
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llavakit"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# --- TGI, vLLM, Triton ------------------------------------------------------------------------------------


class TGIParameters(BaseModel):
    """TGI's generation parameters; sampling is on when do_sample or any sampling value is given."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    max_new_tokens: MaxTokens = None
    temperature: Number | None = Field(None, gt=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, gt=0, le=MAX_TOKENS)
    repetition_penalty: Number | None = Field(None, ge=0.01, le=10)
    seed: Seed = None
    stop: Annotated[list[StopText], Field(max_length=MAX_STOPS)] = []
    do_sample: StrictBool = False
    details: StrictBool = False
    return_full_text: StrictBool = False


class TGIRequest(Strict):
    inputs: str = Field(description="raw text; images inline as ![](https://...) or ![](data:image/...)")
    parameters: TGIParameters = TGIParameters()
    stream: StrictBool = False


class TGIToken(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool


class TGIDetails(BaseModel):
    finish_reason: Literal["length", "eos_token", "stop_sequence"]
    generated_tokens: int
    seed: int | None = None
    tokens: list[TGIToken] | None = None


class TGIResponse(BaseModel):
    generated_text: str
    details: TGIDetails | None = None


class TGIStreamEvent(BaseModel):
    index: int
    token: TGIToken
    generated_text: str | None = None
    details: TGIDetails | None = None


class MultiModalData(Strict):
    image: ImageSources = None


class VLLMRequest(SamplingFields):
    prompt: str = Field(description="raw text; images of multi_modal_data go before it")
    multi_modal_data: MultiModalData | None = None
    max_tokens: MaxTokens = 16
    stream: StrictBool = False


def _generate_format(body: Any) -> str:
    """Which API a /generate body is written for: one with "prompt" (and no "inputs") is vLLM's, any other
    TGI's, so that an error names a field of the API the client meant."""
    vllm = isinstance(body, dict) and "prompt" in body and "inputs" not in body
    return "VLLMRequest" if vllm else "TGIRequest"


# The tags are class names, which error messages leave out of a field's path ("n", not "VLLMRequest.n").
GenerateRequest = Annotated[Annotated[TGIRequest, Tag("TGIRequest")] | Annotated[VLLMRequest, Tag("VLLMRequest")],
                            Discriminator(_generate_format)]


class VLLMResponse(BaseModel):
    text: list[str] = Field(description="prompt + completion, one per n")


class TritonParameters(Strict):
    max_tokens: MaxTokens = 16
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0, le=MAX_TOKENS)
    seed: Seed = None
    stop: Stop = None
    exclude_input_in_output: StrictBool = False


class TritonRequest(Strict):
    text_input: str
    parameters: TritonParameters = TritonParameters()
    image: ImageSources = None


class TritonResponse(BaseModel):
    model_name: str
    model_version: str = "1"
    text_output: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
