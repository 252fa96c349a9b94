"""diffusers-native loading: after ``import diffquant``, ``UNet2DConditionModel.from_pretrained(q/"unet")`` (any
denoiser class) and ``DiffusionPipeline.from_pretrained(q)`` return the quantized model ``diffquant.load(q)`` returns.

diffusers keeps its quantization backends in two closed tables in ``diffusers.quantizers.auto``
(``AUTO_QUANTIZER_MAPPING``, ``AUTO_QUANTIZATION_CONFIG_MAPPING``), keyed by the ``quant_method`` of a model's
``quantization_config``. SDNQ joins them by writing its classes there when imported; diffquant does the same, lazily, so
that ``import diffquant`` loads neither diffusers nor torch: ``install()`` registers at once when diffusers' quantizer
module is already loaded, else leaves a finder on ``sys.meta_path`` that registers right after diffusers imports it.

What happens inside ``from_pretrained``: a saved denoiser's config.json names ``quant_method: "diffquant"`` and its
folder holds an empty ``diffusion_pytorch_model.safetensors`` (serialization.py), so diffusers builds the float model on
the meta device and reads no tensor. The hooks learn the folder from that file's path, check what can be checked (no
pickles; the folder's files against the manifest of the save, when there is one), give the parameters memory and run
``serialization.restore_denoiser``: the one restore behind ``diffquant.load``, so outputs are bit-identical.
``diffquant.load`` stays the documented safe path: it refuses a folder without its manifest.
"""

from __future__ import annotations

import importlib.abc
import sys
import warnings
from enum import Enum
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from .registry import HF_QUANT_METHOD

TARGET = "diffusers.quantizers.auto"
TABLES = ("AUTO_QUANTIZER_MAPPING", "AUTO_QUANTIZATION_CONFIG_MAPPING")
# The DiffusersQuantizer hooks the loading goes through (diffusers 0.42 has them all).
HOOKS = ("update_torch_dtype", "maybe_update_loaded_keys", "update_missing_keys", "preprocess_model", "postprocess_model")
SUPPORTED = "diffusers>=0.42 (tested with 0.42.1)"


class QuantMethod(str, Enum):
    """diffusers reads ``quant_method.value`` (its own enum is closed)."""

    DIFFQUANT = HF_QUANT_METHOD

    def __str__(self) -> str:  # diffusers' messages format it
        return self.value


def install() -> None:
    """Register with diffusers now if its quantizer module is loaded, else right after it is (``import diffquant``)."""
    after_import(TARGET, register)


def after_import(name: str, callback: Callable[[ModuleType], None]) -> None:
    """``callback(module)`` now if module ``name`` is loaded, else once right after its first import (a one-shot finder
    on ``sys.meta_path``): how diffquant joins another library's tables without importing it (diffusers here, peft in
    ``diffquant.lora``)."""
    if name in sys.modules:
        callback(sys.modules[name])
    elif not any(isinstance(f, _RegisterAfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport(name, callback))


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for ``name`` it wraps the real loader so ``callback`` runs once the module has run.

    It leaves ``sys.meta_path`` only when the module actually executes: availability probes such as
    ``importlib.util.find_spec("peft")`` (diffusers and transformers make them) build a spec and never load it.
    """

    def __init__(self, name: str, callback: Callable[[ModuleType], None]) -> None:
        self.name, self.callback, self._searching = name, callback, False

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name or self._searching:
            return None
        self._searching = True  # the real finders below may recurse into meta_path
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None and spec.loader is not None:
                    spec.loader = _ThenRegister(spec.loader, self)
                    return spec
        finally:
            self._searching = False
        return None


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader: Any, finder: _RegisterAfterImport) -> None:
        self.loader, self.finder = loader, finder

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        if self.finder in sys.meta_path:  # once
            sys.meta_path.remove(self.finder)
            self.finder.callback(module)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... of the real loader
        return getattr(self.loader, name)


def register(auto: ModuleType) -> None:
    """Put diffquant's classes in diffusers' tables. A diffusers without the names the hooks use gets a stand-in
    instead, which fails with one line when a diffquant folder loads (every other model loads as before)."""
    missing = [t for t in TABLES if not isinstance(getattr(auto, t, None), dict)]
    try:
        from diffusers.quantizers.base import DiffusersQuantizer
        from diffusers.quantizers.quantization_config import QuantizationConfigMixin
    except ImportError as e:
        missing.append(e.name or str(e))
    else:
        missing += [f"DiffusersQuantizer.{h}" for h in HOOKS if not hasattr(DiffusersQuantizer, h)]
    quantizer, config = (_unsupported(missing),) * 2 if missing else _classes(DiffusersQuantizer, QuantizationConfigMixin)
    for table, cls in zip(TABLES, (quantizer, config)):
        if isinstance(getattr(auto, table, None), dict):
            getattr(auto, table)[HF_QUANT_METHOD] = cls


def unsupported_error(missing: list[str]) -> ImportError:
    import diffusers

    return ImportError(
        f"diffusers {diffusers.__version__} lacks {', '.join(missing)}, which loading a diffquant folder with "
        f"from_pretrained needs ({SUPPORTED}); install a supported diffusers or load it with diffquant.load(folder)"
    )


def _unsupported(missing: list[str]) -> type:
    """A stand-in for both tables: diffusers' first call on it (``from_dict`` or the constructor) raises."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise unsupported_error(missing)

    return type("UnsupportedDiffusers", (), {"__init__": fail, "from_dict": classmethod(fail)})


def _classes(base: type, config_base: type) -> tuple[type, type]:
    """The quantizer and config classes, built once diffusers is imported (their bases are diffusers')."""

    class DiffquantConfig(config_base):
        """A saved denoiser's ``quantization_config``: it names diffquant; what was quantized and how is in
        diffquant_config.json beside it."""

        def __init__(self, quant_method: str = HF_QUANT_METHOD, diffquant_version: str | None = None) -> None:
            self.quant_method = QuantMethod(quant_method)
            self.diffquant_version = diffquant_version

        def to_diff_dict(self) -> dict:  # repr and to_json_string call it; diffusers' mixin lacks it (0.42.1)
            return self.to_dict()

    class DiffquantQuantizer(base):
        """Rebuilds the saved quantized denoiser inside ``from_pretrained`` (module docstring)."""

        requires_calibration = True  # only saved diffquant models: from_pretrained(float, quantization_config=) is refused

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            self.folder: Path | None = None
            self.torch_dtype = None

        def update_torch_dtype(self, torch_dtype: Any) -> Any:
            self.torch_dtype = torch_dtype
            return torch_dtype

        def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[Any]) -> list[str]:
            self.folder = Path(checkpoint_files[0]).absolute().parent  # the empty placeholder beside the real files
            return loaded_keys

        def update_missing_keys(self, model: Any, missing_keys: list[str], prefix: str) -> list[str]:
            return []  # the restore loaded every tensor itself

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            if self.folder is None:  # diffusers no longer passed the weights' path through maybe_update_loaded_keys
                raise unsupported_error(["the checkpoint path in DiffusersQuantizer.maybe_update_loaded_keys"])
            return _restore(model, self.folder, self.torch_dtype)

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            return model

        @property
        def is_serializable(self) -> bool:
            """False: ``save_pretrained`` (which asks, then refuses) would lose the integer codes and the plan."""
            warnings.warn("a diffquant model saves with diffquant.save(pipe_or_denoiser, folder), not save_pretrained",
                          stacklevel=2)
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    return DiffquantQuantizer, DiffquantConfig


def _restore(model: Any, folder: Path, torch_dtype: Any) -> Any:
    """``model`` (parameters on the meta device) becomes the denoiser saved in ``folder``, through serialization."""
    import torch

    from . import serialization  # late: diffusers may still be importing when ``register`` runs

    if not (folder / serialization.QUANT_CONFIG).is_file():
        raise FileNotFoundError(
            f"{folder / serialization.QUANT_CONFIG} missing: from_pretrained reads a diffquant model from a local folder "
            "written by diffquant.save; download the whole folder and pass its path"
        )
    serialization.verify_denoiser(folder)
    meta = serialization.read_denoiser_meta(folder)
    dtype = getattr(torch, meta["dtype"])
    for module in model.modules():  # memory for what diffusers left on the meta device; the restore fills all of it
        for name, param in module.named_parameters(recurse=False):
            if param.is_meta:
                module._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=dtype), param.requires_grad)
    serialization.restore_denoiser(model, folder, meta)
    # Asked for another dtype: cast after the restore, as diffquant.load does (diffusers' own to() refuses any dtype
    # on a model it flagged quantized; diffquant's layers cast like float ones).
    return torch.nn.Module.to(model, torch_dtype) if torch_dtype is not None else model
