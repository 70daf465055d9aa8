"""The original LLaVA's and PaddleMIX's training options: translated, and their command lines and configs run
(LLaVAR's seed scripts under torchrun with 2 gloo processes, PaddleMIX's lora_sft_argument.json); evaluation
during training, trainer_state.json, QLoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from checkpoints import build_hf_model, processor_config, save_tokenizer, write_clip_tower, write_hf_checkpoint
from test_recipe import make_dataset

import llavakit
from llavakit.cli import build_parser, main
from llavakit.layers.linear import linear
from llavakit.quant.config import QuantConfig
from llavakit.quant.linear import QuantLinear
from llavakit.train.compat import ORIGINAL_DEFAULTS, translate
from llavakit.train.config import build_config, option_fields
from llavakit.train.lora import QLoRALinear
from llavakit.train.metrics import read_trainer_state
from llavakit.train.recipe import train

FIELDS = option_fields()


def test_the_original_flags_imply_the_stage():
    assert translate({"tune_mm_mlp_adapter": "True"}, FIELDS)[0]["stage"] == "pretrain"
    assert translate({"lora_enable": True}, FIELDS)[0]["stage"] == "lora"
    assert "stage" not in translate({"lora_enable": "False"}, FIELDS)[0]
    with pytest.raises(ValueError, match="cannot both be true"):
        translate({"tune_mm_mlp_adapter": True, "lora_enable": True}, FIELDS)


def test_deepspeed_and_fsdp_become_fsdp_settings(tmp_path):
    out, notes = translate({"deepspeed": "./scripts/zero2.json"}, FIELDS)
    assert (out["distributed"], out["fsdp_sharding"], out["cpu_offload"]) == ("fsdp", "shard_grad_op", False)
    assert notes == ["--deepspeed ./scripts/zero2.json: ZeRO-2 runs as torch FSDP shard_grad_op (DeepSpeed is not "
                     "used)"]
    config = tmp_path / "my_ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}))
    out, _ = translate({"deepspeed": str(config)}, FIELDS)
    assert (out["fsdp_sharding"], out["cpu_offload"]) == ("full_shard", True)
    out, notes = translate({"fsdp": "full_shard auto_wrap", "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"},
                           FIELDS)
    assert (out["distributed"], out["fsdp_sharding"], notes) == ("fsdp", "full_shard", [])
    with pytest.raises(ValueError, match="ZeRO-1"):
        config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
        translate({"deepspeed": str(config)}, FIELDS)


def test_unknown_flags_get_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--model_name_or_path", "m", "--frobnicate_everything", "x"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown options: --frobnicate_everything" in err[0], err


def test_both_spellings_and_the_original_defaults():
    parser = build_parser()
    for flag in ("--eval_steps", "--eval-steps"):
        assert parser.parse_args(["train", flag, "3"]).eval_steps == 3
    args = parser.parse_args(["train", "--report_to", "wandb", "tensorboard", "--mm_use_im_start_end",
                              "--fsdp", "full_shard auto_wrap", "--lazy-preprocess", "True"])
    assert args.report_to == ["wandb", "tensorboard"] and args.mm_use_im_start_end is True
    assert args.compat_fsdp == ["full_shard auto_wrap"] and args.compat_lazy_preprocess is True
    cfg, _ = build_config(None, {"model": "m", "data_path": "d"}, ORIGINAL_DEFAULTS)
    # ModelArguments / TrainingArguments defaults of the original train.py, and transformers'
    assert (cfg.mm_vision_select_layer, cfg.mm_projector_type, cfg.lora_r, cfg.lora_alpha) == (-1, "linear", 64, 16)
    assert (cfg.model_max_length, cfg.learning_rate, cfg.lr_scheduler_type) == (512, 5e-5, "linear")


PADDLE_LORA = {  # PaddleMIX paddlemix/config/llava/v1_5/lora_sft_argument.json, paths and sizes swapped
    "model_name_or_path": "MODEL",
    "dataset": {
        "train": [{"name": "chatml_dataset", "data_files": "train.json", "chat_template": "chat_template.json"}],
        "eval": [{"name": "chatml_dataset", "data_files": "val.json", "chat_template": "chat_template.json"}]},
    "mixtoken": False, "output_dir": "OUT", "overwrite_output_dir": True, "recompute": True,
    "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "per_device_eval_batch_size": 1,
    "eval_accumulation_steps": 16, "num_train_epochs": 1, "learning_rate": 2e-04, "mm_projector_lr": 2e-5,
    "weight_decay": 0.0, "warmup_ratio": 0.03, "lr_scheduler_type": "cosine", "logging_steps": 1, "save_steps": 100,
    "evaluation_strategy": "epoch", "save_strategy": "epoch", "max_length": 2048, "bf16": False,
    "fp16_opt_level": "O1", "do_train": True, "do_eval": False, "disable_tqdm": True, "load_best_model_at_end": False,
    "eval_with_do_generation": False, "skip_memory_metrics": False, "benchmark": False, "save_total_limit": 1,
    "lora": True, "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
    "lora_target_modules": ["llama.layer.*q_proj.*", "llama.layer.*k_proj.*", "llama.layer.*v_proj.*",
                            "llama.layer.*gate_proj.*", "llama.layer.*up_proj.*", "llama.layer.*down_proj.*",
                            "llama.layer.*o_proj.*"],
}


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("compat")
    d = write_hf_checkpoint(build_hf_model("llava", seed=3), root / "base", "hub",
                            processor=processor_config("LlavaImageProcessor", do_pad=True))
    return d, make_dataset(root, n=8)


def test_a_paddlemix_lora_config_trains_the_layers_it_names(llava, tmp_path, capsys):
    base, data = llava
    config = dict(PADDLE_LORA, model_name_or_path=str(base), output_dir=str(tmp_path / "out"))
    config["dataset"]["train"][0]["data_files"] = str(data)
    config["dataset"]["eval"][0]["data_files"] = str(data)
    path = tmp_path / "lora_sft_argument.json"
    path.write_text(json.dumps(config))
    assert main(["train", str(path), "--image-folder", str(data.parent), "--max-steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "mixtoken" in err and "chat_template" in err  # Paddle-only keys: a note each, not an error
    adapter = json.loads((tmp_path / "out" / "final" / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
    assert adapter["target_modules"].endswith("(down_proj|gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)")
    state = read_trainer_state(tmp_path / "out")
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]
    assert not any("eval_loss" in e for e in state["log_history"])  # do_eval false


def _run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_llavar_seed_scripts_run_under_torchrun(tmp_path):
    """Seed 002's pretrain and finetune command lines, paths and sizes swapped (and --report_to none: wandb is not
    installed in CI), with only the script path replaced by -m llavakit.train."""
    import transformers

    hf = build_hf_model("llava", seed=4)
    text = transformers.LlamaConfig(**{k: v for k, v in hf.config.text_config.to_dict().items()
                                       if k not in ("model_type", "architectures")}
                                    | {"vocab_size": 32000, "pad_token_id": None})
    transformers.LlamaForCausalLM(text).save_pretrained(tmp_path / "vicuna")
    save_tokenizer(tmp_path / "vicuna", extra_tokens=())
    write_clip_tower(hf, tmp_path / "clip")
    make_dataset(tmp_path, n=8)
    # --standalone instead of the scripts' --master_port=25001: a free port on a shared CI machine
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
                "-m", "llavakit.train"]
    _run([*torchrun, "--model_name_or_path", "vicuna", "--data_path", "data.json", "--image_folder", ".",
          "--vision_tower", "clip", "--tune_mm_mlp_adapter", "True", "--mm_vision_select_layer", "-2",
          "--mm_use_im_start_end", "--bf16", "True", "--output_dir", "pre", "--num_train_epochs", "1",
          "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--gradient_accumulation_steps",
          "2", "--evaluation_strategy", "no", "--save_strategy", "steps", "--save_steps", "4000",
          "--save_total_limit", "1", "--learning_rate", "2e-3", "--weight_decay", "0.", "--warmup_ratio", "0.03",
          "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--tf32", "True", "--model_max_length", "1024",
          "--gradient_checkpointing", "True", "--lazy_preprocess", "True", "--image_aspect_ratio", "pad",
          "--report_to", "none"], tmp_path)
    adapter = torch.load(tmp_path / "pre" / "mm_projector.bin", weights_only=True)
    # LLaVAR's projector is the original's default, linear; <im_start>/<im_end> train with it
    assert set(adapter) == {"model.mm_projector.weight", "model.mm_projector.bias", "model.embed_tokens.weight"}
    result = _run([*torchrun, "--model_name_or_path", "vicuna", "--data_path", "data.json", "--image_folder", ".",
                   "--vision_tower", "clip", "--pretrain_mm_mlp_adapter", "pre/mm_projector.bin",
                   "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "True", "--bf16", "True",
                   "--output_dir", "ft", "--num_train_epochs", "3", "--max_steps", "2",
                   "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
                   "--gradient_accumulation_steps", "1", "--evaluation_strategy", "no", "--save_strategy", "steps",
                   "--save_steps", "8000", "--save_total_limit", "1", "--learning_rate", "2e-5", "--weight_decay",
                   "0.", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine", "--logging_steps", "1",
                   "--tf32", "True", "--fsdp", "full_shard auto_wrap", "--fsdp_transformer_layer_cls_to_wrap",
                   "LlamaDecoderLayer", "--model_max_length", "2048", "--gradient_checkpointing", "True",
                   "--lazy_preprocess", "True", "--image_aspect_ratio", "pad", "--report_to", "none"], tmp_path)
    assert "error" not in result.stderr.lower()
    pipe = llavakit.load(tmp_path / "ft" / "final", dtype="float32", device="cpu")
    assert (pipe.config.projector_type, pipe.config.use_im_start_end, pipe.config.vision_feature_layer) == \
        ("linear", True, -2)
    # the finetune started from the pretrained projector (2 steps at 2e-5 move it by ~1e-4 at most)
    torch.testing.assert_close(pipe.model.projector[0].weight, adapter["model.mm_projector.weight"].float(),
                               atol=1e-3, rtol=0)
    start, end = pipe.tokenizer.convert_tokens_to_ids(["<im_start>", "<im_end>"])
    assert start != end and pipe.tokenizer.unk_token_id not in (start, end)
    state = read_trainer_state(tmp_path / "ft" / "final")
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2]


def test_evaluation_during_training_and_the_best_model(llava, tmp_path):
    base, data = llava
    cfg, _ = build_config(None, dict(model=str(base), data_path=str(data), image_folder=str(data.parent),
                                     output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=4,
                                     learning_rate=3e-3, eval_data_path=str(data), evaluation_strategy="steps",
                                     eval_steps=2, per_device_eval_batch_size=3, load_best_model_at_end=True,
                                     save_total_limit=1, report_to=["none"]))
    train(cfg)
    out = tmp_path / "o"
    state = read_trainer_state(out)
    evals = [e for e in state["log_history"] if "eval_loss" in e]
    assert [e["step"] for e in evals] == [2, 4] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert state["best_model_checkpoint"] == str(out / "checkpoint-4")
    assert state["best_metric"] == evals[1]["eval_loss"]
    assert "train_loss" in state["log_history"][-1]
    final, best = out / "final" / "model.safetensors", out / "checkpoint-4" / "model.safetensors"
    assert final.read_bytes() == best.read_bytes()
    assert (out / "loss_curve.png").stat().st_size > 5000


def test_qlora_learns_and_merges_into_base_plus_adapter(llava, tmp_path):
    base, data = llava
    cfg, _ = build_config(None, dict(model=str(base), data_path=str(data), image_folder=str(data.parent),
                                     output_dir=str(tmp_path / "q"), per_device_train_batch_size=4, max_steps=8,
                                     learning_rate=3e-3, lora_r=4, lora_alpha=8, lora_dropout=0.0, seed=0,
                                     bits=8, lora_enable=True, report_to=["none"]))
    assert cfg.quantization == "w8a16" and cfg.stage == "lora"
    history = train(cfg)
    assert history[-1].loss < history[0].loss - 0.5, [s.loss for s in history]
    base_layer = QuantLinear.from_linear(linear(64, 32, bias=False), QuantConfig("w8a16"))
    layer = QLoRALinear(base_layer, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
        x = torch.randn(3, 64)
        expected = x @ (base_layer.dequantized_weight() + layer.lora_B @ layer.lora_A * 2).T  # base + B A alpha/r
        torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(layer.merge()(x), expected, atol=1e-4, rtol=1e-4)
