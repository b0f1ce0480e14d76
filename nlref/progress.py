"""Progress bars on stderr for the long commands (tqdm, the ecosystem's standard).

Every long loop of nlref (``nlref demo --toy`` training, ``nlref attention`` at large sizes,
``nlref bench``, ``nlref vectors``, ``nlref explore``) wraps its iterations in
:func:`progress`. The bar goes to stderr, so that the command's output on stdout stays
clean, and it is quiet where nobody watches: when stderr is not a terminal (pipes, CI,
notebooks' captured streams), or when the command got ``--quiet`` (``enabled=False``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["progress"]

T = TypeVar("T")


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool | None = None,
) -> Any:
    """``tqdm(iterable, ...)`` on stderr; a plain pass-through when disabled.

    Parameters
    ----------
    iterable : iterable, optional
        What to iterate over; None gives a bar to advance by hand (``bar.update(n)``,
        used as a context manager).
    total : int, optional
        The number of iterations, when ``len(iterable)`` does not say.
    desc : str, optional
        A short label before the bar.
    unit : str
        What one iteration is ("step", "case", "run", ...).
    enabled : bool or None
        None: shown when stderr is a terminal; False: never (``--quiet``); True: always.
    """
    from tqdm.auto import tqdm

    disable = None if enabled is None else not enabled
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=disable,
        leave=False,
        dynamic_ncols=True,
    )
