"""The mini-zoo evaluator: a small CNN that reads a scene's attributes back from its image.

It gives two things the rest of the project needs on the mini models: attribute accuracy of a
generated image against its caption (does the picture show what was asked?) and a feature vector
for Fréchet distance (no Inception weights can be downloaded here).

The network predicts one slot per position (empty or shape, colour, size) plus the background, so
a caption is scored object by object at the position it names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import data

EVALUATOR_DIR = Path(__file__).parent / "models" / "evaluator"
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position", "background", "count", "all")
CONFIDENCE = 0.5  # top-class softmax probability that counts as "classified with confidence" (Evaluator.valid_scenes)
TOLERANCE = 0.06  # mean absolute difference between an image and the re-rendered scene read from it (same)


class EvaluatorNet(nn.Module):
    """Conv stack 32x32 -> 4x4, a 256-d feature layer, and per-slot heads."""

    def __init__(self, width: int = 32, feature_dim: int = 256) -> None:
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.body = nn.Sequential(
            *block(3, w), *block(w, w), nn.AvgPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.AvgPool2d(2),
            *block(2 * w, 4 * w), *block(4 * w, 4 * w), nn.AvgPool2d(2),
        )
        self.fc = nn.Linear(4 * w * 16, feature_dim)
        n_pos = len(data.POSITION_NAMES)
        self.background = nn.Linear(feature_dim, len(data.BACKGROUND_NAMES))
        self.shape = nn.Linear(feature_dim, n_pos * (len(data.SHAPES) + 1))  # class 0 = empty slot
        self.colour = nn.Linear(feature_dim, n_pos * len(data.COLOUR_NAMES))
        self.size = nn.Linear(feature_dim, n_pos * len(data.SIZE_NAMES))
        self.config = {"width": width, "feature_dim": feature_dim}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, 32, 32] in [0, 1] -> [N, feature_dim] (post-activation penultimate layer)."""
        if x.shape[-2:] != (data.RESOLUTION, data.RESOLUTION):
            x = F.interpolate(x, size=(data.RESOLUTION, data.RESOLUTION), mode="bilinear", antialias=True,
                              align_corners=False)
        return F.silu(self.fc(self.body(x * 2 - 1).flatten(1)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(x)
        n, p = x.shape[0], len(data.POSITION_NAMES)
        return {
            "features": f,
            "background": self.background(f),
            "shape": self.shape(f).view(n, p, -1),
            "colour": self.colour(f).view(n, p, -1),
            "size": self.size(f).view(n, p, -1),
        }


def scene_targets(scenes: Sequence[data.Scene]) -> dict[str, torch.Tensor]:
    """Per-slot class targets; colour/size of an empty slot are -100 (ignored by the loss)."""
    n, p = len(scenes), len(data.POSITION_NAMES)
    shape = torch.zeros(n, p, dtype=torch.long)
    colour = torch.full((n, p), -100, dtype=torch.long)
    size = torch.full((n, p), -100, dtype=torch.long)
    background = torch.zeros(n, dtype=torch.long)
    for i, s in enumerate(scenes):
        background[i] = data.BACKGROUND_NAMES.index(s.background)
        for o in s.objects:
            j = data.POSITION_NAMES.index(o.position)
            shape[i, j] = data.SHAPES.index(o.shape) + 1
            colour[i, j] = data.COLOUR_NAMES.index(o.colour)
            size[i, j] = data.SIZE_NAMES.index(o.size)
    return {"shape": shape, "colour": colour, "size": size, "background": background}


def to_tensor(images) -> torch.Tensor:
    """Accept [N,3,H,W] float in [0,1], a list of PIL images, or uint8 numpy [N,H,W,3]; return float [N,3,H,W]."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensor must be [N, 3, H, W] in [0, 1], got shape {tuple(x.shape)}")
        return x.clamp(0, 1)
    if isinstance(images, np.ndarray):
        arr = images
    elif isinstance(images, (list, tuple)) and len(images) > 0:
        arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    else:
        raise ValueError("images must be a float tensor [N,3,H,W], a list of PIL images or a uint8 array [N,H,W,3]")
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"image array must be [N, H, W, 3], got shape {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    return x / 255.0 if arr.dtype == np.uint8 else x.clamp(0, 1)


class Evaluator:
    """Scores images against captions and embeds them for Fréchet distance."""

    def __init__(self, net: EvaluatorNet, device: str | torch.device = "cpu", batch_size: int = 256) -> None:
        self.net = net.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def _run(self, images) -> dict[str, torch.Tensor]:
        x = to_tensor(images)
        outs = [self.net(x[i:i + self.batch_size].to(self.device)) for i in range(0, len(x), self.batch_size)]
        return {k: torch.cat([o[k].float().cpu() for o in outs]) for k in outs[0]}

    def features(self, images) -> torch.Tensor:
        """[N, D] feature vectors (D=256) for Fréchet distance between image sets."""
        return self._run(images)["features"]

    def predict(self, images) -> list[data.Scene]:
        """The scene the evaluator sees in each image."""
        return _read_scenes(self._run(images))

    def valid_scenes(self, images, confidence: float = CONFIDENCE, tolerance: float = TOLERANCE) -> list[bool]:
        """Per image: does it show a valid scene, every object's shape and colour classified with confidence?

        The judge of an unconditional model, which has no caption to be scored against. "With confidence":
        at each of the five position slots the shape head's softmax (empty or one of the shapes) gives its top
        class at least ``confidence``, so a half-drawn blob is neither an object nor an empty slot, and at each
        occupied slot the colour head does too. "Valid": at least one object, laid out as the data draws scenes
        (one object anywhere, or two at left and right or top and bottom), and the scene read is the image:
        re-rendered (no jitter) it differs from the image by at most ``tolerance`` in mean absolute pixel value.
        That last test is needed because the heads are confident on images unlike any scene (uniform noise
        gets p > 0.9 on most slots); real scenes differ from their re-rendering by < 0.04 (the ±1 px jitter),
        noise by > 0.18. Real scenes (``data.real_scenes``) pass at ~100 % (tested).
        """
        x = to_tensor(images)
        out = self._run(x)
        shape = out["shape"].softmax(-1).max(-1)
        colour_ok = out["colour"].softmax(-1).amax(-1) >= confidence
        occupied = shape.indices > 0
        confident = (shape.values >= confidence).all(1) & (colour_ok | ~occupied).all(1)
        layouts = {frozenset({p}) for p in data.POSITION_NAMES} | {frozenset(pair) for pair in data.TWO_OBJECT_LAYOUTS}
        scenes = _read_scenes(out)
        rendered = torch.from_numpy(np.stack([data.render(s) for s in scenes]).transpose(0, 3, 1, 2))
        faithful = (F.interpolate(x, size=rendered.shape[-2:], mode="area") - rendered).abs().mean((1, 2, 3)) <= tolerance
        return [bool(confident[i] and faithful[i]) and frozenset(o.position for o in scenes[i].objects) in layouts
                for i in range(len(scenes))]

    def attribute_accuracy(self, images, prompts: Sequence[str]) -> dict[str, float]:
        """Fraction correct per attribute, judged against what each caption asks for.

        Object attributes (shape, colour, size, position) are scored per captioned object at the
        slot its position names: an empty slot there fails all four. ``background`` and ``count``
        (number of objects) are per image; ``all`` is the fraction of images entirely right.
        """
        return self.judge(images, prompts)[0]

    def judge(self, images, prompts: Sequence[str]) -> tuple[dict[str, float], list[bool]]:
        """``attribute_accuracy`` and, per image, whether everything its caption asks for is right (what ``all`` counts)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        predicted = self.predict(images)
        if len(predicted) != len(prompts):
            raise ValueError(f"got {len(predicted)} images but {len(prompts)} prompts; pass one prompt per image")
        hits = {a: 0 for a in ATTRIBUTES}
        n_obj = 0
        correct: list[bool] = []
        for pred, prompt in zip(predicted, prompts):
            want = data.parse_caption(prompt)
            by_pos = {o.position: o for o in pred.objects}
            image_ok = pred.background == want.background and len(pred.objects) == len(want.objects)
            hits["background"] += pred.background == want.background
            hits["count"] += len(pred.objects) == len(want.objects)
            for o in want.objects:
                n_obj += 1
                got = by_pos.get(o.position)
                ok = {"position": got is not None, "shape": got is not None and got.shape == o.shape,
                      "colour": got is not None and got.colour == o.colour, "size": got is not None and got.size == o.size}
                for k, v in ok.items():
                    hits[k] += v
                image_ok = image_ok and all(ok.values())
            hits["all"] += image_ok
            correct.append(bool(image_ok))
        n_img = len(prompts)
        return {a: hits[a] / (n_obj if a in ("shape", "colour", "size", "position") else n_img) for a in ATTRIBUTES}, correct


def _read_scenes(out: dict[str, torch.Tensor]) -> list[data.Scene]:
    """The scenes (no jitter) the evaluator's head outputs ``out`` describe: per slot the top shape, colour, size."""
    scenes = []
    for i in range(len(out["features"])):
        objs = []
        for j, pos in enumerate(data.POSITION_NAMES):
            s = int(out["shape"][i, j].argmax())
            if s > 0:
                objs.append(data.SceneObject(data.SHAPES[s - 1], data.COLOUR_NAMES[int(out["colour"][i, j].argmax())],
                                             data.SIZE_NAMES[int(out["size"][i, j].argmax())], pos))
        scenes.append(data.Scene(tuple(objs), data.BACKGROUND_NAMES[int(out["background"][i].argmax())]))
    return scenes


def load_evaluator(path: str | Path | None = None, device: str | torch.device = "cpu") -> Evaluator:
    """Load the trained evaluator (default: the one shipped in the package) from safetensors."""
    folder = Path(path) if path is not None else EVALUATOR_DIR
    weights, config = folder / "model.safetensors", folder / "config.json"
    if not weights.exists() or not config.exists():
        raise FileNotFoundError(f"no evaluator weights in {folder}; train them with `diffquant zoo train evaluator`")
    net = EvaluatorNet(**json.loads(config.read_text()))
    net.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    return Evaluator(net, device)


def save_evaluator(net: EvaluatorNet, folder: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """Write ``model.safetensors`` (``dtype``) and ``config.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(dtype).contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(net.config, indent=2))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, noise and small colour shifts, so generated (imperfect) images are read like real ones."""
    n = x.shape[0]
    blur = torch.rand(n, generator=gen) < 0.4
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        x = torch.where(blur[:, None, None, None], F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3), x)
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.06
    x = x + (torch.rand(n, 3, 1, 1, generator=gen) - 0.5) * 0.08
    return x.clamp(0, 1)


def train_evaluator(out: str | Path, steps: int = 2000, seed: int = 0, batch_size: int = 128, lr: float = 2e-3,
                    resume: bool = True, device: str = "cpu", checkpoint_every: int = 250, width: int = 32,
                    install: Path | None = None) -> dict:
    """Train the evaluator on fresh procedural batches (any split: it must read every composition)."""
    from ..outputs import claim_output
    from .checkpoint import load_checkpoint, save_checkpoint
    from .train import autocast, lr_at

    out = Path(out)
    torch.manual_seed(seed)
    net = EvaluatorNet(width=width).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    step = load_checkpoint(out / "checkpoint", {"net": net}, opt) if resume else 0
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    bar = tqdm(range(step, steps), desc="evaluator", initial=step, total=steps)
    loss_v = float("nan")
    for step in bar:
        images, _, scenes = data.make_batch(seed, step, batch_size, split="any")
        x = augment(torch.from_numpy(images), gen).to(device)
        t = {k: v.to(device) for k, v in scene_targets(scenes).items()}
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=100)
        with autocast(device):
            o = net(x)
        loss = (F.cross_entropy(o["background"].float(), t["background"])
                + F.cross_entropy(o["shape"].float().flatten(0, 1), t["shape"].flatten())
                + F.cross_entropy(o["colour"].float().flatten(0, 1), t["colour"].flatten(), ignore_index=-100)
                + F.cross_entropy(o["size"].float().flatten(0, 1), t["size"].flatten(), ignore_index=-100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_v = loss.item()
        bar.set_postfix(loss=f"{loss_v:.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save_checkpoint(out / "checkpoint", step + 1, {"net": net}, opt, {"loss": loss_v})
    net = net.float().cpu().eval()
    with claim_output(out / "evaluator", overwrite=True) as output:  # appears whole (diffquant.outputs)
        save_evaluator(net, output.tmp)
        metrics = evaluate_evaluator(load_evaluator(output.tmp))
        (output.tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        output.publish()
    return metrics


def evaluate_evaluator(ev: Evaluator, n: int = 256, seed: int = 12345) -> dict[str, float]:
    """Accuracy of the evaluator itself on real rendered images of the held-out captions."""
    prompts = data.heldout_prompts(n)
    rng = np.random.default_rng(seed)
    scenes = [data.parse_caption(p) for p in prompts]
    scenes = [data.Scene(s.objects, s.background, tuple((float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))
                                                        for _ in s.objects)) for s in scenes]
    images = np.stack([data.render(s) for s in scenes]).transpose(0, 3, 1, 2)
    return ev.attribute_accuracy(torch.from_numpy(images), prompts)
