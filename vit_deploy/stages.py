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


def release_memory() -> None:
    """Hand freed memory back to the system: collect cycles, then glibc's malloc_trim.
    Between stages and runtimes of a large model (vit-h14), freed weights otherwise stay
    in the process's heap and the next stage's weights stack on top of them."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


class Stages:
    """Prints each stage with its time; quiet for scripts. Records the process's peak
    memory after each stage, so the stage that raised it shows in the manifest."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.times, self.peak_rss_gb = quiet, {}, {}

    def run(self, name: str, fn, *args, **kwargs):
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        release_memory()
        self.times[name] = round(time.perf_counter() - t, 2)
        self.peak_rss_gb[name] = peak_rss_gb()
        if not self.quiet:
            log.info("[%s] %.1f s", name, self.times[name])
        return result
