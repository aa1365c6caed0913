"""Runs the pipeline's stages one by one, timing and announcing each."""
from __future__ import annotations

import logging
import time

log = logging.getLogger("vit_deploy")


class Stages:
    """Prints each stage with its time; quiet for scripts."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.times = quiet, {}

    def run(self, name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - t, 2)
        if not self.quiet:
            log.info("[%s] %.1f s", name, self.times[name])
        return result
