"""Subcommands that plugins add to the `dgpo` command line, registered by name.

A plugin registers the function a subcommand runs with :func:`register_command`, naming its one-line help and
a function that adds its arguments to the subcommand's parser; `dgpo` lists every registered command after
its own. The function takes the parsed arguments and returns the exit status; a ``UserError``, ``ValueError``
or ``FileNotFoundError`` it raises is printed as one line, as for the built-in commands.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass

from .registry import Registry


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: Registry[Command] = Registry("command", plugins=True)


def register_command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register the decorated ``run(args) -> exit status`` as `dgpo NAME`, whose arguments ``add_arguments`` adds."""

    def decorator(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS.register(name)(Command(help, add_arguments, run))
        return run

    return decorator


def key_value(text: str) -> tuple[str, object]:
    """An argparse ``type`` for KEY=VALUE; VALUE is parsed as JSON when it is JSON (numbers, booleans)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value
