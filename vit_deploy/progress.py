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


class progress_bar:
    """`with progress_bar(total, label) as advance: advance(n)`, for loops that are not one iterable."""

    def __init__(self, length: int, label: str):
        self.length, self.label, self.bar = length, label, None

    def __enter__(self):
        quiet = logging.getLogger("vit_deploy").level > logging.INFO
        if not quiet and sys.stderr.isatty():
            import click
            self.bar = click.progressbar(length=self.length, label=self.label, file=sys.stderr).__enter__()
        return lambda n: self.bar.update(n) if self.bar else None

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)
