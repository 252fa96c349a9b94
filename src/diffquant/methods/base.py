"""What a method is: a name, its options dataclass, its defaults, and a ``run`` over a ``QuantJob``."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from ..store import MemoryBudget, mapped_copy
from ..typed import conforms, field_types, type_name

if TYPE_CHECKING:
    from ..calibration import CalibrationSet
    from ..config import QuantConfig
    from ..sampling import SamplingSettings


@dataclass
class NoOptions:
    """The method takes no options."""


@dataclass
class QuantJob:
    """Everything a method run needs: the denoiser, its pipeline (if any), config and data sources."""

    denoiser: nn.Module
    config: QuantConfig
    pipeline: Any | None = None
    prompts: list[str] | None = None
    calibration: CalibrationSet | None = None
    sampling_defaults: dict = field(default_factory=dict)
    workdir: Path | None = None
    progress: bool = True
    _memory: MemoryBudget | None = field(default=None, repr=False)

    def memory(self) -> MemoryBudget:
        """The job's one data budget (``config.max_memory``), spilling under ``workdir/spill`` when there is a workdir."""
        if self._memory is None:
            self._memory = MemoryBudget(self.config.max_memory, spill_root=self.workdir / "spill" if self.workdir else None)
        return self._memory

    def float_reference(self) -> nn.Module:
        """An untouched float copy of the denoiser (reconstruction's targets). On CPU it is memory-mapped from a
        file in the budget's spill folder (``mapped_copy``): page cache, not a second copy in process memory."""
        if any(p.device.type != "cpu" for p in self.denoiser.parameters()):
            return copy.deepcopy(self.denoiser)
        return mapped_copy(self.denoiser, self.memory().spill_path())

    def sampling(self) -> SamplingSettings:
        """The calibration sampling settings, resolved: the config's, else the registered defaults, else the pipeline's."""
        return self.config.calibration.sampling.resolve(self.pipeline, self.sampling_defaults)

    def calibration_set(self, keep_outputs: bool = False) -> CalibrationSet:
        """The recorded calibration calls: given, or recorded now from the float pipeline."""
        from ..calibration import record_denoiser_calls

        if self.calibration is not None and (not keep_outputs or all(c.output is not None for c in self.calibration)):
            return self.calibration
        if self.pipeline is None or not self.prompts:
            raise ValueError(
                "calibration data needed: pass calibration=<list of prompts> with a pipeline, "
                "or calibration=<CalibrationSet> for a bare denoiser"
            )
        cfg = self.config.calibration
        self.calibration = record_denoiser_calls(
            self.pipeline, self.prompts[: cfg.num_prompts], cfg, keep_outputs=keep_outputs, progress=self.progress,
            defaults=self.sampling_defaults, cache_dir=None if self.workdir is None else self.workdir / "calibration",
            memory=self.memory(),
        )
        return self.calibration


class Method:
    """A quantization recipe. Subclasses set ``name``, ``Options`` and implement ``run``."""

    name = ""
    Options: type = NoOptions
    split_shortcut_default = False

    def options(self, config: QuantConfig) -> Any:
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = set(config.options) - known
        if unknown:
            raise ValueError(
                f"unknown {self.name} options {sorted(unknown)}; valid: {', '.join(sorted(known)) or 'none'}"
            )
        types = field_types(self.Options)
        for key, value in config.options.items():
            if not conforms(value, types[key]):
                raise ValueError(f"{self.name} option {key}={value!r}: expected {type_name(types[key])}")
        return self.Options(**config.options)

    def run(self, job: QuantJob) -> None:
        raise NotImplementedError
