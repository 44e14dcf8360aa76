"""Command lines of the training CLIs: dataclass fields become flags, and a user's mistake
becomes one line on stderr with exit code 2 (never a traceback)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import sys
import types
import typing
from typing import Any, Callable, Iterable


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block) and exits 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _field_type(tp: Any) -> tuple[type, bool]:
    """(base type, optional) of an annotation like `int`, `float | None`."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        (base,) = [a for a in args if a is not type(None)]
        return base, True
    return tp, False


def add_dataclass_args(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    defaults: dict[str, Any] | None = None,
    helps: dict[str, str] | None = None,
    skip: Iterable[str] = (),
) -> None:
    """Adds one ``--field-name`` flag per dataclass field, its help from the field's metadata.
    Flags default to argparse.SUPPRESS, so the namespace holds only what the user gave
    (``dataclass_kwargs`` picks them out); ``defaults`` only changes what --help shows."""
    defaults, helps = defaults or {}, helps or {}
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group((cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip("."))
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        base, optional = _field_type(hints[f.name])
        default = defaults.get(f.name, f.default)
        shown = "auto" if default is None else default
        text = helps.get(f.name, f.metadata.get("help", ""))
        text = f"{text} (default: {shown})" if "default:" not in text else text
        flag = flag_name(f.name)
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
            continue
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            group.add_argument(flag, nargs="+", type=item, default=argparse.SUPPRESS, metavar="PATH", help=text)
            continue
        group.add_argument(
            flag,
            type=_parse_value(base, optional),
            default=argparse.SUPPRESS,
            choices=f.metadata.get("choices"),
            metavar=f.name.split("_")[-1].upper() if f.metadata.get("choices") is None else None,
            help=text,
        )


def _parse_value(base: type, optional: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "auto"):
            return None
        return base(text)

    parse.__name__ = base.__name__  # argparse names the type in "invalid int value: 'x'"
    return parse


def dataclass_kwargs(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` the user gave on the command line."""
    given = vars(namespace)
    return {f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given}


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Runs a CLI's main; a user error (bad value, missing file) becomes one line on stderr
    and exit code 2, an environment fault (any other OSError: disk full, read-only file
    system, no permission; or an allocator's failure) one line naming the file or the
    allocation and exit code 1. GPT1_DEBUG=1 shows the traceback instead."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, UserError) as e:
        if os.environ.get("GPT1_DEBUG") == "1":
            raise
        if getattr(e, "echo", True):
            print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment: disk full, read-only file system, permissions
        if os.environ.get("GPT1_DEBUG") == "1":
            raise
        print(f"error: {os_error_line(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as e:  # torch's allocators raise RuntimeError subclasses
        line = out_of_memory_line(e)
        if line is None or os.environ.get("GPT1_DEBUG") == "1":
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves and returns)
        print("error: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def os_error_line(e: OSError) -> str:
    """'<file>: <reason>' (the file first: it is what the user must look at)."""
    reason = e.strerror or str(e)
    if e.filename is not None:
        other = f" -> {e.filename2}" if e.filename2 is not None else ""
        return f"{e.filename}{other}: {reason}"
    return reason


def out_of_memory_line(e: BaseException) -> str | None:
    """'out of memory: <what failed>; <what to do>' for an allocator's failure (torch's CPU
    allocator, CUDA's, Python's MemoryError), else None."""
    text = str(e)
    asked = re.search(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes", text)
    if asked is not None:
        what = f"the CPU allocator could not allocate {int(asked.group(1)) / 1e9:.1f} GB"
    elif "DefaultCPUAllocator: can't allocate memory" in text:
        what = "the CPU allocator could not allocate memory"
    elif text.startswith("CUDA out of memory."):
        what = ". ".join(text.split(". ")[:2])  # "CUDA out of memory. Tried to allocate 2.00 GiB"
    elif isinstance(e, MemoryError):
        what = "MemoryError"
    else:
        return None
    return (
        f"out of memory: {what}; a smaller batch or model needs less "
        "(training: --micro-batch-size keeps the batch, accumulating gradients)"
    )


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line. `echo`: whether
    this process prints it (False on the other ranks of a job whose rank 0 prints the same line)."""

    def __init__(self, message: str, *, echo: bool = True):
        super().__init__(message)
        self.echo = echo
