"""`--model timm:NAME`: any timm model, with the preprocessing of its pretrained config.

timm is an optional extra, imported only here. Weights come from --weights FILE
(read as plain tensors, never unpickled code) or, online, from timm's own hub
repository with --weights pretrained; without weights the model is random (seeded).
"""
from __future__ import annotations

import difflib
import logging

from ..errors import UserError
from ..zoo import Preprocessing
from . import BuiltModel, finish, output_dim, weights_record

log = logging.getLogger("vit_deploy")
PRETRAINED = "pretrained"  # --weights pretrained: timm's hub weights for NAME (needs the network)


def import_timm():
    try:
        import timm
    except ImportError:
        raise UserError("timm: models need timm, which is not installed: pip install 'vit-deploy[timm]'") from None
    return timm


class TimmSource:
    kind = "timm"

    def __init__(self, name: str):
        timm = import_timm()
        from timm.models import split_model_name_tag
        arch, _ = split_model_name_tag(name)
        if not name or not timm.is_model(arch):
            close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.5)
            hint = f"did you mean {', '.join('timm:' + c for c in close)}?" if close else \
                "`python -c \"import timm; print(timm.list_models('*vit*'))\"` lists them"
            raise UserError(f"unknown timm model '{name}': {hint}")
        self.name, self.arch = name, arch
        self.bundle_name = name

    def build(self, num_classes, img_size, weights, options: dict) -> BuiltModel:
        timm = import_timm()
        from timm.data import resolve_data_config
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(self.name)
        classifier = _classifier_names(cfg)
        tensors = self._read(weights, cfg) if weights is not None else None
        if tensors is not None and num_classes is None:  # the checkpoint's head decides
            head = tensors.state_dict.get(f"{classifier[0]}.weight") if classifier else None
            num_classes = int(head.shape[0]) if head is not None else 0
        if num_classes is not None and num_classes < 0:
            raise UserError(f"--num-classes must be 0 (the embedding) or more, got {num_classes}")
        kwargs = dict(options)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if img_size:
            kwargs.setdefault("img_size", img_size)
        try:
            try:
                net = timm.create_model(self.name, pretrained=False, **kwargs)
            except TypeError as e:
                if "img_size" not in str(e) or "img_size" in options:
                    raise
                # a convolutional model takes any input size: --img-size only sets the input
                net = timm.create_model(self.name, pretrained=False, **{k: v for k, v in kwargs.items()
                                                                        if k != "img_size"})
        except TypeError as e:  # an argument this architecture does not take
            raise UserError(f"timm:{self.name}: {e}") from None
        if tensors is not None:
            _load(net, tensors, classifier, self.name)
        folded = fold_std_conv(net)
        if folded:
            log.info("folded weight standardization into %d convs", folded)
        data = resolve_data_config({}, model=net)
        size = img_size or int(data["input_size"][-1])
        if data["input_size"][-1] != data["input_size"][-2] and not img_size:
            raise UserError(f"timm:{self.name} expects {data['input_size'][-2]}x{data['input_size'][-1]} images: "
                            f"only square inputs are supported; pass --img-size N")
        if data.get("crop_mode", "center") != "center":
            log.warning("timm:%s uses crop mode '%s'; vit-deploy centre-crops", self.name, data["crop_mode"])
        pre = Preprocessing(img_size=size, crop_pct=float(data["crop_pct"]), interpolation=str(data["interpolation"]),
                            mean=tuple(map(float, data["mean"])), std=tuple(map(float, data["std"])))
        nc = int(net.num_classes)
        finish(net, img_size=size, preprocessing=pre, labels=None, num_classes=nc,
               output="logits" if nc else "embedding")
        model = {"name": f"timm:{self.name}", "architecture": type(net).__name__, "num_classes": nc,
                 "img_size": size, "labels": None, "output": net.output, "output_dim": output_dim(net, size),
                 "params": sum(p.numel() for p in net.parameters())}
        source = {"kind": self.kind, "name": self.name, "options": dict(options), "timm_version": timm.__version__,
                  "weights": weights_record(tensors.path, tensors.sha256, "timm") if tensors else None}
        return BuiltModel(net, model, source)

    def _read(self, weights, cfg):
        from ..weights import HUB_PREFIX, read_tensors
        if str(weights) == PRETRAINED:
            if not cfg.hf_hub_id:
                raise UserError(f"timm:{self.name} has no Hugging Face hub weights; pass a file with --weights FILE")
            return read_tensors(HUB_PREFIX + cfg.hf_hub_id)
        return read_tensors(weights)


def _classifier_names(cfg) -> tuple[str, ...]:
    c = cfg.classifier or ()
    return (c,) if isinstance(c, str) else tuple(c)


def _load(net, tensors, classifier: tuple[str, ...], name: str) -> None:
    """Load a timm state dict, checking every tensor; the head must fit or be dropped."""
    import importlib
    sd = dict(tensors.state_dict)
    module = importlib.import_module(type(net).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None)
    if convert is not None:  # timm's own fix-ups: position embeddings resampled to the asked size, ...
        try:
            sd = convert(sd, net)
        except Exception as e:  # noqa: BLE001  a foreign file; the checks below name what misfits
            log.info("timm's checkpoint filter for %s did not apply: %s", name, e)
    target = net.state_dict()
    heads = sorted((k for k in sd if any(k.startswith(c + ".") for c in classifier)),
                   key=lambda k: not k.endswith(".weight"))  # a weight's shape names both sizes
    if net.num_classes == 0:
        for k in heads:  # the embedding: a head in the file is not used
            sd.pop(k)
    else:
        for k in heads:
            if k in target and tuple(sd[k].shape) != tuple(target[k].shape):
                raise UserError(f"{tensors.path}: the checkpoint's head '{k}' is {list(sd[k].shape)}, "
                                f"{net.num_classes} classes need {list(target[k].shape)}; leave out --num-classes "
                                f"to use the checkpoint's own head, or pass --num-classes 0 for its embedding")
    missing = [k for k in target if k not in sd]
    if missing:
        k = missing[0]
        why = " (the checkpoint has no head: pass --num-classes 0 for its embedding)" if k in \
            [t for t in target if any(t.startswith(c + ".") for c in classifier)] else ""
        raise UserError(f"{tensors.path}: weights do not fit timm:{name}: tensor '{k}' {list(target[k].shape)} "
                        f"is missing{why}")
    from ..weights import load_checked
    load_checked(net, sd, target, f"{tensors.path}: weights do not fit timm:{name}")


def fold_std_conv(net) -> int:
    """timm's StdConv2d / StdConv2dSame standardize their weight at every forward pass; store
    the standardized weight once so the exported graph computes no weight statistics."""
    import torch
    import torch.nn.functional as F
    from timm.layers import StdConv2d, StdConv2dSame
    from timm.layers.padding import pad_same

    class FoldedStdConv(torch.nn.Conv2d):
        def forward(self, x):
            if getattr(self, "same_pad", False):
                x = pad_same(x, self.kernel_size, self.stride, self.dilation)
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    count = 0
    for m in net.modules():
        if isinstance(m, (StdConv2d, StdConv2dSame)):
            with torch.no_grad():
                w = F.batch_norm(m.weight.reshape(1, m.out_channels, -1), None, None, training=True,
                                 momentum=0.0, eps=m.eps).reshape_as(m.weight)
                m.weight.copy_(w)
            m.__class__ = FoldedStdConv
            count += 1
    return count
