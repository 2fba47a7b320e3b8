"""Binary (Shannon) entropy, the one information measure every key-rate formula uses.

h(p) = −p log2 p − (1 − p) log2(1 − p), with the continuous extension h(0) = h(1) = 0
(e.g. Ma et al., PRA 72, 012326 (2005), the H2 of Eq. (1); Lim et al., PRA 89, 022307
(2014), the h of Eq. (1)).
"""

from __future__ import annotations

from typing import overload

import numpy as np
from numpy.typing import ArrayLike, NDArray


@overload
def binary_entropy(p: float) -> float: ...
@overload
def binary_entropy(p: NDArray[np.floating]) -> NDArray[np.float64]: ...


def binary_entropy(p: ArrayLike) -> float | NDArray[np.float64]:
    """Binary entropy h2(p) in bits, vectorised over NumPy arrays.

    Values at (and, by clipping, beyond) the end points give 0: h(0) = h(1) = 0. A scalar
    argument returns a Python float, an array argument an array of the same shape. NaN in
    gives NaN out (callers that must never produce NaN check their inputs first).
    """
    arr = np.asarray(p, dtype=np.float64)
    q = np.clip(arr, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(q > 0, -q * np.log2(np.where(q > 0, q, 1.0)), 0.0)
        r = 1.0 - q
        b = np.where(r > 0, -r * np.log2(np.where(r > 0, r, 1.0)), 0.0)
    out = np.where(np.isnan(arr), np.nan, a + b)
    if out.ndim == 0:
        return float(out)
    return out
