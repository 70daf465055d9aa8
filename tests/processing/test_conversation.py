"""Conversation templates against literal prompts from SPEC section 5, and the image-aware
tokenization against the ids the original LLaVA printed (LLaVA-NeXT walk-through example)."""

from pathlib import Path
from types import SimpleNamespace

import pytest

from llavakit.assets import LLAMA_TOKENIZER_DIR
from llavakit.processing.conversation import TEMPLATES, add_image_tags, get_template, render, render_segments
from llavakit.processing.tokens import split_on_tags, tokenize_texts

VICUNA_SYS = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYS = ("A chat between a curious human and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAMA_2_SYS = ("You are a helpful language and vision assistant. You are able to understand the visual "
               "content that the user provides, and assist the user with a variety of tasks using natural "
               "language.")

TWO_TURNS = [
    {"role": "user", "content": "<image>\nWhat is shown?"},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "What color is it?"},
    {"role": "assistant", "content": "Black."},
]

# name -> (prompt for the second answer, full two-turn text, learned pieces)
EXPECTED = {
    "vicuna_v1": (
        VICUNA_SYS + " USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>USER: What color is it? ASSISTANT:",
        VICUNA_SYS + " USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>"
                     "USER: What color is it? ASSISTANT: Black.</s>",
        [" A cat.</s>", " Black.</s>"],
    ),
    "llava_v1": (
        LLAVA_SYS + " USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>USER: What color is it? ASSISTANT:",
        LLAVA_SYS + " USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>USER: What color is it? ASSISTANT: Black.</s>",
        [" A cat.</s>", " Black.</s>"],
    ),
    "mistral_instruct": (
        "[INST] <image>\nWhat is shown? [/INST] A cat. </s>[INST] What color is it? [/INST]",
        "[INST] <image>\nWhat is shown? [/INST] A cat. </s>[INST] What color is it? [/INST] Black. </s>",
        [" A cat. </s>", " Black. </s>"],
    ),
    "llava_llama_2": (
        "[INST] <<SYS>>\n" + LLAMA_2_SYS + "\n<</SYS>>\n\n<image>\nWhat is shown? [/INST] A cat. </s>"
        "<s>[INST] What color is it? [/INST]",
        "[INST] <<SYS>>\n" + LLAMA_2_SYS + "\n<</SYS>>\n\n<image>\nWhat is shown? [/INST] A cat. </s>"
        "<s>[INST] What color is it? [/INST] Black. </s>",
        [" A cat. </s>", " Black. </s>"],
    ),
    "chatml_direct": (
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nWhat color is it?<|im_end|>"
        "<|im_start|>assistant\n",
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|><|im_start|>user\nWhat color is it?<|im_end|>"
        "<|im_start|>assistant\nBlack.<|im_end|>",
        ["A cat.<|im_end|>", "Black.<|im_end|>"],
    ),
    "llava_v0": (
        LLAVA_SYS + "###Human: <image>\nWhat is shown?###Assistant: A cat.###Human: What color is it?###Assistant:",
        LLAVA_SYS + "###Human: <image>\nWhat is shown?###Assistant: A cat.###Human: What color is it?"
        "###Assistant: Black.###",
        [" A cat.###", " Black.###"],
    ),
}


def tokenize_with_images(tokenizer, prompt: str, placeholder_id: int = -200) -> list[int]:
    """The original LLaVA's tokenizer_image_token by our chunk rule: one placeholder id per "<image>"."""
    chunks = tokenize_texts(tokenizer, split_on_tags(prompt, ["<image>"])[0])
    return [i for n, chunk in enumerate(chunks) for i in ([placeholder_id] if n else []) + chunk]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_turn_render(name):
    prompt, full, _ = EXPECTED[name]
    template = get_template(name)
    assert render(template, TWO_TURNS[:3]) == prompt
    assert render(template, TWO_TURNS) == full
    assert render(template, TWO_TURNS, add_generation_prompt=False) == full


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_segments_join_and_learn_only_answers(name):
    prompt, full, learned = EXPECTED[name]
    segments = render_segments(get_template(name), TWO_TURNS)
    assert "".join(text for text, _ in segments) == full
    assert [text for text, is_learned in segments if is_learned] == learned
    assert [flag for _, flag in segments] == [False, True, False, True]
    # The text before the last answer is exactly the generation prompt for it.
    assert "".join(text for text, _ in segments[:3]) == prompt


def test_v1_segments_literal():
    segments = render_segments(get_template("v1"), TWO_TURNS)
    assert segments == [
        (VICUNA_SYS + " USER: <image>\nWhat is shown? ASSISTANT:", False),
        (" A cat.</s>", True),
        ("USER: What color is it? ASSISTANT:", False),
        (" Black.</s>", True),
    ]


def test_generation_prompt_segments_end_unlearned():
    segments = render_segments(get_template("chatml_direct"), TWO_TURNS[:3])
    assert segments[-1] == ("<|im_start|>user\nWhat color is it?<|im_end|><|im_start|>assistant\n", False)


def test_trailing_user_without_generation_prompt():
    text = render(get_template("llava_v1"), TWO_TURNS[:3], add_generation_prompt=False)
    assert text == LLAVA_SYS + " USER: <image>\nWhat is shown? ASSISTANT: A cat.</s>USER: What color is it? "


def test_plain_single_turn():
    plain = get_template("plain")
    caption = [{"role": "user", "content": "<image>\nDescribe the image briefly."},
               {"role": "assistant", "content": "A cat on a mat."}]
    assert render(plain, caption) == "<image>A cat on a mat.\n"
    assert render(plain, caption[:1]) == "<image>"
    assert render_segments(plain, caption) == [("<image>", False), ("A cat on a mat.\n", True)]
    assert render(plain, [{"role": "user", "content": "<image>\n<image>\nx"}]) == "<image><image>"


def test_plain_rejects_two_turns_and_missing_image():
    with pytest.raises(ValueError, match="exactly one"):
        render(get_template("plain"), TWO_TURNS)
    with pytest.raises(ValueError, match="add_image_tags"):
        render(get_template("plain"), [{"role": "user", "content": "no image"}])


def test_stop_strings():
    stops = {name: TEMPLATES[name].stop_str for name in EXPECTED}
    assert stops == {"vicuna_v1": None, "llava_v1": None, "mistral_instruct": None, "llava_llama_2": None,
                     "chatml_direct": "<|im_end|>", "llava_v0": "###"}
    assert TEMPLATES["v1"] is TEMPLATES["vicuna_v1"]
    assert all(t.image_token == "<image>" for t in TEMPLATES.values())


def test_system_override():
    one = [{"role": "user", "content": "Hi"}]
    v1 = get_template("vicuna_v1")
    assert render(v1, [{"role": "system", "content": "Be brief."}] + one) == "Be brief. USER: Hi ASSISTANT:"
    assert render(v1, one, system="Be kind.") == "Be kind. USER: Hi ASSISTANT:"
    # A system message in the conversation wins over the argument.
    assert render(v1, [{"role": "system", "content": "Be brief."}] + one, system="Be kind.") == \
        "Be brief. USER: Hi ASSISTANT:"
    assert render(get_template("llava_llama_2"), one, system="S") == "[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST]"
    assert render(get_template("mistral_instruct"), one, system="S") == "[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST]"
    assert render(get_template("chatml_direct"), one, system="S") == \
        "<|im_start|>system\nS<|im_end|><|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    assert render(get_template("chatml_direct"), one, system="") == \
        "<|im_start|>user\nHi<|im_end|><|im_start|>assistant\n"
    assert render(get_template("llava_v0"), one, system="S") == "S###Human: Hi###Assistant:"


def test_bad_role_order():
    with pytest.raises(ValueError, match="expected 'user'"):
        render(get_template("v1"), [{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="expected 'assistant'"):
        render(get_template("v1"), [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_add_image_tags():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]
    tagged = add_image_tags(messages, 2)
    assert tagged[1] == {"role": "user", "content": "<image>\n<image>\nQ"}
    assert tagged[3]["content"] == "Q2" and messages[1]["content"] == "Q"  # input untouched
    assert add_image_tags(messages, 0) == messages
    placed = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
              {"role": "user", "content": "look <image> here"}]
    assert add_image_tags(placed, 1) == placed
    assert add_image_tags([{"role": "user", "content": "Q"}], 1, image_token="<video>") == \
        [{"role": "user", "content": "<video>\nQ"}]
    with pytest.raises(ValueError, match="no user message"):
        add_image_tags([{"role": "system", "content": "S"}], 1)


def test_unknown_template():
    with pytest.raises(ValueError, match="unknown conversation template 'vicuna_v9'.*llava_v1.*vicuna_v1"):
        get_template("vicuna_v9")


# --- tokenization, against the ids printed by the original LLaVA (LLaVA-NeXT walk-through example) --------------------

LLAMA_DIR = LLAMA_TOKENIZER_DIR  # shipped in the package
QUESTION = "What are the things I should be cautious about when I visit here?"
SEED_PROMPT = (LLAVA_SYS + " USER: <image>\n" + QUESTION + " ASSISTANT:")
SEED_IDS = [1, 319, 13563, 1546, 263, 12758, 5199, 322, 385, 23116, 21082, 20255, 29889, 450, 20255, 4076,
            8444, 29892, 13173, 29892, 322, 1248, 568, 6089, 304, 278, 5199, 29915, 29879, 5155, 29889, 3148,
            1001, 29901, 29871, -200, 29871, 13, 5618, 526, 278, 2712, 306, 881, 367, 274, 1300, 2738, 1048,
            746, 306, 6493, 1244, 29973, 319, 1799, 9047, 13566, 29901]

class SentencePieceTokenizer:
    """The slow (sentencepiece) tokenizer behind the call interface tokenize_with_images uses."""

    def __init__(self, model_file: Path):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.bos_token_id = self.sp.bos_id()

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self.sp.encode(text, add_bos=add_special_tokens))


@pytest.fixture(scope="module")
def tokenizers():
    from transformers import AutoTokenizer

    return {"fast": AutoTokenizer.from_pretrained(str(LLAMA_DIR)),
            "sentencepiece": SentencePieceTokenizer(LLAMA_DIR / "tokenizer.model")}


def test_seed_prompt_renders():
    messages = add_image_tags([{"role": "user", "content": QUESTION}], 1)
    assert render(get_template("llava_v1"), messages) == SEED_PROMPT


@pytest.mark.parametrize("kind", ["fast", "sentencepiece"])
def test_tokenize_with_images_matches_seed(tokenizers, kind):
    assert tokenize_with_images(tokenizers[kind], SEED_PROMPT) == SEED_IDS


@pytest.mark.parametrize("kind", ["fast", "sentencepiece"])
def test_later_chunks_without_bos_give_the_same_ids(tokenizers, kind):
    tok = tokenizers[kind]
    first, second = SEED_PROMPT.split("<image>")
    ids = tok(first, add_special_tokens=True).input_ids + [-200] + tok(second, add_special_tokens=False).input_ids
    assert ids == SEED_IDS
    # Each chunk is its own encode, so the chunk after the image starts with the dummy prefix "▁".
    assert tok(second, add_special_tokens=False).input_ids[:2] == [29871, 13]


def test_fast_and_slow_differ_on_a_leading_space(tokenizers):
    # tokenizer.json (Metaspace) does not add a second "▁" before text that starts with a space;
    # sentencepiece does. Tokenizing a rendered piece such as " ASSISTANT:" on its own therefore
    # depends on the tokenizer; in the whole prompt both give "?" "▁A" "SS" "IST" "ANT" ":".
    fast, slow = tokenizers["fast"], tokenizers["sentencepiece"]
    assert fast(" ASSISTANT:", add_special_tokens=False).input_ids == [319, 1799, 9047, 13566, 29901]
    assert slow(" ASSISTANT:", add_special_tokens=False).input_ids == [29871, 319, 1799, 9047, 13566, 29901]
    assert fast("here? ASSISTANT:").input_ids == slow("here? ASSISTANT:").input_ids == \
        [1, 1244, 29973, 319, 1799, 9047, 13566, 29901]


def test_empty_chunks_add_nothing(tokenizers):
    tok = tokenizers["fast"]
    caption = "A cat on a mat.\n"
    ids = tokenize_with_images(tok, "<image>" + caption)
    assert ids == [1, -200] + tok(caption, add_special_tokens=False).input_ids
    assert tokenize_with_images(tok, "a<image><image>")[-2:] == [-200, -200]
