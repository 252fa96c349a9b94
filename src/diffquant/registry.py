"""What the layers above the core plug into it: methods, bundled models, prompt sets, converted layer kinds,
deployment engines.

The core consults these tables and never imports their providers, so the import graph stays one-way:
the package root names the providers (``diffquant.methods`` registers its recipes, ``diffquant.zoo`` its
models' sampling defaults, loaders and prompt sets, ``diffquant.runtime`` its converted layers,
``diffquant.deployment`` its engines) with :func:`provided_by`, and the first read of any table imports them.
``import diffquant`` thus stays light (the CLI's ``--help`` loads no torch) while every lookup sees the full tables.
A new method, model family or engine registers here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PROVIDERS: list[str] = []  # modules that fill the tables, imported at the first read (see provided_by)


def provided_by(*modules: str) -> None:
    """Name the modules whose import fills the tables; the first read of a table imports them (an absent
    optional package, e.g. a slim install without the zoo, is skipped)."""
    _PROVIDERS.extend(modules)


def _fill() -> None:
    while _PROVIDERS:
        module = _PROVIDERS.pop(0)  # popped first: a provider reading a table while it imports does not recurse
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


class _Table(dict):
    """A registry table whose first read imports the providers; writes (registrations) do not."""

    def __getitem__(self, key: Any) -> Any:
        _fill()
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        _fill()
        return super().__contains__(key)

    def __iter__(self):
        _fill()
        return super().__iter__()

    def __len__(self) -> int:
        _fill()
        return super().__len__()

    def get(self, key: Any, default: Any = None) -> Any:
        _fill()
        return super().get(key, default)

    def keys(self):
        _fill()
        return super().keys()

    def values(self):
        _fill()
        return super().values()

    def items(self):
        _fill()
        return super().items()


# name -> Method (diffquant.methods.base.Method): ``name``, ``Options``, ``split_shortcut_default``, ``run``.
METHODS: dict[str, Any] = _Table()


@dataclass(frozen=True)
class BundledModel:
    """A model shipped with diffquant: where it is, how it loads, how it samples by default."""

    name: str
    folder: Callable[[], Path]
    load: Callable[..., Any]  # (torch_dtype=..., device=...) -> pipeline
    sampling: dict  # num_inference_steps, guidance_scale, height, width
    calibration_prompts: Callable[[], list[str]]


MODELS: dict[str, BundledModel] = _Table()
# "source:split" (e.g. "zoo:heldout") -> prompts(count or None)
PROMPT_SETS: dict[str, Callable[..., list[str]]] = _Table()
# kind of a converted (deployed) module -> build(wrapped module, its saved ``converted_form()``) -> module;
# diffquant.runtime registers its integer layers, so loading a converted model needs no runtime import.
CONVERTED: dict[str, Callable[[Any, dict], Any]] = _Table()
# The ``quant_method`` a saved denoiser's config.json names (serialization writes it) and under which
# hf_quantizer registers diffquant with diffusers; here because both must agree and hf_quantizer stays light.
HF_QUANT_METHOD = "diffquant"


def register_method(method: Any) -> Any:
    METHODS[method.name] = method
    return method


def method(name: str) -> Any:
    """The registered method ``name``; unknown names get a one-line error listing the others."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def register_model(model: BundledModel) -> None:
    MODELS[model.name] = model


def model_for(pipe: Any) -> BundledModel | None:
    """The bundled model ``pipe`` was loaded from (by its folder), if any."""
    if pipe is None:
        return None
    origin = str(getattr(pipe.config, "_name_or_path", "") or getattr(pipe, "name_or_path", "") or "")
    if not origin:
        return None
    for model in MODELS.values():
        try:
            if Path(origin).resolve() == Path(model.folder()).resolve():
                return model
        except (FileNotFoundError, OSError):
            continue
    return None


def sampling_defaults(pipe: Any) -> dict:
    """Default steps/guidance/size for a pipeline: its bundled model's settings, else {} (the pipeline's own)."""
    model = model_for(pipe)
    return dict(model.sampling) if model else {}


def register_converted(kind: str, build: Callable[[Any, dict], Any]) -> None:
    CONVERTED[kind] = build


def register_prompt_set(name: str, prompts: Callable[..., list[str]]) -> None:
    PROMPT_SETS[name] = prompts


@dataclass(frozen=True)
class Engine:
    """A deployment engine: how a quantized model goes onto it (``export``) and comes back generating (``load``).

    ``export(pipe, out, *, overwrite=False, group=None, batch=2) -> Path`` writes the quantized pipeline (or denoiser)
    in the engine's form (``group``: one timestep group, for formats that hold one; ``batch``: the traced batch);
    ``load(folder, *, device=None, torch_dtype=None)`` returns the pipeline (a bare denoiser for a bare export) whose
    denoiser runs on the engine, or None for an export-only format; ``is_folder(path)`` says ``path`` is this
    engine's export (it then loads on this engine whatever backend was asked); ``deploy(pipe)`` puts an in-memory
    quantized pipeline on the engine without a folder (``load(save_folder, backend=name)``, ``bench --backend``),
    None if it cannot. Registered by the module that implements it (``diffquant/deployment/<name>.py``).
    """

    name: str
    export: Callable[..., Path]
    load: Callable[..., Any] | None
    is_folder: Callable[[Path], bool]
    deploy: Callable[[Any], Any] | None = None
    summary: str = ""


ENGINES: dict[str, Engine] = _Table()


def register_engine(engine: Engine) -> Engine:
    ENGINES[engine.name] = engine
    return engine


def engine(name: str, *, loads: bool = False) -> Engine:
    """The registered engine ``name`` (``loads``: one that runs models, not only writes them); else a one-line error."""
    found = ENGINES.get(name)
    if found is None or (loads and found.load is None):
        names = sorted(n for n, e in ENGINES.items() if e.load is not None or not loads)
        what = "backend" if loads else "export format"
        hint = f" ({name} is an export format only)" if found is not None else ""
        raise ValueError(f"unknown {what} {name!r}{hint}; choose one of {', '.join(names)}")
    return found
