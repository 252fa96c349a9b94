"""What the command line prints: diffquant's own lines and progress bars, not the libraries' warning floods.

Imported under a command, torch, torchao, diffusers and transformers print "Failed to load ... .so" lines,
torch ``_pytree`` "Enum subclass" W-lines, deprecation warnings and their own loading bars before anything of
ours. :func:`quiet` (entered once by the CLI's root callback, before any of them is imported) hides them for
the command's duration; ``diffquant --verbose`` leaves everything as the libraries print it. diffquant's own
messages (its ``diffquant.*`` loggers, a warning raised from its code) always show. Outside the CLI nothing
is changed: a library user keeps the libraries' defaults.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# Top-level loggers of the libraries a command may import; set to ERROR while quiet.
LIBRARY_LOGGERS: tuple[str, ...] = (
    "torch", "torch.utils._pytree", "torchao", "diffusers", "transformers", "accelerate", "huggingface_hub", "peft",
    "torchmetrics", "optimum", "sdnq", "bitsandbytes", "nncf", "openvino", "onnx", "onnxruntime", "onnxscript",
)
# Read by those libraries when they are first imported (a logger level set before would be reset by them).
LIBRARY_ENV: dict[str, str] = {
    "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}

_quiet = False  # inside quiet(verbose=False): quiet_libraries() acts


@contextmanager
def quiet(verbose: bool = False) -> Iterator[None]:
    """Hide third-party warnings, log lines below ERROR and loading bars until exit (then restore all of it);
    ``verbose`` changes nothing."""
    global _quiet
    if verbose:
        yield
        return
    env = {key: os.environ.get(key) for key in LIBRARY_ENV}
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    bars = _library_bars()
    os.environ.update({key: value for key, value in LIBRARY_ENV.items() if env[key] is None})
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    _quiet = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every Python warning raised outside diffquant's own code
        warnings.filterwarnings("default", module=r"diffquant(\.|$)")
        # torch.jit's TracerWarnings point at our code when an export traces it; they are torch's, not ours
        warnings.filterwarnings("ignore", message=r"(?s).*\bthe trace\b")
        try:
            yield
        finally:
            _quiet = False
            for key, value in env.items():
                if value is None:
                    os.environ.pop(key, None)
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            _restore_library_bars(bars)


def quiet_libraries() -> None:
    """Inside :func:`quiet`: import diffusers and transformers, set their verbosity (which they reset when
    first imported) and turn off their loading bars; a pipeline's sampling bar (``set_progress_bar_config``) is
    its own and stays. Commands call it just before they load a model; a no-op under ``--verbose``."""
    if not _quiet:
        return
    for name in ("diffusers", "transformers"):
        library = importlib.import_module(f"{name}.utils.logging")
        library.set_verbosity_error()
        library.disable_progress_bar()


def _imported_hf_logging() -> dict[str, Any]:
    """``diffusers.utils.logging`` and ``transformers.utils.logging``, for those libraries already imported."""
    return {name: importlib.import_module(f"{name}.utils.logging") for name in ("diffusers", "transformers")
            if name in sys.modules}


def _library_bars() -> dict[str, bool]:
    """Whether diffusers' and transformers' loading bars are on, for those already imported."""
    return {name: library.is_progress_bar_enabled() for name, library in _imported_hf_logging().items()}


def _restore_library_bars(before: dict[str, bool]) -> None:
    for name, library in _imported_hf_logging().items():
        if before.get(name, True):  # on by default when the command imported the library
            library.enable_progress_bar()


__all__ = ["LIBRARY_ENV", "LIBRARY_LOGGERS", "quiet", "quiet_libraries"]
