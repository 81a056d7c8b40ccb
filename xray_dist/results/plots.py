"""Pictures of results: training curves, ROC curves, calibration, confusion matrix, sweep plots and
Grad-CAM overlays (matplotlib, headless). Values read back from JSON may be None where a NaN was
written (standard JSON has no NaN): they are drawn as gaps and left out of legends."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from xray_dist.data.classes import abnormal_score, abnormal_truth, finding_key  # noqa: E402
from xray_dist.results.metrics import auroc, roc_curve  # noqa: E402


def _num(v) -> float:
    """A value as a float: None (a NaN written as JSON null) as NaN."""
    return float("nan") if v is None else float(v)


def plot_history(history: list[dict], path: str | Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [_num(h["loss"]) for h in history], "o-", label="train loss")
    a.plot(epochs, [_num(h["val_loss"]) for h in history], "o-", label="val loss")
    a.set_xlabel("epoch"); a.set_ylabel("loss"); a.legend(); a.grid(alpha=0.3)
    for key in ("val_auc", "val_auc_abnormal", "sensitivity", "specificity"):
        b.plot(epochs, [_num(h.get(key)) for h in history], "o-", label=key)
    b.set_ylim(0, 1.02); b.set_xlabel("epoch"); b.legend(loc="lower right"); b.grid(alpha=0.3)
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ci_text(intervals: dict | None, key: str) -> str:
    if not intervals or key not in intervals:
        return ""
    lo, hi = map(_num, intervals[key])
    if np.isnan(lo) or np.isnan(hi):
        return ""
    return f", 95% CI {lo:.2f}-{hi:.2f}"


def plot_roc(labels: np.ndarray, probs: np.ndarray, names: list[str], path: str | Path,
             intervals: dict | None = None, multilabel: bool = False) -> None:
    """ROC of abnormal vs the negative class, plus one-vs-rest per class when K > 2; multi-label:
    any finding vs none (largest finding probability) plus one curve per finding (uncertain
    entries left out).

    ``intervals`` maps ``"abnormal"``, a class name or a finding key to an AUROC confidence interval
    for the legend.
    """
    fig, ax = plt.subplots(figsize=(5.5, 5))
    truth, score = abnormal_truth(labels, multilabel), abnormal_score(probs, multilabel)
    known = truth >= 0  # multi-label: an image with only uncertain findings is left out
    abnormal, score = truth[known] == 1, score[known]
    if multilabel:
        first = "any finding vs none"
        curves = []
        for c, name in enumerate(names):
            k = labels[:, c] >= 0
            curves.append((f"{name}", finding_key(name), labels[k, c] == 1, probs[k, c]))
    else:
        first = f"abnormal vs {names[0]}"
        curves = [(f"{names[c]} vs rest", names[c], labels == c, probs[:, c]) for c in range(1, len(names))] \
            if len(names) > 2 else []
    fpr, tpr, _ = roc_curve(abnormal, score)
    ax.plot(fpr, tpr, lw=2.5, label=f"{first} (AUROC {auroc(abnormal, score):.3f}"
                                    f"{_ci_text(intervals, 'abnormal')})")
    for label, key, y, s in curves:
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1, label=f"{label} (AUROC {auroc(y, s):.3f}{_ci_text(intervals, key)})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("1 - specificity"); ax.set_ylabel("sensitivity"); ax.set_title("Validation ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_calibration(curves: dict[str, dict], path: str | Path) -> None:
    """Reliability diagram: observed frequency against mean predicted probability per bin.

    ``curves`` maps a legend name to :func:`xray_dist.results.metrics.reliability`'s result.
    """
    fig, (a, b) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    a.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfectly calibrated")
    width = 1.0 / max(len(next(iter(curves.values()))["count"]), 1)
    for i, (name, rel) in enumerate(curves.items()):
        filled = rel["count"] > 0
        a.plot(rel["confidence"][filled], rel["frequency"][filled], "o-", label=f"{name} (ECE {rel['ece']:.3f})")
        centres = (rel["edges"][:-1] + rel["edges"][1:]) / 2
        b.bar(centres + (i - (len(curves) - 1) / 2) * width / len(curves), rel["count"],
              width=width / len(curves), alpha=0.7)
    a.set_ylabel("observed frequency"); a.set_xlim(0, 1); a.set_ylim(0, 1.02); a.grid(alpha=0.3)
    a.legend(loc="upper left", fontsize=8); a.set_title("Calibration (validation)")
    b.set_xlabel("predicted probability"); b.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, names: list[str], path: str | Path) -> None:
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 1.1 * len(names) + 2.5))
    ax.imshow(matrix, cmap="Blues")
    hi = matrix.max() if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > hi / 2 else "black", fontsize=12)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right"); ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted (argmax)"); ax.set_ylabel("true"); ax.set_title("Confusion matrix (validation)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gradcam(image: np.ndarray, heat: np.ndarray, title: str, path: str | Path) -> None:
    """The model input in gray with the Grad-CAM heatmap over it, side by side with the plain input."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 4.4))
    for ax in (a, b):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([]); ax.set_yticks([])
    im = b.imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
    a.set_title("model input"); b.set_title("Grad-CAM")
    fig.colorbar(im, ax=b, fraction=0.046, pad=0.04)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_sweep(rows: list[dict], path: str | Path, metric: str = "val_auc_abnormal") -> None:
    """The objective against each searched dimension (one dot per trial; failed trials left out)."""
    dims = ["head_width", "num_classes", "unfreeze_blocks", "lr"]
    ok = [r for r in rows if r["status"] != "failed" and not np.isnan(_num(r["val_auc_abnormal"]))]
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


def plot_forest(subgroups: dict, path: str | Path, metric: str = "auc_abnormal") -> None:
    """Forest plot of ``metric`` per subgroup (``evaluate --by``): point and 95 % interval per
    group, one block per attribute; groups below the minimum of patients are named, with no point."""
    rows = []  # (label, value, lo, hi)
    for attr, res in subgroups.items():
        rows.append((attr, None, None, None))
        for g in res["groups"]:
            m = g.get(metric)
            label = f"  {g['value']} ({g['patients']} patients)"
            if m is None:
                rows.append((label + ": too few", None, None, None))
            else:
                rows.append((label, _num(m["value"]), _num(m["ci95"][0]), _num(m["ci95"][1])))
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(rows) + 1.2))
    for y, (label, v, lo, hi) in enumerate(rows):
        if v is not None and not np.isnan(v):
            if not (np.isnan(lo) or np.isnan(hi)):
                ax.plot([lo, hi], [y, y], color="tab:blue", lw=2)
            ax.plot([v], [y], "o", color="tab:blue")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    for t, r in zip(ax.get_yticklabels(), rows):
        if r[1] is None and not r[0].startswith(" "):
            t.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlim(0, 1.02)
    ax.axvline(0.5, color="k", ls="--", lw=0.8)
    ax.set_xlabel(f"{metric} (95 % patient-level interval)")
    ax.set_title("Performance by subgroup")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
