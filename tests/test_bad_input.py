"""Bad input at the public boundaries: every mistake a user can make with a checkpoint, an image, a
prompt or a sampling argument ends in llavakit's own error type, whose message names the file, tensor
or number at fault and says what to do — never a bare library exception (SafetensorError, KeyError,
UnpicklingError, UnidentifiedImageError) or its traceback.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import build_hf_model, processor_config, write_hf_checkpoint
from conftest import noise_image
from safetensors.torch import load_file, save_file

import llavakit
from llavakit.config import ConfigError
from llavakit.processing.image import ImageError
from llavakit.weights.files import WeightsError


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A valid tiny llava-hf checkpoint; tests copy it before breaking the copy."""
    hf = build_hf_model("llava")
    return write_hf_checkpoint(hf, tmp_path_factory.mktemp("bad") / "base", "hub",
                               processor=processor_config("LlavaImageProcessor", do_pad=True))


@pytest.fixture(scope="module")
def pipe(base):
    return _load(base)


def _load(directory: Path):
    return llavakit.load(directory, dtype="float32", device="cpu")


def _copy(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "ck"))


def _raises(exc_type: type[Exception], pattern: str, fn, *args, **kwargs) -> str:
    """Assert `fn` raises exactly `exc_type` with a message matching `pattern`, and that no library
    exception is chained onto it (so the user sees one clear error, not a library traceback)."""
    with pytest.raises(Exception) as info:
        fn(*args, **kwargs)
    err = info.value
    assert type(err) is exc_type, f"expected {exc_type.__name__}, got {type(err).__name__}: {err}"
    message = str(err)
    assert re.search(pattern, message, re.DOTALL), f"{message!r} does not match {pattern!r}"
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__), \
        f"library exception chained onto the error: {err.__context__!r}"
    return message


def _edit_config(directory: Path, edit) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    edit(cfg)
    (directory / "config.json").write_text(json.dumps(cfg))


def _rewrite_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


# --- the checkpoint directory and its config --------------------------------------------------------------


def test_missing_directory(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    _raises(WeightsError, rf"model '{re.escape(str(missing))}' is not a directory.*pass a checkpoint directory",
            _load, missing)


def test_missing_directory_that_looks_like_a_hub_id(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # never touch the network
    _raises(WeightsError, r"model 'no-such-org/no-such-model' is not a local directory and could not be fetched"
                          r".*hf download no-such-org/no-such-model", _load, "no-such-org/no-such-model")


def test_directory_without_config(base, tmp_path):
    d = _copy(base, tmp_path)
    (d / "config.json").unlink()
    _raises(ConfigError, rf"{re.escape(str(d))} has no config\.json.*LLaVA checkpoint directory", _load, d)


def test_config_not_json(base, tmp_path):
    d = _copy(base, tmp_path)
    (d / "config.json").write_text('{"model_type": "llava", "text_config": {')
    _raises(ConfigError, r"config\.json is not valid JSON.*(re-download|fix)", _load, d)


def test_unknown_model_type(base, tmp_path):
    d = _copy(base, tmp_path)
    _edit_config(d, lambda c: c.update(model_type="bert"))
    _raises(ConfigError, r"model_type 'bert'.*not a LLaVA model.*llava_next", _load, d)


def test_unsupported_text_model_type(base, tmp_path):
    d = _copy(base, tmp_path)
    _edit_config(d, lambda c: c["text_config"].update(model_type="gpt2"))
    _raises(ConfigError, r"text model_type 'gpt2'.*supports .*'llama'.*'mistral'", _load, d)


# --- weight files ----------------------------------------------------------------------------------------


def test_corrupt_safetensors(base, tmp_path):
    d = _copy(base, tmp_path)
    (d / "model.safetensors").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    _raises(WeightsError, r"model\.safetensors is not a readable safetensors file.*re-download", _load, d)


def test_truncated_safetensors(base, tmp_path):
    d = _copy(base, tmp_path)
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises(WeightsError, r"model\.safetensors is not a readable safetensors file.*truncated.*re-download",
            _load, d)


def test_shard_listed_in_index_is_missing(tmp_path):
    d = write_hf_checkpoint(build_hf_model("llava"), tmp_path / "sharded", "hub", shards=3)
    (d / "model-00002-of-00003.safetensors").unlink()
    _raises(WeightsError, r"model\.safetensors\.index\.json lists shards.*model-00002-of-00003\.safetensors"
                          r".*incomplete", _load, d)


def test_shape_mismatch_with_config(base, tmp_path):
    d = _copy(base, tmp_path)
    _edit_config(d, lambda c: c["text_config"].update(hidden_size=128))
    _raises(WeightsError, r"tensor \S+: expected shape \([^)]*128[^)]*\), checkpoint has \([^)]*64[^)]*\)"
                          r".*do not match config\.json", _load, d)


def test_missing_tensor_is_named(base, tmp_path):
    d = _copy(base, tmp_path)
    _rewrite_weights(d, lambda s: s.pop("language_model.model.layers.1.mlp.down_proj.weight"))
    message = _raises(WeightsError, r"lacks 1 tensors? .*layers\.1\.mlp\.down_proj\.weight.*incomplete", _load, d)
    assert "layers.0.mlp.down_proj" not in message


@pytest.mark.parametrize("extra", ["language_model.model.layers.7.mlp.up_proj.weight",  # a layer the config lacks
                                   "some_adapter.lora_A.weight"])  # a name no layout knows
def test_unexpected_tensor_is_named(base, tmp_path, extra):
    d = _copy(base, tmp_path)
    _rewrite_weights(d, lambda s: s.update({extra: torch.zeros(4, 4)}))
    _raises(WeightsError, rf"has 1 tensors? this model does not have: {re.escape(extra)}.*config\.json", _load, d)


class _Marker:
    """Unpickling this object would create a file: proof that the pickle ran code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return _leave_marker, (self.path,)


def _leave_marker(path: str) -> None:
    Path(path).touch()


def test_pickle_with_objects_is_refused_unrun(base, tmp_path):
    d = _copy(base, tmp_path)
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({**state, "payload": _Marker(marker)}, d / "pytorch_model.bin")
    _raises(WeightsError, r"refusing to load \S*pytorch_model\.bin: it holds more than tensors.*safetensors", _load, d)
    assert not marker.exists()
    torch.load(d / "pytorch_model.bin", weights_only=False)  # the payload is live: a full unpickle runs it
    assert marker.exists()


# --- images, image tags and sampling arguments at generate() --------------------------------------------


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    noise_image(40, 30).save(buf, format="PNG")
    return buf.getvalue()


def test_random_bytes_image(pipe):
    junk = bytes(torch.randint(0, 256, (500,), dtype=torch.uint8).tolist())
    _raises(ImageError, r"image <500 bytes> could not be decoded; send a valid PNG, JPEG", pipe.generate,
            "What is this?", images=[junk], max_new_tokens=2)


def test_truncated_png_image(pipe, tmp_path):
    path = tmp_path / "cut.png"
    data = _png_bytes()
    path.write_bytes(data[: len(data) // 2])
    _raises(ImageError, rf"image {re.escape(str(path))} is truncated or corrupt.*complete file", pipe.generate,
            "What is this?", images=[path], max_new_tokens=2)


def test_more_image_tags_than_images(pipe):
    _raises(ValueError, r"prompt has 2 <image> tags but 1 images were given", pipe.generate,
            "USER: <image>\n<image>\nhi ASSISTANT:", images=[noise_image(40, 30)], conv_mode="raw",
            max_new_tokens=2)


def test_fewer_image_tags_than_images(pipe):
    _raises(ValueError, r"prompt has 0 <image> tags but 1 images were given.*one <image> where each image goes",
            pipe.generate, "USER: hi ASSISTANT:", images=[noise_image(40, 30)], conv_mode="raw", max_new_tokens=2)


@pytest.mark.parametrize("kwargs, pattern", [(dict(temperature=-1), r"temperature must be >= 0, got -1"),
                                             (dict(top_p=0), r"top_p must be in \(0, 1\], got 0"),
                                             (dict(max_new_tokens=0),
                                              r"max_tokens \(max_new_tokens\) must be at least 1, got 0")])
def test_bad_sampling_argument(pipe, kwargs, pattern):
    _raises(ValueError, pattern, pipe.generate, "hi", **kwargs)
