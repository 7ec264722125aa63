"""Sanity checks for saliency maps (Adebayo et al. 2018, "Sanity Checks for Saliency Maps").

Model randomisation, cascading from the top: re-initialise the head, then the backbone's
blocks from the last to the stem, computing maps after each stage and comparing them with the
trained model's maps (Spearman rank correlation and SSIM, per image, mean with a bootstrap
95% interval over images). Maps that survive full randomisation show the input or the
architecture, not what the model learned. Data randomisation: the same comparison against a
model fitted on permuted labels (cheap for the linear probe: refit the probe).

The verdict compares the interval, not just the mean, with ``FAIL_ABOVE`` (0.5 Spearman after
full randomisation): above it "not trustworthy", below it "passes", straddling it
"inconclusive" (not shown trustworthy). The numbers travel with the words.

Re-initialisation uses each module's own ``reset_parameters`` (a fresh init as before
training: Kaiming for convolutions and linear layers, 1/0 and reset running statistics for
norms); parameters a module cannot reset (class and register tokens, position embeddings,
layer scales) are drawn from a truncated normal with std 0.02, timm's ViT init.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from torch import nn

MapFn = Callable[[nn.Module, torch.Tensor, Sequence[int]], np.ndarray]
"""``(model, images [B, C, H, W], targets [B]) -> maps [B, H, W]`` in [0, 1]."""

#: Mean Spearman correlation with the trained maps above which a map set fails.
FAIL_ABOVE = 0.5
_BOOTSTRAP = 2000


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def randomisation_stages(model: nn.Module) -> list[tuple[str, list]]:
    """Stages from the output to the input: ``(name, [modules and/or parameters])``.

    The model's children other than ``.backbone`` (its head) come first; then the backbone's
    children in reverse order, a ``Sequential``/``ModuleList`` (ResNet layers, ViT blocks,
    ConvNeXt stages) opened one level so each block is a stage; last the backbone's own
    parameters (tokens, position embeddings). A model without ``.backbone`` is walked as one.
    """
    backbone = getattr(model, "backbone", None)
    stages: list[tuple[str, list]] = []
    if isinstance(backbone, nn.Module):
        for name, child in reversed(list(model.named_children())):
            if child is not backbone and _has_params(child):
                stages.append((name, [child]))
        root, prefix = backbone, "backbone."
    else:
        root, prefix = model, ""
    for name, child in reversed(list(root.named_children())):
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            for sub, block in reversed(list(child.named_children())):
                if _has_params(block):
                    stages.append((f"{prefix}{name}.{sub}", [block]))
        elif _has_params(child):
            stages.append((f"{prefix}{name}", [child]))
    own = [p for _, p in root.named_parameters(recurse=False)]
    if own:
        stages.append((f"{prefix}embeddings" if prefix else "embeddings", own))
    return stages


@torch.no_grad()
def reinitialise(items: list) -> None:
    """Re-initialise modules (``reset_parameters``, else truncated normal) and bare parameters."""
    for item in items:
        if isinstance(item, nn.Parameter):
            nn.init.trunc_normal_(item, std=0.02)
            continue
        for module in item.modules():
            own = list(module.parameters(recurse=False))
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            elif own:
                for p in own:
                    nn.init.trunc_normal_(p, std=0.02)
            elif hasattr(module, "reset_running_stats"):
                module.reset_running_stats()


def _ci(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    if len(values) < 2:
        v = float(values[0]) if len(values) else float("nan")
        return v, v
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (_BOOTSTRAP, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def compare_maps(reference: np.ndarray, other: np.ndarray) -> dict:
    """Per-image Spearman and SSIM between two ``[N, H, W]`` map sets in [0, 1], and means.

    A flat map (all one value) has no ranking: its Spearman is counted as 0 and ``flat``
    counts such images (an all-zero Grad-CAM map shows no evidence anywhere).
    """
    if reference.shape != other.shape:
        raise ValueError(f"map sets differ in shape: {reference.shape} vs {other.shape}")
    rho, ssim, flat = [], [], 0
    for a, b in zip(reference, other):
        if np.ptp(a) == 0 or np.ptp(b) == 0:
            rho.append(0.0)
            flat += 1
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rho.append(float(spearmanr(a.ravel(), b.ravel()).statistic))
        win = min(7, *a.shape)
        win = (win - (win % 2 == 0)) if win >= 3 else None   # odd, at most the map's side
        ssim.append(float(structural_similarity(a.astype(np.float64), b.astype(np.float64),
                                                data_range=1.0, win_size=win)) if win else
                    float("nan"))
    rho_a, ssim_a = np.asarray(rho), np.asarray(ssim)
    return {"spearman": float(rho_a.mean()), "spearman_ci": _ci(rho_a),
            "ssim": float(np.nanmean(ssim_a)) if np.isfinite(ssim_a).any() else float("nan"),
            "ssim_ci": _ci(ssim_a[np.isfinite(ssim_a)]) if np.isfinite(ssim_a).any()
            else (float("nan"), float("nan")),
            "n": len(rho_a), "flat": flat, "per_image_spearman": [round(r, 4) for r in rho]}


def verdict(comparison: dict, test: str, threshold: float = FAIL_ABOVE) -> dict:
    """Words and numbers for one test's final comparison (``compare_maps`` output).

    ``trustworthy``: True (passes), False (fails) or None (inconclusive).
    """
    rho, (lo, hi) = comparison["spearman"], comparison["spearman_ci"]
    nums = (f"Spearman {rho:.2f} (95% CI {lo:.2f} to {hi:.2f}, {comparison['n']} images), "
            f"SSIM {comparison['ssim']:.2f}")
    what = {"model": "after re-initialising every layer",
            "data": "for a model fitted on permuted labels"}[test]
    if lo > threshold:
        ok, words = False, (f"NOT TRUSTWORTHY: {what} the maps still rank pixels like the "
                            f"trained model's ({nums}; fails above {threshold}): they show the "
                            f"image or the architecture, not what the model learned")
    elif hi < threshold:
        ok, words = True, (f"passes the {test}-randomisation test: {what} the maps no longer "
                           f"resemble the trained model's ({nums}; fails above {threshold})")
    else:
        ok, words = None, (f"not shown trustworthy: {what} the maps' similarity to the trained "
                           f"model's straddles {threshold} ({nums}); too few images to tell")
    return {"test": test, "trustworthy": ok, "words": words, "threshold": threshold,
            "spearman": rho, "spearman_ci": [lo, hi], "ssim": comparison["ssim"]}


def cascading_randomisation(model: nn.Module, images: torch.Tensor, targets: Sequence[int],
                            map_fn: MapFn, reference: np.ndarray | None = None,
                            seed: int = 0) -> dict:
    """Maps after each cascading re-initialisation stage, compared with the trained maps.

    Works on a copy: ``model`` is untouched. Returns ``{"stages": [{"stage", "spearman",
    "spearman_ci", "ssim", "flat"} ...], "final": compare_maps(...), "verdict": verdict(...)}``
    and the fully randomised maps under ``"random_maps"`` (``[N, H, W]``), the fully
    randomised copy of the model under ``"random_model"``.
    """
    if reference is None:
        reference = map_fn(model, images, targets)
    shadow = copy.deepcopy(model)
    rows, maps = [], reference
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, items in randomisation_stages(shadow):
            reinitialise(items)
            maps = map_fn(shadow, images, targets)
            cmp = compare_maps(reference, maps)
            rows.append({"stage": name, "spearman": cmp["spearman"],
                         "spearman_ci": list(cmp["spearman_ci"]), "ssim": cmp["ssim"],
                         "flat": cmp["flat"]})
    final = compare_maps(reference, maps)
    return {"stages": rows, "final": final, "verdict": verdict(final, "model"),
            "random_maps": maps, "random_model": shadow}


def data_randomisation(reference: np.ndarray, permuted_model: nn.Module, images: torch.Tensor,
                       targets: Sequence[int], map_fn: MapFn) -> dict:
    """Trained maps vs the maps of a model fitted on permuted labels (same targets)."""
    cmp = compare_maps(reference, map_fn(permuted_model, images, targets))
    return {"final": cmp, "verdict": verdict(cmp, "data")}


def overall(verdicts: list[dict]) -> dict:
    """One verdict for a map set from its tests: any fail fails; all must pass to pass."""
    states = [v["trustworthy"] for v in verdicts]
    ok = False if False in states else (True if states and all(states) else None)
    words = {True: "trustworthy by the randomisation tests run",
             False: "NOT TRUSTWORTHY (fails a randomisation test)",
             None: "not shown trustworthy (a randomisation test is inconclusive)"}[ok]
    return {"trustworthy": ok, "words": words, "tests": [v["words"] for v in verdicts]}
