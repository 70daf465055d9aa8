"""Conversation templates: turn chat messages into the exact prompt text each LLaVA checkpoint was
trained on (SPEC section 5), and into flagged spans from which training labels are built.

Every template renders the same way:

    system block, then per round:  [round_prefix] user turn, assistant header, assistant answer

with the generation prompt being a user turn followed by the assistant header. A template is data
(format strings); `render` and `render_segments` are the only code. The text matches what the original
LLaVA `Conversation.get_prompt` produces for the same conversation.
"""

from __future__ import annotations

from dataclasses import dataclass

Message = dict[str, str]


@dataclass(frozen=True, slots=True)
class Template:
    """How one conversation format writes system text, user turns and assistant answers.

    Format strings take `{system}` or `{content}`. `assistant_format` holds the answer together with
    the separator (or EOS text) that ends it, which is what training learns; `stop_str` is the text
    that ends an answer when the model does not emit EOS (None when EOS ends it).
    """

    name: str
    system: str = ""
    system_format: str = "{system}"
    # LLaMA-2 chat writes the system block inside the first [INST] instead of before it.
    system_in_first_user: bool = False
    user_format: str = "{content}"
    round_prefix: str = ""  # written before every user turn but the first
    assistant_header: str = ""
    assistant_format: str = "{content}"
    stop_str: str | None = None
    image_token: str = "<image>"
    # Stage-1 pretraining ("plain"): one round, the user turn is reduced to its image tags.
    images_only: bool = False


_VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
_LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand "
                         "the visual content that the user provides, and assist the user with a variety "
                         "of tasks using natural language.")


def _two(name: str, system: str) -> Template:
    """SEP_STYLE TWO of the original: sep " " after user turns, sep2 "</s>" after answers."""
    return Template(name=name, system=system, system_format="{system} ", user_format="USER: {content} ",
                    assistant_header="ASSISTANT:", assistant_format=" {content}</s>")


def _llama_2(name: str, system: str, round_prefix: str) -> Template:
    return Template(name=name, system=system, system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
                    system_in_first_user=True, user_format="[INST] {content} [/INST]",
                    round_prefix=round_prefix, assistant_format=" {content} </s>")


_ALL = (
    _two("vicuna_v1", _VICUNA_SYSTEM),
    _two("llava_v1", _LLAVA_SYSTEM),
    _llama_2("mistral_instruct", "", round_prefix=""),
    _llama_2("llava_llama_2", _LLAVA_LLAMA_2_SYSTEM, round_prefix="<s>"),
    Template(name="chatml_direct", system="Answer the questions.",
             system_format="<|im_start|>system\n{system}<|im_end|>",
             user_format="<|im_start|>user\n{content}<|im_end|>",
             assistant_header="<|im_start|>assistant\n", assistant_format="{content}<|im_end|>",
             stop_str="<|im_end|>"),
    Template(name="plain", assistant_format="{content}\n", stop_str="\n", images_only=True),
    Template(name="llava_v0", system=_LLAVA_SYSTEM, system_format="{system}###",
             user_format="Human: {content}###", assistant_header="Assistant:",
             assistant_format=" {content}###", stop_str="###"),
)

TEMPLATES: dict[str, Template] = {t.name: t for t in _ALL}
TEMPLATES["v1"] = TEMPLATES["vicuna_v1"]


def get_template(name: str) -> Template:
    """The template called `name` (or an alias such as "v1")."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown conversation template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def _split_system(messages: list[Message], system: str | None, default: str) -> tuple[str, list[Message]]:
    """System text (leading system message > `system` argument > template default) and the rest."""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return (default if system is None else system), messages


def _rounds(template: Template, messages: list[Message]) -> list[tuple[str, str | None]]:
    """Pair alternating user/assistant messages into (question, answer-or-None) rounds."""
    for i, message in enumerate(messages):
        expected = ("user", "assistant")[i % 2]
        if message["role"] != expected:
            raise ValueError(f"message {i} (after any leading system message) has role {message['role']!r}, "
                             f"expected {expected!r}: turns must alternate user, assistant, starting with user")
    rounds = [(messages[i]["content"], messages[i + 1]["content"] if i + 1 < len(messages) else None)
              for i in range(0, len(messages), 2)]
    if template.images_only and len(rounds) != 1:
        raise ValueError(f"template {template.name!r} takes exactly one user turn (and its answer), "
                         f"got {len(rounds)} rounds")
    return rounds


def _user_text(template: Template, index: int, content: str, system_block: str) -> str:
    if template.images_only:
        count = content.count(template.image_token)
        if count == 0:
            raise ValueError(f"template {template.name!r} needs {template.image_token!r} in the user message; "
                             "call add_image_tags first")
        content = template.image_token * count
    if index == 0 and template.system_in_first_user:
        content = system_block + content
    prefix = template.round_prefix if index > 0 else ""
    return prefix + template.user_format.format(content=content)


def render_segments(template: Template, messages: list[Message], system: str | None = None,
                    add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
    """The prompt as consecutive (text, learned) pieces; "".join of the texts == `render(...)`.

    A learned piece is one assistant answer as the model generates it after the assistant header: the
    answer text with its leading space (where the format has one) and the separator or EOS text that
    ends it. Everything else, including the generation prompt, is not learned. Pieces alternate.
    The generation prompt is added only when the last message is a user turn.
    """
    system_text, rest = _split_system(list(messages), system, template.system)
    system_block = template.system_format.format(system=system_text) if system_text else ""
    pieces: list[tuple[str, bool]] = []
    if not template.system_in_first_user:
        pieces.append((system_block, False))
    for index, (question, answer) in enumerate(_rounds(template, rest)):
        pieces.append((_user_text(template, index, question, system_block), False))
        if answer is not None or add_generation_prompt:
            pieces.append((template.assistant_header, False))
        if answer is not None:
            pieces.append((template.assistant_format.format(content=answer), True))
    return _merge(pieces)


def _merge(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Drop empty pieces and join neighbours with the same flag."""
    merged: list[tuple[str, bool]] = []
    for text, learned in pieces:
        if not text:
            continue
        if merged and merged[-1][1] == learned:
            merged[-1] = (merged[-1][0] + text, learned)
        else:
            merged.append((text, learned))
    return merged


def render(template: Template, messages: list[Message], system: str | None = None,
           add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` ({"role": "user"|"assistant"|"system", "content": str}).

    A leading system message replaces the system text; otherwise `system`, if given, does; empty
    system text drops the system block. With `add_generation_prompt` a trailing user turn is followed
    by the assistant header (e.g. "... USER: Q ASSISTANT:").
    """
    return "".join(text for text, _ in render_segments(template, messages, system, add_generation_prompt))


def add_image_tags(messages: list[Message], num_images: int, image_token: str = "<image>") -> list[Message]:
    """A copy of `messages` with `num_images` image tags ("<image>\\n" each) put before the text of the
    first user message, unless some message already carries the tag (then the tags stay where they are).
    """
    out = [dict(m) for m in messages]
    if num_images <= 0 or any(image_token in m["content"] for m in out):
        return out
    for message in out:
        if message["role"] == "user":
            message["content"] = f"{image_token}\n" * num_images + message["content"]
            return out
    raise ValueError(f"cannot place {num_images} image(s): the conversation has no user message")
