"""The dataset model: a catalog and its three splits of samples, and the error every problem in
a dataset raises.

In memory a dataset is a :class:`Dataset`: the catalog ``titles`` (item id -> title; several ids
may share a title) and three lists of :class:`Sample`. Every problem found in a file raises
:class:`DatasetError`, whose message names the file, the line and the problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["SPLITS", "Dataset", "DatasetError", "Sample"]

SPLITS = ("train", "valid", "test")


class DatasetError(ValueError):
    """A problem in a dataset file (or an in-memory dataset). ``str(error)`` reads
    ``"<file>, line <n>: <problem>"``; ``file`` and ``line`` are None where they do not apply."""

    def __init__(
        self, problem: str, file: str | os.PathLike | None = None, line: int | None = None
    ):
        self.problem = problem
        self.file = None if file is None else str(file)
        self.line = line
        where = self.file or "dataset"
        if line is not None:
            where += f", line {line}"
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True, slots=True)
class Sample:
    """One training or evaluation example: the items before ``target`` (oldest first) and the
    target. The other fields are known for freshly prepared data and for the published valid/test
    files, and None where the file does not say (e.g. the published, rebuilt train CSV)."""

    history: tuple[int, ...]
    target: int
    user: str | None = None
    timestamp: int | None = None  # unix seconds of the target interaction
    rating: float | None = None
    history_timestamps: tuple[int, ...] | None = None
    history_ratings: tuple[float, ...] | None = None


@dataclass
class Dataset:
    """A catalog and its three splits.

    ``titles[i]`` is the title of item ``i``; ``item_keys[i]``, when known, its raw id in the
    source data (an Amazon ASIN, a MovieLens movie id), None where unknown. Samples keep file
    order, which is the temporal order for data built by
    :func:`flower_rec.data.build_dataset`."""

    name: str
    titles: list[str]
    train: list[Sample]
    valid: list[Sample]
    test: list[Sample]
    item_keys: list[str | None] | None = field(default=None)

    @property
    def num_items(self) -> int:
        return len(self.titles)

    def split(self, name: str) -> list[Sample]:
        """The samples of split ``name`` (``"train"``, ``"valid"`` or ``"test"``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def title_items(self) -> dict[str, list[int]]:
        """Title -> the ids of the items with that title (one-to-many), in catalog order."""
        out: dict[str, list[int]] = {}
        for item, title in enumerate(self.titles):
            out.setdefault(title, []).append(item)
        return out

    def validate(self) -> None:
        """Check the in-memory invariants that the file format needs: titles non-empty without
        tab or line breaks, ids in range, per-sample list lengths, non-empty splits."""
        n = len(self.titles)
        if n == 0:
            raise DatasetError(f"dataset {self.name!r} has an empty catalog")
        for item, title in enumerate(self.titles):
            if not isinstance(title, str) or not title or any(c in title for c in "\t\r\n"):
                raise DatasetError(
                    f"dataset {self.name!r}: item {item} has an invalid title {title!r} "
                    "(must be a non-empty string without tab or line breaks)"
                )
        if self.item_keys is not None and len(self.item_keys) != n:
            raise DatasetError(
                f"dataset {self.name!r}: {len(self.item_keys)} item keys for {n} items"
            )
        for split in SPLITS:
            samples = self.split(split)
            if not samples:
                raise DatasetError(f"dataset {self.name!r}: the {split} split is empty")
            for index, s in enumerate(samples):
                bad = [i for i in (*s.history, s.target) if not (0 <= i < n)]
                if bad:
                    raise DatasetError(
                        f"dataset {self.name!r}: {split} sample {index} has unknown item id "
                        f"{bad[0]} (the catalog has {n} items)"
                    )
                for name, values in (
                    ("history_timestamps", s.history_timestamps),
                    ("history_ratings", s.history_ratings),
                ):
                    if values is not None and len(values) != len(s.history):
                        raise DatasetError(
                            f"dataset {self.name!r}: {split} sample {index} has {len(values)} "
                            f"{name} for {len(s.history)} history items"
                        )

