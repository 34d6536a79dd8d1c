"""What changed between two builds: layers added, reused and removed, and their bytes.

``new.compare(old)`` on a :class:`~nixery_core.results.BuildResult` gives a
:class:`BuildComparison`.  Layers are matched by digest (a layer is the
same blob exactly when it holds the same store paths packed the same way),
so ``reused`` is what a client that pulled ``old`` does not download again,
and ``bytes_added`` what it does.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import attrs

from nixery_core.display import LayerLike, human_size

__all__ = ["BuildComparison", "LayerLike", "compare_layers"]  # LayerLike lives in display


@attrs.frozen
class LayerChange:
    """One layer in a comparison: its digest, compressed size and packages."""

    digest: str
    size: int
    packages: tuple[str, ...]


@attrs.frozen
class BuildComparison:
    """Layers of a new build against an old one (matched by digest)."""

    added: tuple[LayerChange, ...]
    reused: tuple[LayerChange, ...]
    removed: tuple[LayerChange, ...]

    @property
    def bytes_added(self) -> int:
        """Compressed bytes a client holding the old image downloads for the new one."""
        return sum(layer.size for layer in self.added)

    @property
    def bytes_reused(self) -> int:
        """Compressed bytes the two images share."""
        return sum(layer.size for layer in self.reused)

    @property
    def bytes_removed(self) -> int:
        """Compressed bytes of old layers the new image no longer has."""
        return sum(layer.size for layer in self.removed)

    @property
    def reused_fraction(self) -> float:
        """Share of the new image's layer bytes already in the old one (0.0 to 1.0)."""
        total = self.bytes_added + self.bytes_reused
        return self.bytes_reused / total if total else 1.0

    def __str__(self) -> str:
        return (
            f"{len(self.added)} layers added ({human_size(self.bytes_added)}), "
            f"{len(self.reused)} reused ({human_size(self.bytes_reused)}), "
            f"{len(self.removed)} removed ({human_size(self.bytes_removed)})"
        )

    def _repr_html_(self) -> str:
        """A table for Jupyter: one row per layer, grouped by what happened to it."""
        rows = []
        for state, layers in (("added", self.added), ("reused", self.reused),
                              ("removed", self.removed)):
            for layer in layers:
                names = ", ".join(layer.packages[:6]) or "(customisation)"
                more = f" +{len(layer.packages) - 6}" if len(layer.packages) > 6 else ""
                rows.append(
                    f"<tr><td>{state}</td><td>{html.escape(human_size(layer.size))}</td>"
                    f"<td><code>{html.escape(layer.digest[:19])}</code></td>"
                    f"<td>{html.escape(names + more)}</td></tr>"
                )
        return (
            f"<p>{html.escape(str(self))}; {self.reused_fraction:.0%} of the new image's "
            "layer bytes were already there</p><table><thead><tr><th>layer</th><th>size</th>"
            "<th>digest</th><th>packages</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>"
        )


def compare_layers(new: Sequence[LayerLike], old: Sequence[LayerLike]) -> BuildComparison:
    """Layers of ``new`` added or reused with respect to ``old``, and those of ``old`` removed."""
    old_digests = {layer.digest for layer in old}
    new_digests = {layer.digest for layer in new}

    def change(layer: LayerLike) -> LayerChange:
        return LayerChange(layer.digest, layer.size, tuple(layer.packages))

    return BuildComparison(
        added=tuple(change(x) for x in new if x.digest not in old_digests),
        reused=tuple(change(x) for x in new if x.digest in old_digests),
        removed=tuple(change(x) for x in old if x.digest not in new_digests),
    )
