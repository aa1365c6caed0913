"""The built-in zoo (the reference article's models) as a model source."""
from __future__ import annotations

from ..zoo import get_spec, spec_dict
from . import BuiltModel, finish, weights_record


class ZooSource:
    kind = "zoo"

    def __init__(self, name: str):
        self.spec = get_spec(name)  # an unknown name fails here, with the closest names
        self.name = self.bundle_name = name

    def build(self, num_classes, img_size, weights, options: dict) -> BuiltModel:
        from ..models import build_model
        from ..weights import read_checkpoint

        if options:
            raise _no_options(self.name, options)
        ckpt = read_checkpoint(weights) if weights is not None else None
        net = build_model(self.name, num_classes, img_size, checkpoint=ckpt)
        finish(net, img_size=net.img_size, preprocessing=net.preprocessing, labels=net.labels,
               num_classes=net.num_classes, output=net.output)
        model = {**spec_dict(self.spec), "num_classes": net.num_classes, "img_size": net.img_size,
                 "layer_norm_eps": net.norm.eps, "labels": net.labels, "output": net.output,
                 "output_dim": net.num_classes or self.spec.hidden_size}
        source = {"kind": self.kind, "options": {},
                  "weights": weights_record(ckpt.path, ckpt.sha256, ckpt.layout) if ckpt else None}
        return BuiltModel(net, model, source)


def _no_options(name: str, options: dict):
    from ..errors import UserError
    return UserError(f"{name}: built-in models take no --model-arg (got {', '.join(options)}); "
                     f"use timm:NAME for timm's constructor arguments")
