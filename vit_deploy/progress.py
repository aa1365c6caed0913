"""A progress bar on stderr for long stages (silent when quiet or not a terminal)."""
from __future__ import annotations

import logging
import sys


def progress(iterable, length: int, label: str):
    quiet = logging.getLogger("vit_deploy").level > logging.INFO
    if quiet or not sys.stderr.isatty():
        yield from iterable
        return
    import click
    with click.progressbar(iterable, length=length, label=label, file=sys.stderr) as bar:
        yield from bar
