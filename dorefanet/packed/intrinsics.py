"""Every LLVM instruction the packed engine writes by hand: numba ``@intrinsic`` functions and their IR helpers.

The kernels (:mod:`.kernels`, :mod:`.elementwise`, :mod:`.float_conv`) are plain numba functions; where they
need an instruction that numba does not emit from Python code (a vector popcount, an unaligned 64-bit load,
an atomic add, a vector kept in one register across a loop), they call an intrinsic from here, which numba
inlines as the few LLVM instructions its ``codegen`` builds.  Three kinds of values:

* uint64 words and ``<8 x i64>`` vectors (:data:`vec8`): the popcount GEMM's accumulators (:mod:`.kernels`);
* ``<16 x float>`` / ``<16 x i8>`` lanes (:class:`Lanes16`): pooling and the float convolution's tiles;
* ``<8 x double>`` affine maps of int32 accumulators, written as float32 or uint8 codes (the epilogues);

and the atomics of the thread team (:mod:`.threads`).  Arrays are flat (1-D, C-contiguous); no intrinsic
checks bounds, each caller's loops do.
"""
import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

__all__ = ["element_pointer", "is_flat", "splat", "fetch_add", "compare_exchange", "atomic_load", "pause",
           "popcount", "load", "load_at", "store_at", "bits_of_64_bytes", "vec8", "vzero", "vload", "vpopadd",
           "vfold", "vput", "vshl", "vadd", "Lanes16", "lanes_load", "lanes_store", "lanes_max", "lanes_add",
           "lanes_divide", "fzero", "fma_at", "emit", "affine8", "affine8_codes"]

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


# ------------------------------------------------------------------------------------------ IR helpers
def element_pointer(context, builder, array_type, array, index):
    """Pointer to element ``index`` of a C-contiguous 1-D array (no bounds or wraparound logic)."""
    data = context.make_array(array_type)(context, builder, array).data
    return builder.gep(data, [index])


def is_flat(array_type, dtype):
    return isinstance(array_type, types.Array) and array_type.ndim == 1 and array_type.dtype == dtype


def _vector_pointer(context, builder, array_type, array, index, vector_type):
    """Element ``index`` of a flat array as a pointer to ``vector_type`` (a vector load or store from there)."""
    return builder.bitcast(element_pointer(context, builder, array_type, array, index), vector_type.as_pointer())


def _byte_pointer(context, builder, array_type, array, byte_offset, value_type):
    """Byte ``byte_offset`` of a flat array's data as a pointer to ``value_type`` (unaligned access)."""
    data = context.make_array(array_type)(context, builder, array).data
    at = builder.gep(builder.bitcast(data, ir.IntType(8).as_pointer()), [byte_offset])
    return builder.bitcast(at, value_type.as_pointer())


def splat(builder, value, vector_type):
    """``value`` in every lane of an LLVM ``vector_type`` (insert into lane 0, then shuffle)."""
    undef = ir.Constant(vector_type, ir.Undefined)
    one = builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, undef, ir.Constant(ir.VectorType(ir.IntType(32), vector_type.count),
                                                          [0] * vector_type.count))


def _call_llvm(builder, name, vector_type, *operands):
    """``llvm.<name>`` on vectors of ``vector_type`` (e.g. ``ctpop``, ``maxnum``, ``fma``): one instruction."""
    suffix = "v{}{}".format(vector_type.count, "f32" if isinstance(vector_type.element, ir.FloatType)
                            else "i{}".format(vector_type.element.width))
    function = cgutils.get_or_insert_function(builder.module,
                                              ir.FunctionType(vector_type, [vector_type] * len(operands)),
                                              "llvm.{}.{}".format(name, suffix))
    return builder.call(function, list(operands))


def _codes_of(builder, y, levels):
    """uint8 codes ``rint(min(max(y, 0), 1) * levels)`` of a float32 vector ``y``: the engine's quantizer
    (:func:`.elementwise.quantize`, round half to even) on every lane, with no float map stored."""
    vector_type = y.type
    lanes = vector_type.count
    clipped = _call_llvm(builder, "minnum", vector_type,
                         _call_llvm(builder, "maxnum", vector_type, y, ir.Constant(vector_type, [0.0] * lanes)),
                         ir.Constant(vector_type, [1.0] * lanes))
    rounded = _call_llvm(builder, "rint", vector_type, builder.fmul(clipped, splat(builder, levels, vector_type)))
    return builder.fptoui(rounded, ir.VectorType(ir.IntType(8), lanes))


# ----------------------------------------------------------------------------- atomics of the thread team
@intrinsic
def fetch_add(typingctx, counter, index, value):
    """Atomically ``counter[index] += value``; returns the old value."""
    if not is_flat(counter, types.int64):
        return None

    def codegen(context, builder, signature, args):
        pointer = element_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", pointer, context.cast(builder, args[2], signature.args[2], types.int64),
                                  "monotonic")

    return types.int64(counter, types.intp, types.int64), codegen


@intrinsic
def compare_exchange(typingctx, state, index, expected, new):
    """Atomically: if ``state[index] == expected`` set it to ``new``; returns the old value."""
    if not is_flat(state, types.int64):
        return None

    def codegen(context, builder, signature, args):
        pointer = element_pointer(context, builder, signature.args[0], args[0], args[1])
        old_new = builder.cmpxchg(pointer, context.cast(builder, args[2], signature.args[2], types.int64),
                                  context.cast(builder, args[3], signature.args[3], types.int64),
                                  "seq_cst", "seq_cst")
        return builder.extract_value(old_new, 0)

    return types.int64(state, types.intp, types.int64, types.int64), codegen


@intrinsic
def atomic_load(typingctx, array, index):
    """``array[index]`` read atomically: a spin loop re-reads it (LLVM may not hoist the load)."""
    if not is_flat(array, types.int64):
        return None

    def codegen(context, builder, signature, args):
        pointer = element_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(pointer, "acquire", 8)

    return types.int64(array, types.intp), codegen


@intrinsic
def pause(typingctx):
    """x86's ``pause``, a spin loop's hint (it frees the core's shared resources for a sibling thread);
    nothing elsewhere."""
    def codegen(context, builder, signature, args):
        if _X86:
            builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                        "llvm.x86.sse2.pause"), [])
        return context.get_dummy_value()

    return types.void(), codegen


# ------------------------------------------------------------------------- uint64 words (bit planes)
@intrinsic
def popcount(typingctx, x):
    """``llvm.ctpop.i64`` of an integer (``popcnt``)."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(context.cast(builder, args[0], signature.args[0], types.uint64))

    return types.uint64(x), codegen


@intrinsic
def load(typingctx, array, index):
    """``array[index]`` of a flat uint64 array, without numba's negative-index fix-up."""
    if not is_flat(array, types.uint64):
        return None

    def codegen(context, builder, signature, args):
        return builder.load(element_pointer(context, builder, signature.args[0], args[0], args[1]))

    return types.uint64(array, types.intp), codegen


@intrinsic
def load_at(typingctx, array, byte_offset):
    """The uint64 at any byte offset of a flat uint64 array (an unaligned load)."""
    if not is_flat(array, types.uint64):
        return None

    def codegen(context, builder, signature, args):
        return builder.load(_byte_pointer(context, builder, signature.args[0], args[0], args[1], ir.IntType(64)),
                            align=1)

    return types.uint64(array, types.intp), codegen


@intrinsic
def store_at(typingctx, array, byte_offset, value):
    """Store a uint64 at any byte offset of a flat uint64 array (an unaligned store)."""
    if not is_flat(array, types.uint64):
        return None

    def codegen(context, builder, signature, args):
        builder.store(args[2], _byte_pointer(context, builder, signature.args[0], args[0], args[1], ir.IntType(64)),
                      align=1)
        return context.get_dummy_value()

    return types.void(array, types.intp, types.uint64), codegen


@intrinsic
def bits_of_64_bytes(typingctx, codes, start, bit):
    """uint64 whose bit ``i`` is bit ``bit`` of ``codes[start + i]`` for ``i < 64``.

    One 64-byte load, an AND and a compare to a ``<64 x i1>`` mask (``vptestmb`` + ``kmovq`` with
    AVX-512BW).  ``codes`` is a contiguous 1-D ``uint8`` array with ``start + 64 <= codes.size``.
    """
    if not is_flat(codes, types.uint8):
        return None

    def codegen(context, builder, signature, args):
        _, start_v, bit_v = args
        i8 = ir.IntType(8)
        vec = ir.VectorType(i8, 64)
        loaded = builder.load(_vector_pointer(context, builder, signature.args[0], args[0], start_v, vec), align=1)
        mask = builder.trunc(builder.shl(ir.Constant(bit_v.type, 1), bit_v), i8)
        nonzero = builder.icmp_unsigned("!=", builder.and_(loaded, splat(builder, mask, vec)),
                                        ir.Constant(vec, [0] * 64))
        return builder.bitcast(nonzero, ir.IntType(64))

    return types.uint64(codes, types.intp, types.intp), codegen


# --------------------------------------------------------------------- <8 x i64>: popcount accumulators
class _Vec8Type(types.Type):
    """Eight uint64 lanes, an LLVM ``<8 x i64>`` value (a zmm register with AVX-512): a type of its own, so that
    the popcount tile compiles to exactly its vector code, independent of the auto-vectoriser."""

    def __init__(self):
        super().__init__(name="uint64x8")


vec8 = _Vec8Type()
_V8 = ir.VectorType(ir.IntType(64), 8)
_I32X8 = ir.VectorType(ir.IntType(32), 8)


@register_model(_Vec8Type)
class _Vec8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8)


@intrinsic
def vzero(typingctx):
    """A vector of zeros (an accumulator's start)."""
    def codegen(context, builder, signature, args):
        return ir.Constant(_V8, [0] * 8)

    return vec8(), codegen


@intrinsic
def vload(typingctx, array, index):
    """``array[index:index + 8]`` of a flat uint64 array as a vector."""
    if not is_flat(array, types.uint64):
        return None

    def codegen(context, builder, signature, args):
        return builder.load(_vector_pointer(context, builder, signature.args[0], args[0], args[1], _V8), align=8)

    return vec8(array, types.intp), codegen


@intrinsic
def vpopadd(typingctx, acc, word, weights):
    """``acc + popcount(word & weights)`` lane-wise, ``word`` broadcast (vpandq, vpopcntq, vpaddq)."""
    if not (acc == vec8 and weights == vec8 and isinstance(word, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        acc_v, word_v, weights_v = args
        word_v = context.cast(builder, word_v, signature.args[1], types.uint64)
        both = builder.and_(splat(builder, word_v, _V8), weights_v)
        return builder.add(acc_v, _call_llvm(builder, "ctpop", _V8, both))

    return vec8(acc, word, weights), codegen


@intrinsic
def vfold(typingctx, out, index, acc, shift):
    """``out[index:index + 8] += int32(acc << shift)`` for a flat int32 array."""
    if not (is_flat(out, types.int32) and acc == vec8):
        return None

    def codegen(context, builder, signature, args):
        out_v, index_v, acc_v, shift_v = args
        pointer = _vector_pointer(context, builder, signature.args[0], out_v, index_v, _I32X8)
        shift_v = context.cast(builder, shift_v, signature.args[3], types.uint64)
        add = builder.trunc(builder.shl(acc_v, splat(builder, shift_v, _V8)), _I32X8)
        builder.store(builder.add(builder.load(pointer, align=4), add), pointer, align=4)
        return context.get_dummy_value()

    return types.none(out, types.intp, acc, types.intp), codegen


@intrinsic
def vput(typingctx, out, index, acc):
    """``out[index:index + 8] = int32(acc)`` for a flat int32 array."""
    if not (is_flat(out, types.int32) and acc == vec8):
        return None

    def codegen(context, builder, signature, args):
        pointer = _vector_pointer(context, builder, signature.args[0], args[0], args[1], _I32X8)
        builder.store(builder.trunc(args[2], _I32X8), pointer, align=4)
        return context.get_dummy_value()

    return types.none(out, types.intp, acc), codegen


@intrinsic
def vshl(typingctx, acc, shift):
    """``acc << shift`` lane-wise."""
    if acc != vec8:
        return None

    def codegen(context, builder, signature, args):
        shift_v = context.cast(builder, args[1], signature.args[1], types.uint64)
        return builder.shl(args[0], splat(builder, shift_v, _V8))

    return vec8(acc, types.intp), codegen


@intrinsic
def vadd(typingctx, x, y):
    """``x + y`` lane-wise."""
    if not (x == vec8 and y == vec8):
        return None

    def codegen(context, builder, signature, args):
        return builder.add(args[0], args[1])

    return vec8(x, y), codegen


# ------------------------------------------------------------ <16 x float> / <16 x i8>: pooling, float tiles
#: Lanes of a :class:`Lanes16` vector (one AVX-512 register of float32).
_LANES = 16


def _lane_type(dtype):
    """The LLVM element type of float32 or uint8 lanes."""
    return ir.FloatType() if dtype == types.float32 else ir.IntType(8)


class Lanes16(types.Type):
    """16 lanes of a float32 or uint8 array: an LLVM ``<16 x float>`` (one AVX-512 register; also the float
    convolution's tile type) or ``<16 x i8>``."""

    def __init__(self, dtype):
        self.dtype = dtype
        super().__init__(name="Lanes16(%s)" % dtype)


@register_model(Lanes16)
class _Lanes16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_lane_type(fe_type.dtype), _LANES))


def _lanes_pointer(context, builder, array_type, array, index):
    return _vector_pointer(context, builder, array_type, array, index,
                           ir.VectorType(_lane_type(array_type.dtype), _LANES))


@intrinsic
def lanes_load(typingctx, array, index):
    """``array[index:index + 16]`` of a flat float32 or uint8 array as one vector."""
    if not (is_flat(array, types.float32) or is_flat(array, types.uint8)):
        return None

    def codegen(context, builder, signature, args):
        return builder.load(_lanes_pointer(context, builder, signature.args[0], args[0], args[1]), align=1)

    return Lanes16(array.dtype)(array, types.intp), codegen


@intrinsic
def lanes_store(typingctx, array, index, value):
    """``array[index:index + 16] = value``."""
    if not ((is_flat(array, types.float32) or is_flat(array, types.uint8)) and value == Lanes16(array.dtype)):
        return None

    def codegen(context, builder, signature, args):
        builder.store(args[2], _lanes_pointer(context, builder, signature.args[0], args[0], args[1]), align=1)
        return context.get_dummy_value()

    return types.none(array, types.intp, value), codegen


@intrinsic
def lanes_max(typingctx, a, b):
    """Lane-wise ``b if b > a else a`` (what the scalar kernel's ``max(a, b)`` gives)."""
    if not (isinstance(a, Lanes16) and a == b):
        return None

    def codegen(context, builder, signature, args):
        if signature.args[0].dtype == types.float32:
            greater = builder.fcmp_ordered(">", args[1], args[0])
        else:
            greater = builder.icmp_unsigned(">", args[1], args[0])
        return builder.select(greater, args[1], args[0])

    return a(a, b), codegen


#: Sixteen float32 lanes: the float convolution's tile vectors.
_f16 = Lanes16(types.float32)
_VF = ir.VectorType(ir.FloatType(), _LANES)


@intrinsic
def lanes_add(typingctx, a, b):
    """Lane-wise ``a + b`` of float32 lanes."""
    if not (a == _f16 and b == a):
        return None

    def codegen(context, builder, signature, args):
        return builder.fadd(args[0], args[1])

    return a(a, b), codegen


@intrinsic
def lanes_divide(typingctx, a, divisor):
    """Lane-wise ``a / divisor`` of float32 lanes by a float32."""
    if not (a == _f16 and divisor == types.float32):
        return None

    def codegen(context, builder, signature, args):
        return builder.fdiv(args[0], splat(builder, args[1], _VF))

    return a(a, divisor), codegen


@intrinsic
def fzero(typingctx):
    """Sixteen float32 zeros (a tile accumulator's start)."""
    def codegen(context, builder, signature, args):
        return ir.Constant(_VF, [0.0] * _LANES)

    return _f16(), codegen


@intrinsic
def fma_at(typingctx, array, index, weights, acc):
    """``acc + array[index] * weights``, the scalar broadcast to all lanes (one fused multiply-add)."""
    if not (is_flat(array, types.float32) and weights == _f16 and acc == _f16):
        return None

    def codegen(context, builder, signature, args):
        scalar = builder.load(element_pointer(context, builder, signature.args[0], args[0], args[1]))
        return _call_llvm(builder, "fma", _VF, splat(builder, scalar, _VF), args[2], args[3])

    return _f16(array, types.intp, weights, acc), codegen


def _emit_one(builder, out_ptr, codes_ptr, levels, acc, scale, shift):
    """LLVM for one vector of the tile: ``y = acc * scale + shift`` (two float32 roundings, no contraction to
    an FMA), then, if ``levels`` > 0, its codes (:func:`_codes_of`) into ``codes_ptr``, else ``y`` into
    ``out_ptr``."""
    y = builder.fadd(builder.fmul(acc, scale), shift)
    with builder.if_else(builder.fcmp_ordered(">", levels, ir.Constant(ir.FloatType(), 0.0))) as (quantize, plain):
        with quantize:
            codes = _codes_of(builder, y, levels)
            builder.store(codes, builder.bitcast(codes_ptr, codes.type.as_pointer()), align=1)
        with plain:
            builder.store(y, builder.bitcast(out_ptr, _VF.as_pointer()), align=1)


@intrinsic
def emit(typingctx, out, codes, levels, index, accs, scales, shifts):
    """One output pixel's channels ``index ..`` from a tuple of vectors ``accs`` (16 channels each) with the
    layer's affine map (``scales``, ``shifts``: tuples of the same length): into ``out`` (float32) or, if
    ``levels`` > 0, quantized into ``codes`` (uint8).

    One intrinsic rather than jitted helpers: a jitted helper that takes the arrays increfs and decrefs them
    around every store (an atomic add on a counter both threads share), and its tuple loop spilled the tile;
    the epilogue of SVHN's conv0 (6 x 48 outputs after 75 multiply-adds each) took a fifth of its time.
    """
    if not (is_flat(out, types.float32) and is_flat(codes, types.uint8) and levels == types.float32
            and isinstance(accs, types.UniTuple) and accs.dtype == _f16 and scales == accs and shifts == accs):
        return None

    def codegen(context, builder, signature, args):
        out_a, codes_a, levels_v, index, accs_v, scales_v, shifts_v = args
        for lane in range(accs.count):
            at = builder.add(index, ir.Constant(index.type, lane * _LANES))
            _emit_one(builder, element_pointer(context, builder, signature.args[0], out_a, at),
                      element_pointer(context, builder, signature.args[1], codes_a, at), levels_v,
                      builder.extract_value(accs_v, lane), builder.extract_value(scales_v, lane),
                      builder.extract_value(shifts_v, lane))
        return context.get_dummy_value()

    return types.none(out, codes, levels, types.intp, accs, scales, shifts), codegen


# ------------------------------------------------------------- <8 x double>: accumulators to the layer's output
def _affine8_ir(context, builder, signature, args):
    """LLVM for :func:`.elementwise.affine_row`'s ``y`` on 8 channels: ``acc[at:at + 8]`` (int32) with
    ``a, b, c[ci:ci + 8]`` (float64) and the row sum ``s``, as ``<8 x float>``; the same operations in the same
    order (no contraction)."""
    acc_t, _, _, a_t, b_t, c_t = signature.args[:6]
    acc, at, s, a, b, c, ci = args[:7]
    f64x8 = ir.VectorType(ir.DoubleType(), 8)

    def lanes(array_type, array, index, element_type):
        pointer = _vector_pointer(context, builder, array_type, array, index, ir.VectorType(element_type, 8))
        return builder.load(pointer, align=1)

    x = builder.sitofp(lanes(acc_t, acc, at, ir.IntType(32)), f64x8)
    shift = builder.fadd(builder.fmul(splat(builder, s, f64x8), lanes(b_t, b, ci, ir.DoubleType())),
                         lanes(c_t, c, ci, ir.DoubleType()))
    y = builder.fadd(builder.fmul(x, lanes(a_t, a, ci, ir.DoubleType())), shift)
    return builder.fptrunc(y, ir.VectorType(ir.FloatType(), 8))


def _affine8_args_ok(acc, s, a, b, c):
    return (is_flat(acc, types.int32) and s == types.float64
            and all(is_flat(v, types.float64) for v in (a, b, c)))


@intrinsic
def affine8(typingctx, acc, at, s, a, b, c, ci, out, oi):
    """``out[oi:oi + 8] = y`` of :func:`.elementwise.affine_row` for channels ``ci ..`` of the accumulators at
    ``acc[at:]`` (flat arrays).  An intrinsic, not a loop over slices: a slice made per output row increfs and
    decrefs its array (atomic adds on counters that both threads share), a fifth of SVHN's conv1 at batch 128."""
    if not (_affine8_args_ok(acc, s, a, b, c) and is_flat(out, types.float32)):
        return None

    def codegen(context, builder, signature, args):
        y = _affine8_ir(context, builder, signature, args)
        builder.store(y, _vector_pointer(context, builder, signature.args[7], args[7], args[8], y.type), align=1)
        return context.get_dummy_value()

    return types.none(acc, types.intp, s, a, b, c, types.intp, out, types.intp), codegen


@intrinsic
def affine8_codes(typingctx, acc, at, s, a, b, c, ci, n, out, oi):
    """As :func:`affine8`, the uint8 codes ``rint(clip(y, 0, 1) * n)`` of :func:`.elementwise.affine_row_codes`."""
    if not (_affine8_args_ok(acc, s, a, b, c) and n == types.float32 and is_flat(out, types.uint8)):
        return None

    def codegen(context, builder, signature, args):
        codes = _codes_of(builder, _affine8_ir(context, builder, signature, args), args[7])
        builder.store(codes, _vector_pointer(context, builder, signature.args[8], args[8], args[9], codes.type),
                      align=1)
        return context.get_dummy_value()

    return types.none(acc, types.intp, s, a, b, c, types.intp, n, out, types.intp), codegen
