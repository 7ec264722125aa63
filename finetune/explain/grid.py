"""Choosing images to explain and drawing their maps as one PNG grid per init.

One row per class, ``n`` images each; every image gets two panels: the image in its window
(grayscale, [0, 1]) and the same with the map overlaid, titled with the true and predicted
labels (red when they differ) and the predicted probability. The figure's title says the
init, the method and the sanity verdict in words, so the PNG never travels without it.
Drawn with matplotlib's object API on the Agg canvas: no pyplot state, no display needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def pick_per_class(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of up to ``n`` images per class (``labels`` ``[N]`` or ``[N, 1]`` ints),
    class by class, drawn without replacement; a class with fewer images gives all it has."""
    labels = np.asarray(labels).reshape(len(labels), -1)[:, 0]
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out.extend(sorted(rng.choice(idx, size=min(n, len(idx)), replace=False).tolist()))
    return np.asarray(out, dtype=np.int64)


def display_images(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo the init's normalisation: ``[B, C, H, W]`` model input -> ``[B, H, W]`` in [0, 1]
    (the windowed image; channels averaged, as preprocessing repeated them)."""
    m = torch.tensor(mean, dtype=batch.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=batch.dtype).view(1, -1, 1, 1)
    return (batch.detach().cpu() * s + m).mean(dim=1).clamp(0, 1).numpy()


def draw_grid(images: np.ndarray, maps: np.ndarray, true: Sequence[int], pred: Sequence[int],
              prob: Sequence[float], class_names: Sequence[str], out: Path | str,
              title: str, alpha: float = 0.45, panel_in: float = 1.6) -> Path:
    """Write the grid PNG to ``out`` and return its path.

    ``images`` and ``maps``: ``[N, H, W]`` in [0, 1]; ``true``/``pred``: class indices;
    ``prob``: the predicted class's probability. Rows follow the true classes in order.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images, maps = np.asarray(images), np.asarray(maps)
    if images.shape != maps.shape or len(images) != len(true) or len(true) != len(pred):
        raise ValueError(f"images {images.shape}, maps {maps.shape}, {len(true)} true and "
                         f"{len(pred)} predicted labels do not line up")
    classes = sorted({int(t) for t in true})
    rows = {c: [i for i, t in enumerate(true) if int(t) == c] for c in classes}
    per_row = max(len(v) for v in rows.values()) if rows else 1
    fig = Figure(figsize=(2 * per_row * panel_in, len(classes) * panel_in * 1.15 + 0.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(1, len(classes)), 2 * per_row, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, c in enumerate(classes):
        for j, i in enumerate(rows[c]):
            left, right = axes[r, 2 * j], axes[r, 2 * j + 1]
            left.imshow(images[i], cmap="gray", vmin=0, vmax=1)
            right.imshow(images[i], cmap="gray", vmin=0, vmax=1)
            right.imshow(maps[i], cmap="jet", vmin=0, vmax=1, alpha=alpha)
            wrong = int(pred[i]) != int(true[i])
            left.set_title(f"true: {class_names[int(true[i])]}", fontsize=7)
            right.set_title(f"pred: {class_names[int(pred[i])]} ({float(prob[i]):.2f})",
                            fontsize=7, color="red" if wrong else "black")
    fig.suptitle(title, fontsize=8, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
