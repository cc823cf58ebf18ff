"""The Typer app object and the helpers every subcommand module shares."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from vembed.cli.failures import VembedGroup
from vembed.settings import Settings, load_settings

CONFIG_HELP = "YAML recipe."
OVERRIDES_HELP = "key=value settings overrides (e.g. index.batch_size=128 model.device=cpu)."

# `vembed --help` lists commands in the order a user runs them; helpers (and any others) come last.
COMMAND_ORDER = (
    "prepare",
    "mine",
    "train",
    "eval",
    "export",
    "embed",
    "search",
    "classify",
    "predict-masks",
    "index",
    "serve",
    "store",
    "visualize",
    "quickstart",
    "models",
    "config",
)


class OrderedGroup(VembedGroup):
    """The app's group (failures reported in one place, see :mod:`vembed.cli.failures`), whose
    ``list_commands`` follows :data:`COMMAND_ORDER`."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda name: (rank.get(name, len(rank)), names.index(name)))


app = typer.Typer(
    name="vembed",
    cls=OrderedGroup,
    help="Turn a pretrained vision backbone into a domain-specific image embedding model: "
    "prepare data, train, evaluate, export, embed and search. "
    "--debug (or VEMBED_DEBUG=1) prints the full traceback of an unexpected error.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def settings_from(config: Path | None, overrides: list[str] | None, **explicit) -> Settings:
    """Recipe + ``key=value`` overrides + options given as flags (flags win; ``None`` = not given).

    Flags are passed as ``section__key=value`` (``model__name="dinov2-base"``).
    """
    values = {key.replace("__", "."): value for key, value in explicit.items() if value is not None}
    settings = load_settings(config, list(overrides or []), values)
    return settings


def quiet_transformers() -> None:
    """Keep transformers' own progress bars and warnings off our stderr."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
