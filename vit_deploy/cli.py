"""The `vit-deploy` command: a thin click layer over the library API.

Each command imports what it needs when it runs, so `vit-deploy models` never
loads a runtime. Errors a user can cause print one line and exit 2.
"""
from __future__ import annotations

import functools
import json
import logging
import sys

import click

from .errors import CheckFailed, UserError


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except CheckFailed as e:
            click.echo(f"FAILED: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


class _Formatter(logging.Formatter):
    def format(self, record):
        prefix = "warning: " if record.levelno >= logging.WARNING else ""
        return prefix + record.getMessage()


def _setup_logging(quiet: bool) -> None:
    log = logging.getLogger("vit_deploy")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter())
        log.addHandler(handler)
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vit-deploy")
def cli():
    """Vision Transformers from a PyTorch checkpoint to verified edge engines."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@_handle_errors
def models(as_json):
    """List the model zoo with parameters and GFLOPs at 224 px, 1000 classes."""
    from .zoo_table import list_models
    rows = list_models()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    head = f"{'name':<12} {'patch':>5} {'layers':>6} {'hidden':>6} {'mlp':>5} {'heads':>5} {'params':>9} {'GFLOPs':>7}"
    click.echo(head)
    for r in rows:
        patch = f"{r['patch_size']}" + ("*" if r["backbone_layers"] else "")
        click.echo(f"{r['name']:<12} {patch:>5} {r['layers']:>6} {r['hidden_size']:>6} {r['mlp_size']:>5} "
                   f"{r['heads']:>5} {r['params'] / 1e6:>8.2f}M {r['gflops']:>7.2f}")
    click.echo("* hybrid: 1x1 patches on the 14x14x1024 map of a ResNet-50 v2 backbone (stages 3/4/9)")


def main():
    cli(prog_name="vit-deploy")


if __name__ == "__main__":
    main()
