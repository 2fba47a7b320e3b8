"""Bob's two threshold detectors in time: dead time, after-pulses and squashing of double clicks.

Input: the *primary* clicks of a frame in pulse order (from photons or dark counts), each a
pulse index and a 2-bit detector mask (bit d set: detector d, which reads bit value d,
fired). One sequential pass (Numba) over the sorted clicks applies, per detector:

* **Dead time** (non-paralysable): after a registered click at gate g the detector is
  blind for ``dead_gates`` = ⌈τ_dead · f_rep⌉ gates; clicks at g + 1 … g + dead_gates are
  lost. A blind detector does not restart its dead time. Masking independently sampled
  primary clicks this way is exact, because a blind detector's would-be clicks are
  independent of its state.
* **After-pulses**: a registered click whose cause was light or a dark count produces,
  with probability p_ap, one spurious click in the same detector at a later gate, after
  the dead time; after-pulses do not themselves cause after-pulses (as in the model of
  Lim et al., PRA 89, 022307 (2014), where R_k = D_k (1 + p_ap)). Where the after-pulse
  lands is ``gap``: in mode *next-gate* the first gate the detector is live again (what a
  real detector does, blind to Alice's intensity); in mode *same-class* the first gate
  after the dead time that carries a pulse of the *same intensity class* as the
  triggering pulse (a geometric gap with parameter p_k), which reproduces the per-class
  R_k = D_k (1 + p_ap) and error p_ap D_k / 2 of Lim et al. The bit of an after-pulse is
  the detector's, independent of Alice's bit at that gate: a random bit.
* **Squashing**: a gate in which both detectors registered gets a uniformly random bit.

An after-pulse landing on a gate that already has a primary click merges with it.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from qkdstack.physics.sampling import GOLDEN_GAMMA, splitmix64, uniform_open0


@njit(inline="always", cache=True)
def _heap_push(hg: np.ndarray, hd: np.ndarray, hc: np.ndarray, size: int, g: np.int64, d: int, c: int) -> int:
    i = size
    hg[i] = g
    hd[i] = d
    hc[i] = c
    while i > 0:
        parent = (i - 1) >> 1
        if hg[parent] <= hg[i]:
            break
        hg[parent], hg[i] = hg[i], hg[parent]
        hd[parent], hd[i] = hd[i], hd[parent]
        hc[parent], hc[i] = hc[i], hc[parent]
        i = parent
    return size + 1


@njit(inline="always", cache=True)
def _heap_pop(hg: np.ndarray, hd: np.ndarray, hc: np.ndarray, size: int) -> int:
    size -= 1
    hg[0] = hg[size]
    hd[0] = hd[size]
    hc[0] = hc[size]
    i = 0
    while True:
        left = 2 * i + 1
        if left >= size:
            break
        child = left
        if left + 1 < size and hg[left + 1] < hg[left]:
            child = left + 1
        if hg[i] <= hg[child]:
            break
        hg[child], hg[i] = hg[i], hg[child]
        hd[child], hd[i] = hd[i], hd[child]
        hc[child], hc[i] = hc[i], hc[child]
        i = child
    return size


@njit(cache=True, nogil=True)
def _resolve_kernel(
    index: np.ndarray,
    mask: np.ndarray,
    cls: np.ndarray,
    n_pulses: np.int64,
    dead_gates: np.int64,
    p_ap: float,
    class_log1m: np.ndarray,
    key: np.uint64,
    out_index: np.ndarray,
    out_bit: np.ndarray,
    out_src: np.ndarray,
    out_cls: np.ndarray,
) -> np.int64:
    """The pass described in the module docstring. ``class_log1m`` empty = next-gate mode.

    Writes registered clicks in pulse order: index, Bob's bit, the primary entry it came
    from (−1 for a pure after-pulse) and, for pure after-pulses, the triggering class.
    """
    m = index.size
    hg = np.empty(m + 1, np.int64)
    hd = np.empty(m + 1, np.uint8)
    hc = np.empty(m + 1, np.uint8)
    hsize = 0
    last0 = np.int64(-(2**62))
    last1 = np.int64(-(2**62))
    ctr = key
    i = 0
    out = 0
    same_class = class_log1m.size > 0
    while i < m or hsize > 0:
        g = hg[0] if hsize > 0 and (i >= m or hg[0] < index[i]) else index[i]
        clicks = 0
        src = -1
        if i < m and index[i] == g:
            clicks = int(mask[i])
            src = i
            i += 1
        ap_cls = 0
        while hsize > 0 and hg[0] == g:
            clicks |= 1 << int(hd[0])
            ap_cls = int(hc[0])
            hsize = _heap_pop(hg, hd, hc, hsize)
        if g >= n_pulses:
            continue
        if (clicks & 1) and g <= last0 + dead_gates:
            clicks &= 2
        if (clicks & 2) and g <= last1 + dead_gates:
            clicks &= 1
        if clicks == 0:
            continue
        if clicks & 1:
            last0 = g
        if clicks & 2:
            last1 = g
        ctr += GOLDEN_GAMMA
        w = splitmix64(ctr)
        bit = int(w & np.uint64(1)) if clicks == 3 else clicks >> 1
        out_index[out] = g
        out_bit[out] = bit
        out_src[out] = src
        out_cls[out] = ap_cls if src < 0 else cls[src]
        out += 1
        if src >= 0 and p_ap > 0.0:
            ctr += GOLDEN_GAMMA
            if uniform_open0(splitmix64(ctr)) <= p_ap:
                det = bit if clicks == 3 else (clicks >> 1)
                if same_class:
                    c = int(cls[src])
                    ctr += GOLDEN_GAMMA
                    gap = math.floor(math.log(uniform_open0(splitmix64(ctr))) / class_log1m[c]) + 1.0
                    if gap > float(n_pulses):
                        continue
                    target = g + dead_gates + np.int64(gap)
                else:
                    c = int(cls[src])
                    target = g + dead_gates + 1
                if target < n_pulses:
                    hsize = _heap_push(hg, hd, hc, hsize, target, det, c)
    return out


def resolve_clicks(
    index: np.ndarray,
    mask: np.ndarray,
    cls: np.ndarray,
    n_pulses: int,
    dead_gates: int,
    p_ap: float,
    class_probs: tuple[float, ...] | None,
    key: np.uint64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Apply dead time, after-pulses and squashing to sorted primary clicks.

    ``class_probs`` given = same-class after-pulse placement (see module docstring); None =
    next-gate. Returns (pulse index, Bob's bit, source entry or −1, class of the pulse or
    of the after-pulse's trigger), all in pulse order.
    """
    m = index.size
    cap = 2 * m if p_ap > 0 else m
    if class_probs is None:
        class_log1m = np.empty(0, np.float64)
    else:
        class_log1m = np.array([math.log1p(-p) if p < 1 else -math.inf for p in class_probs], np.float64)
    out_index = np.empty(cap, np.int64)
    out_bit = np.empty(cap, np.uint8)
    out_src = np.empty(cap, np.int64)
    out_cls = np.empty(cap, np.uint8)
    count = _resolve_kernel(
        np.ascontiguousarray(index, np.int64),
        np.ascontiguousarray(mask, np.uint8),
        np.ascontiguousarray(cls, np.uint8),
        np.int64(n_pulses),
        np.int64(dead_gates),
        float(p_ap),
        class_log1m,
        key,
        out_index,
        out_bit,
        out_src,
        out_cls,
    )
    return out_index[:count], out_bit[:count], out_src[:count], out_cls[:count]


def dead_gates(dead_time_s: float, rep_rate_hz: float) -> int:
    """⌈τ_dead · f_rep⌉: gates a detector is blind after a click."""
    return math.ceil(dead_time_s * rep_rate_hz - 1e-9) if dead_time_s > 0 else 0
