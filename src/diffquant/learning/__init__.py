"""Learning quantization parameters on data, each piece usable on its own:

- ``reconstruction``: BRECQ block reconstruction with AdaRound and LSQ (Q-Diffusion, seed 001), resumable per block.
- ``loop``: the optimizer step reconstruction and QAT share (LSQ step sizes: ``quant.lsq.StepSizes``, one clamp).
- ``dataset``: serial dataset generation from the FP pipeline's sampling trajectories (sharded, resumable).
- ``timeprecalc``: time-dependent projections as float lookup tables, outside the quantized graph.
- ``sensitivity``: per-layer sensitivity on dataset rows, saved and plotted.
- ``qat``: the parallel/serial QAT loop with LSQ, full or low-rank weight tuning, inter-layer distillation, checkpoints.
- ``freezing``: oscillation tracking and selective freezing of weights.
- ``lowrank``: low-rank weight adapters, merged before freezing.
"""

from .dataset import SerialDataset, SerialDatasetConfig, generate_serial_dataset, record_features
from .freezing import SelectiveFreezer
from .qat import QATConfig, QATTrainer, check_training_memory
from .sensitivity import measure_layer_sensitivity, rank_layers, save_sensitivity
from .timeprecalc import TimePrecalculation, live_time_layers

__all__ = [
    "QATConfig", "QATTrainer", "SelectiveFreezer", "SerialDataset", "SerialDatasetConfig", "TimePrecalculation",
    "check_training_memory", "generate_serial_dataset", "live_time_layers", "measure_layer_sensitivity", "rank_layers", "record_features", "save_sensitivity",
]
