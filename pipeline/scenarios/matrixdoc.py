"""What the compatibility matrices (zdtm.py, workload_matrix.py) share: cells run again merged into the
recorded ones, and the cells saved as JSON with their generated table spliced into docs/compatibility.md."""

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel


class Header(BaseModel):
    """When and on what a matrix last ran; each matrix adds its `cells`."""

    when: str
    kernel: str
    criu: str


class _Matrix(Protocol):
    cells: list[Any]

    def model_copy(self, *, update: dict[str, Any]) -> Any: ...

    def model_dump_json(self, *, indent: int) -> str: ...


M = TypeVar("M", bound=_Matrix)


def merge(old: M, new: M, key: Callable[[Any], Hashable]) -> M:
    """`old` with the cells `new` ran again (same `key`) replaced in place, new cells appended; the header
    (date, kernel, CRIU) is `new`'s: the matrix was last touched by the rerun."""
    fresh = {key(c): c for c in new.cells}
    cells = [fresh.pop(key(c), c) for c in old.cells] + list(fresh.values())
    return new.model_copy(update={"cells": cells})


@dataclass(frozen=True)
class Section:
    """A generated table in a doc: between its markers, under `heading` if the markers are not there yet."""

    heading: str
    begin: str
    end: str


def write_doc(matrix: _Matrix, table: str, section: Section, doc: Path, results: Path) -> None:
    """Save the cells as JSON and replace the table between the section's markers; the prose stays."""
    results.write_text(matrix.model_dump_json(indent=1) + "\n")
    text = doc.read_text() if doc.exists() else "# Compatibility\n"
    block = f"{section.begin}\n{table}\n{section.end}"
    if section.begin in text and section.end in text:
        head, _, rest = text.partition(section.begin)
        text = head + block + rest.partition(section.end)[2]
    else:
        text = text.rstrip("\n") + f"\n\n## {section.heading}\n\n" + block + "\n"
    doc.write_text(text)
