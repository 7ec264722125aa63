"""One map set for one init: maps, sanity checks, localisation and the PNG grid, as a record.

``explain_set`` is what ``medssl explain`` and finetune's ``evaluation.explain`` call per init
(and per protocol: ``full.Classifier`` after fine-tuning, ``probe.ProbeClassifier`` for the
linear probe). It returns a JSON-ready dict; the report links ``grid`` and quotes
``verdict["words"]`` beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from finetune.explain.cam import BATCH, grad_cam
from finetune.explain.grid import draw_grid
from finetune.explain.localisation import energy_inside, pointing_game
from finetune.explain.rollout import attention_rollout
from finetune.explain.sanity import MapFn, cascading_randomisation, data_randomisation, overall


def gradcam_maps(model: nn.Module, images: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
    return grad_cam(model, images, targets)


def rollout_maps(model: nn.Module, images: torch.Tensor, targets: Sequence[int]) -> np.ndarray:
    return attention_rollout(model, images)


#: Map methods by name: Grad-CAM (CNNs and ViTs) and attention rollout (ViTs, class-agnostic).
METHODS: dict[str, MapFn] = {"gradcam": gradcam_maps, "rollout": rollout_maps}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, multilabel: bool = False) -> np.ndarray:
    """Probabilities ``[N, n_out]`` (softmax, or sigmoid per label), in eval mode."""
    was = model.training
    model.eval()
    try:
        out = [model(images[s:s + BATCH]).float() for s in range(0, len(images), BATCH)]
    finally:
        model.train(was)
    logits = torch.cat(out)
    return (logits.sigmoid() if multilabel else logits.softmax(dim=1)).cpu().numpy()


def explain_set(model: nn.Module, images: torch.Tensor, labels: Sequence[int],
                class_names: Sequence[str], display: np.ndarray, out_png: Path | str,
                title: str, method: str = "gradcam", targets: str | Sequence[int] = "pred",
                permuted_model: nn.Module | None = None, masks: np.ndarray | None = None,
                seed: int = 0, multilabel: bool = False) -> dict:
    """Explain ``images [N, C, S, S]`` (model input) of true ``labels [N]``.

    ``display [N, S, S]``: the same images in their window, [0, 1] (``grid.display_images``).
    ``targets``: "pred" (the predicted class), "true", or one class index per image.
    ``permuted_model``: the same architecture fitted on permuted labels (data-randomisation
    test), when cheap. ``masks [N, S, S]`` bool: where the finding is, in input pixels
    (``localisation.resize_masks``); an empty mask marks an image without a finding (not
    scored). Localisation is scored on maps of the TRUE class (the finding's), whatever
    ``targets`` chose for the grid, for the trained and the fully randomised model.
    """
    if method not in METHODS:
        raise ValueError(f"explain method {method!r} unknown; choose from {sorted(METHODS)}")
    map_fn = METHODS[method]
    labels = np.asarray(labels).reshape(len(images), -1)[:, 0].astype(int)
    prob = predict(model, images, multilabel)
    pred = prob.argmax(axis=1)
    if isinstance(targets, str):
        if targets not in ("pred", "true"):
            raise ValueError(f"targets must be 'pred', 'true' or class indices, got {targets!r}")
        chosen = pred if targets == "pred" else labels
    else:
        chosen = np.asarray(targets, dtype=int)
    chosen = [int(t) for t in chosen]
    maps = map_fn(model, images, chosen)
    model_test = cascading_randomisation(model, images, chosen, map_fn, reference=maps, seed=seed)
    tests = [model_test["verdict"]]
    record: dict = {"method": method, "n_images": len(images), "targets": chosen,
                    "accuracy": float(np.mean(pred == labels)),
                    "model_randomisation": {"stages": model_test["stages"],
                                            "final": _brief(model_test["final"]),
                                            "verdict": model_test["verdict"]}}
    if permuted_model is not None:
        data_test = data_randomisation(maps, permuted_model, images, chosen, map_fn)
        tests.append(data_test["verdict"])
        record["data_randomisation"] = {"final": _brief(data_test["final"]),
                                        "verdict": data_test["verdict"]}
    record["verdict"] = overall(tests)
    if masks is not None:
        record["localisation"] = _localise(model, model_test["random_model"], images, labels,
                                           chosen, maps, model_test["random_maps"], masks, map_fn)
    grid = draw_grid(display, maps, labels, pred, prob[np.arange(len(pred)), pred], class_names,
                     out_png, f"{title} - {method} - {record['verdict']['words']}")
    record["grid"] = Path(grid).name
    return record


def _localise(model: nn.Module, random_model: nn.Module, images: torch.Tensor, labels: np.ndarray,
              chosen: list[int], maps: np.ndarray, random_maps: np.ndarray, masks: np.ndarray,
              map_fn: MapFn) -> dict:
    """Pointing game and energy inside the mask on the images that have a finding."""
    masks = np.asarray(masks, bool)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} do not match the maps {maps.shape}")
    idx = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
    if not len(idx):
        return {"n_scored": 0, "target": "true class",
                "status": "no explained image has a finding mask"}
    true = [int(t) for t in labels[idx]]
    if all(chosen[i] == t for i, t in zip(idx, true)):
        trained, randomised = maps[idx], random_maps[idx]
    else:  # the grid explains predictions: localise the finding's own class instead
        trained = map_fn(model, images[idx], true)
        randomised = map_fn(random_model, images[idx], true)
    m = masks[idx]
    return {"n_scored": len(idx), "target": "true class",
            "trained": {"pointing_game": _brief(pointing_game(trained, m)),
                        "energy_inside": _brief(energy_inside(trained, m))},
            "randomised": {"pointing_game": _brief(pointing_game(randomised, m)),
                           "energy_inside": _brief(energy_inside(randomised, m))}}


def _brief(d: dict) -> dict:
    """A comparison or score without its per-image lists (they stay in memory only)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()
            if not k.startswith("per_image")}
