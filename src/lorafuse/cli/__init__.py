"""The ``lorafuse`` command: a thin map of verbs to library functions.

The app is assembled here from one module per verb or verb group (``inspect``, ``merge``,
``demo``, ``fuse`` (with ``train-lora`` and ``generate``), ``explain``, ``compress`` (with
``decompress``), ``serve``, ``world`` (with the studies of :mod:`lorafuse.cli.studies`),
``route``, ``models``); they share :mod:`lorafuse.cli.options` (value checks) and
:mod:`lorafuse.cli.loading` (the one model and tokenizer loader). :func:`main` is the one place
lorafuse errors become one line and exit status 2.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Annotated

import typer

from lorafuse import __version__
from lorafuse.cli import (
    compress,
    demo,
    explain,
    export,
    fuse,
    inspect,
    library,
    merge,
    models,
    route,
    serve,
    studies,
    world,
)
from lorafuse.errors import LorafuseError

__all__ = ["app", "main"]

app = typer.Typer(
    name="lorafuse",
    help=(
        "Reuse a library of LoRA adapters on one frozen base LLM: inspect adapters and run them "
        "as a weighted bank (merge, fuse, route, compress and serve are built on the same bank)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorafuse {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """lorafuse: merge, fuse, route, compress and serve LoRA adapters on one base model."""


inspect.register(app)
merge.register(app)
demo.register(app)
fuse.register(app)
explain.register(app)
compress.register(app)
serve.register(app)
app.add_typer(world.world_app, name="world")
studies.register(world.world_app)
route.register(app)
models.register(app)
library.register(app)
export.register(app)


class _StderrNotices(logging.Handler):
    """Library notices (``logging.getLogger("lorafuse.notices")``) as plain lines on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # a closed stream must not turn a notice into a crash
            self.handleError(record)


def _show_notices() -> None:
    """Send lorafuse's notices to the user (such as a capped ``--max-new-tokens``) to stderr, unprefixed."""
    logger = logging.getLogger("lorafuse.notices")
    if not any(isinstance(h, _StderrNotices) for h in logger.handlers):
        logger.addHandler(_StderrNotices(logging.WARNING))
        logger.propagate = False


def main() -> None:
    """Entry point: run the CLI, turning lorafuse errors into one clear line and status 2.

    ``--debug`` (anywhere on the command line) or ``LORAFUSE_DEBUG=1`` shows the traceback
    instead. An error that is not a lorafuse error is a bug: it is reported in one line with
    status 1 and a request to rerun with ``--debug``.
    """
    import os

    # Deprecation chatter between transformers and peft releases is not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning)
    _show_notices()
    debug = "--debug" in sys.argv[1:] or os.environ.get("LORAFUSE_DEBUG", "") not in ("", "0")
    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
    try:
        app()
    except LorafuseError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        typer.echo(
            f"error: unexpected {type(exc).__name__}: {exc} (a bug in lorafuse; rerun with --debug "
            "for the traceback and report it)",
            err=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
