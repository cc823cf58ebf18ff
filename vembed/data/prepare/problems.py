"""Problems found while preparing a data set: each names the file, line or path it is about.

Some problems make the output wrong (a missing or undecodable image, a malformed line, one path
with two labels): they stop ``prepare`` unless ``skip_bad`` drops the records concerned. Others are
worth knowing but harmless (an exact duplicate line, a class with a single image, an empty split):
they are reported and the splits are written.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from vembed.errors import VembedError

# kind -> stops prepare unless skip_bad
KINDS: dict[str, bool] = {
    "bad-record": True,  # malformed line, missing field, wrong type
    "missing-image": True,  # the image file does not exist
    "bad-image": True,  # the image does not decode (--check-images)
    "conflicting-duplicate": True,  # the same image listed with two labels
    "duplicate": False,  # the same image listed twice with the same label: the copy is dropped
    "single-image-class": False,  # a class with one image: never a retrieval query
    "single-image-in-split": False,  # classes with one image in val/test: never a query there
    "small-class": False,  # a class too small for the k-shot support it was asked for
    "empty-split": False,  # a split asked for came out empty: not written
    "unlabelled": False,  # an image outside any class folder: ignored
    "missing-mask": True,  # segmentation: an image without a mask
    "bad-mask": True,  # segmentation: undecodable, colour, wrong size or class index beyond the class list
    "unpaired-mask": False,  # segmentation: a mask without an image: ignored
}


@dataclass(frozen=True)
class Problem:
    kind: str
    where: str  # "file.jsonl:12", an image path, a class or split name
    message: str

    @property
    def fatal(self) -> bool:
        return KINDS[self.kind]

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


@dataclass
class ProblemLog:
    """The problems of one prepare run, in the order they were found."""

    items: list[Problem] = field(default_factory=list)

    def add(self, kind: str, where: str, message: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown problem kind {kind!r}")
        self.items.append(Problem(kind, str(where), message))

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    @property
    def fatal(self) -> list[Problem]:
        return [p for p in self.items if p.fatal]

    def counts(self) -> dict[str, int]:
        counts = Counter(p.kind for p in self.items)
        return {kind: counts[kind] for kind in KINDS if counts[kind]}

    def raise_if_fatal(self, *, skip_bad: bool, shown: int = 10) -> None:
        """Stop with one message listing the first ``shown`` fatal problems, unless ``skip_bad``."""
        fatal = self.fatal
        if not fatal or skip_bad:
            return
        counts = Counter(p.kind for p in fatal)
        head = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        lines = "\n  ".join(str(p) for p in fatal[:shown])
        more = f"\n  ... and {len(fatal) - shown} more" if len(fatal) > shown else ""
        raise VembedError(
            f"{len(fatal)} problem(s) in the input ({head}); nothing was written:\n  {lines}{more}\n"
            "Fix them, or pass --skip-bad to leave those records out (they are listed in problems.txt)."
        )
