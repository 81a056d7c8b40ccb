"""Patient-level, label-stratified, seeded splits: no patient is ever on two sides."""

from __future__ import annotations

from collections import Counter

import numpy as np


def patient_labels(rows: list[tuple[str, str]]) -> dict[str, str]:
    """``(patient, label)`` per image → one stratum per patient: their most frequent label
    (ties broken alphabetically, so the result does not depend on row order)."""
    counts: dict[str, Counter] = {}
    for patient, label in rows:
        counts.setdefault(patient, Counter())[label] += 1
    return {p: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for p, c in counts.items()}


def split_patients(strata: dict[str, str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """Assign each patient to ``train``, ``val`` or ``test``.

    Within each label, patients are sorted, shuffled with ``seed`` and cut by the fractions
    (rounded, and at least one validation patient per label that has two or more patients when
    ``val_fraction > 0``), so every split sees every class in proportion and the same inputs with
    the same seed always give the same split.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for label in sorted(set(strata.values())):
        members = sorted(p for p, lab in strata.items() if lab == label)
        order = [members[i] for i in rng.permutation(len(members))]
        n = len(order)
        n_val = int(round(n * val_fraction))
        n_test = int(round(n * test_fraction))
        if val_fraction > 0 and n >= 2:
            n_val = max(n_val, 1)
        if test_fraction > 0 and n >= 3:
            n_test = max(n_test, 1)
        n_val = min(n_val, max(n - 1, 0))
        n_test = min(n_test, max(n - 1 - n_val, 0))
        for i, p in enumerate(order):
            out[p] = "val" if i < n_val else ("test" if i < n_val + n_test else "train")
    return out
