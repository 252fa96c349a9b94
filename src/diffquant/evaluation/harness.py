"""The paired evaluation: one FP reference, any number of models judged against it on the same pairs.

``Evaluation`` generates (or reads from cache) the reference images once, prepares every metric
whose weights are available, records why the others are skipped, and then scores each model
added to it. ``eval`` adds one model; ``bench`` adds one per method, bit width and peer.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from pathlib import Path

import torch

import diffquant

from . import metrics as M
from ..bits import coverage
from .coverage import layer_table, shipped_mib
from .curves import layer_sensitivity, timestep_error
from ..registry import model_for
from ..sampling import SamplingSettings, is_unconditional
from ..wrap import get_denoiser
from .paired import generate, model_fingerprint
from .prompts import PromptItem
from .options import METRICS, EvalOptions
from .report import markdown_table, render_html, write_json


def _mean(t: torch.Tensor) -> float:
    return float(t.double().mean())


class Evaluation:
    """Reference images and metric state shared by every model scored against one FP pipeline."""

    def __init__(self, reference_pipe, reference_spec: str, items: list[PromptItem], settings: SamplingSettings,
                 options: EvalOptions, prompts_spec: str = "", reference_label: str = "FP") -> None:
        self.skipped: dict[str, str] = {}
        if is_unconditional(reference_pipe):  # no prompt to score against or to render a reference set from
            unscored = {"clip": "an unconditional model has no prompts to score", "attributes": "an unconditional model has no captions to check"}
            # A bundled (mini-zoo) model's real data are the zoo's scenes; any other needs a folder of real images.
            real = options.reference_images or (M.ZOO_SCENES if model_for(reference_pipe) is not None else None)
            if not real:
                unscored["fd_ref"] = (f"an unconditional model has no prompts to render reference scenes from; pass "
                                      f"--reference-images FOLDER (or {M.ZOO_SCENES} for models of the mini zoo's data)")
            self.skipped.update({k: v for k, v in unscored.items() if k in options.metrics})
            options = dataclasses.replace(options, metrics=[m for m in options.metrics if m not in unscored], reference_images=real)
        self.pipe, self.items, self.settings, self.options = reference_pipe, items, settings, options
        self.prompts = [it.prompt for it in items]
        self.models: list[dict] = []
        wanted = set(options.metrics)
        for name in METRICS:
            if name not in wanted:
                self.skipped.setdefault(name, "not requested (--metrics)")
        self.images: dict[str, torch.Tensor] = {}
        fingerprint = model_fingerprint(reference_pipe)
        fp_images, stats = generate(reference_pipe, items, settings, options.cache_dir, options.batch_size, reference_label, fingerprint)
        self.images[reference_label] = fp_images
        self.fp_size = tuple(fp_images.shape[-2:])  # an unconditional model's settings carry no size
        # Parameters and MACs of the float denoiser on one call of these settings: every row's coverage and bits.
        self.layer_table = layer_table(reference_pipe, settings, items[0].prompt if items else "")
        self.reference = {"label": reference_label, "spec": reference_spec, "fingerprint": fingerprint,
                          "generation": vars(stats), "summary": self.costs(reference_pipe, reference=True)}
        sampling = {k: v for k, v in settings.to_dict().items() if k != "seed"}  # each item carries its own seed
        self.settings_record = {"prompts": prompts_spec, "n_images": len(items), **sampling, "batch_size": options.batch_size}

        self.lpips = self._try("lpips", self._make_lpips)
        self.clip = self._try("clip", self._make_clip)
        self.feature_space = "none (Fréchet distances skipped)"
        self.features = None
        if wanted & {"fd_fp", "fd_ref"}:
            self.features = self._feature_extractor()
        self.evaluator = self._try("attributes", M.zoo_evaluator) if "attributes" in wanted else None
        self.fp_feats = self.features(fp_images) if self.features else None
        self.ref_feats = None
        if self.features and "fd_ref" in wanted:
            ref_images = self._try("fd_ref", self._reference_set)
            if ref_images is not None:
                self.ref_feats = self.features(ref_images)
        self._prompt_scores(self.reference, fp_images)

    # ------------------------------------------------------------------ setup helpers
    def _try(self, name: str, make):
        if name not in self.options.metrics:
            return None
        try:
            return make()
        except M.MetricUnavailable as e:
            self.skipped[name] = str(e)
            return None

    def _make_lpips(self) -> M.LPIPS:
        if not self.options.lpips_weights:
            raise M.MetricUnavailable("no backbone weights: pass --lpips-weights PATH (torchvision alexnet .pth/.safetensors)")
        return M.LPIPS(self.options.lpips_weights)

    def _make_clip(self) -> M.ClipScorer:
        if not self.options.clip_model:
            raise M.MetricUnavailable("no CLIP model: pass --clip-model PATH (a local transformers CLIPModel folder)")
        return M.ClipScorer(self.options.clip_model)

    def _feature_extractor(self):
        if self.options.inception_weights:
            try:
                inception = M.InceptionFeatures(self.options.inception_weights)
                self.feature_space = f"Inception-v3 features from {self.options.inception_weights} (these are FID values)"
                return inception
            except M.MetricUnavailable as e:
                self.skipped["fid"] = f"{e}; falling back to the mini-zoo evaluator's features"
        try:
            evaluator = M.zoo_evaluator()
        except M.MetricUnavailable as e:
            reason = f"no feature extractor: no usable --inception-weights and {e}"
            for name in ("fd_fp", "fd_ref"):
                self.skipped.setdefault(name, reason)
            return None
        self.feature_space = ("mini-zoo evaluator features (no --inception-weights given, so these Fréchet distances "
                              "are not FID and compare only within this report)")
        return evaluator.features

    def _reference_set(self) -> torch.Tensor:
        """Real images for ``fd_ref``: a folder, the zoo's real scenes (as many as items), or the renders of the prompts."""
        size = (self.fp_size if self.settings.height is None else (self.settings.height, self.settings.width))
        if self.options.reference_images == M.ZOO_SCENES:
            images = M.zoo_real_scenes(len(self.items))
        elif self.options.reference_images:
            return M.load_image_folder(self.options.reference_images, size)
        else:
            images = M.zoo_reference_images(self.prompts)
        if images.shape[-2:] != size:
            images = torch.nn.functional.interpolate(images, size=size, mode="area")
        return images

    def _frechet(self, name: str, a: torch.Tensor, b: torch.Tensor) -> float | None:
        try:
            return M.frechet_distance(a, b)
        except M.MetricUnavailable as e:
            self.skipped[name] = str(e)
            return None

    def _prompt_scores(self, entry: dict, images: torch.Tensor) -> None:
        """Metrics against the prompt or the reference set, which the FP row gets too."""
        summary = entry["summary"]
        if self.ref_feats is not None:
            summary["fd_ref"] = self._frechet("fd_ref", self.features(images), self.ref_feats)
        if self.clip is not None:
            scores = self.clip(images, self.prompts)
            summary["clip_score"] = _mean(scores)
            entry["clip_per_image"] = scores.tolist()
        if self.evaluator is not None:
            try:
                acc, correct = self.evaluator.judge(images, self.prompts)
            except ValueError as e:
                self.skipped["attributes"] = f"prompts are not mini-zoo captions ({e})"
                self.evaluator = None
                return
            entry["attributes"] = acc
            entry["attr_all_per_image"] = correct  # paired intervals of attribute gaps (benchmarks/methods.py)
            summary["attr_all"] = acc["all"]
            others = [v for k, v in acc.items() if k != "all"]
            summary["attr_mean"] = sum(others) / len(others)

    # ------------------------------------------------------------------ scoring
    def costs(self, pipe, reference: bool = False, known: dict | None = None) -> dict:
        """Coverage, average bits over the whole denoiser and shipped size (``evaluation.coverage``): one
        computation for diffquant's rows, the peers' and the reference. ``known``: a size already measured."""
        out = coverage(self.layer_table, get_denoiser(pipe))
        out["denoiser_mib"] = (known or {}).get("denoiser_mib") or shipped_mib(pipe, reference)
        return out

    def add(self, label: str, pipe, spec: str, extra: dict | None = None) -> dict:
        """Generate ``pipe``'s images on the pairs and score them; returns (and records) the model's entry."""
        opts = self.options
        fingerprint = model_fingerprint(pipe)
        images, stats = generate(pipe, self.items, self.settings, opts.cache_dir, opts.batch_size, label, fingerprint)
        self.images[label] = images
        fp = self.images[self.reference["label"]]
        entry: dict = {"label": label, "spec": spec, "fingerprint": fingerprint, "generation": vars(stats),
                       "summary": dict(extra or {})}
        summary = entry["summary"]
        per_psnr, per_ssim = M.psnr(images, fp), M.ssim(images, fp)
        summary["psnr"], summary["ssim"] = _mean(per_psnr), _mean(per_ssim)
        per_lpips = self.lpips(images, fp) if self.lpips is not None else None
        if per_lpips is not None:
            summary["lpips"] = _mean(per_lpips)
        entry["per_image"] = [
            {"prompt": it.prompt, "seed": it.seed, "psnr": float(per_psnr[i]), "ssim": float(per_ssim[i]),
             **({"lpips": float(per_lpips[i])} if per_lpips is not None else {})}
            for i, it in enumerate(self.items)
        ]
        if self.fp_feats is not None and "fd_fp" in opts.metrics:
            summary["fd_fp"] = self._frechet("fd_fp", self.features(images), self.fp_feats)
        self._prompt_scores(entry, images)
        denoiser = get_denoiser(pipe)
        summary.update({k: v for k, v in self.costs(pipe, known=summary).items() if k not in summary})  # given values win
        if "timestep" in opts.metrics:
            curve = timestep_error(self.pipe, denoiser, self.items[:opts.curve_items], self.settings, opts.batch_size)
            entry["timestep_error"] = curve
            summary["timestep_rel_mse"] = sum(curve["rel_mse"]) / len(curve["rel_mse"])
        if "sensitivity" in opts.metrics:
            self._sensitivity(entry, denoiser)
        self.models.append(entry)
        return entry

    def _sensitivity(self, entry: dict, denoiser: torch.nn.Module) -> None:
        if not diffquant.quantized_layers(denoiser):
            self.skipped[f"sensitivity ({entry['label']})"] = "not a diffquant-quantized model, so its layers cannot be toggled one at a time"
            return
        entry["sensitivity"] = layer_sensitivity(self.pipe, denoiser, self.items[:self.options.sensitivity_items], self.settings,
                                                 self.options.sensitivity_steps, self.options.sensitivity_max_layers)

    def add_unavailable(self, label: str, reason: str, extra: dict | None = None) -> None:
        """A model that could not be built here (e.g. a peer kernel missing on this CPU): a row with the reason."""
        self.models.append({"label": label, "unavailable": reason, "summary": dict(extra or {})})

    # ------------------------------------------------------------------ output
    def results(self) -> dict:
        return {
            "version": 1,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "settings": self.settings_record,
            "feature_space": self.feature_space,
            "reference": self.reference,
            "models": self.models,
            "skipped": self.skipped,
        }

    def write(self, out_dir: str | Path, title: str) -> dict[str, Path]:
        """Write results.json, report.html and results.md into ``out_dir``; returns their paths."""
        from ..io import atomic_write

        out = Path(out_dir)
        results = self.results()
        paths = {"json": out / "results.json", "html": out / "report.html", "markdown": out / "results.md"}
        write_json(paths["json"], results)
        atomic_write(paths["markdown"], markdown_table(results))
        atomic_write(paths["html"], render_html(results, self.items, self.images, title))
        return paths
