"""Helpers shared by the sub-command modules."""

from __future__ import annotations

import functools
import logging
from typing import Callable, TypeVar

import typer

from diffca_med.errors import DiffCAError

F = TypeVar("F", bound=Callable)

DEVICE_HELP = ("Where the model runs: 'auto' (a CUDA GPU when torch sees one, else the CPU), "
               "'cpu', 'cuda' or 'cuda:N'. Outputs are the same up to floating-point rounding.")


def user_errors(func: F) -> F:
    """Turn a :class:`DiffCAError` raised by a command into one line and exit 2.

    Expected mistakes (bad input, bad config) print ``error: <message>`` on stderr
    without a traceback; anything else is a bug and propagates unchanged.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except DiffCAError as err:
            typer.secho(f"error: {err}", fg="red", err=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", fg="red", err=True)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def warn(message: str) -> None:
    """Print a one-line warning on stderr."""
    typer.secho(f"warning: {message}", fg="yellow", err=True)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
