"""Training options: files, flags in both spellings, the original's aliases, clear errors."""

from __future__ import annotations

import json

import pytest

from llavakit.cli import build_parser
from llavakit.train.config import make_config


def test_yaml_file_with_flag_overrides(tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_text("model_name_or_path: m\ndata_path: d.json\nversion: v1\nlearning_rate: 2.0e-5\nbf16: true\n"
                 "per_device_train_batch_size: 16\n")
    cfg = make_config(f, learning_rate=1e-4)
    assert (cfg.model, cfg.conv_mode, cfg.learning_rate, cfg.bf16) == ("m", "vicuna_v1", 1e-4, True)
    assert cfg.per_device_train_batch_size == 16


def test_json_file_like_paddlemix(tmp_path):
    f = tmp_path / "sft_argument.json"
    f.write_text(json.dumps({"model": "m", "data-path": "d.json", "num_train_epochs": 3, "stage": "lora"}))
    cfg = make_config(f)
    assert cfg.num_train_epochs == 3 and cfg.stage == "lora"


def test_cli_flags_in_both_spellings():
    parser = build_parser()
    args = parser.parse_args(["train", "--model", "m", "--data_path", "d.json", "--learning-rate", "3e-4",
                              "--per_device_train_batch_size", "8", "--bf16", "--gradient-checkpointing", "false"])
    assert (args.data_path, args.learning_rate, args.per_device_train_batch_size) == ("d.json", 3e-4, 8)
    assert args.bf16 is True and args.gradient_checkpointing is False


@pytest.mark.parametrize("options, message", [
    ({"learning_rate": -1}, "learning_rate must be > 0"),
    ({"stage": "rlhf"}, "stage must be one of"),
    ({"lr_scheduler_type": "exotic"}, "lr_scheduler_type must be one of"),
    ({"model": ""}, "no model given"),
    ({"frobnicate": 1}, "unknown training option 'frobnicate'"),
    ({"save_dtype": "int8"}, "save_dtype must be one of \\('float32', 'float16', 'bfloat16'\\), got 'int8'"),
])
def test_bad_options_say_what_is_wrong(options, message):
    with pytest.raises(ValueError, match=message):
        make_config(**{"model": "m", "data_path": "d.json", **options})


def test_save_dtype_flag(capsys):
    parser = build_parser()
    assert parser.parse_args(["train", "--save-dtype", "bfloat16"]).save_dtype == "bfloat16"
    assert parser.parse_args(["train", "--save_dtype", "float16"]).save_dtype == "float16"
    assert parser.parse_args(["train"]).save_dtype is None  # the checkpoint's own dtype
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--save-dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_bad_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml is not valid YAML"):
        make_config(f)
    with pytest.raises(ValueError, match="does not exist"):
        make_config(tmp_path / "none.yaml")


def test_freeze_mm_mlp_adapter_keeps_the_projector_out_of_training():
    from llavakit.train.build import trainable_prefixes

    base = dict(model="m", data_path="d.json", output_dir="o", stage="finetune")
    assert "projector." in trainable_prefixes(make_config(**base))
    frozen = trainable_prefixes(make_config(**base, freeze_mm_mlp_adapter=True))
    assert "projector." not in frozen and "language_model." in frozen
