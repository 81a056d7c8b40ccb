"""Class schemes: which labels become which model outputs.

A scheme of size K is the negative class (``--negative-class``, default ``normal``) followed by the
other labels from most to least frequent; when K is smaller than the number of labels, the least
frequent labels merge into one class named ``other`` (K = 2 is negative vs everything else).
Two classes are one sigmoid output (probability of the second class); K > 2 are K softmax outputs.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

OTHER = "other"


@dataclass(frozen=True)
class ClassScheme:
    names: tuple[str, ...]  # model classes, index = output
    mapping: dict[str, int] = field(default_factory=dict)  # raw label -> class index
    negative: str = "normal"

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def num_outputs(self) -> int:
        return 1 if self.num_classes == 2 else self.num_classes

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    def to_dict(self) -> dict:
        return {"names": list(self.names), "mapping": dict(self.mapping), "negative": self.negative}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassScheme":
        return cls(names=tuple(d["names"]), mapping=dict(d["mapping"]), negative=d["negative"])


def build_scheme(label_counts: dict[str, int], num_classes: int | None, negative: str = "normal") -> ClassScheme:
    counts = Counter(label_counts)
    if negative not in counts:
        raise ValueError(f"negative class {negative!r} is not among the labels {sorted(counts)}; "
                         "set --negative-class to one of them")
    others = sorted((lab for lab in counts if lab != negative), key=lambda lab: (-counts[lab], lab))
    if not others:
        raise ValueError(f"only the negative class {negative!r} has images; training needs at least two classes")
    k = num_classes or (len(others) + 1)
    if k > len(others) + 1:
        raise ValueError(f"num_classes={k} but the labels give only {len(others) + 1} classes: {[negative, *others]}")
    if k == len(others) + 1:
        kept, merged = others, []
    else:
        kept, merged = others[: k - 2], others[k - 2 :]
    names = [negative, *kept] + ([OTHER] if merged else [])
    if OTHER in kept:
        raise ValueError(f"a label is named {OTHER!r}, which clashes with the merged class; rename it")
    mapping = {negative: 0, **{lab: i + 1 for i, lab in enumerate(kept)}}
    mapping.update({lab: len(names) - 1 for lab in merged})
    return ClassScheme(names=tuple(names), mapping=mapping, negative=negative)
