"""``MODEL_CARD.md`` (Mitchell et al., 2019): what a trained model is for, what it was trained on,
how it performs overall, by subgroup and elsewhere, how calibrated it is, and the limits this
package can detect on its own.

Built, like the report, only from what the run, its evaluations and the cache's prepare report
already hold: counts, metrics, settings and the cache's fingerprint. No file name, directory,
patient key or header value beyond the subgroup attributes reaches it (sites appear as the keys or
the ``--site-column`` values prepare stored). One structure is rendered twice: as Markdown for
the file and as HTML for the report's own model-card section.
"""

from __future__ import annotations

import html
import math
import platform
from dataclasses import dataclass, field
from importlib import metadata

from xray_dist.data.cache import read_report_summary
from xray_dist.errors import XrayDistError
from xray_dist.infra import storage

CARD_FILE = "MODEL_CARD.md"
#: Fewer held-out patients than this and the card says the intervals are wide.
SMALL_TEST_PATIENTS = 100
#: The packages whose versions the card lists (the run's own record first, see ``software``).
PACKAGES = ("xray-dist", "tensorflow", "tf-keras", "ray", "pydicom", "numpy", "pyarrow")
PLACEHOLDER = ("Not stated. The person who trained this model has not said what it is for (`xray-dist report "
               "--intended-use TEXT`). Until they do, it is a research artefact and not for clinical use.")


def software() -> dict[str, str]:
    """This environment's versions of :data:`PACKAGES` and Python (read without importing them)."""
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


@dataclass
class Card:
    """Sections of ``(title, blocks)``; a block is a paragraph (str) or a table ``(header, rows)``."""

    sections: list[tuple[str, list]] = field(default_factory=list)

    def add(self, title: str, *blocks) -> None:
        self.sections.append((title, [b for b in blocks if b]))

    @property
    def titles(self) -> list[str]:
        return [t for t, _ in self.sections]

    def markdown(self, heading: str) -> str:
        out = [f"# {heading}", ""]
        for title, blocks in self.sections:
            out += [f"## {title}", ""]
            for b in blocks:
                if isinstance(b, str) and b.startswith("- "):  # a list: one item a line
                    out += [b] if blocks[-1] is not b else [b, ""]
                elif isinstance(b, str):
                    out += [b, ""]
                else:
                    header, rows = b
                    out.append("| " + " | ".join(map(_md, header)) + " |")
                    out.append("|" + "---|" * len(header))
                    out += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
                    out.append("")
        return "\n".join(out)

    def html(self) -> str:
        out = ['<section class="card"><h2>Model card</h2><p>Also written as <code>MODEL_CARD.md</code> beside '
               "this page.</p>"]
        for title, blocks in self.sections:
            out.append(f"<h3>{html.escape(title)}</h3>")
            for b in blocks:
                if isinstance(b, str):
                    out.append(f"<p>{html.escape(b)}</p>")
                else:
                    header, rows = b
                    out.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"
                               + "".join("<tr>" + "".join(f"<td>{html.escape(_cell(c))}</td>" for c in r) + "</tr>"
                                         for r in rows) + "</table>")
        return "\n".join(out) + "</section>"


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _md(v) -> str:
    return _cell(v).replace("|", "\\|").replace("\n", " ")


def _ci(m: dict | None) -> str:
    if not isinstance(m, dict) or m.get("value") is None:
        return "n/a"
    lo, hi = m.get("ci95") or (None, None)
    return f"{_cell(m['value'])} [{_cell(lo)}, {_cell(hi)}]"


def _distribution(counts: dict[str, int]) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{k} {v} ({100 * v / total:.0f} %)" for k, v in counts.items())


def _weights(cfg: dict) -> str | None:
    """The base weights as the card may name them: never a file's path (it can carry a name)."""
    w = cfg.get("weights")
    return w if w in (None, "imagenet", "none") else "a weights file"


def limitations(metrics: dict, spec: dict, held_out: dict | None, external: list[dict], dataset: dict) -> list[str]:
    """What this package can see is wrong or missing about the evidence for the model."""
    out = []
    weights = _weights(metrics.get("config") or {})
    if weights != "imagenet":
        out.append(f"The base was not initialised with ImageNet weights ({weights}): the usual transfer "
                   "learning did not happen, and the features are what this data alone could teach.")
    if not held_out:
        out.append("No held-out test evaluation: the model's only numbers are validation ones, which chose the "
                   "epoch, the threshold (and any trial), so optimistic. Run `xray-dist evaluate`.")
    elif held_out.get("split") != "test":
        out.append(f"The evaluation shown is on the `{held_out.get('split')}` split, which took part in selection: "
                   "optimistic.")
    elif (held_out.get("patients") or 0) < SMALL_TEST_PATIENTS:
        out.append(f"A small test set: {held_out.get('patients')} patients (under {SMALL_TEST_PATIENTS}); the "
                   "intervals are wide and a subgroup gap may go unseen.")
    if held_out and not held_out.get("subgroups"):
        out.append("No subgroup evaluation (`xray-dist evaluate --by sex,age,view,site`): performance across sex, "
                   "age, view and site is unknown.")
    for attr, res in ((held_out or {}).get("subgroups") or {}).items():
        small = [g for g in res.get("groups", []) if "skipped" in g]
        if small:
            out.append(f"Subgroups of {attr} with too few patients to measure ({small[0]['skipped']}), listed "
                       f"without numbers: {', '.join(str(g['value']) for g in small)}.")
    if not external:
        out.append("No external validation: the model has been tested only on patients of the hospitals it was "
                   "trained on (`xray-dist evaluate --external` on another site's cache).")
    if "calibration" not in spec:
        out.append("Not calibrated: the probabilities are the network's own and may be over- or under-confident "
                   "(`xray-dist calibrate`).")
    sites = (dataset.get("subgroups") or {}).get("site", {})
    if len([s for s in sites if s != "unknown"]) <= 1:
        out.append("Trained on data from a single site (or sites unknown).")
    if not metrics.get("complete", True):
        out.append("Training did not run all its epochs.")
    return out


def build(run_metrics: dict, spec: dict, held_out: dict | None, external: list[dict], fingerprint: dict | None,
          intended_use: str | None) -> Card:
    """The card for a run's (or a sweep's best trial's) outputs."""
    cfg, model = run_metrics.get("config") or {}, spec.get("model") or {}
    dataset = {}
    if cfg.get("cache"):
        try:
            dataset = read_report_summary(cfg["cache"])
        except (XrayDistError, OSError):
            dataset = {}
    dataset = dataset or run_metrics.get("dataset") or {}
    card = Card()
    card.add("Intended use", intended_use.strip() if intended_use and intended_use.strip() else PLACEHOLDER)
    classes = run_metrics.get("classes", [])
    card.add("Model", (["", ""], [
        ["architecture", "VGG16 convolutional base, a new head sized to the task"],
        ["task", "multi-label findings (one sigmoid each)" if run_metrics.get("task") == "multilabel"
         else f"{len(classes)} classes ({'one sigmoid' if len(classes) == 2 else 'softmax'})"],
        ["outputs", ", ".join(classes)],
        ["base weights", _weights(cfg)],
        ["image size (px)", model.get("image_size", cfg.get("image_size"))],
        ["head width", model.get("head_width", cfg.get("head_width"))],
        ["unfreeze depth (VGG blocks trained)", model.get("unfreeze_blocks", cfg.get("unfreeze_blocks"))],
        ["epochs (best)", f"{run_metrics.get('epochs')} ({run_metrics.get('best_epoch')})"],
        ["threshold (chosen on validation)", spec.get("threshold")],
    ]))
    n = dataset.get("ok") or 0
    rows = [["files found", dataset.get("found")], ["images used", dataset.get("ok")],
            ["quarantined", dataset.get("quarantined")], ["excluded by view", dataset.get("excluded")]]
    rows += [[f"{s} split", f"{v.get('images')} images, {v.get('patients')} patients"]
             for s, v in (dataset.get("splits") or {}).items()]
    rows += [[f"prevalence of {k}", f"{v} ({100 * v / n:.1f} %)" if n else v]
             for k, v in sorted((dataset.get("classes") or {}).items())]
    rows += [[a, _distribution(c)] for a, c in (dataset.get("subgroups") or {}).items()]
    card.add("Training data", "Counts from the cache's prepare report (all splits; attributes as prepare read them, "
             "'unknown' where nothing gave one).", (["", "value"], rows))
    if held_out:
        card.add("Held-out results",
                 f"{held_out.get('images')} images of {held_out.get('patients')} patients ({held_out.get('split')} "
                 f"split), at the model's threshold. Intervals: {held_out.get('interval_method', '')}.",
                 (["metric", "value [95 % CI]"],
                  [[k, _ci(v)] for k, v in held_out.items() if isinstance(v, dict) and "ci95" in v]))
    else:
        card.add("Held-out results", "None yet: `xray-dist evaluate --model RUN --cache CACHE` scores the test split.")
    sub_rows = [[attr, g["value"], g["patients"], _ci(g.get("auc_abnormal")) if "auc_abnormal" in g else g["skipped"],
                 _ci(g.get("sensitivity")), _ci(g.get("specificity"))]
                for attr, res in ((held_out or {}).get("subgroups") or {}).items() for g in res.get("groups", [])]
    card.add("Subgroups", (["attribute", "subgroup", "patients", "AUROC abnormal", "sensitivity", "specificity"],
                           sub_rows) if sub_rows else "Not evaluated by subgroup.")
    card.add("External validation", (["cache fingerprint", "images", "patients", "AUROC abnormal"],
                                     [[e.get("cache_fingerprint", "")[:8], e.get("images"), e.get("patients"),
                                       _ci(e.get("auc_abnormal"))] for e in external])
             if external else "None.")
    cal, ev_cal = spec.get("calibration"), (held_out or {}).get("calibration")
    if cal:
        t = cal["temperature"]
        shown = ", ".join(f"{k} {v:.3f}" for k, v in t.items()) if isinstance(t, dict) else f"{t:.3f}"
        card.add("Calibration", f"Temperature {shown}, fitted on validation.",
                 (["", "uncalibrated", "calibrated"],
                  [["ECE (held out)", _ci(ev_cal["ece_before"]), _ci(ev_cal["ece_after"])],
                   ["Brier (held out)", _ci(ev_cal["brier_before"]), _ci(ev_cal["brier_after"])]]) if ev_cal else
                 (["", "uncalibrated", "calibrated"], [["ECE (validation)", *cal.get("val_ece", [None, None])],
                                                      ["Brier (validation)", *cal.get("val_brier", [None, None])]]))
    else:
        card.add("Calibration", "Not calibrated." + (f" Held-out ECE {_ci(held_out.get('ece'))}."
                                                     if held_out and held_out.get("ece") else ""))
    card.add("Known limitations", *[f"- {x}" for x in limitations(run_metrics, spec, held_out, external, dataset)])
    sw = run_metrics.get("software")
    card.add("Software and data version",
             ("Versions that trained the model." if sw else "The run recorded no versions; these are the report's.")
             + (f" Cache fingerprint {fingerprint['id']}" if fingerprint else " No cache fingerprint recorded")
             + (f", split fingerprint {dataset['split_fingerprint']}." if dataset.get("split_fingerprint") else "."),
             (["package", "version"], sorted((sw or software()).items())))
    return card


def write(card: Card, out_dir: str, heading: str) -> str:
    """``OUT_DIR/MODEL_CARD.md`` (whole or absent); its location."""
    path = storage.join(out_dir, CARD_FILE)
    storage.write_text(path, card.markdown(heading) + "\n")
    return path
