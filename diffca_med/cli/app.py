"""The Typer application behind the ``diffca-med`` console script.

Each sub-command lives in its own module (``diffca_med/cli/<name>.py``) exposing a
``register(app)`` function; this module only assembles them. Expected errors become
one line on stderr and exit status 2 through :func:`diffca_med.cli.common.user_errors`
on each command, so that also holds under Typer's CliRunner.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="diffca-med",
    help=(
        "Diff-CA for brain MRI: split healthy vs tumour scans into common and salient "
        "factors, generate pseudo-healthy counterfactuals, anomaly maps, salient "
        "embeddings, subgroup maps and per-subject reports."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Sub-command modules, in the order a user runs them.
COMMAND_MODULES = [
    "phantom",
    "prepare",
    "train",
    "pseudo_healthy",
    "swap",
    "embed",
    "subgroups",
    "report",
    "demo",
    "evaluate",
]

for _name in COMMAND_MODULES:
    importlib.import_module(f"diffca_med.cli.{_name}").register(app)


def main() -> None:
    """Console-script entry point (commands handle their own expected errors)."""
    app()
