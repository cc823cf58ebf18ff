"""The Typer app object and the helpers every subcommand module shares."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import typer
from typer.core import TyperGroup

from vembed.console import console
from vembed.errors import VembedError
from vembed.settings import Settings, load_settings

# `vembed --help` lists commands in the order a user runs them; helpers (and any others) come last.
COMMAND_ORDER = (
    "prepare",
    "train",
    "eval",
    "export",
    "embed",
    "search",
    "classify",
    "predict-masks",
    "index",
    "quickstart",
    "models",
    "config",
)


class OrderedGroup(TyperGroup):
    """A command group whose ``list_commands`` follows :data:`COMMAND_ORDER`."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda name: (rank.get(name, len(rank)), names.index(name)))


app = typer.Typer(
    name="vembed",
    cls=OrderedGroup,
    help="Turn a pretrained vision backbone into a domain-specific image embedding model: "
    "prepare data, train, evaluate, export, embed and search.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def user_errors(fn):
    """Turn a :class:`VembedError` into one red line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VembedError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def settings_from(config: Path | None, overrides: list[str] | None, **explicit) -> Settings:
    """Recipe + ``key=value`` overrides + options given as flags (flags win; ``None`` = not given).

    Flags are passed as ``section__key=value`` (``model__name="dinov2-base"``).
    """
    values = {key.replace("__", "."): value for key, value in explicit.items() if value is not None}
    return load_settings(config, list(overrides or []), values)


def quiet_transformers() -> None:
    """Keep transformers' own progress bars and warnings off our stderr."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
