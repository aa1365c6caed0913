"""`vit-deploy models`: the zoo table with parameter counts and GFLOPs at 224 px."""
from __future__ import annotations

from .zoo import ZOO, spec_dict


def list_models(num_classes: int = 1000, img_size: int = 224) -> list[dict]:
    from .models import count_model
    rows = []
    for spec in ZOO.values():
        params, gflops = count_model(spec, num_classes, img_size)
        row = {k: v for k, v in spec_dict(spec).items() if k not in ("layer_norm_eps",)}
        row.update(params=params, gflops=round(gflops, 2), img_size=img_size, num_classes=num_classes)
        rows.append(row)
    return rows
