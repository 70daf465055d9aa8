"""The demo model's parts: its own small tokenizer, its config, a randomly initialised llava-hf
checkpoint to train from, and the synthetic training set on disk."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from llavakit.config import ImageConfig, LlavaConfig, TextConfig, VisionConfig
from llavakit.demo.questions import PHRASES, caption, conversation
from llavakit.demo.scenes import COLORS, NUMBER_WORDS, SHAPES, random_scene
from llavakit.models.llava import LlavaForConditionalGeneration
from llavakit.processing.conversation import TEMPLATES
from llavakit.weights.save import save_llava_hf

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# The demo speaks the mistral_instruct format: no system prompt, so the image and the question are nearly
# all the model reads (with a 40-token system prompt in front, training learnt only the language prior).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                 "[/INST]{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
FEATURE_LAYERS = -1  # the tower is trained from scratch: its last layer is the feature layer


def _corpus(rng: random.Random) -> list[str]:
    """Text the tokenizer must cover: every phrasing, answer word and template string."""
    texts = [t.system for t in TEMPLATES.values()] + ["USER: ASSISTANT: ###Human: Assistant:"]
    texts += [p for phrases in PHRASES.values() for p in phrases]
    words = list(COLORS) + list(SHAPES) + [f"{k}s" for k in SHAPES] + NUMBER_WORDS
    texts += [" ".join(words), " ".join(w.capitalize() for w in words)]
    for _ in range(3000):
        scene = random_scene(rng)
        texts.append(caption(scene))
        texts += [f"{qa.question} {qa.answer}" for qa in conversation(rng, scene, 3)]
    return texts


def build_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """A byte-pair tokenizer in the LLaMA style (▁ for spaces, <s> first, single digits) for the demo."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
                                                 pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    alphabet = [chr(c) for c in range(32, 127)] + ["\n"]  # whatever a user types in ASCII has a token
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_corpus(random.Random(seed)), trainer)
    tok.add_tokens(["[INST]", "[/INST]"])  # the chat format's markers, one token each
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", add_bos_token=True, model_max_length=1024)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def demo_config(tokenizer, feature_layers=None, image_size: int = 160, patch_size: int = 20) -> LlavaConfig:
    """~6M parameters: a 4-layer CLIP-style tower on 160-pixel images (64 patches of 20), a 4-layer decoder."""
    vision = VisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                          image_size=image_size, patch_size=patch_size)
    text = TextConfig(vocab_size=math.ceil(len(tokenizer) / 64) * 64, hidden_size=256, intermediate_size=704,
                      num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return LlavaConfig(vision=vision, text=text, image=ImageConfig(mode="pad", size=image_size, crop_size=image_size),
                       model_type="llava", image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=FEATURE_LAYERS if feature_layers is None else feature_layers)


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """GPT-style initialisation for training from scratch."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(model.vision_tower.embeddings.class_embedding, std=std)
    emb = model.vision_tower.embeddings.position_embedding.weight
    with torch.no_grad():  # 2-D sin-cos positions: attention can use where a patch is from the first step
        emb[1:] = 0.5 * sincos_positions(math.isqrt(emb.shape[0] - 1), emb.shape[1])
        emb[0] = 0


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) fixed 2-D sine-cosine position codes, half the channels for rows, half for columns."""
    quarter = dim // 4
    freqs = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                            indexing="ij")
    parts = [f(c.reshape(-1, 1) * freqs) for c in (ys, xs) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)


def write_initial_checkpoint(out: Path, seed: int = 0, feature_layers=None, vision_steps: int = 0,
                             log=print) -> Path:
    """The demo model in llava-hf layout, with its tokenizer, that the language stages train from:
    randomly initialised, then (vision_steps > 0) its tower and projector trained on dense scene targets."""
    tokenizer = build_tokenizer(seed=seed)
    cfg = demo_config(tokenizer, feature_layers)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    init_weights(model)
    if vision_steps > 0:
        from llavakit.demo.vision import pretrain_vision

        pretrain_vision(model, steps=vision_steps, seed=seed, log=log)
    # The tower's final layer norm is never run (features come from the last layer's output), but
    # transformers expects it in the file.
    d = cfg.vision.hidden_size
    extra = {"vision_tower.vision_model.post_layernorm.weight": torch.ones(d),
             "vision_tower.vision_model.post_layernorm.bias": torch.zeros(d)}
    return save_llava_hf(model, out, tokenizer=tokenizer, extra_tensors=extra)


def write_dataset(out: Path, n: int, seed: int, turns: tuple[int, int] = (2, 5), kinds=None, weights=None,
                  max_shapes: int = 4, any_canvas: bool = False, hard_negatives: float = 0.0,
                  kind_only: float = 0.0) -> Path:
    """n scenes as PNG files and a LLaVA-format JSON of conversations about them (`hard_negatives`,
    `kind_only`: see questions.ask)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in tqdm(range(n), desc="scenes", unit="scene", disable=None):
        scene = random_scene(rng, max_shapes, any_canvas)
        name = f"{seed}_{i}.png"
        scene.render().save(out / name)
        qas = conversation(rng, scene, rng.randint(*turns), **({"kinds": kinds, "weights": weights} if kinds else {}),
                           hard_negatives=hard_negatives, kind_only=kind_only)
        turns_json = []
        for k, qa in enumerate(qas):
            turns_json.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + qa.question})
            turns_json.append({"from": "gpt", "value": qa.answer})
        rows.append({"id": f"{seed}_{i}", "image": name, "conversations": turns_json})
    path = out / "data.json"
    path.write_text(json.dumps(rows))
    return path
