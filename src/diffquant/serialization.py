"""``diffquant.save`` / ``diffquant.load``: diffusers-style folders, safetensors + JSON, verified on load.

Layout of a saved pipeline (a bare denoiser saves the ``unet/`` part alone)::

    model_index.json, scheduler/, text_encoder/, tokenizer/, vae/   untouched components
    unet/config.json                     the architecture (diffusers config) + ``quantization_config`` naming diffquant
    unet/diffusion_pytorch_model.safetensors   an empty placeholder where diffusers looks for weights (hf_quantizer.py)
    unet/diffquant_config.json           QuantConfig, layer plan, lifecycle state of each module, method report
    unet/diffquant_model.safetensors     integer weight codes + scales, float parameters as they were
    diffquant_manifest.json              sha256 and size of every file, library versions

Quantized weights are stored as their integer codes; loading dequantizes them, and re-quantizing
those values gives the same codes, so a loaded model reproduces the saved one bit for bit.

A converted model (``diffquant.convert``, format 2) stores its integer layers as they run:
``<layer>.qweight`` (int8 codes, or int4 codes packed two per byte), scales, bias; float tensors
that fp16 represents exactly are stored in fp16 (lossless), and loading restores the integer
layers with the kernel each one chose.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import diffusers
import torch
from safetensors.torch import load_file
from torch import nn

from . import __version__
from .config import QuantConfig
from .determinism import TIMINGS, canonical_safetensors_header, merge_timings, split_timings
from .io import atomic_save_tensors, atomic_write_json, file_table, null_components, refuse_pickles, verify_files
from .nn import QuantState, quantized_layers
from .outputs import claim_output
from .quant import TimestepGroups
from .registry import CONVERTED, HF_QUANT_METHOD
from .bits import BITS_CONVENTION, average_bits
from .wrap import get_denoiser, quant_record, set_submodule, wrap_denoiser

FORMAT_VERSION = 1
CONVERTED_FORMAT_VERSION = 2
MANIFEST = "diffquant_manifest.json"
QUANT_CONFIG = "diffquant_config.json"
QUANT_WEIGHTS = "diffquant_model.safetensors"
# diffusers' ``from_pretrained`` needs a weights file by its own name before any quantizer hook runs; this empty one
# (no tensors: nothing to read twice) lets it reach diffquant's hook, which loads ``QUANT_WEIGHTS`` (hf_quantizer.py).
DIFFUSERS_PLACEHOLDER = "diffusion_pytorch_model.safetensors"
_DENOISER_ATTRS = ("unet", "transformer")


def denoiser_attr(pipe: Any, denoiser: nn.Module) -> str:
    for attr in _DENOISER_ATTRS:
        if getattr(pipe, attr, None) is denoiser:
            return attr
    raise TypeError("the pipeline's denoiser is neither `unet` nor `transformer`")


def with_denoiser(pipe: Any, denoiser: nn.Module, attr: str | None = None) -> Any:
    """The same pipeline class built around ``denoiser`` in place of its own (``attr``: default where its denoiser
    is); the pipeline's __init__ reads the new denoiser's config. The other components are shared."""
    attr = attr or denoiser_attr(pipe, get_denoiser(pipe))
    return type(pipe)(**{**pipe.components, attr: denoiser})


def denoiser_tensors(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each quantized weight replaced by its integer codes (``<layer>.weight_codes``)."""
    tensors = dict(denoiser.state_dict())
    for name, module in quantized_layers(denoiser).items():
        codes = module.saved_weight_codes()
        if codes is not None:
            tensors.pop(f"{name}.weight")
            tensors[f"{name}.weight_codes"] = codes
    return tensors


def _save_denoiser(denoiser: nn.Module, folder: Path) -> None:
    record = quant_record(denoiser)
    layers = quantized_layers(denoiser)
    not_frozen = sorted({m.state.value for m in layers.values()} - {QuantState.FROZEN.value, QuantState.CONVERTED.value})
    if not_frozen:
        raise ValueError(f"only frozen models can be saved (found states {not_frozen}); finish diffquant.quantize first")
    if any(name.endswith(".base_layer") for name in layers):
        raise ValueError("a LoRA is loaded: pipe.unload_lora_weights() before saving (pipe.fuse_lora() first keeps it, "
                         "fused into the quantized weights)")
    converted = {name: form for name, m in layers.items() if (form := m.converted_form()) is not None}
    folder.mkdir(parents=True, exist_ok=True)
    _write_config(denoiser, folder)
    dtype = next(denoiser.parameters()).dtype
    tensors = denoiser_tensors(denoiser)
    extra = {}
    if converted:
        tensors = {k: _fp16_if_exact(v) for k, v in tensors.items()}
        extra["converted"] = converted
    report, timings = split_timings(record.report)
    atomic_write_json(folder / TIMINGS, timings)
    atomic_write_json(folder / QUANT_CONFIG, {
        **extra,
        "format_version": CONVERTED_FORMAT_VERSION if converted else FORMAT_VERSION,
        "class": type(denoiser).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "quant_config": record.config.to_dict(),
        "plan": record.plan(),
        "states": {name: m.state.value for name, m in layers.items()},
        "report": report,
        # The one average-bits convention (diffquant.bits): `info` reads it from here, eval/bench compute the same function.
        "average_bits": {"convention": BITS_CONVENTION,
                         **{k: v if math.isfinite(v) else None for k, v in average_bits(denoiser).items()}},
    })
    atomic_save_tensors(tensors, folder / QUANT_WEIGHTS, metadata={"format": "diffquant", "version": __version__})
    canonical_safetensors_header(folder / QUANT_WEIGHTS)


def _write_config(denoiser: nn.Module, folder: Path) -> None:
    """diffusers' config.json plus the ``quantization_config`` by which ``from_pretrained`` finds diffquant's hook;
    the model's own config is left untouched (written as diffusers writes it, then hashed in the manifest)."""
    config = json.loads(denoiser.to_json_string())
    config["quantization_config"] = {"quant_method": HF_QUANT_METHOD, "diffquant_version": __version__}
    atomic_write_json(folder / "config.json", config)
    atomic_save_tensors({}, folder / DIFFUSERS_PLACEHOLDER, metadata={
        "format": "pt", "diffquant": f"weights in {QUANT_WEIGHTS}; load with diffquant.load or after `import diffquant`"})
    canonical_safetensors_header(folder / DIFFUSERS_PLACEHOLDER)


def _fp16_if_exact(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp16 when that loses nothing (e.g. weights of an fp16 checkpoint held in fp32)."""
    if t.dtype != torch.float32 or not t.numel():
        return t
    half = t.to(torch.float16)
    return half if torch.equal(half.to(torch.float32), t) else t


def save_components(pipe: Any, folder: Path, *, skip: nn.Module) -> None:
    """Every component of ``pipe`` but ``skip`` (the denoiser, saved in its own form), plus model_index.json."""
    for name, component in pipe.components.items():
        if component is not None and component is not skip and hasattr(component, "save_pretrained"):
            component.save_pretrained(folder / name)
    pipe.save_config(folder)


def save(pipe_or_denoiser: Any, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write a quantized pipeline (or denoiser) to ``folder``; it appears (or replaces the old one, with
    ``overwrite``) only when complete, and a concurrent writer of the same folder is refused (``outputs``)."""
    folder = Path(folder)
    denoiser = get_denoiser(pipe_or_denoiser)
    quant_record(denoiser)
    with claim_output(folder, overwrite=overwrite, flag="overwrite=True (--overwrite)") as output:
        tmp = output.tmp
        tmp.mkdir()
        if isinstance(pipe_or_denoiser, nn.Module):
            _save_denoiser(denoiser, tmp)
        else:
            pipe = pipe_or_denoiser
            attr = denoiser_attr(pipe, denoiser)
            save_components(pipe, tmp, skip=denoiser)
            _save_denoiser(denoiser, tmp / attr)
        table = file_table(tmp, exclude=tuple(p.relative_to(tmp).as_posix() for p in tmp.rglob(TIMINGS)))
        import transformers

        atomic_write_json(tmp / MANIFEST, {
            "format_version": FORMAT_VERSION,
            "files": table,
            "versions": {"diffquant": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
        })
        output.publish()
    return folder


def verify(folder: str | Path) -> dict:
    """Check a saved folder against its manifest; returns the manifest. Raises naming the bad file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found; pass a folder written by diffquant.save or `diffquant quantize --out`")
    refuse_pickles(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} missing: {folder} was not written by diffquant.save (or the save did not finish)")
    manifest = _read_manifest(manifest_path)
    verify_files(folder, manifest["files"])
    return manifest


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ValueError(f"{path} is corrupted (not JSON); save the model again") from None
    check_format(manifest, path, FORMAT_VERSION)
    return manifest


def verify_denoiser(folder: Path) -> bool:
    """What can be checked of one saved denoiser folder reached without ``load`` (``from_pretrained(q/"unet")``):
    no pickles in it, and its files against the manifest of the save it belongs to (in it, or in the pipeline folder
    above it). Returns False when no manifest lists it (a copied-out subfolder): then nothing was hashed."""
    refuse_pickles(folder)
    for root in (folder, folder.parent):
        if (root / MANIFEST).is_file():
            prefix = "" if root == folder else f"{folder.name}/"
            table = {k: v for k, v in _read_manifest(root / MANIFEST)["files"].items() if k.startswith(prefix)}
            if table:
                verify_files(root, table)
                return True
    return False


def check_format(meta: dict, path: Path, newest: int) -> None:
    """Refuse a file marked with a format version newer than this diffquant reads (load and ``info`` alike)."""
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or version > newest:
        raise ValueError(f"{path} has format version {version}, newer than this diffquant reads ({newest}); upgrade diffquant")


def is_quantized_folder(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_denoiser_meta(folder: Path) -> dict:
    """A saved denoiser's ``diffquant_config.json``, its format checked and this run's timings merged into the report."""
    meta = json.loads((folder / QUANT_CONFIG).read_text())
    check_format(meta, folder / QUANT_CONFIG, CONVERTED_FORMAT_VERSION)
    timings = folder / TIMINGS
    meta["report"] = merge_timings(meta.get("report", {}), json.loads(timings.read_text()) if timings.is_file() else {})
    return meta


def _load_denoiser(folder: Path, device: str | torch.device | None) -> nn.Module:
    meta = read_denoiser_meta(folder)
    cls = getattr(diffusers, meta["class"], None)
    if cls is None or not issubclass(cls, diffusers.ModelMixin):
        raise ValueError(f"{folder}: unsupported denoiser class {meta['class']!r}")
    # eval() as from_pretrained does: a model built from_config trains (dropout on), so loads were not deterministic
    denoiser = restore_denoiser(cls.from_config(cls.load_config(folder)), folder, meta).eval()
    return denoiser.to(device) if device is not None else denoiser


def restore_denoiser(denoiser: nn.Module, folder: Path, meta: dict) -> nn.Module:
    """Turn ``denoiser``, a float model built from ``folder``'s config, into the saved quantized one, in place:
    the one restore behind ``load`` and diffusers' ``from_pretrained`` (hf_quantizer.py). ``meta`` is
    ``read_denoiser_meta(folder)``; every saved tensor is loaded, so the float weights' values do not matter."""
    dtype = getattr(torch, meta["dtype"])
    if next(denoiser.parameters()).dtype != dtype:  # diffusers' to() refuses a dtype once from_pretrained flagged it quantized
        denoiser.to(dtype)
    config = QuantConfig.from_dict(meta["quant_config"])
    plan = meta["plan"]
    record = wrap_denoiser(
        denoiser, config, TimestepGroups.from_dict(plan["groups"]), float_layers=plan["float_layers"],
        skip_splits=plan["skip_splits"], calibrate_weights=False,
    )
    record.report = meta.get("report", {})
    tensors = load_file(str(folder / QUANT_WEIGHTS))
    converted = meta.get("converted", {})
    for name, form in converted.items():
        build = CONVERTED.get(form["kind"])
        if build is None:
            raise ValueError(f"{folder}: layer {name} was saved as a converted {form['kind']!r} layer, which this "
                             "diffquant cannot rebuild; upgrade diffquant")
        try:
            set_submodule(denoiser, name, build(denoiser.get_submodule(name), form))
        except ValueError as e:
            raise ValueError(f"saved layer {name}: {e}; save the model again") from None
    layers = quantized_layers(denoiser)
    codes = {
        name: tensors.pop(f"{name}.weight_codes") for name, m in layers.items()
        if m.weight_quantizer is not None and name not in converted
    }
    result = denoiser.load_state_dict(tensors, strict=False)
    expected_missing = {f"{name}.weight" for name in codes}
    if set(result.missing_keys) != expected_missing or result.unexpected_keys:
        extra = sorted(set(result.missing_keys) ^ expected_missing)[:3] + sorted(result.unexpected_keys)[:3]
        raise ValueError(f"{folder / QUANT_WEIGHTS} does not match its config (keys {extra}); save the model again")
    for name, code in codes.items():
        layers[name].restore_weight_codes(code)
    # Saved models are frozen or converted (``save`` refuses others); converted layers are born converted.
    states = meta.get("states", {})
    for name, module in layers.items():
        if name not in converted:
            module.restore_state(states.get(name, QuantState.FROZEN.value))
    return denoiser


def load(folder: str | Path, *, device: str | torch.device | None = None, torch_dtype: torch.dtype | None = None) -> Any:
    """Load what ``save`` wrote: a pipeline that generates (or the bare denoiser), after verifying hashes.

    ``diffquant.load`` (``deployment.load``) adds ``backend=`` for the deployed forms.
    """
    folder = Path(folder)
    verify(folder)
    if not (folder / "model_index.json").is_file():
        return _load_denoiser(folder, device)
    attr = next((a for a in _DENOISER_ATTRS if (folder / a / QUANT_CONFIG).is_file()), None)
    if attr is None:
        raise ValueError(f"{folder} has a model_index.json but no quantized unet/ or transformer/ folder")
    denoiser = _load_denoiser(folder / attr, device)
    # One dtype for the whole pipeline: the one it was quantized in (e.g. --dtype bfloat16) unless one is asked for.
    if torch_dtype is not None:
        denoiser.to(torch_dtype)
    kwargs: dict = {**null_components(folder), attr: denoiser, "use_safetensors": True,
                    "torch_dtype": torch_dtype or next(denoiser.parameters()).dtype}
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    if device is not None:
        pipe = pipe.to(device)
    return pipe
