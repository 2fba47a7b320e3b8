"""Multiplication in GF(2)[x] on packed 64-bit words, with the CPU's carry-less multiply.

A binary polynomial is a little-endian uint64 array: bit ``b`` of word ``w`` is the
coefficient of ``x^(64 w + b)`` (``np.packbits(bits, bitorder="little").view("<u8")`` after
padding to whole words). :func:`multiply` returns the product, ``len(a) + len(b)`` words.

Algorithm: Karatsuba's three-products recursion (Karatsuba and Ofman 1962; over GF(2)
additions are XOR, so ``(a0 + a1)(b0 + b1) + a0 b0 + a1 b1`` is the cross term exactly),
down to blocks of at most :data:`LEAF_WORDS` words, which are multiplied column by column
with ``PCLMULQDQ`` (one 64 x 64 -> 128-bit carry-less product per instruction; two per
instruction with the 256-bit ``VPCLMULQDQ`` where the CPU has it), accumulated in a vector
register by LLVM loops emitted through Numba (:func:`_clmul_dot`, :func:`_clmul_dot2`). Every
64 x 64 product is exact, so the result is exact; the tests compare it with Python-integer
shift-and-XOR multiplication.

The instruction exists on every x86-64 CPU since 2010 (Intel Westmere, AMD Bulldozer);
:data:`AVAILABLE` is false elsewhere (e.g. on ARM) and callers then use another method
(:mod:`qkdstack.protocol.toeplitz` falls back to its floating-point FFT).
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["AVAILABLE", "LEAF_WORDS", "multiply", "multiply_into"]

_FEATURES = llvm.get_host_cpu_features()
AVAILABLE = bool(_FEATURES.get("pclmul", False)) and llvm.get_process_triple().startswith("x86_64")
"""Whether this CPU has the carry-less multiply instruction the kernels are compiled to."""

_WIDE = AVAILABLE and bool(_FEATURES.get("vpclmulqdq", False)) and bool(_FEATURES.get("avx", False))
"""Whether it also has the 256-bit form (two products per instruction; AMD Zen 3+, Intel Ice Lake+)."""

LEAF_WORDS = 32
"""Blocks of at most this many words are multiplied by the schoolbook method (measured best)."""


@intrinsic
def _clmul_dot(typingctx, a, ia, b, ib, count):
    """XOR over ``t < count`` of ``clmul(a[ia + t], b[ib - t])``, returned as ``(low, high)`` words.

    Emitted as an LLVM loop keeping the 128-bit accumulator in a vector register, so the
    column sums of the schoolbook product cost one ``PCLMULQDQ`` and one ``PXOR`` per term.
    Indices are not bounds-checked: callers stay inside both arrays.
    """
    sig = types.UniTuple(types.uint64, 2)(a, types.intp, b, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        a_arr = context.make_array(signature.args[0])(context, builder, args[0])
        b_arr = context.make_array(signature.args[2])(context, builder, args[2])
        i64, i32 = ir.IntType(64), ir.IntType(32)
        v2 = ir.VectorType(i64, 2)
        clmul = builder.module.declare_intrinsic(
            "llvm.x86.pclmulqdq", fnty=ir.FunctionType(v2, [v2, v2, ir.IntType(8)])
        )
        base_a = builder.gep(a_arr.data, [args[1]])
        base_b = builder.gep(b_arr.data, [args[3]])
        entry = builder.block
        head = builder.append_basic_block("clmul.head")
        body = builder.append_basic_block("clmul.body")
        done = builder.append_basic_block("clmul.done")
        builder.branch(head)
        builder.position_at_end(head)
        t = builder.phi(i64)
        acc = builder.phi(v2)
        t.add_incoming(ir.Constant(i64, 0), entry)
        acc.add_incoming(ir.Constant(v2, [ir.Constant(i64, 0), ir.Constant(i64, 0)]), entry)
        builder.cbranch(builder.icmp_signed("<", t, args[4]), body, done)
        builder.position_at_end(body)
        undef = ir.Constant(v2, ir.Undefined)
        x = builder.insert_element(undef, builder.load(builder.gep(base_a, [t])), ir.Constant(i32, 0))
        y = builder.insert_element(undef, builder.load(builder.gep(base_b, [builder.neg(t)])), ir.Constant(i32, 0))
        product = builder.call(clmul, [x, y, ir.Constant(ir.IntType(8), 0)])
        t.add_incoming(builder.add(t, ir.Constant(i64, 1)), body)
        acc.add_incoming(builder.xor(acc, product), body)
        builder.branch(head)
        builder.position_at_end(done)
        low = builder.extract_element(acc, ir.Constant(i32, 0))
        high = builder.extract_element(acc, ir.Constant(i32, 1))
        return context.make_tuple(builder, signature.return_type, [low, high])

    return sig, codegen


@intrinsic
def _clmul_dot2(typingctx, a, ia, b, ib, count):
    """Two adjacent columns: XOR over ``t < count`` of ``a[ia + t] * b[ib - t]`` and of ``a[ia + t] * b[ib - t + 1]``.

    Returns ``(low_k, high_k, low_k1, high_k1)``. With 256-bit ``VPCLMULQDQ`` one instruction
    makes both products (``a[ia + t]`` broadcast, the pair ``b[ib - t], b[ib - t + 1]`` from one
    128-bit load); without it, two ``PCLMULQDQ``. No bounds checks.
    """
    sig = types.UniTuple(types.uint64, 4)(a, types.intp, b, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        a_arr = context.make_array(signature.args[0])(context, builder, args[0])
        b_arr = context.make_array(signature.args[2])(context, builder, args[2])
        i64, i32, i8 = ir.IntType(64), ir.IntType(32), ir.IntType(8)
        v2, v4 = ir.VectorType(i64, 2), ir.VectorType(i64, 4)
        lanes = ir.VectorType(i32, 4)
        base_a = builder.gep(a_arr.data, [args[1]])
        base_b = builder.gep(b_arr.data, [args[3]])
        entry = builder.block
        head = builder.append_basic_block("clmul2.head")
        body = builder.append_basic_block("clmul2.body")
        done = builder.append_basic_block("clmul2.done")
        builder.branch(head)
        builder.position_at_end(head)
        t = builder.phi(i64)
        acc = builder.phi(v4)
        t.add_incoming(ir.Constant(i64, 0), entry)
        acc.add_incoming(ir.Constant(v4, [ir.Constant(i64, 0)] * 4), entry)
        builder.cbranch(builder.icmp_signed("<", t, args[4]), body, done)
        builder.position_at_end(body)
        x = builder.load(builder.gep(base_a, [t]))
        pair = builder.load(builder.bitcast(builder.gep(base_b, [builder.neg(t)]), v2.as_pointer()), align=8)
        undef2, undef4 = ir.Constant(v2, ir.Undefined), ir.Constant(v4, ir.Undefined)
        if _WIDE:
            clmul = builder.module.declare_intrinsic("llvm.x86.pclmulqdq.256", fnty=ir.FunctionType(v4, [v4, v4, i8]))
            xs = builder.shuffle_vector(
                builder.insert_element(undef4, x, ir.Constant(i32, 0)), undef4, ir.Constant(lanes, [0, 0, 0, 0])
            )
            ys = builder.shuffle_vector(pair, undef2, ir.Constant(lanes, [0, 0, 1, 1]))
            product = builder.call(clmul, [xs, ys, ir.Constant(i8, 0)])
        else:
            clmul = builder.module.declare_intrinsic("llvm.x86.pclmulqdq", fnty=ir.FunctionType(v2, [v2, v2, i8]))
            xs = builder.insert_element(undef2, x, ir.Constant(i32, 0))
            low = builder.call(clmul, [xs, pair, ir.Constant(i8, 0x00)])  # x * pair[0]
            high = builder.call(clmul, [xs, pair, ir.Constant(i8, 0x10)])  # x * pair[1]
            product = builder.shuffle_vector(low, high, ir.Constant(lanes, [0, 1, 2, 3]))
        t.add_incoming(builder.add(t, ir.Constant(i64, 1)), body)
        acc.add_incoming(builder.xor(acc, product), body)
        builder.branch(head)
        builder.position_at_end(done)
        words = [builder.extract_element(acc, ir.Constant(i32, j)) for j in range(4)]
        return context.make_tuple(builder, signature.return_type, words)

    return sig, codegen


@njit(cache=True, nogil=True)
def _schoolbook(a: np.ndarray, b: np.ndarray, n: int, out: np.ndarray) -> None:
    """``out[:2n] = a[:n] * b[:n]``, two product columns ``k, k + 1`` per pass.

    Column ``k`` is the XOR of ``a[i] * b[k - i]``; the two columns share the terms
    ``max(0, k - n + 2) <= i <= min(k, n - 1)``, and each may have one more (``i = k - n + 1``
    for ``k``, ``i = k + 1`` for ``k + 1``). The high word of column ``k`` lands in word ``k + 1``.
    """
    carry = np.uint64(0)
    k = 0
    while k + 1 < 2 * n - 1:
        first = max(0, k - n + 2)
        last = min(k, n - 1)
        low0, high0, low1, high1 = _clmul_dot2(a, first, b, k - first, last - first + 1)
        if k - n + 1 >= 0:
            low, high = _clmul_dot(a, k - n + 1, b, n - 1, 1)
            low0 ^= low
            high0 ^= high
        if k + 1 <= n - 1:
            low, high = _clmul_dot(a, k + 1, b, 0, 1)
            low1 ^= low
            high1 ^= high
        out[k] = low0 ^ carry
        out[k + 1] = low1 ^ high0
        carry = high1
        k += 2
    if k < 2 * n - 1:  # the last column, when 2n - 1 is odd (always)
        first = max(0, k - n + 1)
        low, high = _clmul_dot(a, first, b, k - first, min(k, n - 1) - first + 1)
        out[k] = low ^ carry
        carry = high
    out[2 * n - 1] = carry


@njit("void(uint64[::1], uint64[::1], int64, uint64[::1], uint64[::1])", cache=True, nogil=True)
def _karatsuba(a, b, n, out, scratch):
    """``out[:2n] = a[:n] * b[:n]``; ``scratch`` holds at least ``4n + 64`` words."""
    if n <= LEAF_WORDS:
        _schoolbook(a, b, n, out)
        return
    h = (n + 1) // 2
    low = n - h  # words of the high halves, h or h - 1
    _karatsuba(a[:h], b[:h], h, out[: 2 * h], scratch)
    _karatsuba(a[h:n], b[h:n], low, out[2 * h : 2 * n], scratch)
    sum_a = scratch[:h]
    sum_b = scratch[h : 2 * h]
    middle = scratch[2 * h : 4 * h]
    sum_a[:] = a[:h]
    sum_b[:] = b[:h]
    for i in range(low):
        sum_a[i] ^= a[h + i]
        sum_b[i] ^= b[h + i]
    _karatsuba(sum_a, sum_b, h, middle, scratch[4 * h :])
    for i in range(2 * h):
        middle[i] ^= out[i]
    for i in range(2 * low):
        middle[i] ^= out[2 * h + i]
    top = min(2 * h, 2 * n - h)  # the cross term's words that can be non-zero
    for i in range(top):
        out[h + i] ^= middle[i]


@njit(cache=True, nogil=True)
def multiply_into(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out ^= a * b`` (uint64 words), ``b`` in pieces of ``len(a)`` words, each by Karatsuba; releases the GIL.

    Product words past the end of ``out`` are dropped. Work arrays are zeroed before return.
    """
    n = a.size
    piece = np.zeros(n, np.uint64)
    product = np.empty(2 * n, np.uint64)
    scratch = np.empty(4 * n + 64, np.uint64)
    for start in range(0, b.size, n):
        width = min(n, b.size - start)
        piece[:width] = b[start : start + width]
        piece[width:] = 0
        _karatsuba(a, piece, n, product, scratch)
        end = min(out.size, start + 2 * n)
        for i in range(start, end):
            out[i] ^= product[i - start]
    piece[:] = 0
    product[:] = 0
    scratch[:] = 0


def multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The product of two packed binary polynomials (uint64 words), ``len(a) + len(b)`` words."""
    if not AVAILABLE:
        raise RuntimeError("this CPU has no carry-less multiply instruction")
    a = np.ascontiguousarray(a, np.uint64)
    b = np.ascontiguousarray(b, np.uint64)
    out = np.zeros(a.size + b.size, np.uint64)
    if a.size and b.size:
        short, long = (a, b) if a.size <= b.size else (b, a)
        multiply_into(short, long, out)
    return out
