"""The record of one apply(): what was planned, what was swapped, and the table report() prints."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .plan import Options, Row

COLUMNS = ("path", "kind", "original", "replacement", "backend", "status", "reason")
CUT = "\u2026"  # ends a table cell cut to its column's width


def _fit(cell: str, width: int) -> str:
    return cell if len(cell) <= width else cell[:width - 1] + CUT


class Report:
    """Iterable of Rows (attributes: path, kind, original, replacement, backend, status, reason)."""

    def __init__(self, rows):
        self.rows = list(rows)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def where(self, **match) -> "Report":
        return Report(r for r in self.rows if all(getattr(r, k) == v for k, v in match.items()))

    def summary(self) -> str:
        counts = Counter((r.kind, r.status) for r in self.rows)
        kinds = sorted({k for k, _ in counts})
        parts = []
        for kind in kinds:
            by = ", ".join(f"{n} {s}" for (k, s), n in sorted(counts.items()) if k == kind)
            parts.append(f"{kind}: {by}")
        return "; ".join(parts) if parts else "nothing to patch"

    def __str__(self):
        """The rows as a table: columns cut at 60 characters, the reason at 200, a cut cell ending in CUT; each
        Row's attributes keep the whole text."""
        table = [COLUMNS] + [tuple(str(getattr(r, c)) for c in COLUMNS) for r in self.rows]
        widths = [min(max(len(row[i]) for row in table), 60 if i < 6 else 200) for i in range(len(COLUMNS))]
        cut = any(len(cell) > w for row in table for cell, w in zip(row, widths))
        lines = ["  ".join(_fit(cell, w).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        note = [f"({CUT} marks text cut to fit; the rows of report(model) / plan_report(model) hold all of it)"] \
            if cut else []
        return "\n".join(lines + ["", self.summary()] + note)

    def __repr__(self):
        return f"<moe_patch.Report {len(self.rows)} rows: {self.summary()}>"


@dataclass
class Record:
    """Kept on the model as `model._moe_patch`; everything revert() and report() need."""

    options: Options
    rows: list[Row]
    swaps: list = field(default_factory=list)  # (parent, child name, replacement module)
    attention_modules: list = field(default_factory=list)  # the attention modules patched at apply()
    # [row, module, rope?, hook handles, row as planned] per patched attention module (swap.replan)
    attention: list = field(default_factory=list)
    # [row, parent, child name, replacement, experts implementation at apply, row as planned] (swap.replan)
    experts: list = field(default_factory=list)
    switched: list = field(default_factory=list)  # (module, method name): Transformers' switches followed
    warned: set = field(default_factory=set)  # messages already logged once
    hooks: list = field(default_factory=list)  # hook handles installed by apply() (fused RoPE), removed by revert()
    mesh: object = None
    parallel: dict = field(default_factory=dict)  # the expert-parallel options asked for (dispatcher, ...)
    sharded: list = field(default_factory=list)  # expert modules sharded over the mesh
    forward_replaced: bool = False  # the fused loss's instance-level forward
    auto: bool = False  # patched by MOE_PATCH=1 at build time: an explicit apply() may re-plan it (engine._replan)
