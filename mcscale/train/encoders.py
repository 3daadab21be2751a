"""The encoder of the clustering stage and of `mcscale embed`: a BYOL run (``--encoder RUN``), or built
from the config (``model.backbone: identity``, or ``model.weights``: a pretrained torchvision network);
``model.adapter`` and ``model.trainable`` on top. The architecture dict it returns goes into every
checkpoint, so `mcscale eval` and ``--resume`` rebuild the same model without the weights file."""

from __future__ import annotations

from pathlib import Path

import torch

from mcscale.config import Config
from mcscale.models.pretrained import Encoder, encoder_from_arch
from mcscale.train.run_folder import load_encoder


def config_architecture(cfg: Config, views) -> dict:
    """Everything needed to rebuild the config's encoder (its weights come from the checkpoint)."""
    m = cfg.model
    return {
        "encoder": "config",
        "backbone": m.backbone,
        "weights": str(Path(m.weights).expanduser().resolve()) if m.weights else None,
        "trainable": m.trainable,
        "adapter": m.adapter,
        "in_channels": views.in_channels if views.is_image else 0,
        "input_dim": 0 if views.is_image else views.input_dim,
        "image_size": views.image_size or 0,
        "cifar_stem": False,
    }


def open_encoder(cfg: Config, encoder_dir: str | Path | None, views, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """(encoder on ``device``, architecture with its ``feature_dim``)."""
    if encoder_dir is None:
        arch = config_architecture(cfg, views)
        encoder, dim = encoder_from_arch(arch, load=True)
    else:
        byol, arch = load_encoder(encoder_dir, device)
        arch = {**arch, "trainable": cfg.model.trainable, "adapter": cfg.model.adapter}
        encoder, dim = encoder_from_arch(arch)
        if isinstance(encoder, Encoder):  # wrapped (adapter, frozen parts): the run's weights go in
            encoder.body.load_state_dict(byol.state_dict())
        else:
            encoder = byol
    return encoder.to(device), {**arch, "feature_dim": dim}


def rebuild_encoder(arch: dict) -> torch.nn.Module:
    """The encoder of a checkpoint's architecture, weights to be loaded from the checkpoint."""
    return encoder_from_arch(arch)[0]
