"""Runs the pipeline's stages one by one, timing and announcing each."""
from __future__ import annotations

import logging
import time

log = logging.getLogger("vit_deploy")


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    import resource
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1e9 if sys.platform == "darwin" else 1e6), 2)


class Stages:
    """Prints each stage with its time; quiet for scripts. Records the process's peak
    memory after each stage, so the stage that raised it shows in the manifest."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.times, self.peak_rss_gb = quiet, {}, {}

    def run(self, name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - t, 2)
        self.peak_rss_gb[name] = peak_rss_gb()
        if not self.quiet:
            log.info("[%s] %.1f s", name, self.times[name])
        return result
