"""Array-namespace helpers shared by every layer.

nlref never imports an array library at module level except NumPy (used only for random
numbers and host copies). Every function finds its namespace from its inputs with
:func:`namespace`, so the same code runs on NumPy, CuPy and array-api-strict.
"""

from __future__ import annotations

import sys
from typing import Any

import array_api_compat
import numpy as np

Array = Any  # any array-API-compatible array (NumPy, CuPy, array-api-strict, ...)

__all__ = [
    "Array",
    "check_plain_array",
    "namespace",
    "namespace_of_mapping",
    "new_array",
    "one_hot_like",
    "to_numpy",
]


def namespace(*arrays: Array) -> Any:
    """Return the array-API namespace shared by ``arrays``.

    Raises
    ------
    TypeError
        If the arrays come from different array libraries (for example a NumPy and a
        CuPy array in one call), naming the libraries that were mixed.
    """
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as err:
        kinds = sorted({_library_name(a) for a in arrays})
        raise TypeError(
            "all arrays in one call must come from the same array library; "
            f"got a mix of {', '.join(kinds)}. Move them to one library first "
            "(for example with xp.asarray)."
        ) from err


def check_plain_array(a: Array, what: str) -> None:
    """Refuse the NumPy arrays whose arithmetic is not that of an array, or whose bytes are
    not in the machine's order; ``what`` names the argument in the message.

    - ``numpy.ma.MaskedArray``: its operations skip masked entries, which the formulas
      cannot do; and the values under the mask are arbitrary.
    - ``numpy.matrix``: ``*`` is a matrix product and every result is 2-d.
    - non-native byte order (big-endian data on a little-endian machine, from a file, say):
      NumPy computes with it, but its dtype is not ``float32``/``float64``, so the dtype
      checks would fail with a confusing message. Converting it is a copy, which nlref never
      makes behind the caller's back.

    Raises
    ------
    TypeError
        Naming the kind of array and how to convert it.
    """
    if not isinstance(a, np.ndarray):
        return
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(
            f"{what} is a numpy.ma.MaskedArray; nlref computes on every entry and cannot "
            "skip masked ones. Pass a plain array: a.filled(value), or np.asarray(a) to "
            "keep the values under the mask"
        )
    if isinstance(a, np.matrix):
        raise TypeError(
            f"{what} is a numpy.matrix, whose * and indexing differ from an array's; "
            "pass np.asarray(a)"
        )
    if not a.dtype.isnative:
        raise TypeError(
            f"{what} has dtype {a.dtype.str!r}, in the non-native byte order ("
            f"{'big' if a.dtype.byteorder == '>' else 'little'}-endian on this "
            f"{sys.byteorder}-endian machine); convert it to the native byte order with "
            "a.astype(a.dtype.newbyteorder('='))"
        )


def namespace_of_mapping(first: Array, named: dict[str, Array]) -> Any:
    """Return the namespace shared by ``first`` and every value of ``named``.

    On a mismatch, the error names the first parameter whose library differs from
    ``first``'s.
    """
    xp_first = namespace(first)
    for name, value in named.items():
        try:
            array_api_compat.array_namespace(first, value)
        except TypeError:
            raise TypeError(
                f"parameter {name!r} is an array of type {_library_name(value)} but x is "
                f"of type {_library_name(first)}; all arrays in one call must come from "
                "the same array library"
            ) from None
    return xp_first


def _library_name(a: Array) -> str:
    module = type(a).__module__.split(".")[0]
    return f"{module}.{type(a).__name__}"


def new_array(values: np.ndarray, like: Array) -> Array:
    """Move the host array ``values`` to the namespace, device and dtype of ``like``."""
    xp = namespace(like)
    return xp.asarray(values, dtype=like.dtype, device=array_api_compat.device(like))


def one_hot_like(like: Array, flat_index: int) -> Array:
    """An array shaped like ``like`` that is 1 at ``flat_index`` (C order) and 0 elsewhere."""
    host = np.zeros(int(np.prod(like.shape)), dtype=np.float64)
    host[flat_index] = 1.0
    return new_array(host.reshape(tuple(like.shape)), like)


def to_numpy(a: Array) -> np.ndarray:
    """Copy any supported array (NumPy, CuPy, array-api-strict, torch CPU) to a NumPy array."""
    if isinstance(a, np.ndarray):
        return a
    if array_api_compat.is_cupy_array(a):
        return a.get()
    if array_api_compat.is_torch_array(a):
        return a.detach().cpu().numpy()
    try:
        return np.from_dlpack(a)
    except (TypeError, AttributeError, BufferError, RuntimeError):
        return np.asarray(a)
