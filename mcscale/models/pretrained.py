"""Encoders the clustering stage builds from its config: identity (the input itself), or a torchvision
ResNet-18 / 50 / ViT-B/16 with weights from a local file; an optional residual adapter after either;
which parameters train (``model.trainable``). Nothing is downloaded.

Weights files: a torchvision state dict (``.pt`` / ``.pth``, read with ``torch.load(weights_only=True)``:
tensors only, never unpickled objects), ``.safetensors``, or the key layout of the public DINO ViT
checkpoints (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.*``, ``norm``), mapped onto
torchvision's ViT. Classifier weights in the file (``fc``, ``heads``, ``head``) are dropped; any other
missing or unexpected key, or a shape that differs, is one error line naming them.
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mcscale.errors import RunError
from mcscale.files import pickle_refusal
from mcscale.models.backbones import (
    VIT_SHAPES,
    FlattenInput,
    ResidualMLP,
    ThreeChannels,
    feature_dim_of,
    imagenet_resnet,
    vit,
)
from mcscale.models.byol import build_byol

# the preprocessing of torchvision's and DINO's ImageNet weights
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRETRAINED_SIZE = 224
CLASSIFIER_PREFIXES = ("fc.", "heads.", "head.")
WRAPPER_KEYS = ("teacher", "state_dict", "model")  # DINO's full checkpoint keeps the teacher under "teacher"
KEY_PREFIXES = ("module.", "backbone.")


def preprocessing(backbone: str, weights: str | None, image_size: int | None, channels: int = 3):
    """(view size or None, (mean, std) or None) that the encoder expects: pretrained weights take
    224 px views normalised with the ImageNet mean / std (a ViT takes 224 px without weights too);
    ``image_size`` (data.image_size) overrides the size. None: as stored / fitted on the data."""
    size = image_size
    if weights is not None or backbone in VIT_SHAPES:
        size = image_size or PRETRAINED_SIZE
    if weights is None:
        return size, None
    if channels == 1:  # grey images are repeated to three channels: one mean / std for all three
        return size, ([sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3])
    return size, (list(IMAGENET_MEAN), list(IMAGENET_STD))


# ---------------------------------------------------------------- weights files
def _names(keys, limit: int = 4) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a weights file, unwrapped (``teacher`` / ``state_dict`` / ``model``) and without
    ``module.`` / ``backbone.`` prefixes. Pickled Python objects are refused, never run."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RunError(f"model.weights: {path} not found; give a local .pt / .pth / .safetensors file (nothing is"
                       " downloaded)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise RunError(f"model.weights: {path} is not a readable safetensors file ({' '.join(str(err).split())[:120]})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise RunError(f"model.weights: {path}: refused to load: {pickle_refusal(err)} (loading it could run code); save the"
                           " state dict alone (torch.save(model.state_dict(), ...)) or as .safetensors") from None
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise RunError(f"model.weights: {path}: unreadable or truncated weights file ({type(err).__name__})") from None
    while isinstance(state, dict):
        inner = [key for key in WRAPPER_KEYS if isinstance(state.get(key), dict)]
        if not inner:
            break
        state = state[inner[0]]
    if not isinstance(state, dict) or not state:
        raise RunError(f"model.weights: {path} holds no state dict (a mapping of parameter names to tensors)")
    tensors = {key: value for key, value in state.items() if isinstance(value, Tensor)}
    if len(tensors) != len(state):
        other = [key for key, value in state.items() if not isinstance(value, Tensor)]
        raise RunError(f"model.weights: {path}: entries that are not tensors: {_names(other)}; save a state dict")
    for prefix in KEY_PREFIXES:
        if all(key.startswith(prefix) for key in tensors):
            tensors = {key[len(prefix):]: value for key, value in tensors.items()}
    return tensors


_DINO_BLOCK = {
    "norm1": "ln_1", "attn.qkv.weight": "self_attention.in_proj_weight", "attn.qkv.bias": "self_attention.in_proj_bias",
    "attn.proj": "self_attention.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3",
}
_DINO_TOP = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding", "patch_embed.proj": "conv_proj",
             "norm": "encoder.ln"}


def is_dino_layout(state: dict) -> bool:
    return "cls_token" in state or any(key.startswith("blocks.") for key in state)


def _dino_name(key: str) -> str:
    found = re.match(r"blocks\.(\d+)\.(.+)$", key)
    if found:
        number, rest = found.groups()
        for old, new in _DINO_BLOCK.items():
            if rest == old or rest.startswith(old + "."):
                return f"encoder.layers.encoder_layer_{number}.{new}{rest[len(old):]}"
        return key
    for old, new in _DINO_TOP.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return key


def dino_to_torchvision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """DINO's ViT names onto torchvision's VisionTransformer (any depth and width: the tensors keep
    their shapes; DINO's fused qkv rows are q, k, v like torchvision's in_proj). Names it does not
    know are kept, so they surface as unexpected keys."""
    return {_dino_name(key): value for key, value in state.items()}


def _resize_positions(pos: Tensor, tokens: int) -> Tensor:
    """A (1, 1 + g*g, D) position embedding bicubically resized to ``tokens`` = 1 + h*h (class token kept)."""
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(tokens - 1)
    if old * old != pos.shape[1] - 1 or new * new != tokens - 1:
        return pos  # not square grids: left for the shape check to report
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)], dim=1)


def load_pretrained(net: nn.Module, path: str | Path, backbone: str) -> None:
    """Load a weights file into ``net`` (torchvision layout, classifier removed): the file's classifier
    is dropped, DINO names mapped, a ViT's position grid resized to the view size; anything else that
    does not fit is one error line."""
    state = read_weights(path)
    if backbone in VIT_SHAPES and is_dino_layout(state):
        state = dino_to_torchvision(state)
    state = {key: value for key, value in state.items() if not key.startswith(CLASSIFIER_PREFIXES)}
    expected = net.state_dict()
    pos = "encoder.pos_embedding"
    if pos in state and pos in expected and state[pos].shape != expected[pos].shape and state[pos].dim() == 3:
        state[pos] = _resize_positions(state[pos], expected[pos].shape[1])
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    shapes = [f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}" for key in expected
              if key in state and state[key].shape != expected[key].shape]
    problems = [f"{what}: {_names(keys)}" for what, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shapes differ", shapes)) if keys]
    if problems:
        raise RunError(f"model.weights: {path} does not fit model.backbone={backbone}: {'; '.join(problems)}")
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value)


# ---------------------------------------------------------------- trainable parts
def last_block(net: nn.Module, backbone: str) -> list[nn.Module]:
    """What ``model.trainable: last_block`` trains: a ViT's last transformer block and the LayerNorm
    after it; a ResNet's last residual block (layer4's last)."""
    if backbone in VIT_SHAPES:
        return [net.encoder.layers[-1], net.encoder.ln]
    return [net.layer4[-1]]


class Encoder(nn.Module):
    """A backbone (``body``), then an optional adapter. ``frozen``: modules whose own parameters do
    not train and which stay in eval mode (BatchNorm statistics fixed) whatever ``train()`` asks."""

    def __init__(self, body: nn.Module, adapter: nn.Module | None = None, frozen: list[nn.Module] = ()):
        super().__init__()
        self.body = body
        self.adapter = adapter
        self._frozen = list(frozen)
        for module in self._frozen:
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen:
            module.training = False  # this module only: a kept block inside it still follows ``mode``
        return self

    def forward(self, x: Tensor) -> Tensor:
        f = self.body(x)
        return f if self.adapter is None else self.adapter(f)


def _frozen_parts(net: nn.Module, backbone: str, trainable: str) -> list[nn.Module]:
    """Modules of ``net`` whose own parameters stay fixed: none (all), every module (none), every
    module outside the last block (last_block)."""
    if trainable == "all":
        return []
    if trainable == "none":
        return list(net.modules())
    kept = {id(m) for module in last_block(net, backbone) for m in module.modules()}
    return [m for m in net.modules() if id(m) not in kept]


def encoder_from_arch(arch: dict, load: bool = False) -> tuple[nn.Module, int]:
    """The encoder that ``arch`` describes, and its feature width.

    ``arch["encoder"] == "config"``: built from the config (identity, or a torchvision network, with the
    weights file loaded when ``load``); otherwise a BYOL encoder (weights from encoder.pt or a
    checkpoint). ``adapter`` and ``trainable`` apply to either."""
    backbone, trainable = arch["backbone"], arch.get("trainable", "all")
    if arch.get("encoder") == "config":
        if backbone == "identity":
            net = FlattenInput()
        elif backbone in VIT_SHAPES:
            net, _ = vit(backbone, arch["image_size"])
        else:
            net, _ = imagenet_resnet(backbone)
        if load and arch.get("weights"):
            load_pretrained(net, arch["weights"], backbone)
        frozen = _frozen_parts(net, backbone, trainable)
        grey = arch.get("in_channels") == 1 and backbone != "identity"
        body = nn.Sequential(ThreeChannels(), net) if grey else net  # ImageNet networks take three channels
    else:
        body, frozen = build_byol(arch).encoder(), []
        if trainable == "last_block":
            raise RunError("model.trainable: last_block applies to an encoder built from the config (model.weights);"
                           " with --encoder use all or none")
        if trainable == "none":
            frozen = list(body.modules())
        if not frozen and arch.get("adapter", "none") == "none":
            return body, arch["proj_dim"]  # a BYOL encoder as before: its checkpoints keep their key names
    example = (torch.zeros(2, arch["in_channels"], arch["image_size"], arch["image_size"]) if arch["in_channels"]
               else torch.zeros(2, arch["input_dim"]))
    dim = feature_dim_of(body, example)
    adapter = ResidualMLP(dim) if arch.get("adapter", "none") == "residual_mlp" else None
    return Encoder(body, adapter, frozen), dim
