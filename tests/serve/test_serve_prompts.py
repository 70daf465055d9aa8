"""Prompt building for the server, without a server: the same ids as the offline processor for ordinary
text, and typed "<image>" tags that stay text (no placeholder id, and the characters survive)."""

from __future__ import annotations

import pytest
from conftest import noise_image

from llavakit.serve.errors import APIError
from llavakit.serve.prompts import chat_input, markdown_images, protect, raw_text, render_chat
from llavakit.serve.protocol import ChatMessage


@pytest.fixture(scope="module")
def encoder(pipe):
    """Rendered text (with the server's tags) -> ids, as the server's Service.inputs makes them."""
    proc = pipe.processor
    return lambda text, images=(), videos=(): proc.encode_prompt(text, images, videos).ids


@pytest.fixture(scope="module")
def images(pipe):
    return pipe.processor.prepare_images([noise_image(30, 20, seed=1), noise_image(20, 50, seed=2)])


CONVERSATIONS = [
    [{"role": "user", "content": "What is this?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Describe it\nin detail."}],
]


@pytest.mark.parametrize("num_images", [0, 1, 2])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one-turn", "multi-turn"])
def test_ids_equal_the_offline_processor(pipe, encoder, images, messages, num_images):
    proc, prepared = pipe.processor, images[:num_images]
    expected = proc.tokenize(proc.render_messages(messages, num_images), prepared)
    parts = [{"type": "image_url", "image_url": {"url": "x"}}] * num_images
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    client = [ChatMessage(role=m["role"], content=parts + [{"type": "text", "text": m["content"]}]
                          if i == first_user else m["content"]) for i, m in enumerate(messages)]
    chat = chat_input(client)
    assert len(chat.images) == num_images
    assert encoder(render_chat(pipe.processor, chat.messages), prepared) == expected


def test_typed_image_tags_stay_text(pipe, encoder, images):
    image_id = pipe.config.image_token_id
    chat = chat_input([ChatMessage(role="user", content="Explain <image> and<image>.")])
    ids = encoder(render_chat(pipe.processor, chat.messages), [])
    assert image_id not in ids
    assert "Explain <image> and<image>" in pipe.tokenizer.decode(ids)  # (the tokenizer may space what follows)
    with_image = chat_input([ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}},
                                                               {"type": "text", "text": "What is <image>?"}])])
    ids = encoder(render_chat(pipe.processor, with_image.messages), images[:1])
    assert ids.count(image_id) == images[0].num_tokens
    start = ids.index(image_id)
    assert ids[start:start + images[0].num_tokens] == [image_id] * images[0].num_tokens
    raw = encoder(raw_text("<image>", 0, "prompt"), [])
    assert image_id not in raw and pipe.tokenizer.decode(raw, skip_special_tokens=True) == "<image>"


def test_markdown_images_become_tags_where_they_stand():
    text, urls = markdown_images("A ![](http://a/1.png) then ![alt](data:image/png;base64,AAA=) end <image>", "inputs")
    assert urls == ["http://a/1.png", "data:image/png;base64,AAA="]
    assert text.count("<image>") == 2 and text.startswith("A <image> then <image> end ")


def test_bad_text_and_roles_are_400s():
    with pytest.raises(APIError, match="surrogate"):
        protect("a\ud800", "prompt")
    with pytest.raises(APIError, match="only user messages may carry images"):
        chat_input([ChatMessage(role="assistant", content=[{"type": "image_url", "image_url": {"url": "x"}}]),
                    ChatMessage(role="user", content="hi")])
    with pytest.raises(APIError, match="last message has role 'assistant'"):
        chat_input([ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="yo")])
