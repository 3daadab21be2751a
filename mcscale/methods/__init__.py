"""The clustering methods: one module each (``base.Method``), one entry each in ``METHODS``.

A method turns the head logits of two views into a loss; the trainer knows nothing method-specific.
What the rest of the package needs to know about a method without building it (the config check of
M against K, the head of the model, which weights the evaluation tracks, the name in a comparison)
is in its ``MethodEntry`` here. This module imports no torch: ``mcscale.config`` checks
``cluster.method`` against ``METHODS`` before the command line loads anything heavy; a method's class
is imported when it is built.

Adding a method: write ``mcscale/methods/<name>.py`` with a ``base.Method`` subclass, add
``METHODS["<name>"] = MethodEntry("<name>", "<Label>", "mcscale.methods.<name>:<Class>")``.
``mcscale.methods.base.build_method`` builds the configured one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

__all__ = ["METHODS", "MethodEntry", "option"]


def option(cfg: Any, key: str) -> Any:
    """The value of a dotted config key such as ``"p2ot.mini_weights"`` in a ``Config`` or in a run
    folder's raw ``config.yaml`` mapping; None where it is absent."""
    section, name = key.split(".")
    part = (cfg.get(section) or {}) if isinstance(cfg, Mapping) else getattr(cfg, section)
    return part.get(name) if isinstance(part, Mapping) else getattr(part, name, None)


@dataclass(frozen=True)
class MethodEntry:
    """What a stage needs to know about a method, by config keys rather than code.

    ``weights``: the mini-cluster weights the method estimates ("mini" needs M > K, "maxi" M < K), on
    whenever the method runs or only when the boolean key ``weights_option`` is true. ``cosine``: the
    (boolean key, scale key) of a cosine-classifier head, if the method offers one.
    """

    name: str  # the value of cluster.method
    label: str  # its name in messages
    impl: str  # "module:Class" of its base.Method, imported by load()
    weights: str | None = None  # "mini" | "maxi" | None
    weights_option: str | None = None
    cosine: tuple[str, str] | None = None

    def load(self) -> type:
        module, _, cls = self.impl.partition(":")
        return getattr(importlib.import_module(module), cls)

    def weight_mode(self, cfg) -> str | None:
        """Which weights a run of this config estimates (and the evaluation tracks): "mini", "maxi" or None."""
        if self.weights_option is not None and not option(cfg, self.weights_option):
            return None
        return self.weights

    def cosine_head(self, cfg) -> bool:
        return self.cosine is not None and bool(option(cfg, self.cosine[0]))

    def cosine_scale(self, cfg) -> float | None:
        """The cosine classifier's scale, None for linear heads."""
        return option(cfg, self.cosine[1]) if self.cosine_head(cfg) else None

    def display_name(self, cfg) -> str:
        """The method's name in a comparison: ``name`` (``p2ot+mini`` where optional weights are on)."""
        optional = self.weights_option is not None and self.weight_mode(cfg) is not None
        return f"{self.name}+{self.weights}" if optional else self.name


METHODS: dict[str, MethodEntry] = {
    "mini": MethodEntry("mini", "MiniClustering", "mcscale.methods.head_guided:HeadGuided", weights="mini"),
    "maxi": MethodEntry("maxi", "MaxiClustering", "mcscale.methods.head_guided:HeadGuided", weights="maxi"),
    "selflabel": MethodEntry("selflabel", "Self-labelling", "mcscale.methods.selflabel:SelfLabelling"),
    "p2ot": MethodEntry("p2ot", "P2OT", "mcscale.methods.p2ot:P2OT", weights="mini",
                        weights_option="p2ot.mini_weights", cosine=("p2ot.cosine_head", "p2ot.cosine_scale")),
}
