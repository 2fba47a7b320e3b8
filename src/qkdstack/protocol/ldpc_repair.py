"""Repair of a stalled LDPC decoding stuck on degree-2 variables (a Numba kernel, ``nogil``).

Belief propagation on these codes has one recurring way to stall well above a codeword's decode point:
a short run of *degree-2* variables, all wrong, between two unsatisfied checks. The PEG codes lay their
degree-2 variables on a chain through the checks (``ldpc_codes.build_code``), so a run of wrong ones
satisfies every check inside it and leaves only the two at its ends unsatisfied; each variable of the run
hears one wrong and one right neighbour, so BP holds it. Measured (2 % QBER, 10⁵-bit frames on the
rate-0.85 code): a frame whose codeword failed up to f = 1.35 of blind rounds, and on a candidate code one
up to f = 1.53, both ended every decoding with exactly 2 unsatisfied checks and 4 wrong degree-2 variables
between them; extra parities, drawn at random, almost never land on those four. (The same shape is the
(4, 2) trapping set of the error-floor literature: Richardson, "Error floors of LDPC codes", 2003.)

The repair works on Bob's hard decision after a failed decoding. Flipping every variable on a path of
degree-2 variables between two checks toggles those two checks and no other, so when few checks are
unsatisfied (at most ``max_unsatisfied``) and their count is even, each is paired with the nearest other
one through degree-2 variables (breadth-first, at most ``max_path`` of them) and the path between them is
flipped. When that fails, or the count is odd, runs may meet at one wrong variable of higher degree (a
*hub*; measured at 1.3 %: 3 unsatisfied checks, 4 wrong degree-2 variables and one of degree 3, f = 1.68):
each variable of degree ≥ 3 with two of its checks near the unsatisfied ones is flipped in turn, the
checks left are paired by short paths (``HUB_REACH``), and of the hubs that pair everything the one that
changes the fewest bits is kept (the likeliest word on a BSC; taking the first that worked instead gave
91 wrong words caught on that frame). A repair that is not unique is not made: when two shortest paths
lead to a check, or two hubs change equally few bits, one of the two words is wrong, and merged rows make
such pairs (two degree-2 variables whose checks were merged into the same two rows are a codeword of
weight 2: at 1.3 % on the rate-0.87 code, 27 % of its rows merged, 26 wrong words were caught in 300
frames before this rule). Only a word that then meets the whole syndrome is kept; otherwise the decision
is left as BP gave it. A repaired word is a candidate like any decoded word: Alice's check
parities decide whether it is hers (``ldpc.bob``), so a wrong repair costs what a wrong BP codeword costs
(the codeword stays open), and ``ldpc.bob`` stops repairing a codeword once a wrong word of it was caught
(BP's warm start stays near that word, and the repair would pick it again each round). It runs on Bob's
side only and discloses nothing.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from qkdstack.protocol.ldpc_codes import _columns

MAX_UNSATISFIED = 16
"""A decoding left with more unsatisfied checks is a waterfall failure (hundreds of them), not a run of
degree-2 variables: the repair is not tried."""
MAX_PATH = 16
"""Longest run of degree-2 variables flipped between two unsatisfied checks. The runs seen are short: at
8 % (100 frames) the repairs that gave Alice's word flipped at most 10 variables per pair of checks; with
48 allowed, five more words were repaired, all wrong (42–47 variables flipped), and caught by the check
parities."""
HUB_REACH = 8
"""A hub (a variable of degree ≥ 3 where runs meet) is looked for this many degree-2 steps from the
unsatisfied checks."""
MAX_HUBS = 256
"""Hubs tried per word, at most (each trial is a few short searches; the syndrome is checked only when one
pairs every check up)."""


@njit(cache=True, nogil=True)
def _unsatisfied(row_ptr, col_idx, target, err, out):
    """out[c] = 1 where check c is not met by ``err``; returns how many."""
    count = 0
    for c in range(row_ptr.size - 1):
        p = target[c]
        for e in range(row_ptr[c], row_ptr[c + 1]):
            p ^= err[col_idx[e]]
        out[c] = p
        count += p
    return count


@njit(cache=True, nogil=True, inline="always")
def _other_end(ends, v, c):
    """The check at the other end of degree-2 variable v from check c."""
    return ends[v, 1] if ends[v, 0] == c else ends[v, 0]


@njit(cache=True, nogil=True)
def _degree2_ends(var_ptr, var_rows, n):
    """For every variable of degree 2, its two checks (−1 for the other variables)."""
    ends = np.full((n, 2), -1, dtype=np.int64)
    for v in range(n):
        a = var_ptr[v]
        if var_ptr[v + 1] - a == 2 and var_rows[a] != var_rows[a + 1]:
            ends[v, 0] = var_rows[a]
            ends[v, 1] = var_rows[a + 1]
    return ends


@njit(cache=True, nogil=True)
def _pair_up(row_ptr, col_idx, ends, err, unsat, max_path, via, depth, queue, flipped, nflipped, ambiguous):
    """Pair the unsatisfied checks by degree-2 paths and flip the paths (recorded in ``flipped``).

    Returns (whether every check was paired, the new count of flipped variables); on False some
    unsatisfied check has no other one within ``max_path`` degree-2 variables, or two shortest paths
    reach it (merged rows make such cycles: then flipping either meets the syndrome, and one of the two
    words is wrong), and the caller undoes the flips so far."""
    m = row_ptr.size - 1
    for s in range(m):
        if unsat[s] == 0:
            continue
        # breadth-first search from s over checks joined by degree-2 variables, to the nearest other
        # unsatisfied check; via[c] = the variable c was reached through (−2: not reached); ambiguous[c]:
        # more than one shortest path leads to c (final once c's level is done: BFS order)
        via[s] = -1
        depth[s] = 0
        ambiguous[s] = 0
        head, tail = 0, 1
        queue[0] = s
        found = -1
        while head < tail:
            c = queue[head]
            head += 1
            if found >= 0 and depth[c] >= depth[found]:  # found's level is done
                break
            if depth[c] >= max_path:
                continue
            for e in range(row_ptr[c], row_ptr[c + 1]):
                v = col_idx[e]
                if ends[v, 0] < 0:
                    continue
                nxt = _other_end(ends, v, c)
                if via[nxt] != -2:
                    if depth[nxt] == depth[c] + 1 and via[nxt] != v:
                        ambiguous[nxt] = 1
                    continue
                if found >= 0:  # only the rest of found's level, for a second way into it
                    continue
                via[nxt] = v
                depth[nxt] = depth[c] + 1
                ambiguous[nxt] = ambiguous[c]
                queue[tail] = nxt
                tail += 1
                if unsat[nxt]:
                    found = nxt
        paired = found >= 0 and ambiguous[found] == 0
        if paired:  # flip the path back to s
            c = found
            while c != s:
                v = via[c]
                err[v] ^= 1
                flipped[nflipped] = v
                nflipped += 1
                c = _other_end(ends, v, c)
            unsat[s] = 0
            unsat[found] = 0
        for i in range(tail):
            via[queue[i]] = -2
        if not paired:
            return False, nflipped
    return True, nflipped


@njit(cache=True, nogil=True)
def _hubs(row_ptr, col_idx, var_ptr, var_rows, ends, unsat, reach, via, depth, queue):
    """Variables of degree ≥ 3 with at least two checks within ``reach`` degree-2 steps of an unsatisfied
    check: where runs of wrong degree-2 variables can meet at one wrong variable of higher degree."""
    m = row_ptr.size - 1
    tail = 0
    for c in range(m):
        if unsat[c]:
            via[c] = -1
            depth[c] = 0
            queue[tail] = c
            tail += 1
    head = 0
    while head < tail:
        c = queue[head]
        head += 1
        if depth[c] >= reach:
            continue
        for e in range(row_ptr[c], row_ptr[c + 1]):
            v = col_idx[e]
            if ends[v, 0] < 0:
                continue
            nxt = _other_end(ends, v, c)
            if via[nxt] == -2:
                via[nxt] = v
                depth[nxt] = depth[c] + 1
                queue[tail] = nxt
                tail += 1
    hubs = []
    for i in range(tail):
        for e in range(row_ptr[queue[i]], row_ptr[queue[i] + 1]):
            v = col_idx[e]
            if ends[v, 0] >= 0 or var_ptr[v + 1] - var_ptr[v] < 3:
                continue
            inside = 0
            for k in range(var_ptr[v], var_ptr[v + 1]):
                if via[var_rows[k]] != -2:
                    inside += 1
            if inside >= 2 and v not in hubs:
                hubs.append(v)
    for i in range(tail):
        via[queue[i]] = -2
    return hubs


@njit(cache=True, nogil=True)
def _with_hub(h, row_ptr, col_idx, var_ptr, var_rows, ends, err, unsat, unsat0, u, via, depth, queue, flipped,
              ambiguous):
    """Flip hub h, then pair the checks left by degree-2 paths of at most HUB_REACH; returns (paired, the
    variables flipped, h first, recorded in ``flipped`` for the caller to undo)."""
    unsat[:] = unsat0
    err[h] ^= 1
    flipped[0] = h
    left = u
    for k in range(var_ptr[h], var_ptr[h + 1]):
        c = var_rows[k]
        left += 1 - 2 * unsat[c]
        unsat[c] ^= 1
    if left % 2:
        return False, 1
    return _pair_up(row_ptr, col_idx, ends, err, unsat, HUB_REACH, via, depth, queue, flipped, 1, ambiguous)


@njit(cache=True, nogil=True)
def _repair_word(row_ptr, col_idx, var_ptr, var_rows, ends, target, err, unsat, u, max_path, via, depth, queue,
                 flipped, unsat0, ambiguous):
    """Degree-2 paths alone (u even), else one hub flipped first, then paths; True with err repaired and
    meeting the syndrome, False with err and unsat as they were."""
    unsat0[:] = unsat
    if u % 2 == 0:
        paired, nflipped = _pair_up(row_ptr, col_idx, ends, err, unsat, max_path, via, depth, queue, flipped, 0,
                                    ambiguous)
        if paired and _unsatisfied(row_ptr, col_idx, target, err, unsat) == 0:
            return True
        for i in range(nflipped):
            err[flipped[i]] ^= 1
        unsat[:] = unsat0
    # one hub: of those after which degree-2 paths of at most HUB_REACH pair every check, the one that
    # changes the fewest bits (the likeliest word on a BSC), and only if no other hub ties with it and that
    # word meets the syndrome
    hubs = _hubs(row_ptr, col_idx, var_ptr, var_rows, ends, unsat0, HUB_REACH, via, depth, queue)
    best, best_flips, ties = -1, err.size + 1, 0
    for h in hubs[:MAX_HUBS]:
        paired, nflipped = _with_hub(h, row_ptr, col_idx, var_ptr, var_rows, ends, err, unsat, unsat0, u, via,
                                     depth, queue, flipped, ambiguous)
        for i in range(nflipped):
            err[flipped[i]] ^= 1
        if paired and nflipped < best_flips:
            best, best_flips, ties = h, nflipped, 0
        elif paired and nflipped == best_flips:
            ties += 1
    if best >= 0 and ties == 0:
        paired, nflipped = _with_hub(best, row_ptr, col_idx, var_ptr, var_rows, ends, err, unsat, unsat0, u, via,
                                     depth, queue, flipped, ambiguous)
        if _unsatisfied(row_ptr, col_idx, target, err, unsat) == 0:
            return True
        for i in range(nflipped):
            err[flipped[i]] ^= 1
    unsat[:] = unsat0
    return False


@njit(cache=True, nogil=True)
def repair_batch(row_ptr, col_idx, target, err, iters, skip, max_unsatisfied, max_path):
    """Try the repair on every word i with iters[i] < 0 (a failed decoding) and not skip[i]; where the
    repaired word meets the syndrome target[i], keep it in err[i] and set iters[i] = 0 (likewise a failed
    word that already meets it). Returns the words repaired."""
    count, n = err.shape
    m = row_ptr.size - 1
    unsat = np.empty(m, dtype=np.uint8)
    unsat0 = np.empty(m, dtype=np.uint8)
    var_ptr = np.empty(0, dtype=np.int64)
    var_rows = np.empty(0, dtype=np.int32)  # the type ldpc_codes._columns gives
    ends = np.empty((0, 2), dtype=np.int64)
    via = np.full(m, -2, dtype=np.int64)
    depth = np.zeros(m, dtype=np.int64)
    queue = np.empty(m, dtype=np.int64)
    flipped = np.empty(n, dtype=np.int64)
    ambiguous = np.zeros(m, dtype=np.uint8)
    repaired = 0
    for i in range(count):
        if iters[i] >= 0 or skip[i]:
            continue
        u = _unsatisfied(row_ptr, col_idx, target[i], err[i], unsat)
        if u == 0:  # the kernel stopped just as its hard decision met the syndrome: decoded after all
            iters[i] = 0
            continue
        if u > max_unsatisfied:
            continue
        if ends.shape[0] == 0:
            var_ptr, var_rows = _columns(row_ptr, col_idx, n)
            ends = _degree2_ends(var_ptr, var_rows, n)
        if _repair_word(row_ptr, col_idx, var_ptr, var_rows, ends, target[i], err[i], unsat, u, max_path, via,
                        depth, queue, flipped, unsat0, ambiguous):
            iters[i] = 0
            repaired += 1
    return repaired
