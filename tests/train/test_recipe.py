"""The training recipe on tiny checkpoints: it learns, trains exactly what each stage should, resumes
bit-exactly, survives a crash mid-save, stops on bad data and diverging losses, and LoRA merges."""

from __future__ import annotations

import json
import math

import pytest
import torch
from checkpoints import build_hf_model, processor_config, save_tokenizer, write_clip_tower, write_hf_checkpoint
from conftest import noise_image

import llavakit
from llavakit.cli import main
from llavakit.train import checkpoint as ckpt
from llavakit.train.config import make_config
from llavakit.train.recipe import TrainingError, setup, split_by_length, train

COLORS = ["red", "blue", "green", "black", "white", "gray", "pink", "brown"]


def make_dataset(root, n=16, missing=()):
    rows = []
    for i in range(n):
        if i not in missing:
            noise_image(30 + i, 20 + i, seed=i).save(root / f"img{i}.png")
        rows.append({"id": f"s{i}", "image": f"img{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\nWhat color is it?"},
                                       {"from": "gpt", "value": f"It is {COLORS[i % 8]}."}]})
    path = root / "data.json"
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    d = write_hf_checkpoint(build_hf_model("llava", seed=3), root / "base", "hub",
                            processor=processor_config("LlavaImageProcessor", do_pad=True))
    return d, make_dataset(root)


def config(base, out, **kw):
    d, data = base
    options = dict(model=str(d), data_path=str(data), image_folder=str(data.parent), output_dir=str(out),
                   per_device_train_batch_size=4, learning_rate=3e-3, max_steps=8, save_steps=100, seed=0)
    options.update(kw)
    return make_config(**options)


def test_overfits_16_samples(base, tmp_path):
    history = train(config(base, tmp_path / "o", max_steps=60))
    first, last = history[0].loss, history[-1].loss
    assert first > 9.0  # ~ln(32064) at random init
    assert last < 2.5, f"loss {first:.2f} -> {last:.2f}"  # the answers are learned (threshold: 2.5 nats/token)
    logged = [json.loads(line) for line in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 61))
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(logged[0])
    assert (tmp_path / "o" / "loss_curve.png").stat().st_size > 5000
    trained = llavakit.load(tmp_path / "o" / "final", dtype="float32", device="cpu")
    assert trained.generate("What color is it?", images=[str(base[1].parent / "img3.png")],
                            max_new_tokens=6).text.startswith("It is")


def _trainable_modules(run):
    counts = {}
    for name, p in run.model.named_parameters():
        if p.requires_grad:
            key = "lora" if ".lora_" in name else name.split(".")[0]
            counts[key] = counts.get(key, 0) + p.numel()
    return counts


@pytest.mark.parametrize("stage, extra, expected", [
    ("finetune", {}, {"projector", "language_model", "lm_head"}),
    ("finetune", {"unfreeze_vision": True}, {"projector", "language_model", "lm_head", "vision_tower"}),
    ("lora", {"lora_r": 4, "lora_alpha": 8}, {"projector", "lora"}),
])
def test_each_stage_trains_exactly_its_parts(base, tmp_path, stage, extra, expected):
    run = setup(config(base, tmp_path, stage=stage, **extra))
    counts = _trainable_modules(run)
    assert set(counts) == expected
    model = run.model
    assert counts["projector"] == sum(p.numel() for p in model.projector.parameters())
    if stage == "lora":  # 2 adapters x 7 Linear layers x 2 decoder layers, rank 4
        cfg = model.cfg.text
        per_layer = 4 * (2 * cfg.hidden_size + 2 * cfg.hidden_size + 2 * cfg.hidden_size + 2 * cfg.hidden_size
                         + 3 * (cfg.hidden_size + cfg.intermediate_size))
        assert counts["lora"] == per_layer * cfg.num_hidden_layers
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen > 0 or stage == "finetune"


def test_resume_gives_identical_losses(base, tmp_path):
    straight = [s.loss for s in train(config(base, tmp_path / "a", save_steps=4))]

    def crash(info):
        if info.step == 4:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        train(config(base, tmp_path / "b", save_steps=4), callbacks=[crash])
    assert (tmp_path / "b" / "checkpoint-4" / ckpt.STATE_FILE).is_file()
    resumed = train(config(base, tmp_path / "b", save_steps=4, resume_from_checkpoint="latest"))
    assert [s.step for s in resumed] == [5, 6, 7, 8]
    assert [s.loss for s in resumed] == straight[4:]  # bit-identical in fp32


def test_lora_resume_is_identical_too(base, tmp_path):
    kw = dict(stage="lora", lora_r=4, lora_alpha=8, lora_dropout=0.1, save_steps=3, max_steps=6)
    straight = [s.loss for s in train(config(base, tmp_path / "a", **kw))]
    with pytest.raises(KeyboardInterrupt):
        train(config(base, tmp_path / "b", **kw), callbacks=[lambda i: i.step == 3 and (_ for _ in ()).throw(
            KeyboardInterrupt())])
    resumed = train(config(base, tmp_path / "b", resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"), **kw))
    assert [s.loss for s in resumed] == straight[3:]


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(base, tmp_path, monkeypatch):
    real = ckpt.write_model
    calls = []

    def flaky(directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 2:
            (directory / "model.safetensors").write_bytes(b"half a file")
            raise OSError("disk full")
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(ckpt, "write_model", flaky)
    with pytest.raises(OSError, match="disk full"):
        train(config(base, tmp_path, save_steps=2, max_steps=6))
    assert [p.name for p in ckpt.sorted_checkpoints(tmp_path)] == ["checkpoint-2"]
    llavakit.load(tmp_path / "checkpoint-2", dtype="float32", device="cpu")  # whole and loadable


def test_save_total_limit_keeps_the_newest(base, tmp_path):
    train(config(base, tmp_path, save_steps=2, max_steps=8, save_total_limit=2))
    assert [p.name for p in ckpt.sorted_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]


def test_bad_rows_are_skipped_within_the_limit_and_stop_above_it(tmp_path, base):
    data = make_dataset(tmp_path, n=16, missing=(5,))
    rows = json.loads(data.read_text())
    rows.append({"id": "broken", "conversations": "not a list"})
    data.write_text(json.dumps(rows))
    with pytest.raises(TrainingError,
                       match=r"rows name image files that do not exist.*--max-bad-fraction\) 0.01.*img5.png"):
        train(config(base, tmp_path / "strict", data_path=str(data), image_folder=str(tmp_path), max_steps=6))
    history = train(config(base, tmp_path / "lenient", data_path=str(data), image_folder=str(tmp_path),
                           max_steps=6, max_bad_fraction=0.2))
    assert history[-1].skipped == 2 and all(math.isfinite(s.loss) for s in history)


def test_nonfinite_loss_stops_training(base, tmp_path):
    with pytest.raises(TrainingError, match="not finite for 3 steps in a row"):
        train(config(base, tmp_path, learning_rate=1e30, warmup_ratio=0.0, max_steps=30))


def test_lora_merge_matches_unmerged_and_loads_in_transformers(base, tmp_path):
    from transformers import LlavaForConditionalGeneration

    train(config(base, tmp_path / "lora", stage="lora", lora_r=4, lora_alpha=8, max_steps=4, learning_rate=1e-2))
    adapter = tmp_path / "lora" / "final"
    assert main(["merge-lora", "--base", str(base[0]), "--lora", str(adapter), "--out", str(tmp_path / "merged"),
                 "--dtype", "float32"]) == 0
    from safetensors.torch import load_file

    from llavakit.train.lora import NON_LORA_FILE, load_adapter

    unmerged = llavakit.load(base[0], dtype="float32", device="cpu")
    load_adapter(unmerged.model, adapter)  # with the projector, saved under llava-hf names
    assert sorted(load_file(adapter / NON_LORA_FILE)) == [f"multi_modal_projector.linear_{i}.{p}"
                                                          for i in (1, 2) for p in ("bias", "weight")]
    merged = llavakit.load(tmp_path / "merged", dtype="float32", device="cpu")
    image = noise_image(33, 21, seed=1)
    ids = merged.tokenize("What color is it?", images=[image])
    pix = merged.processor.prepare_images([image])[0]

    def logits(m):
        with torch.no_grad():
            f = m.encode_images([pix.pixel_values], [pix.size])
            return m.compute_logits(m(m.embed_inputs(torch.tensor([ids]), f), torch.arange(len(ids))[None]))[0, -1]

    base_logits = logits(llavakit.load(base[0], dtype="float32", device="cpu").model)
    torch.testing.assert_close(logits(merged.model), logits(unmerged.model), atol=1e-5, rtol=1e-5)
    assert (logits(merged.model) - base_logits).abs().max() > 1e-3  # the adapter did change the model
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values=pix.pixel_values).logits[0, -1]
    torch.testing.assert_close(logits(merged.model), ref, atol=1e-4, rtol=1e-4)


def test_pretrain_builds_a_llava_from_a_text_llm_and_clip(tmp_path):
    import transformers

    hf = build_hf_model("llava", seed=4)
    text = transformers.LlamaConfig(**{k: v for k, v in hf.config.text_config.to_dict().items()
                                       if k not in ("model_type", "architectures")}
                                    | {"vocab_size": 32000, "pad_token_id": None})
    llm = transformers.LlamaForCausalLM(text)
    llm.save_pretrained(tmp_path / "llm")
    save_tokenizer(tmp_path / "llm", extra_tokens=())
    write_clip_tower(hf, tmp_path / "clip")
    data = make_dataset(tmp_path, n=8)
    history = train(make_config(stage="pretrain", model=str(tmp_path / "llm"), vision_tower=str(tmp_path / "clip"),
                                data_path=str(data), image_folder=str(tmp_path), output_dir=str(tmp_path / "out"),
                                per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3))
    assert len(history) == 4
    out = tmp_path / "out" / "final"
    pipe = llavakit.load(out, dtype="float32", device="cpu")
    assert pipe.config.text.vocab_size == 32064 and pipe.config.image_token_id == 32000
    assert pipe.tokenizer.convert_tokens_to_ids("<image>") == 32000
    torch.testing.assert_close(pipe.model.language_model.embed_tokens.weight[:32000],
                               llm.model.embed_tokens.weight)  # the LLM itself did not train
    hf_loaded = transformers.LlavaForConditionalGeneration.from_pretrained(out)
    assert hf_loaded.config.image_token_id == 32000


def test_gradient_checkpointing_gives_the_same_losses(base, tmp_path):
    plain = [s.loss for s in train(config(base, tmp_path / "a", max_steps=3))]
    checkpointed = [s.loss for s in train(config(base, tmp_path / "b", max_steps=3, gradient_checkpointing=True))]
    assert max(abs(a - b) for a, b in zip(plain, checkpointed, strict=True)) < 1e-5


def test_micro_batches_by_length_give_the_same_losses_and_weights(base, tmp_path):
    # Rows of three lengths: the split changes how much is padded, never what is learnt.
    d, data = base
    rows = json.loads(data.read_text())
    for i, row in enumerate(rows):
        row["conversations"][1]["value"] += " It really is." * (i % 3)
    (tmp_path / "data.json").write_text(json.dumps(rows))
    kw = dict(data_path=str(tmp_path / "data.json"), max_steps=3, per_device_train_batch_size=8)
    whole = train(config(base, tmp_path / "a", **kw))
    split = train(config(base, tmp_path / "b", micro_batches_by_length=3, **kw))
    assert [s.tokens for s in whole] == [s.tokens for s in split]
    assert max(abs(a.loss - b.loss) for a, b in zip(whole, split, strict=True)) < 1e-5
    a = llavakit.load(tmp_path / "a" / "final", dtype="float32", device="cpu").model.state_dict()
    b = llavakit.load(tmp_path / "b" / "final", dtype="float32", device="cpu").model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_split_by_length_sorts_and_keeps_every_row():
    lengths = {10: 5, 11: 1, 12: 9, 13: 1, 14: 3}
    assert split_by_length([10, 11, 12, 13, 14], lengths.get, 2) == [[11, 13], [14, 10, 12]]
    assert split_by_length([10, 11], lengths.get, 3) == [[11], [], [10]]
    with pytest.raises(ValueError, match="micro_batches_by_length must be between 1 and"):
        make_config(model="m", data_path="d", per_device_train_batch_size=2, micro_batches_by_length=3)


def test_bf16_autocast_trains(base, tmp_path):
    history = train(config(base, tmp_path, max_steps=6, bf16=True))
    assert all(math.isfinite(s.loss) for s in history) and history[-1].loss < history[0].loss
