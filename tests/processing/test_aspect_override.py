"""The image_aspect_ratio override, and the CLI's --image-aspect-ratio, --threads and --version.

llava-hf LLaVA-1.5 repos ship a CLIPImageProcessor, so transformers (and llavakit by default) center-crops,
though LLaVA-1.5 was trained and evaluated with expand2square padding: image_aspect_ratio="pad" must be exactly
expand2square followed by transformers' CLIP processor, and give transformers' greedy tokens on those pixels.
The default (no override) stays transformers' own processor path; tests/models/test_parity.py checks the whole
model on it (test_llava15_clip_processor_means_no_pad), here only its pixels are compared.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from checkpoints import (
    IMAGE_TOKEN_ID,
    PINPOINTS,
    build_hf_model,
    processor_config,
    text_config_dict,
    write_hf_checkpoint,
)
from conftest import noise_image
from parity import PROMPT, assert_parity
from PIL import Image
from transformers import AutoTokenizer, LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import llavakit
from llavakit.cli import build_parser, common, main
from llavakit.config import ConfigError, image_mode, with_image_aspect_ratio
from llavakit.llm import LLM
from llavakit.presets import preset_config
from llavakit.sampling import SamplingParams

WIDE, TALL = (70, 30), (24, 60)  # (width, height): padding and cropping see different pixels


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """The original LLaVA code's expand2square, written here independently of llavakit's."""
    width, height = img.size
    if width == height:
        return img
    if width > height:
        result = Image.new(img.mode, (width, width), background)
        result.paste(img, (0, (width - height) // 2))
        return result
    result = Image.new(img.mode, (height, height), background)
    result.paste(img, ((height - width) // 2, 0))
    return result


def _load(d, **kw):
    return llavakit.load(d, dtype="float32", device="cpu", **kw)


@pytest.fixture(scope="module")
def llava15(tmp_path_factory):
    """A tiny llava-hf LLaVA-1.5 checkpoint shipping a CLIPImageProcessor (as the hub repos do), loaded with
    the pad override and without."""
    hf = build_hf_model("llava", seed=3)
    d = write_hf_checkpoint(hf, tmp_path_factory.mktemp("aspect") / "llava15", "hub",
                            processor=processor_config("CLIPImageProcessor"))
    return hf, d, _load(d, image_aspect_ratio="pad"), _load(d)


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    hf = build_hf_model("llava_next", text=text_config_dict(num_key_value_heads=2), seed=4)
    return write_hf_checkpoint(hf, tmp_path_factory.mktemp("aspect") / "next", "hub",
                               processor=processor_config("LlavaNextImageProcessor", image_grid_pinpoints=PINPOINTS))


def _clip(d) -> tuple[CLIPImageProcessorPil, tuple[int, int, int]]:
    """transformers' CLIP processor of the checkpoint and the original LLaVA's expand2square fill."""
    clip = CLIPImageProcessorPil.from_pretrained(d)
    return clip, tuple(int(x * 255) for x in clip.image_mean)


@pytest.mark.parametrize("size", [WIDE, TALL], ids=["wide", "tall"])
def test_pad_is_expand2square_then_transformers_clip(llava15, size):
    _, d, pad, default = llava15
    clip, fill = _clip(d)
    img = noise_image(*size, seed=7)
    assert pad.config.image.mode == "pad" and default.config.image.mode == "crop"
    ours_pad = pad.processor.prepare_images([img])[0].pixel_values
    ours_default = default.processor.prepare_images([img])[0].pixel_values
    assert torch.equal(ours_pad, clip(images=[expand2square(img, fill)], return_tensors="pt")["pixel_values"])
    assert torch.equal(ours_default, clip(images=[img], return_tensors="pt")["pixel_values"])  # (c): pixels only
    assert (ours_pad - ours_default).abs().max() > 0.5  # the override changed what the model sees


@pytest.mark.parametrize("size", [WIDE, TALL], ids=["wide", "tall"])
def test_pad_greedy_tokens_equal_transformers_on_expand2square_pixels(llava15, size):
    hf, d, pad, _ = llava15
    clip, fill = _clip(d)
    img = noise_image(*size, seed=8)
    proc = LlavaProcessor(image_processor=clip, tokenizer=AutoTokenizer.from_pretrained(d), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    text = pad.processor.render_prompt(PROMPT, 1)
    hf_inputs = proc(images=[expand2square(img, fill)], text=text, return_tensors="pt")
    ids = assert_parity(pad, hf, proc, [img], hf_inputs=hf_inputs)  # ids, pixels, logits, 20 greedy tokens
    assert ids.count(IMAGE_TOKEN_ID) == 4


def test_llm_takes_image_aspect_ratio(llava15):
    _, d, pad, default = llava15
    llm = LLM(str(d), dtype="float32", device="cpu", num_kv_blocks=64, image_aspect_ratio="pad")
    assert llm.pipe.config.image.mode == "pad"
    img = noise_image(*WIDE, seed=9)
    out = llm.generate([{"prompt": PROMPT, "images": [img]}], SamplingParams(max_tokens=12), use_tqdm=False)[0]
    assert out.token_ids == pad.generate(PROMPT, images=[img], max_new_tokens=12).token_ids
    engine_pixels = llm.pipe.processor.prepare_images([img])[0].pixel_values
    assert torch.equal(engine_pixels, pad.processor.prepare_images([img])[0].pixel_values)
    assert not torch.equal(engine_pixels, default.processor.prepare_images([img])[0].pixel_values)


def test_bad_values_and_anyres_on_llava15_are_clear_errors(llava15):
    _, d, _, _ = llava15
    with pytest.raises(ConfigError, match="'stretch' is not one of pad, crop, anyres .*expand2square"):
        _load(d, image_aspect_ratio="stretch")
    with pytest.raises(ConfigError, match="'anyres' needs a LLaVA-NeXT checkpoint.*LLaVA-1.5.*use pad"):
        _load(d, image_aspect_ratio="anyres")


def test_square_is_crop_and_anyres_needs_pinpoints():
    assert image_mode("square") == image_mode("crop") == "crop"
    next_cfg = preset_config("llava-v1.6-vicuna-7b")
    assert with_image_aspect_ratio(next_cfg, None) is next_cfg
    assert with_image_aspect_ratio(next_cfg, "square").image.mode == "crop"
    bare = dataclasses.replace(next_cfg, image=dataclasses.replace(next_cfg.image, mode="pad", pinpoints=[]))
    with pytest.raises(ConfigError, match="needs image_grid_pinpoints"):
        with_image_aspect_ratio(bare, "anyres")
    with pytest.raises(ConfigError, match="LLaVA-1.5"):
        with_image_aspect_ratio(preset_config("llava-1.5-7b"), "anyres")


@pytest.mark.parametrize("aspect", ["pad", "crop"])
def test_pad_or_crop_on_next_is_one_view_and_the_newline(llava_next, aspect):
    """On a NeXT checkpoint pad / crop feed one view (as the original LLaVA-NeXT code does with
    image_aspect_ratio pad): 4 patch features + the image_newline, and the model agrees with that count."""
    pipe = _load(llava_next, image_aspect_ratio=aspect)
    img = noise_image(*WIDE, seed=10)
    prepared = pipe.processor.prepare_images([img])[0]
    assert pipe.config.image.mode == aspect and prepared.pixel_values.shape[0] == 1 and prepared.num_tokens == 5
    tiled = _load(llava_next).processor.prepare_images([img])[0]
    assert tiled.pixel_values.shape[0] > 1 and tiled.num_tokens > 5
    out = pipe.generate(PROMPT, images=[img], max_new_tokens=4)  # placeholders and features agree
    assert out.prompt_token_ids.count(IMAGE_TOKEN_ID) == 5 and len(out.token_ids) == 4


def test_training_uses_the_shared_override(llava15, llava_next):
    from llavakit.train.build import build_model
    from llavakit.train.config import TrainConfig

    _, d, _, _ = llava15
    cpu = torch.device("cpu")
    for aspect, mode in (("square", "crop"), ("pad", "pad"), (None, "crop")):
        cfg = TrainConfig(stage="finetune", model=str(d), data_path="x.json", image_aspect_ratio=aspect)
        assert build_model(cfg, cpu)[1].cfg.image.mode == mode
    with pytest.raises(ConfigError, match="'anyres' needs a LLaVA-NeXT"):
        build_model(TrainConfig(stage="finetune", model=str(d), data_path="x.json", image_aspect_ratio="anyres"), cpu)
    with pytest.raises(ConfigError, match="cannot be trained.*anyres"):
        build_model(TrainConfig(stage="finetune", model=str(llava_next), data_path="x.json",
                                image_aspect_ratio="pad"), cpu)


def test_dummy_presets_take_the_override(llava15):
    _, d, _, _ = llava15  # its tokenizer fits the preset's 32064-token vocabulary
    pipe = _load("bench-small", load_format="dummy", tokenizer=d, image_aspect_ratio="crop")
    assert pipe.config.image.mode == "crop"
    with pytest.raises(ConfigError, match="'anyres' needs a LLaVA-NeXT"):
        _load("bench-small", load_format="dummy", tokenizer=d, image_aspect_ratio="anyres")


# ---- CLI ----

@pytest.fixture
def recorded(monkeypatch):
    """torch.set_num_threads and llavakit.load replaced by recorders (nothing global changes, nothing loads)."""
    events: list[tuple] = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: events.append(("threads", n)))

    def fake_load(model, **kw):
        events.append(("load", model, kw))
        return "pipe"

    monkeypatch.setattr("llavakit.pipeline.load", fake_load)
    return events


COMMANDS = {"chat": [], "generate": ["--prompt", "hi"], "ground": ["--image", "x.png", "--query", "where?"],
            "predict": ["--questions", "q.jsonl", "--answers", "a.jsonl"], "serve": []}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_loading_command_passes_the_flags_to_load(command, recorded):
    args = build_parser().parse_args([command, "--model", "m", *COMMANDS[command], "--image-aspect-ratio", "pad",
                                      "--threads", "3"])
    assert common.load_pipeline(args) == "pipe"
    assert recorded[0] == ("threads", 3)  # before loading
    assert recorded[1][0] == "load" and recorded[1][2]["image_aspect_ratio"] == "pad"
    recorded.clear()
    common.load_pipeline(build_parser().parse_args([command, "--model", "m", *COMMANDS[command]]))
    assert recorded[0] == ("threads", common.default_threads()) and recorded[1][2]["image_aspect_ratio"] is None


def test_bench_passes_the_flags_to_load(recorded, monkeypatch):
    def load_then_stop(model, **kw):
        recorded.append(("load", model, kw))
        raise ValueError("stop here: nothing to benchmark")

    monkeypatch.setattr("llavakit.pipeline.load", load_then_stop)
    assert main(["bench", "--model", "bench-small", "--load-format", "dummy", "--image-aspect-ratio", "crop",
                 "--threads", "2"]) == 1
    assert recorded[0] == ("threads", 2)
    assert recorded[1][2]["image_aspect_ratio"] == "crop" and recorded[1][2]["load_format"] == "dummy"


def test_prompt_flag_reaches_the_processor(llava15, llava_next, recorded, capsys, tmp_path):
    img = tmp_path / "wide.png"
    noise_image(*WIDE, seed=11).save(img)
    assert main(["prompt", "--model", str(llava_next), "--image", str(img), "--threads", "1", "hi"]) == 0
    assert ", 5 image placeholders" not in capsys.readouterr().out  # tiles by default
    assert main(["prompt", "--model", str(llava_next), "--image", str(img), "--image-aspect-ratio", "pad", "hi"]) == 0
    assert ", 5 image placeholders" in capsys.readouterr().out  # one view + the newline
    assert recorded == [("threads", 1), ("threads", common.default_threads())]
    _, d, _, _ = llava15
    assert main(["prompt", "--model", str(d), "--image-aspect-ratio", "anyres", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llavakit: error: image_aspect_ratio 'anyres' needs a LLaVA-NeXT")


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--threads", "two"], ["--threads", "-1"],
                                  ["--image-aspect-ratio", "stretch"]])
def test_bad_flag_values_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "hi", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage:" in err and argv[0] in err


def test_default_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert common.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a count: the CPU rule decides
    for cpus, expected in ((1, 1), (2, 1), (8, 4), (128, common.MAX_DEFAULT_THREADS)):
        monkeypatch.setattr("os.sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert common.default_threads() == expected
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert common.default_threads() == common.MAX_DEFAULT_THREADS  # 128 CPUs, capped


def test_threads_type_is_positive():
    parser = argparse.ArgumentParser()
    common.add_threads_flag(parser)
    assert parser.parse_args(["--threads", "4"]).threads == 4
    for bad in ("0", "-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
            common.number(int, 1)(bad)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"llavakit {llavakit.__version__}\n"


def test_pyproject_version_is_llavakit_version():
    from pathlib import Path

    setuptools_config = pytest.importorskip("setuptools.config.pyprojecttoml")
    from setuptools.dist import Distribution

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    dist = setuptools_config.apply_configuration(Distribution(), pyproject)
    assert dist.metadata.version == llavakit.__version__
