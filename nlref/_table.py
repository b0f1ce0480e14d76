"""The one plain-text table formatter of nlref.

Every table nlref prints (``nlref gradcheck``, ``nlref bench``, ``nlref compare`` and the
oracle's ``Report``, ``nlref vectors --check``, :class:`nlref.GradcheckResult`) goes
through :func:`format_table`, so that they all look alike: a header line, a rule of
dashes as wide as the widest line, one line per row, columns two spaces apart, numbers
right-aligned, and no trailing spaces.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    align: str | None = None,
    gap: int = 2,
) -> list[str]:
    """Lay out ``rows`` under ``header`` as lines of text.

    Parameters
    ----------
    header : sequence of str
        The column titles.
    rows : sequence of sequences
        One sequence of cells per row, as many as the header; cells are turned into
        strings with ``str``.
    align : str, optional
        One character per column, ``"<"`` (left) or ``">"`` (right). Default: the first
        column left and the others right.
    gap : int
        Spaces between columns.

    Returns
    -------
    list of str
        The header, a rule of dashes, then the rows.

    Examples
    --------
    >>> print("\\n".join(format_table(["name", "err"], [["x", "1e-9"], ["theta", "2e-10"]])))
    name     err
    ------------
    x       1e-9
    theta  2e-10
    """
    cells = [[str(c) for c in row] for row in rows]
    width = len(header)
    if any(len(row) != width for row in cells):
        raise ValueError(f"every row needs {width} cells (one per header column)")
    align = align or "<" + ">" * (width - 1)
    if len(align) != width or set(align) - {"<", ">"}:
        raise ValueError(f"align needs one of '<' or '>' per column, got {align!r}")
    widths = [max(len(line[i]) for line in [list(header), *cells]) for i in range(width)]
    space = " " * gap

    def fmt(line: Sequence[str]) -> str:
        parts = (f"{v:{a}{w}}" for v, a, w in zip(line, align, widths, strict=True))
        return space.join(parts).rstrip()

    lines = [fmt(list(header))] + [fmt(row) for row in cells]
    rule = "-" * max(len(line) for line in lines)
    return [lines[0], rule, *lines[1:]]
