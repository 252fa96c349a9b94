"""Image metrics for paired evaluation. All images are float tensors [N, 3, H, W] in [0, 1].

PSNR and SSIM come from torchmetrics. LPIPS reuses torchmetrics' LPIPS pieces and its bundled linear
heads, with the AlexNet backbone read from a local file (torchvision, which would download it, is
not a dependency). Feature extractors for Fréchet distance and CLIP score load only from local
paths; anything missing raises :class:`MetricUnavailable` with the reason the report shows.
"""

from __future__ import annotations

import inspect
from pathlib import Path
import numpy as np
import torch
from torch import nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..stats import MetricUnavailable, frechet_distance  # noqa: F401  (the zoo's floor uses them too)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (data range 1); identical images give +inf."""
    return peak_signal_noise_ratio(a.double(), b.double(), data_range=1.0, reduction="none", dim=(1, 2, 3)).float()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11, σ 1.5, data range 1)."""
    return structural_similarity_index_measure(a.double(), b.double(), data_range=1.0, reduction="none").float()


# ---------------------------------------------------------------- LPIPS (AlexNet backbone from a local file)

def _alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features`` layout, so its state-dict keys (``features.N.*``) load directly."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


class LPIPS(nn.Module):
    """LPIPS (Zhang et al. 2018, 'alex' variant): torchmetrics' scaling layer, normalisation and linear heads."""

    _TAPS = (1, 4, 7, 9, 11)  # ReLU outputs after conv1..conv5
    _CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self, backbone_path: str | Path) -> None:
        super().__init__()
        from torchmetrics.functional.image import lpips as tm_lpips

        self._tm = tm_lpips
        path = Path(backbone_path)
        if not path.is_file():
            raise MetricUnavailable(f"LPIPS backbone file {path} not found; pass torchvision's alexnet weights (.pth or .safetensors)")
        self.scaling_layer = tm_lpips.ScalingLayer()
        self.features = _alexnet_features()
        state = {k.removeprefix("features."): v for k, v in _read_state_dict(path).items() if k.startswith("features.")}
        missing = set(self.features.state_dict()) - set(state)
        if missing:
            raise MetricUnavailable(f"{path} is not an AlexNet state dict (missing features.{sorted(missing)[0]}); pass torchvision's alexnet weights")
        self.features.load_state_dict(state)
        self.lins = nn.ModuleList([tm_lpips.NetLinLayer(c, use_dropout=True) for c in self._CHANNELS])
        heads = Path(inspect.getfile(tm_lpips)).parent / "lpips_models" / "alex.pth"
        lin_state = torch.load(str(heads), map_location="cpu", weights_only=True)
        self.lins.load_state_dict({k.removeprefix("lin"): v for k, v in lin_state.items() if k.startswith("lin")})
        self.eval().requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._TAPS:
                out.append(x)
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distance; inputs in [0, 1] (resized to 64 px at least, as AlexNet's stride needs)."""
        xa, xb = (self.scaling_layer(2 * t.float() - 1) for t in (a, b))
        if min(xa.shape[-2:]) < 64:
            xa, xb = (nn.functional.interpolate(t, size=(64, 64), mode="bilinear", align_corners=False) for t in (xa, xb))
        total = torch.zeros(len(a))
        for lin, fa, fb in zip(self.lins, self._taps(xa), self._taps(xb)):
            diff = (self._tm._normalize_tensor(fa) - self._tm._normalize_tensor(fb)) ** 2
            total += self._tm._spatial_average(lin(diff), keep_dim=False).reshape(len(a))
        return total


# ---------------------------------------------------------------- feature extractors

class InceptionFeatures:
    """Inception-v3 pool features from a TorchScript file (e.g. clean-fid's ``inception-2015-12-05.pt``).

    The module gets images resized to 299x299 with values in [0, 255]; a forward taking ``return_features``
    (clean-fid's) is called with it set, any other must return [N, D] features.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise MetricUnavailable(f"--inception-weights {path} not found; pass a TorchScript Inception file such as clean-fid's inception-2015-12-05.pt")
        try:
            self.model = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as e:  # noqa: BLE001 - any load failure means the file is not usable TorchScript
            raise MetricUnavailable(f"--inception-weights {path} is not a TorchScript module ({type(e).__name__}); export one with torch.jit.save") from None
        self.return_features = "return_features" in str(self.model.forward.schema)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        feats = []
        for i in range(0, len(images), batch_size):
            x = nn.functional.interpolate(images[i:i + batch_size].float(), size=(299, 299), mode="bilinear", align_corners=False) * 255.0
            out = self.model(x, return_features=True) if self.return_features else self.model(x)
            feats.append(out.reshape(len(x), -1).float())
        return torch.cat(feats)


def zoo_evaluator():
    """The mini zoo's evaluator, or MetricUnavailable saying why it cannot load."""
    try:
        from diffquant.zoo.evaluator import load_evaluator
    except ImportError as e:
        raise MetricUnavailable(f"diffquant.zoo is not importable ({e})") from None
    try:
        return load_evaluator()
    except (FileNotFoundError, OSError) as e:
        raise MetricUnavailable(f"zoo evaluator weights unavailable ({e})") from None


ZOO_SCENES = "zoo:scenes"  # --reference-images value: the mini zoo's real scenes (unconditional models)


def zoo_real_scenes(n: int) -> torch.Tensor:
    """``n`` real training-distribution scenes of the mini zoo, the ones its quality floor compares samples with."""
    try:
        from diffquant.zoo import data
    except ImportError as e:
        raise MetricUnavailable(f"diffquant.zoo is not importable ({e})") from None
    return torch.from_numpy(data.real_scenes(n))


def zoo_reference_images(prompts: list[str]) -> torch.Tensor:
    """Ground-truth renders of mini-zoo captions: the procedural scenes the captions describe."""
    try:
        from diffquant.zoo import data
    except ImportError as e:
        raise MetricUnavailable(f"diffquant.zoo is not importable ({e})") from None
    try:
        scenes = [data.parse_caption(p) for p in prompts]
    except ValueError as e:
        raise MetricUnavailable(f"prompts are not mini-zoo captions, so there is no rendered reference ({e}); pass --reference-images DIR") from None
    return torch.from_numpy(np.stack([data.render(s) for s in scenes])).permute(0, 3, 1, 2).contiguous()


def load_image_folder(folder: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """All PNG/JPEG images in ``folder`` (sorted), resized to ``size`` (H, W), as float [N, 3, H, W]."""
    from PIL import Image

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")) if folder.is_dir() else []
    if not files:
        raise MetricUnavailable(f"--reference-images {folder} holds no PNG/JPEG images; point it at a folder of reference images")
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)) for p in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


class ClipScorer:
    """CLIP score 100·max(cos(image, text), 0) (Hessel et al. 2021, torchmetrics' definition) with a local CLIP model.

    torchmetrics' CLIPScore expects transformers 4's ``get_image_features`` returning a tensor; transformers 5
    returns an output object, so the embeddings come from ``CLIPModel.forward`` here, which works on both.
    """

    def __init__(self, path: str | Path, batch_size: int = 32) -> None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise MetricUnavailable(f"--clip-model {path} is not a CLIP model folder (no config.json); pass a local transformers CLIPModel folder")
        from transformers import CLIPModel, CLIPProcessor

        self.model = CLIPModel.from_pretrained(str(path)).eval()
        self.processor = CLIPProcessor.from_pretrained(str(path))
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-image scores of ``images`` [N, 3, H, W] in [0, 1] against their own prompts."""
        scores = []
        for i in range(0, len(images), self.batch_size):
            batch = [(im * 255).round().to(torch.uint8) for im in images[i:i + self.batch_size]]
            inputs = self.processor(text=prompts[i:i + self.batch_size], images=batch, return_tensors="pt", padding=True, truncation=True)
            out = self.model(**inputs)
            cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
            scores.append(100 * cos.clamp_min(0))
        return torch.cat(scores).float()
