"""The PyTorch reference, as a runner."""
from __future__ import annotations

import numpy as np

from . import Runner

RUNTIME = "torch"


def available() -> str | None:
    from .._optional import missing_torch
    return missing_torch()


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, model, max_batch: int, threads: int | None = None):
        import torch
        super().__init__(max_batch, model.img_size)
        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval()

    def infer(self, images: np.ndarray) -> np.ndarray:
        import torch
        with torch.inference_mode():
            return self.model(torch.from_numpy(images)).numpy()
