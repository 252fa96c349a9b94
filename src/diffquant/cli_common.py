"""What every ``diffquant`` command shares: one error handler, typed ``--option`` values, device and
output checks made before any model loads, and options whose defaults come from the config dataclasses.

The four apps (``cli.py``, ``evaluation/cli.py``, ``zoo/cli.py`` and the commands they register) call
:func:`run` around their bodies, so a user error always ends as exit code 2 and one ``error:`` line.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import importlib
import os
import tempfile
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import typer
from typer.core import TyperGroup

from .typed import field_types, parse_as, type_name

# typer >= 0.20 carries its own copy of click; older ones use click's
_click = getattr(typer, "_click", None) or importlib.import_module("click")

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, TypeError, FloatingPointError, NotADirectoryError)
_OOM = "out of memory; lower --batch-size or --num-prompts, or use a smaller --height/--width"


def fail(message: str) -> typing.NoReturn:
    """Print ``error: message`` on stderr and end the command with exit code 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _os_message(e: OSError) -> str | None:
    where = f" writing {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on device{where}; free some space or choose --out on another disk (published outputs are unchanged)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}; choose an --out folder you can write to"
    return None


def run(fn: Callable[[], Any]) -> Any:
    """Run a command body; user errors become one line naming the fix, OOM suggests smaller batches."""
    import torch

    try:
        return fn()
    except (torch.OutOfMemoryError, MemoryError):
        fail(_OOM)
    except USER_ERRORS as e:
        fail(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e))
    except OSError as e:
        message = _os_message(e)
        if message is None:
            raise
        fail(message)


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except getattr(_click.exceptions, "NoArgsIsHelpError", ()):
        raise  # a bare `diffquant zoo`: the help text, as asked
    except _click.exceptions.UsageError as e:
        command = e.ctx.command_path if e.ctx is not None else "diffquant"
        fail(f"{e.format_message().rstrip('.')} (see `{command} --help`)")


class CommandGroup(TyperGroup):
    """The group class of diffquant's apps. A parse error (``--wbits abc``, a missing ``--model``, an unknown
    command), in any subcommand, ends like every other user error, one ``error:`` line naming the fix and exit
    2, instead of click's usage box. An absent ``--help`` of the group reads False, not None, which typer passes
    without coercion: ``diffquant quantize --help`` then skips importing typer's pydantic-based coercion (0.45 s
    of CPU became 0.27 s; benchmarks/cli_startup.py)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            option.default = False
        return option

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


def run_writing(out: Path, overwrite: bool, body: Callable[[Any], Any]) -> Any:
    """:func:`run` of ``body(output)`` with ``out`` claimed first (``diffquant.outputs``): refused when present
    without --overwrite or while another process writes it. Under ``accelerate launch`` only the main process
    claims (``output`` is None in the others, which never write ``--out``)."""
    from .outputs import claim_main_output

    def claimed() -> Any:
        with claim_main_output(out, overwrite=overwrite) as output:
            return body(output)

    return run(claimed)


def handled(command: Callable) -> Callable:
    """Decorator form of :func:`run` for a typer command (its signature, hence its options, is kept)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run(lambda: command(*args, **kwargs))

    return wrapper


def check_device(device: str) -> str:
    """``device`` if this machine has it; a one-line error (before any model loads) otherwise."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if kind not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"--device {device!r} is not supported; use cpu, cuda or cuda:N")
    backend = getattr(torch, kind, None) if kind != "cpu" else None
    if backend is not None and not backend.is_available():
        raise ValueError(f"--device {device}: no {kind} device is visible on this machine; use --device cpu")
    index = torch.device(device).index
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); use cuda:0")
    return device


def check_writable(out: Path) -> None:
    """Refuse an ``--out`` whose nearest existing folder cannot be written to, before work starts."""
    folder = Path(out).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"--out {out}: {folder} is a file, not a folder; choose another --out")
    try:
        if not os.access(folder, os.W_OK):
            raise PermissionError
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".diffquant-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError:
        raise ValueError(f"--out {out}: folder {folder} is not writable; choose an --out folder you can write to") from None


def check_positive(**values: int | None) -> None:
    """Refuse ``--steps 0``, ``--height -8`` and the like (``None`` means the model's default)."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


# --- typed --option values --------------------------------------------------------------------------

def given_fields(ctx: typer.Context, renames: dict[str, str] | None = None) -> set[str]:
    """The command's parameters given on the command line (not defaulted), named as the config's fields via ``renames``."""
    source = _click.core.ParameterSource
    renames = renames or {}
    defaulted = (source.DEFAULT, source.DEFAULT_MAP, None)
    return {renames.get(n, n) for n in ctx.params if ctx.get_parameter_source(n) not in defaulted}


def parse_method_options(method: str, pairs: list[str]) -> dict[str, Any]:
    """``--option key=value`` strings parsed by the field types of the registered method's ``Options``.

    Unknown keys are left for the method's own check (it lists the valid ones); a value that is not of
    its field's type is refused here, before any model loads, naming the option, value and type.
    """
    from .registry import METHODS

    types_ = field_types(METHODS[method].Options) if method in METHODS else {}
    options: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--option expects key=value, got {pair!r}")
        key, value = (s.strip() for s in pair.split("=", 1))
        tp = types_.get(key)
        if tp is None:
            options[key] = value
            continue
        try:
            options[key] = parse_as(value, tp)
        except ValueError:
            raise ValueError(f"--option {key}={value!r}: {method} expects {type_name(tp)} for {key}") from None
    return options


# --- options every sampling command shares (generate, eval, bench) ------------------------------------

STEPS = typer.Option(None, "--steps", help="Sampling steps (default: the model's own).")
GUIDANCE = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default: the model's own).")
HEIGHT = typer.Option(None, "--height", help="Image height in pixels (default: the model's native size).")
WIDTH = typer.Option(None, "--width", help="Image width in pixels (default: the model's native size).")
DEVICE = typer.Option("cpu", "--device", help="torch device: cpu, cuda or cuda:N (checked before any model loads).")
# Engines are what diffquant.deployment registers (diffquant.registry.ENGINES); the command checks the name when it
# runs (an unknown one: a one-line error listing those registered), so the help does not import them.
BACKEND = typer.Option("torch", "--backend", help="Denoiser engine: torch, or a registered deployment engine (openvino) "
                       "for a quantized or exported folder.")
EXPORT_FORMAT = typer.Option("onnx", "--format", help="A registered deployment engine: onnx (Q/DQ file), openvino "
                             "(IR folder), torch (converted to integer kernels).")


# --- options mirroring config fields -------------------------------------------------------------------

def field_option(cls: type, name: str, *param_decls: str, help: str, **kwargs: Any) -> Any:
    """A ``typer.Option`` whose default is the dataclass field's, so the CLI and the config cannot drift."""
    field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if field is None:
        raise AttributeError(f"{cls.__name__} has no field {name!r}")
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    return typer.Option(default, *param_decls, help=help, **kwargs)


__all__ = [
    "BACKEND", "DEVICE", "EXPORT_FORMAT", "GUIDANCE", "HEIGHT", "STEPS", "USER_ERRORS", "WIDTH", "CommandGroup", "check_device",
    "check_positive", "check_writable", "fail", "field_option", "handled",
    "given_fields", "parse_method_options", "run",
]
