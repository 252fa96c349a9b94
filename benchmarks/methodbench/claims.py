"""Each paper's claims checked on one model's rows, with paired 95 % intervals.

PSNR/SSIM: a normal interval over per-image differences; Fréchet distance to FP: a paired bootstrap over
images (the same resampled images for FP, A and B), on the features the runner stored per row. A claim of
being closer holds only where the interval excludes zero on every fidelity metric; nothing is assumed to hold.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

FIDELITY = (("psnr", 1), ("ssim", 1), ("fd_fp", -1))  # closeness to the FP images; +1: higher is better


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a-b and its normal 95 % interval over paired per-image values."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    d = d[torch.isfinite(d)]
    mean = float(d.mean())
    half = 1.96 * float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    return mean, mean - half, mean + half


def fd_interval(fp: torch.Tensor, fa: torch.Tensor, fb: torch.Tensor, n_boot: int = 200, seed: int = 0,
                paired_reference: bool = True) -> tuple[float, float]:
    """Paired bootstrap (same resampled images for FP, A and B) 95 % interval of FD(A, FP) - FD(B, FP).

    ``paired_reference=False``: ``fp`` is a fixed reference set of other images (real scenes), not resampled;
    A and B are still resampled together (the same seeds)."""
    from diffquant.evaluation.metrics import frechet_distance

    g = torch.Generator().manual_seed(seed)
    diffs = []
    n = fa.shape[0]
    for _ in range(n_boot):
        idx = torch.randint(0, n, (n,), generator=g)
        ref = fp[idx] if paired_reference else fp
        diffs.append(frechet_distance(fa[idx], ref) - frechet_distance(fb[idx], ref))
    diffs.sort()
    return diffs[int(0.025 * n_boot)], diffs[int(0.975 * n_boot) - 1]


SMALL_CHANGE = 0.25  # "small while RTN's is large": Q-Diffusion's FD change at most this fraction of RTN's


def fd_real_change_claim(result: dict, cmp: Comparator, bits: str = "w4a8") -> dict | None:
    """Q-Diffusion's headline on unconditional models: at ``bits`` its change in Fréchet distance to real images from
    FP's is small while RTN's is large (paper: FID +2.34 at most vs > 100). Holds when RTN's change minus
    Q-Diffusion's has a paired interval above zero and Q-Diffusion's change is at most ``SMALL_CHANGE`` of RTN's;
    partly when only the first is true. Intervals: bootstrap over the samples (same seeds for FP and both rows)
    against the fixed real set."""
    q, r = cmp.rows.get(f"qdiffusion-{bits}"), cmp.rows.get(f"rtn-{bits}")
    fp_fd = result["reference"]["summary"].get("fd_ref")
    if q is None or r is None or fp_fd is None or q["summary"].get("fd_ref") is None or r["summary"].get("fd_ref") is None:
        return None
    dq, dr = q["summary"]["fd_ref"] - fp_fd, r["summary"]["fd_ref"] - fp_fd
    real, fp, fq, fr = (cmp.features(k) for k in ("real", "FP", q["key"], r["key"]))
    text = f"FD to real scenes: FP {fp_fd:.2f}, QD {q['summary']['fd_ref']:.2f} ({dq:+.2f}), RTN {r['summary']['fd_ref']:.2f} ({dr:+.2f})"
    detail: dict = {"fp": fp_fd, "qdiffusion_change": dq, "rtn_change": dr}
    clear = None
    if all(x is not None for x in (real, fp, fq, fr)):
        detail["qdiffusion_change_interval"] = fd_interval(real, fq, fp, paired_reference=False)
        detail["rtn_change_interval"] = fd_interval(real, fr, fp, paired_reference=False)
        detail["rtn_minus_qdiffusion_interval"] = lo_hi = fd_interval(real, fr, fq, paired_reference=False)
        clear = lo_hi[0] > 0
        text += "; 95 % CI of the changes: QD [{:+.2f}, {:+.2f}], RTN [{:+.2f}, {:+.2f}], RTN − QD [{:+.2f}, {:+.2f}]".format(
            *detail["qdiffusion_change_interval"], *detail["rtn_change_interval"], *lo_hi)
    small = abs(dq) <= SMALL_CHANGE * dr
    text += (f"; QD's change is {'at most' if small else 'more than'} {SMALL_CHANGE:g} of RTN's"
             + ("" if clear is not None else "; no stored features, so no interval"))
    verdict = "holds" if clear and small else "holds partly" if clear or (clear is None and small) else "does not hold"
    return {"claim": f"{bits.upper()}: Q-Diffusion's change in FD to real scenes from FP's is small while RTN's is large "
                     "(unconditional; the paper's FID-change claim)", "verdict": verdict, "text": text, "detail": detail}


_FD_INTERVALS: dict[tuple[str, str], tuple[float, float]] = {}  # (key A, key B) -> interval; the bootstrap takes ~15 s


class Comparator:
    """'Is row A closer to FP than row B on metric m', with the paired interval, for one model's rows."""

    def __init__(self, result: dict, features_dir: Path | None):
        self.rows = {r["label"]: r for r in result["rows"] if "summary" in r}
        self.features_dir = features_dir
        self._feats: dict[str, torch.Tensor | None] = {}

    def features(self, key: str) -> torch.Tensor | None:
        if key not in self._feats:
            path = self.features_dir / f"{key}.pt" if self.features_dir else None
            self._feats[key] = torch.load(path, weights_only=True) if path is not None and path.is_file() else None
        return self._feats[key]

    def compare(self, a: str, b: str, metric: str, sign: int) -> dict | None:
        ra, rb = self.rows.get(a), self.rows.get(b)
        if ra is None or rb is None or ra["summary"].get(metric) is None or rb["summary"].get(metric) is None:
            return None
        va, vb = ra["summary"][metric], rb["summary"][metric]
        out = {"metric": metric, "a": va, "b": vb, "better": sign * (va - vb) > 0}
        interval = None
        if metric in ("psnr", "ssim"):
            _, lo, hi = paired_interval(ra["per_image"][metric], rb["per_image"][metric])
            interval = (lo, hi)
        elif metric == "fd_fp":
            memo = (ra["key"], rb["key"])
            if memo not in _FD_INTERVALS:
                fp, fa, fb = self.features("FP"), self.features(ra["key"]), self.features(rb["key"])
                if fp is not None and fa is not None and fb is not None:
                    _FD_INTERVALS[memo] = fd_interval(fp, fa, fb)
            interval = _FD_INTERVALS.get(memo)
        if interval is not None:
            out["interval_a_minus_b"] = list(interval)
            out["clearly"] = out["better"] and (interval[0] > 0 if sign > 0 else interval[1] < 0)
        return out


def _fmt_cmp(c: dict, a: str, b: str) -> str:
    digits = {"psnr": ".2f", "ssim": ".4f", "fd_fp": ".2f", "attr_all": ".3f"}.get(c["metric"], ".4g")
    text = f"{c['metric']} {a} {c['a']:{digits}} vs {b} {c['b']:{digits}}"
    if "interval_a_minus_b" in c:
        lo, hi = c["interval_a_minus_b"]
        text += f" (diff 95 % CI [{lo:+{digits}}, {hi:+{digits}}]{', clear' if c['clearly'] else ', not clear' if c['better'] else ''})"
    return text


def _verdict(flags: list[bool]) -> str:
    return "holds" if flags and all(flags) else "does not hold" if not any(flags) else "holds partly"


def _closer(cmp: Comparator, claim: str, a: str, b: str, name_a: str, name_b: str,
            metrics: tuple[str, ...] | None = None) -> dict:
    """The claim "row ``a`` is clearly closer to FP than row ``b``" on every fidelity metric (or ``metrics``): its
    verdict, text and the comparisons as ``detail`` (empty where neither row has the metric)."""
    comps = [c for m, sg in FIDELITY if (metrics is None or m in metrics) and (c := cmp.compare(a, b, m, sg))]
    return {"claim": claim, "verdict": _verdict([c.get("clearly", c["better"]) for c in comps]),
            "text": "; ".join(_fmt_cmp(c, name_a, name_b) for c in comps), "detail": comps}


def attr_gap_interval(result: dict, label: str) -> tuple[float, float] | None:
    """Paired 95 % interval, in points, of a row's all-attributes accuracy minus FP's (same prompts and seeds)."""
    fp = result["reference"].get("per_image", {}).get("attr_all")
    row = next((r for r in result["rows"] if r["label"] == label), {}).get("per_image", {}).get("attr_all")
    if not fp or not row or len(fp) != len(row):
        return None
    _, lo, hi = paired_interval([float(x) for x in row], [float(x) for x in fp])
    return 100 * lo, 100 * hi


def check_claims(result: dict, features_dir: Path | None, name: str = "") -> dict[str, list[dict]]:
    """Every paper claim the issues name, evaluated on model ``name``'s rows (nothing is assumed to hold)."""
    cmp = Comparator(result, features_dir)
    rows, fp = cmp.rows, result["reference"]["summary"]
    bits_list = result["bits"]
    claims: dict[str, list[dict]] = {"qdiffusion": [], "pcr": [], "emf": []}

    # Issue 5 (Q-Diffusion, seed 001); the LSQ-off ablation row, when run, gets the same checks marked as such
    for bits in bits_list:
        r = f"rtn-{bits}"
        for variant, title, tag in (("qdiffusion", "Q-Diffusion", "QD"), ("qdiffusion-nolsq", "Q-Diffusion without LSQ (ablation)", "QD-noLSQ")):
            q = f"{variant}-{bits}"
            if bits == "w4a8" and q in rows and r in rows:
                comps = [c for m, s in FIDELITY if (c := cmp.compare(q, r, m, s))]
                attr = cmp.compare(q, r, "attr_all", 1)
                clear = [c.get("clearly", c["better"]) for c in comps]
                text = "; ".join(_fmt_cmp(c, tag, "RTN") for c in comps)
                if attr:
                    text += f"; attributes (for reference) {tag} {attr['a']:.3f} vs RTN {attr['b']:.3f}"
                claims["qdiffusion"].append({"claim": f"W4A8: {title} clearly closer to FP than RTN on every fidelity metric (PSNR, SSIM, FD to FP)",
                                             "verdict": _verdict(clear), "text": text, "detail": comps})
            if bits == "w8a8" and q in rows and fp.get("attr_all") is not None and rows[q]["summary"].get("attr_all") is not None:
                gap = 100 * (rows[q]["summary"]["attr_all"] - fp["attr_all"])
                rtn_gap = 100 * (rows[r]["summary"]["attr_all"] - fp["attr_all"]) if r in rows else None
                interval = attr_gap_interval(result, q)
                text = (f"FP {fp['attr_all']:.3f}, {tag} {rows[q]['summary']['attr_all']:.3f} ({gap:+.1f} points"
                        + (f", paired 95 % CI [{interval[0]:+.1f}, {interval[1]:+.1f}]" if interval else "") + ")"
                        + (f"; RTN {rows[r]['summary']['attr_all']:.3f} ({rtn_gap:+.1f} points)" if rtn_gap is not None else ""))
                unsettled = bool(interval and (interval[0] < -2.0 < interval[1] or interval[0] < 2.0 < interval[1]))
                if unsettled:
                    text += "; the interval reaches both sides of a 2-point gap: these prompts cannot settle the claim"
                claims["qdiffusion"].append({
                    "claim": f"W8A8: {title} attribute accuracy within 2 points of FP",
                    "verdict": "not settled" if unsettled else "holds" if abs(gap) <= 2.0 else "does not hold",
                    "text": text,
                    "detail": {"fp": fp["attr_all"], variant: rows[q]["summary"]["attr_all"], "gap_points": gap, "interval_points": interval}})

    if result.get("unconditional"):
        change = fd_real_change_claim(result, cmp)
        if change is not None:
            claims["qdiffusion"].append(change)

    # Issue 6 (PCR, seed 002): FID to FP, PCR vs Q-Diffusion (and RTN) at the same bits; the same claims for PCR with
    # issue 19's robust per-step ranges, which also has to be no worse than RTN at W4A8 on any fidelity metric
    for bits in bits_list:
        for variant, tag in (("pcr", "PCR"), ("pcr-robust", "PCR (robust ranges)")):
            p = f"{variant}-{bits}"
            if p not in rows:
                continue
            act = rows[p].get("avg_abits")
            over = "whole denoiser" if "weight_coverage" in rows[p].get("summary", {}) else "over its quantized layers"
            for other, title, short in ((f"qdiffusion-{bits}", "Q-Diffusion", "QD"), (f"rtn-{bits}", "RTN", "RTN")):
                c = cmp.compare(p, other, "fd_fp", -1)
                if c is None:
                    continue
                extra = ""
                if rows[p].get("summary_calib") and rows[other].get("summary_calib"):
                    a, b = rows[p]["summary_calib"]["fd_fp"], rows[other]["summary_calib"]["fd_fp"]
                    extra = f"; on the calibration prompts {a:.2f} vs {b:.2f}"
                claims["pcr"].append({"claim": f"{bits}: {tag} beats {title} in FD to FP", "verdict": "holds" if c.get("clearly", c["better"]) else
                                      ("not settled" if c["better"] else "does not hold"),
                                      "text": _fmt_cmp(c, tag, short) + f" ({tag} at {act:.2f} average activation bits, {over}){extra}",
                                      "detail": c})
            r = f"rtn-{bits}"
            if bits == "w4a8" and r in rows:
                comps = [c for m, sg in FIDELITY if (c := cmp.compare(r, p, m, sg))]
                worse = [c["metric"] for c in comps if c.get("clearly", c["better"])]
                claims["pcr"].append({"claim": f"{bits}: {tag} no worse than RTN on any fidelity metric (issue 19)",
                                      "verdict": "does not hold" if worse else "holds",
                                      "text": "; ".join(_fmt_cmp(c, "RTN", tag) for c in comps)
                                              + (f"; RTN clearly closer on {', '.join(worse)}" if worse else ""),
                                      "detail": comps})

    # Issue 7 (EMF, seed 000)
    for bits in bits_list:
        e = f"emf-{bits}"
        # EMF at equal bits (issue 19): its time-dependent layers quantized like everyone's
        eq = f"emf-quantized-time-{bits}"
        if eq in rows:
            for other in ("rtn", "qdiffusion", "pcr", "emf"):
                than = "EMF with float time tables" if other == "emf" else other
                claim = _closer(cmp, f"{bits}: EMF at equal bits ({rows[eq]['avg_wbits']:.2f} average weight bits) closer to FP than {than}",
                                eq, f"{other}-{bits}", "EMF equal-bit", other)
                if claim["detail"]:
                    claims["emf"].append(claim)
        if e not in rows:
            continue
        for other in ("rtn", "qdiffusion", "pcr", "rtn-float-time"):
            o = f"{other}-{bits}"
            if o not in rows:
                continue
            claim = f"{bits}: EMF closer to FP than {other}" + (" (control: RTN with EMF's float time layers)" if other == "rtn-float-time" else "")
            claims["emf"].append(_closer(cmp, claim, e, o, "EMF", other))
        q = f"qdiffusion-{bits}"
        if q in rows:
            et, qt = rows[e]["quantize_s"], rows[q]["quantize_s"]
            train = rows[e]["details"].get("train", {}).get("seconds")
            recon = rows[q]["details"].get("reconstruction_seconds")
            text = f"EMF {et:.0f} s in all vs Q-Diffusion {qt:.0f} s"
            if train is not None and recon is not None:
                text += f"; EMF training alone {train:.0f} s vs Q-Diffusion reconstruction alone {recon:.0f} s"
            claims["emf"].append({"claim": f"{bits}: EMF takes less time than Q-Diffusion's reconstruction-based calibration",
                                  "verdict": "holds" if et < qt else "does not hold", "text": text,
                                  "detail": {"emf_s": et, "qdiffusion_s": qt, "emf_train_s": train, "qdiffusion_reconstruction_s": recon}})
        s = f"emf-serial-{bits}"
        if s in rows:
            par, ser = curve_stats(rows[e]["details"]["curves"]), curve_stats(rows[s]["details"]["curves"])
            steadier = par["loss_last_quarter_std"] < ser["loss_last_quarter_std"] and par["flip_rate_mean"] <= ser["flip_rate_mean"]
            comps = [c for m, sg in FIDELITY if (c := cmp.compare(e, s, m, sg))]
            claims["emf"].append({"claim": f"{bits}: parallel training steadier than serial (ablation)", "verdict": "holds" if steadier else "does not hold",
                                  "text": f"std of loss over the last quarter {par['loss_last_quarter_std']:.3g} vs {ser['loss_last_quarter_std']:.3g}; "
                                          f"mean weight flip rate {par['flip_rate_mean']:.3g} vs {ser['flip_rate_mean']:.3g}; "
                                          + "; ".join(_fmt_cmp(c, "parallel", "serial") for c in comps),
                                  "detail": {"parallel": par, "serial": ser, "fidelity": comps}})
    claims["recipe"] = recipe_claims(name, result, cmp)
    return claims


# Issue 19's targets for the faithful recipe, by model: (bits, minimum PSNR to FP, maximum FD to FP or None, maximum
# average weight bits over the whole denoiser).
RECIPE_TARGETS = {"mini-sd": [("w4a8", 41.7, 1.5, 4.5)], "mini-sd3": [("w4a8", 38.0, None, 4.5), ("w8a8", 42.0, None, 8.5)]}
ABLATIONS = {"faithful-minmax": "MSE weight ranges", "faithful-static": "per-group dynamic activations",
             "faithful-short": "1000 AdaRound iterations at batch 16"}


def recipe_claims(name: str, result: dict, cmp: Comparator) -> list[dict]:
    """Issue 19 on the faithful recipe's rows: its fidelity targets, W4A4 against RTN W4A8, and each ablation row
    (one ingredient removed) against the whole recipe."""
    rows, out = cmp.rows, []
    for bits, psnr, fd, max_wbits in RECIPE_TARGETS.get(name, []):
        row = rows.get(f"faithful-{bits}")
        if row is None:
            continue
        s, wbits = row["summary"], row["avg_wbits"]
        ok = s["psnr"] >= psnr and (fd is None or s["fd_fp"] <= fd) and wbits <= max_wbits
        out.append({"claim": f"{bits}: faithful reaches PSNR >= {psnr} dB" + (f" with FD to FP <= {fd}" if fd else "")
                    + f" at <= {max_wbits} average weight bits",
                    "verdict": "holds" if ok else "does not hold",
                    "text": f"PSNR {s['psnr']:.2f} dB, FD to FP {s['fd_fp']:.2f}, {wbits:.2f} average weight bits",
                    "detail": {"psnr": s["psnr"], "fd_fp": s["fd_fp"], "avg_wbits": wbits}})
    for variant in ("faithful", "faithful-lowrank2"):
        row = f"{variant}-w4a4"
        if row in rows and "rtn-w4a8" in rows:
            out.append(_closer(cmp, f"W4A4: {variant} ({rows[row]['avg_wbits']:.2f} average weight bits) clearly closer to FP "
                                    "than RTN W4A8 on PSNR and FD", row, "rtn-w4a8", f"{variant} W4A4", "RTN W4A8", ("psnr", "fd_fp")))
    for bits in result["bits"]:
        for variant, ingredient in ABLATIONS.items():
            claim = _closer(cmp, f"{bits}: removing {ingredient} costs fidelity (ablation)", f"faithful-{bits}", f"{variant}-{bits}",
                            "faithful", variant)
            if claim["detail"]:
                out.append(claim)
    return out


def curve_stats(curves: dict) -> dict:
    loss, flips = curves.get("loss", []), curves.get("flip_rate", [])
    if not loss:
        return {"loss_first_quarter": None, "loss_last_quarter": None, "loss_last_quarter_std": float("inf"), "flip_rate_mean": float("inf")}
    tail = max(1, len(loss) // 4)
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    last = mean(loss[-tail:])
    return {"loss_first_quarter": mean(loss[:tail]), "loss_last_quarter": last,
            "loss_last_quarter_std": mean([(x - last) ** 2 for x in loss[-tail:]]) ** 0.5,
            "flip_rate_mean": mean(flips), "flip_rate_last_quarter": mean(flips[-tail:])}

