"""LoRA as a transform on the one model class: wrap, merge, and save/load adapters in peft's file format.

Written here rather than taken from peft (STYLE 13) because LoRA has to compose with llavakit's other
transforms: tensor parallelism and quantization find layers by their `Linear.tp_style` tag, so a LoRA
layer stays a tagged `Linear`; and it keeps llavakit's parameter names (`...q_proj.weight`), where peft
wraps the model as `base_model.model.*`, which checkpointing, FSDP wrapping and the name maps would all
have to special-case. Merging into plain weights and saving in llava-hf layout is a few lines.

The adapter *file* format is peft's (`adapter_model.safetensors` keyed by llava-hf hub module names,
`adapter_config.json`), so adapters move freely between llavakit and peft + transformers. Beside it,
`non_lora_trainables.safetensors` (original LLaVA's name for them) holds what a LoRA run trains fully (the
projector, a NeXT image_newline) under llava-hf hub names too, which transformers users load into the base
model before wrapping it with peft.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from llavakit.datafiles import read_json
from llavakit.layers.linear import Linear
from llavakit.quant.linear import QuantLinear
from llavakit.weights.name_maps import LAYOUTS, LLAVA_HF, TRANSFORMERS_5, Rules, detect_layout, is_unused, map_name
from llavakit.weights.save import TO_LLAVA_HF

# Every Linear of the LLM, as LLaVA's LoRA recipe (the tower, projector and LM head are not adapted).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
NON_LORA_FILE = "non_lora_trainables.safetensors"
NON_LORA_PREFIXES = ("projector.", "image_newline")  # what a LoRA run trains besides the adapters
# Names read from NON_LORA_FILE: llava-hf (what save_adapter writes), transformers-5, or llavakit's own (which
# older adapter directories hold).
NON_LORA_NAMES: Rules = LLAVA_HF + TRANSFORMERS_5 + [("projector.", "projector.")]
PEFT_PREFIX = "base_model.model."
_PEFT_KEY = re.compile(r"^(.+)\.(lora_A|lora_B)\.weight$")


class LoRALinear(Linear):
    """A frozen Linear plus a trainable low-rank update: y = x W^T + b + dropout(x) A^T B^T * alpha / r.

    Adopts the base layer's `weight`/`bias` Parameters, so their names, `tp_style`, and any optimizer
    or checkpoint state keyed by them are unchanged; `lora_A` (r, in) and `lora_B` (out, r) are added.
    """

    def __init__(self, base: Linear, r: int, alpha: float, dropout: float):
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        with torch.device("meta"):  # the base's weight is adopted below; do not allocate a second one
            super().__init__(base.in_features, base.out_features, base.bias is not None, base.tp_style)
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's init; B = 0 makes the update start at 0
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        return out + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(out.dtype)

    def merge(self) -> Linear:
        """A plain Linear whose weight holds W + B A * scaling, summed in fp32 and cast to W's dtype."""
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling  # (out, in)
            merged = (self.weight.float() + delta).to(self.weight.dtype)
        with torch.device("meta"):
            plain = Linear(self.in_features, self.out_features, self.bias is not None, self.tp_style)
        plain.weight = nn.Parameter(merged, requires_grad=self.weight.requires_grad)
        plain.bias = self.bias
        return plain.train(self.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tp_style={self.tp_style}, r={self.r}, alpha={self.alpha}"


_REGEX_CHARS = set(".*+?[]()|^$\\")


class QLoRALinear(nn.Module):
    """QLoRA: a frozen quantized Linear (QuantLinear, llavakit.quant) plus a trainable low-rank update.

    The base stays a submodule (`q_proj.base.weight_packed`, ...; adapters save under peft's names as for a float
    base); its product is differentiable in x (the backward multiplies by the weight dequantized again), so
    gradients reach the adapters and everything below them. No bitsandbytes: int4/int8 round-to-nearest weights,
    on CPU and GPU alike.
    """

    def __init__(self, base: QuantLinear, r: int, alpha: float, dropout: float):
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.tp_style = base.in_features, base.out_features, base.tp_style
        if base.bias is not None:
            base.bias.requires_grad_(False)
        dtype = base.weight_scale.dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=base.weight_scale.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=base.weight_scale.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _FrozenQuantProduct.apply(x, self.base)
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        return out + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(out.dtype)

    def merge(self) -> Linear:
        """A float Linear: the dequantized base weight + B A * scaling, in the scale's dtype."""
        with torch.no_grad():
            w = self.base.dequantized_weight(torch.float32)
            merged = (w + (self.lora_B.float() @ self.lora_A.float()) * self.scaling).to(self.lora_A.dtype)
        with torch.device("meta"):
            plain = Linear(self.in_features, self.out_features, self.base.bias is not None, self.tp_style)
        plain.weight = nn.Parameter(merged, requires_grad=False)
        plain.bias = self.base.bias
        return plain.train(self.training)


class _FrozenQuantProduct(torch.autograd.Function):
    """x -> base(x) for a frozen quantized base, keeping only the layer for the backward, which dequantizes the weight
    again (as bitsandbytes' QLoRA does). Autograd through the dequantized weight would keep every layer's float
    weight from the forward to the backward: more memory than LoRA on the float model (measured: 7B, w4a16)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: QuantLinear) -> torch.Tensor:
        ctx.base, ctx.x_dtype = base, x.dtype
        return base(x)  # (gradients are off in here: the packed-weight kernels run, as in inference)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        w = ctx.base.dequantized_weight(grad.dtype)  # (out, in)
        return (grad @ w).to(ctx.x_dtype), None


def _matches(name: str, targets: tuple[str, ...], scope: str) -> bool:
    """peft's rule on the last name component, restricted to modules under `scope` ("" = whole model); a
    target with regex characters (PaddleMIX's `lora_target_modules`) must match the whole module name."""
    in_scope = not scope or name.startswith(scope + ".")
    return in_scope and any(re.fullmatch(t, name) if _REGEX_CHARS & set(t) else name == t or name.endswith("." + t)
                            for t in targets)


def _adaptable(module: nn.Module) -> bool:
    """A float Linear, or (QLoRA) a quantized one, without an adapter yet."""
    return isinstance(module, (Linear, QuantLinear)) and not isinstance(module, (LoRALinear, QLoRALinear))


def _check_wrappable(model: nn.Module, names) -> None:
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not _adaptable(module):
            raise ValueError(f"cannot add LoRA to {name!r}: it is {type(module).__name__}, not a llavakit Linear "
                             "without an adapter (is the adapter for another base model?)")


def _wrap(model: nn.Module, names: list[str], r: int, alpha: float, dropout: float) -> None:
    _check_wrappable(model, names)
    for name in names:
        base = model.get_submodule(name)
        layer = QLoRALinear if isinstance(base, QuantLinear) else LoRALinear
        model.set_submodule(name, layer(base, r, alpha, dropout))


def apply_lora(model: nn.Module, r: int = 128, alpha: float = 256, dropout: float = 0.05,
               targets: tuple[str, ...] = DEFAULT_TARGETS, scope: str = "language_model") -> nn.Module:
    """Replace, in place, each Linear under `scope` whose name ends in one of `targets` by a LoRALinear.

    The wrapped layers' weights and biases are frozen and the adapters trainable; every other
    parameter keeps its requires_grad (the training recipe decides whether e.g. the projector trains).
    """
    names = [n for n, m in model.named_modules() if _adaptable(m) and _matches(n, tuple(targets), scope)]
    if not names:
        raise ValueError(f"no Linear layer under {scope!r} is named any of {list(targets)} (names match the end "
                         "of a module name, regexes the whole name, e.g. language_model.layers.0.self_attn.q_proj)")
    _wrap(model, names, r, alpha, dropout)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, in place, leaving plain Linear layers (the inference model; a QLoRA
    layer becomes a float Linear holding its dequantized weight plus the update)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, (LoRALinear, QLoRALinear)):
            model.set_submodule(name, module.merge())
    return model


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear | QLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, QLoRALinear))}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under peft's names: base_model.model.<llava-hf module>.lora_{A,B}.weight."""
    state = {}
    for name, m in _lora_modules(model).items():
        prefix = PEFT_PREFIX + map_name(name + ".", TO_LLAVA_HF).rstrip(".")
        state[f"{prefix}.lora_A.weight"] = m.lora_A.detach().contiguous()
        state[f"{prefix}.lora_B.weight"] = m.lora_B.detach().contiguous()
    return state


def non_lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fully trained parts (NON_LORA_PREFIXES) under llava-hf hub names: `multi_modal_projector.linear_1.weight`."""
    return {map_name(n, TO_LLAVA_HF): p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if n.startswith(NON_LORA_PREFIXES)}


def save_adapter(model: nn.Module, out_dir: str | Path, base_model: str, r: int = 128, alpha: float = 256,
                 dropout: float = 0.05, targets: tuple[str, ...] | None = None,
                 scope: str = "language_model") -> Path:
    """Write adapter_model.safetensors and adapter_config.json (peft LORA), and the projector (+ image_newline)
    as NON_LORA_FILE, to `out_dir`: everything a LoRA run changes, so base + `out_dir` is the trained model.

    r/alpha/dropout/scope are those given to apply_lora; r and alpha are checked against the model. `targets`
    (default: the last name component of each adapted layer) names the layers in adapter_config.json.
    """
    modules = _lora_modules(model)
    targets = targets or tuple(sorted({n.rpartition(".")[2] for n in modules}))
    if not modules:
        raise ValueError("the model has no LoRA layers; call apply_lora (or load_adapter) first")
    for name, m in modules.items():
        if (m.r, m.alpha) != (r, alpha):
            raise ValueError(f"{name} has r={m.r}, alpha={m.alpha} but save_adapter was given r={r}, alpha={alpha}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(model), out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    save_file(non_lora_state_dict(model), out / NON_LORA_FILE, metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(_peft_config(base_model, r, alpha, dropout, targets, scope), indent=2))
    return out


def _peft_config(base_model: str, r: int, alpha: float, dropout: float, targets, scope: str) -> dict:
    # peft matches a list of names against every module (the CLIP tower has q/k/v_proj too); a regex
    # (re.fullmatch) keeps peft to the scope in both llava-hf and transformers-5 module names.
    names = "|".join(re.escape(t) for t in targets)
    target_modules = rf".*{re.escape(scope)}\..*\.({names})" if scope else sorted(targets)
    return dict(peft_type="LORA", r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                base_model_name_or_path=base_model, bias="none", task_type=None, fan_in_fan_out=False,
                inference_mode=True, init_lora_weights=True, modules_to_save=None, use_rslora=False,
                use_dora=False, rank_pattern={}, alpha_pattern={}, layers_to_transform=None,
                layers_pattern=None, revision=None)


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Wrap the layers a peft LORA adapter holds weights for and load them (llava-hf or transformers-5 names),
    then the fully trained parts in NON_LORA_FILE when the directory has one.

    The layers come from the file's keys, so list- and regex-style `target_modules` both load; adapters
    of tower layers past the feature layer (never built, see clip.py) are skipped. Everything is checked
    before the model is touched.
    """
    adapter_dir = Path(adapter_dir)
    cfg = read_json(adapter_dir / ADAPTER_CONFIG, "a peft LoRA adapter config (peft_type, r, lora_alpha, ...)")
    _check_supported(cfg, adapter_dir)
    r, tensors = cfg["r"], _our_names(load_file(adapter_dir / ADAPTER_WEIGHTS), model, adapter_dir)
    layers = sorted({name.rpartition(".")[0] for name in tensors})
    _check_wrappable(model, layers)
    if len(tensors) != 2 * len(layers):
        raise ValueError(f"{adapter_dir}: every layer needs both lora_A and lora_B; got {len(tensors)} tensors "
                         f"for {len(layers)} layers")
    for name, value in tensors.items():
        layer, _, kind = name.rpartition(".")
        m = model.get_submodule(layer)
        want = (r, m.in_features) if kind == "lora_A" else (m.out_features, r)
        if tuple(value.shape) != want:
            raise ValueError(f"{adapter_dir}: {name} has shape {tuple(value.shape)}, expected {want} (r={r})")
    non_lora = adapter_dir / NON_LORA_FILE
    trained = _non_lora_tensors(model, non_lora) if non_lora.is_file() else {}
    _wrap(model, layers, r, cfg["lora_alpha"], cfg.get("lora_dropout", 0.0))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in (tensors | trained).items():
            params[name].copy_(value)
    return model


def _non_lora_tensors(model: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    """NON_LORA_FILE's tensors under llavakit names, each checked to fit a parameter of `model`."""
    params = dict(model.named_parameters())
    out, bad = {}, []
    for key, value in load_file(path).items():
        try:
            name = map_name(key, NON_LORA_NAMES)
        except KeyError:
            name = None
        if name in params and params[name].shape == value.shape:
            out[name] = value
        else:
            bad.append(f"{key} {tuple(value.shape)}")
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensors fit no parameter of this model: {', '.join(bad[:5])}; "
                         "is the adapter for another base model?")
    return out


def _check_supported(cfg: dict, adapter_dir: Path) -> None:
    unsupported = {k: cfg[k] for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out")
                   if cfg.get(k)}
    if cfg.get("peft_type") != "LORA" or unsupported:
        raise ValueError(f"{adapter_dir}: only plain peft LORA adapters load; its adapter_config.json has "
                         f"peft_type {cfg.get('peft_type')!r} with {unsupported or 'no other options'}")


def _our_names(tensors: dict[str, torch.Tensor], model: nn.Module, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """peft keys -> llavakit parameter names (`...q_proj.lora_A`); a ValueError names the keys that do not fit."""
    keys = [k.removeprefix(PEFT_PREFIX) for k in tensors]
    rules = LAYOUTS[detect_layout(keys, "llava-hf")]
    built = len(model.vision_tower.encoder.layers)
    out, bad = {}, []
    for key, value in zip(keys, tensors.values(), strict=True):
        m = _PEFT_KEY.match(key)
        try:
            target = map_name(f"{m[1]}.{m[2]}", rules) if m else None
        except KeyError:
            target = None
        if target is None:
            bad.append(PEFT_PREFIX + key)
        elif not is_unused(target, built):
            out[target] = value
    if bad:
        raise ValueError(f"{adapter_dir}: {len(bad)} tensors are not LoRA weights of a llava-hf layer: {bad[:5]}")
    return out
