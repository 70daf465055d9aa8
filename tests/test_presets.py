"""`load_format="dummy"`: published sizes with random weights, and the tokenizer shipped for LLaMA-vocabulary
presets."""

import pytest

import llavakit
from llavakit.assets import LLAMA_TOKENIZER_DIR
from llavakit.presets import LLAMA_VOCAB_PRESETS, PRESETS, preset_config, preset_tokenizer_dir


def test_the_llama_tokenizer_ships_inside_the_package():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(LLAMA_TOKENIZER_DIR)
    assert len(tok) == 32000 and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok("Hello world").input_ids == [1, 15043, 3186]
    assert (LLAMA_TOKENIZER_DIR / "tokenizer.model").is_file()


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_with_a_llama_vocabulary_get_the_shipped_tokenizer(name):
    cfg = preset_config(name)
    if name in LLAMA_VOCAB_PRESETS:
        assert preset_tokenizer_dir(name) == LLAMA_TOKENIZER_DIR and cfg.text.vocab_size >= 32000
    else:
        assert preset_tokenizer_dir(name) is None


def test_a_dummy_preset_loads_and_answers_without_a_tokenizer(tmp_path):
    from PIL import Image

    pipe = llavakit.load("bench-small", load_format="dummy", device="cpu")
    assert pipe.tokenizer.name_or_path == str(LLAMA_TOKENIZER_DIR)
    out = pipe.generate("What is this?", images=[Image.new("RGB", (50, 30), "red")], max_new_tokens=3,
                        temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 3


def test_a_preset_of_another_vocabulary_asks_for_a_tokenizer_before_making_weights(monkeypatch):
    import llavakit.weights.loader as loader

    monkeypatch.setattr(loader, "random_llava", lambda *a, **k: pytest.fail("weights made before the check"))
    with pytest.raises(ValueError, match=r"llava-v1.6-mistral-7b preset needs a tokenizer.*--tokenizer DIR"):
        llavakit.load("llava-v1.6-mistral-7b", load_format="dummy", device="cpu")


def test_a_preset_too_big_for_free_memory_is_refused_before_allocating(monkeypatch):
    import llavakit.weights.loader as loader

    monkeypatch.setattr(loader, "free_memory", lambda device: 2**30)
    with pytest.raises(ValueError,
                       match=r"llava-1.5-7b in float32 needs 2[0-9.]+ GiB .* 1.0 GiB free.*--dtype bfloat16"):
        llavakit.load("llava-1.5-7b", load_format="dummy", device="cpu", dtype="float32")


def test_dummy_weights_are_made_in_the_asked_dtype():
    import torch

    pipe = llavakit.load("bench-small", load_format="dummy", device="cpu", dtype="bfloat16")
    assert {p.dtype for p in pipe.model.parameters()} == {torch.bfloat16}
