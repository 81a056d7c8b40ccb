"""Pictures of results: training curves and ROC curves (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from xray_dist.metrics import auroc, roc_curve  # noqa: E402


def plot_history(history: list[dict], path: str | Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["loss"] for h in history], "o-", label="train loss")
    a.plot(epochs, [h["val_loss"] for h in history], "o-", label="val loss")
    a.set_xlabel("epoch"); a.set_ylabel("loss"); a.legend(); a.grid(alpha=0.3)
    for key in ("val_auc", "val_auc_abnormal", "sensitivity", "specificity"):
        b.plot(epochs, [h.get(key, np.nan) for h in history], "o-", label=key)
    b.set_ylim(0, 1.02); b.set_xlabel("epoch"); b.legend(loc="lower right"); b.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc(labels: np.ndarray, probs: np.ndarray, names: list[str], path: str | Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    abnormal = labels != 0
    score = 1 - probs[:, 0]
    fpr, tpr, _ = roc_curve(abnormal, score)
    ax.plot(fpr, tpr, lw=2.5, label=f"abnormal vs {names[0]} (AUROC {auroc(abnormal, score):.3f})")
    if len(names) > 2:
        for c in range(1, len(names)):
            fpr, tpr, _ = roc_curve(labels == c, probs[:, c])
            ax.plot(fpr, tpr, lw=1, label=f"{names[c]} vs rest (AUROC {auroc(labels == c, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity"); ax.set_ylabel("sensitivity"); ax.set_title("Validation ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(rows: list[dict], path: str | Path, metric: str = "val_auc_abnormal") -> None:
    """The objective against each searched dimension (one dot per trial; failed trials left out)."""
    dims = ["head_width", "num_classes", "unfreeze_blocks", "lr"]
    ok = [r for r in rows if r["status"] != "failed" and not np.isnan(float(r["val_auc_abnormal"]))]
    fig, axes = plt.subplots(1, len(dims), figsize=(4 * len(dims), 3.6), sharey=True)
    rng = np.random.default_rng(0)
    for ax, dim in zip(axes, dims):
        xs = np.array([float(r[dim]) for r in ok])
        ys = np.array([float(r["val_auc_abnormal"]) for r in ok])
        colours = ["tab:green" if r["status"] == "completed" else "tab:orange" for r in ok]
        if dim == "lr":
            ax.set_xscale("log")
            ax.scatter(xs, ys, c=colours)
        else:
            cats = sorted(set(xs))
            pos = np.array([cats.index(x) for x in xs]) + rng.uniform(-0.12, 0.12, len(xs))
            ax.scatter(pos, ys, c=colours)
            ax.set_xticks(range(len(cats)), [f"{int(c)}" for c in cats])
            ax.set_xlim(-0.5, len(cats) - 0.5)
        ax.set_xlabel(dim)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"best {metric}")
    fig.suptitle("Sweep: green = completed, orange = stopped early by ASHA")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
