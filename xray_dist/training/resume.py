"""The rule for running again into an existing ``--out``: the same settings resume, other settings
are refused with every difference named (a run, or a sweep, never mixes two configurations).

What counts as "the settings" is the caller's: a train run compares the fields that shape its
model and data (``RUN/config.json``), a sweep its search space and base settings
(``SWEEP/sweep_config.json``).
"""

from __future__ import annotations

from typing import Callable, Iterable

from xray_dist.config.values import RENAMED
from xray_dist.errors import XrayDistError
from xray_dist.infra import storage


def changed_settings(old: dict, new: dict, keys: Iterable[str] | None = None) -> list[str]:
    """``"key: old -> new"`` for each of ``keys`` (default: every key of either, sorted) whose
    value differs; a key one side lacks reads as None there."""
    keys = sorted(set(old) | set(new)) if keys is None else keys
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_same_settings(out: str, record: str, kind: str, differences: Callable[[dict], list[str]]) -> None:
    """Refuse to resume the ``kind`` ("run", "sweep") in ``out`` when ``differences`` finds any
    between its recorded settings (the JSON file ``record`` in ``out``) and this command's;
    nothing recorded yet: a new ``kind``."""
    try:
        old = storage.read_json(storage.join(out, record))
    except FileNotFoundError:
        return
    diff = differences(old)
    if diff:
        renamed = sorted({k for k in RENAMED for d in diff if d.startswith(f"{k}:")})
        why = "".join(f"; it was started before --{k.replace('_', '-')} became --{RENAMED[k][0]}, whose auto "
                      "differs (bfloat16 on CPUs with it), so it cannot resume as it ran" for k in renamed)
        raise XrayDistError(f"--out {out} holds a {kind} with other settings ({'; '.join(diff)}){why}; "
                            "use a new --out, or the same settings to resume it")
