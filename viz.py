"""Pictures of a run, for TensorBoard and as PNG files: the learned cross-dataset relations
(projection heads as heatmaps, true relations marked), confusion matrices, clip strips.

Every function returns an RGB uint8 array (H, W, 3) or writes a PNG; matplotlib is imported
lazily with the Agg backend, so a machine without a display renders them too.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

MAX_TICKS = 40  # class names on the axes up to this many classes; beyond, only the picture


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _to_array(fig) -> np.ndarray:
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()  # (H, W, 3)
    _pyplot().close(fig)
    return image


def _size(rows: int, cols: int) -> tuple:
    scale = 0.22 if max(rows, cols) <= MAX_TICKS else 0.02
    return (min(max(3.5, 2.2 + cols * scale), 14), min(max(3.0, 1.6 + rows * scale), 14))


def _ticks(ax, rows: Sequence[str], cols: Sequence[str]) -> None:
    if len(cols) <= MAX_TICKS:
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=6)
    if len(rows) <= MAX_TICKS:
        ax.set_yticks(range(len(rows)), rows, fontsize=6)


def relation_heatmap(weight: np.ndarray, source: str, target: str, source_classes: Sequence[str],
                     target_classes: Sequence[str], truth: Optional[dict] = None) -> np.ndarray:
    """W_{s->d} (C_d, C_s) as a heatmap with one row per source class and one column per target
    class; each row's largest weight is outlined, and with `truth` ({source class: [target
    classes]}) the true relations are dotted: an outlined cell with a dot is a relation found."""
    plt = _pyplot()
    w = np.asarray(weight, dtype=np.float64).T  # (C_s, C_d)
    fig, ax = plt.subplots(figsize=_size(*w.shape))
    bound = float(np.abs(w).max()) or 1.0
    im = ax.imshow(w, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04)
    best = w.argmax(axis=1)
    ax.scatter(best, np.arange(len(best)), s=40, facecolors="none", edgecolors="black",
               linewidths=0.8, label="largest weight")
    if truth:
        cells = [(list(target_classes).index(t), i) for i, c in enumerate(source_classes)
                 for t in truth.get(c, []) if t in target_classes]
        if cells:
            xs, ys = zip(*cells)
            ax.scatter(xs, ys, s=8, c="gold", edgecolors="black", linewidths=0.3,
                       label="true relation")
        ax.legend(fontsize=6, loc="upper right", bbox_to_anchor=(1, 1.16), ncol=2)
    _ticks(ax, source_classes, target_classes)
    ax.set_ylabel(f"{source} (source)", fontsize=8)
    ax.set_xlabel(f"{target} (target)", fontsize=8)
    ax.set_title(f"W {source} -> {target}", fontsize=9)
    fig.tight_layout()
    return _to_array(fig)


def confusion_image(confusion: np.ndarray, classes: Sequence[str], title: str) -> np.ndarray:
    """Row-normalised confusion matrix (rows: true class, columns: predicted class)."""
    plt = _pyplot()
    c = np.asarray(confusion, dtype=np.float64)
    rates = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=_size(*c.shape))
    im = ax.imshow(rates, cmap="viridis", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.04)
    if len(classes) <= 12:  # counts in the cells where they can be read
        for i, j in zip(*np.nonzero(c)):
            ax.text(j, i, int(c[i, j]), ha="center", va="center", fontsize=6,
                    color="white" if rates[i, j] < 0.6 else "black")
    _ticks(ax, classes, classes)
    ax.set_ylabel("true", fontsize=8)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_title(f"{title}: top-1 {np.trace(c) / max(c.sum(), 1):.1%} of {int(c.sum())}", fontsize=9)
    fig.tight_layout()
    return _to_array(fig)


def save_png(image: np.ndarray, path) -> None:
    plt = _pyplot()
    plt.imsave(str(path), image)
