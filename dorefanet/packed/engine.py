"""Inference on a packed model with integer bit-plane arithmetic, without TensorFlow.

Between layers, quantized activations travel as their integer codes ``c`` in
``0 .. n`` (value ``c / n``, ``n = 2^A - 1``).  A quantized layer whose input
is codes computes exact integer sums ``acc = sum(c * q)`` and ``S = sum(c)``
over each window, where ``q`` is the weight's code:

* BWN (``w = E (2b - 1)``):        ``z = E (2 acc - S) / n``;
* DoReFa (``w = 2 q / m - 1``):    ``z = (2 acc - m S) / (n m)``, ``m = 2^W - 1``.

With few bit planes (W x A <= 8) ``acc`` is a sum of popcounts of ANDs of bit
planes (:mod:`dorefanet.packed.kernels`, DoReFa-Net's bit convolution); wider settings
(e.g. 8,8,8) use an integer matrix product, done exactly in float64.  Float
only where the TensorFlow graph is float: the first and last layers, layers
fed with A = 32 activations (their weights are expanded to the graph's float32
values), batch norm maps, residual sums and pooling of float maps.

Float convolutions and fully-connected layers use :mod:`dorefanet.packed.float_conv`.  When
a layer's output is quantized next (possibly after a max pooling), the layer
writes the codes directly (see ``predict``).
"""
import functools
import mmap

import numpy as np

from . import elementwise, float_conv, passes, profiling
from .threads import num_threads, pinned_thread_count
from .format import read_packed, unpack_weight_planes
from .program import same_pads

__all__ = ["PackedModel", "load_packed", "POPCOUNT_MAX_PLANE_PAIRS", "huge_page_copy"]

#: Quantized layers with W x A bit planes up to this use the popcount kernels; wider ones an integer GEMM.
POPCOUNT_MAX_PLANE_PAIRS = 8
#: Bytes of im2col rows materialised at once by the float and integer-GEMM convolutions.
_IM2COL_BYTES = 64 << 20
#: Bytes of the largest map of a chunk of images run together (see ``PackedModel._chunk``).
_CHUNK_BYTES = 128 << 20


class _Map:
    """A feature map: float32 ``values``, or integer codes with ``levels`` = n (value = code / n)."""

    __slots__ = ("values", "levels")

    def __init__(self, values, levels=None):
        self.values = values
        self.levels = levels

    def as_float(self):
        if self.levels is None:
            return self.values
        # TensorFlow's graph optimizer turns the quantizer's round(x * n) / n into round(x * n) * (1 / n);
        # the same float32 operation gives identical values
        return self.values.astype(np.float32) * _reciprocal(self.levels)


def _reciprocal(levels):
    return np.float32(1) / np.float32(levels)


def _pads(padding, h, w, kh, kw, stride):
    if padding == "VALID":
        return 0, 0, 0, 0
    return same_pads(h, kh, stride) + same_pads(w, kw, stride)


def _out_hw(h, w, kh, kw, stride, pads):
    """Output height and width of a convolution of an ``h x w`` map with ``pads`` (top, bottom, left, right)."""
    top, bottom, left, right = pads
    return (h + top + bottom - kh) // stride + 1, (w + left + right - kw) // stride + 1


def _windows(x, kh, kw, stride, pads):
    """``[B, Ho, Wo, kh, kw, C]`` strided view of the padded NHWC map ``x``."""
    top, bottom, left, right = pads
    if any(pads):
        x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    view = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::stride, ::stride]
    return view.transpose(0, 1, 2, 4, 5, 3)


def _channels(values, channels):
    return None if values is None else values[channels]


def _conv_gemm(x, weights, kh, kw, stride, pads, dtype, with_sums=False):
    """Convolution as blocked im2col x ``weights`` (``[kh*kw*C, out]``) in ``dtype``; optionally the window sums."""
    win = _windows(x, kh, kw, stride, pads)
    b, ho, wo = win.shape[:3]
    k = kh * kw * x.shape[3]
    out = np.empty((b, ho, wo, weights.shape[1]), dtype)
    sums = np.empty((b, ho, wo), dtype) if with_sums else None
    per_image = max(ho * wo * k * np.dtype(dtype).itemsize, 1)
    step = max(1, _IM2COL_BYTES // per_image)
    for start in range(0, b, step):
        rows = win[start:start + step].reshape(-1, k).astype(dtype, copy=False)
        np.matmul(rows, weights, out=out[start:start + step].reshape(-1, weights.shape[1]))
        if with_sums:
            sums[start:start + step] = rows.sum(axis=1).reshape(-1, ho, wo)
    return out, sums


class _Layer:
    """A conv or fc layer's weights in the forms the engine computes with."""

    def __init__(self, name, spec, arrays):
        self.name = name
        self.kind = spec["kind"]
        self.shape = tuple(spec["shape"])
        self.bits = {"binary": 1, "ternary": None, "float": None}.get(self.kind, spec.get("bits"))
        self.scale = arrays.get(name + "/scale")
        self.shift = arrays.get(name + "/shift")
        self.dense_w = None         # a float fully-connected layer's weights for float_conv.dense_affine
        self.dense_affine = None    # and its scale and shift, padded alike
        self._scaled = None         # (factor, float_w * factor): see scaled_float_w
        if self.kind == "float":
            self.float_w = arrays[name + "/W"].astype(np.float32)
            self.codes = None
            return
        planes = unpack_weight_planes(arrays[name + "/planes"], self.shape)
        if self.kind == "ternary":
            wp, wn = np.float32(arrays[name + "/Wp"]), np.float32(arrays[name + "/Wn"])
            self.float_w = np.where(planes[0] == 1, wp, np.where(planes[1] == 1, -wn, np.float32(0)))
            self.codes = None
            return
        # codes in the narrowest integer type, summed plane by plane: an int64 tensordot over AlexNet's
        # fc0 took most of a second of every load
        codes = np.zeros(planes.shape[1:], np.uint8 if planes.shape[0] <= 8 else np.int64)
        for b in range(planes.shape[0]):
            codes |= planes[b].astype(codes.dtype, copy=False) << codes.dtype.type(b)
        self.codes = codes
        self.levels = (1 << self.bits) - 1
        if self.kind == "binary":
            self.E = np.float32(arrays[name + "/E"])
        self._float_w = None        # made on first use: only layers fed with float maps need it
        self._planes = {}
        self._plans = {}            # checked kernels._Plan per popcount call: see PackedModel._conv_group
        self._affine = {}

    @property
    def float_w(self):
        """The weights' float32 values in the graph (for layers computed in float)."""
        if self._float_w is None:
            if self.kind == "binary":
                self._float_w = np.where(self.codes == 1, self.E, -self.E).astype(np.float32)
            else:
                # the graph's 2 * (q / m) - 1 in float32, with its division by a constant made a product
                self._float_w = (np.float32(2) * (self.codes.astype(np.float32) * _reciprocal(self.levels))
                                 - np.float32(1))
        return self._float_w

    @float_w.setter
    def float_w(self, value):
        self._float_w = value

    def scaled_float_w(self, factor):
        """``float_w * factor`` (float32; kept): the weights of a float convolution that takes over its input's
        multiplication by ``factor`` (see ``passes.fold_input_scale``)."""
        if factor is None:
            return self.float_w
        if self._scaled is None or self._scaled[0] != factor:
            self._scaled = (factor, self.float_w * np.float32(factor))
        return self._scaled[1]

    def accumulators_to_output(self, acc, sums, levels, channels, quantize_levels=None):
        """The layer's output (bias and batch norm applied) from ``acc = sum(c q)`` and ``sums = sum(c)``.

        ``z = k1 acc + k2 sums`` (module docstring) and ``y = z scale + shift``
        become one float64 affine map per channel, evaluated in one pass.  With
        ``quantize_levels`` = n the result is the uint8 codes of the float32 output.
        """
        affine = self.affine_map(levels, channels)
        prof = profiling.current()
        if prof is None:
            return elementwise.affine_accumulators(acc, sums, *affine, levels=quantize_levels)
        start = profiling.clock()
        result = elementwise.affine_accumulators(acc, sums, *affine, levels=quantize_levels)
        prof.add("epilogue", profiling.clock() - start)
        return result

    def affine_map(self, levels, channels):
        """``(a, b, c)`` (float64 per channel of ``channels``) with the output ``y = acc a + sums b + c``."""
        key = (levels, channels.start, channels.stop)
        if key not in self._affine:
            if self.kind == "binary":
                k1, k2 = 2.0 * float(self.E) / levels, -float(self.E) / levels
            else:
                k1, k2 = 2.0 / (levels * self.levels), -1.0 / levels
            scale = np.ones(self.shape[-1]) if self.scale is None else self.scale.astype(np.float64)
            shift = np.zeros(self.shape[-1]) if self.shift is None else self.shift.astype(np.float64)
            self._affine[key] = tuple(np.ascontiguousarray(v) for v in
                                      (k1 * scale[channels], k2 * scale[channels], shift[channels]))
        return self._affine[key]

    def epilogue(self, z, channels=slice(None)):
        """Bias and batch norm on a float output ``z`` (float32, as the graph)."""
        if self.scale is not None:
            z = z * self.scale[channels]
        if self.shift is not None:
            z = z + self.shift[channels]
        return z.astype(np.float32, copy=False)


class PackedModel:
    """A packed model ready to run: ``PackedModel(path)`` or :func:`load_packed`.

    ``predict(images)`` takes a batch ``[B, height, width, channels]`` of the
    input dtype in the header (BGR, as the scripts feed their graphs) and
    returns the softmax probabilities ``[B, classes]`` (float32).
    """

    def __init__(self, path, huge_pages=False):
        self.path = path
        self._huge_pages = huge_pages
        self.header, arrays = read_packed(path)
        self.model = self.header["model"]
        self.bits = self.header["bits"]
        self.classes = int(self.header["classes"])
        self.input = self.header["input"]
        self.program = self.header["program"]
        self.layers = {name: _Layer(name, spec, arrays) for name, spec in self.header["layers"].items()}
        self.affines = {op["layer"]: (arrays.get(op["layer"] + "/scale"), arrays.get(op["layer"] + "/shift"))
                        for op in self.program if op["op"] == "affine"}
        self._trace = None
        # (id of a conv op, input shape, input and output levels, threads) -> (checked plan, epilogue) of its
        # popcount call: a batch-1 SVHN layer spent about 5 us of its 45 working out again what they hold
        self._known_calls = {}
        self._image_bytes = {}      # per input shape: the largest map of one image (see _chunk)
        self._largest = 0
        # without a trace, the engine runs the program as its passes rewrote it (see passes.PASSES); a trace
        # needs every op's own result, so tracing runs the program as it is
        self._fast_program = passes.apply(self.program, self.layers, self.affines)
        self._steps = {False: self._program_steps(self._fast_program), True: self._program_steps(self.program)}

    def _streamed(self, array):
        """Weights read in full on every call: on huge pages when the model was loaded with ``huge_pages``."""
        return huge_page_copy(array) if self._huge_pages else array

    # ---------------------------------------------------------------- running
    def predict(self, images, trace=None):
        """Softmax probabilities of a batch.

        ``trace``: a list that receives, for every quantizing ``activate`` op in
        program order, ``(scaled, codes, n)``: its input clipped and multiplied by
        ``n`` (float32, the value rounded), the integer codes it produced and ``n``.
        Tests compare them with the TensorFlow graph to tell float-rounding ties
        at a quantization boundary from real differences.
        """
        images = np.asarray(images)
        want = (self.input["height"], self.input["width"], self.input["channels"])
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError("{}: expects images of shape [batch, {}, {}, {}], got {}".format(
                self.path, *want, list(images.shape)))
        with pinned_thread_count():     # every layer of the call asks; read once
            return self._predict(images, trace)

    def _predict(self, images, trace):
        if trace is None and len(images) > 1:
            chunk = self._chunk(images)
            if chunk < len(images):
                # images are independent, so the chunks' results are the whole batch's
                return np.concatenate([self._run(images[i:i + chunk], None) for i in range(0, len(images), chunk)])
        return self._run(images, trace)

    __call__ = predict

    def _chunk(self, images):
        """Images per chunk of a large batch: the largest map of a chunk about ``_CHUNK_BYTES``.

        Every layer of a whole batch 128 of ResNet-18 wrote and read maps of hundreds of MB: out of cache,
        and new pages to fault in on every call (freed maps go back to the system).  The size of the maps of
        one image is taken from a first image run alone, once per input shape.
        """
        key = images.shape[1:]
        if key not in self._image_bytes:
            self._largest = 0
            self._run(images[:1], None, measure=True)
            self._image_bytes[key] = max(self._largest, 1)
        per = max(1, _CHUNK_BYTES // self._image_bytes[key])
        chunks = -(-len(images) // per)
        return -(-len(images) // chunks)

    def _program_steps(self, program):
        """The program as steps ``(call, src, dst, first, last)``: ``call(x)`` runs ops ``first .. last`` on the
        map in register ``src`` and the result goes to register ``dst``.

        An op with ``fused`` = k (see ``passes.fuse_activate``) is one step with the k ops after it: a conv / fc /
        maxpool whose quantizing activate (after a max pooling, for a conv) writes the codes straight from the
        float32 results; the max pooling in between pools the codes.  The calls are bound once: looking up each
        op's handler and arguments on every call took about a tenth of a batch-1 SVHN prediction.
        """
        steps = []
        i = 0
        while i < len(program):
            op = program[i]
            src = op.get("src", "x")
            span = op.get("fused", 0)
            if op["op"] == "add":
                call = lambda x, srcs=tuple(src): _Map(_sum_maps([x[s] for s in srcs]))    # noqa: E731
                src = None          # the whole register file
            elif span == 0:
                call = functools.partial(getattr(self, "_" + op["op"]), op=op)
            else:
                call = functools.partial(getattr(self, "_" + op["op"]), op=op,
                                         levels=(1 << program[i + span]["bits"]) - 1)
                if span == 2:
                    call = lambda x, conv=call, pool=program[i + 1]: self._maxpool(conv(x), pool)    # noqa: E731
            steps.append((call, src, program[i + span].get("dst", "x"), i, i + span))
            i += span + 1
        return steps

    def _run(self, images, trace, measure=False):
        self._trace = trace
        registers = {"x": _Map(images)}
        prof = profiling.current()
        if prof is None and not measure:
            for call, src, dst, _, _ in self._steps[trace is not None]:
                registers[dst] = call(registers if src is None else registers[src])
        else:
            program = self.program if trace is not None else self._fast_program
            for call, src, dst, first, last in self._steps[trace is not None]:
                x = registers if src is None else registers[src]
                if prof is not None:
                    record = prof.op = profiling.OpRecord(first, "+".join(o["op"] for o in program[first:last + 1]),
                                                          program[first].get("layer"))
                    prof.ops.append(record)
                    start = profiling.clock()
                result = call(x)
                if prof is not None:
                    record.seconds = profiling.clock() - start
                    prof.op = None
                    if program[first]["op"] in ("conv", "fc"):
                        self._describe(record, program[first], x, result)
                registers[dst] = result
                # in 4-byte values: integer sums and float maps of codes that travel as bytes
                self._largest = max(self._largest, result.values.size * 4)
        out = registers["x"].as_float()
        return out.reshape(out.shape[0], -1)

    def _describe(self, record, op, x, result):
        """A conv / fc record's multiply-adds, bit widths and kernel path (for the profile's bit-MACs per cycle)."""
        layer = self.layers[op["layer"]]
        batch = x.values.shape[0]
        if op["op"] == "conv":
            kh, kw = op["kernel"]
            h, w = x.values.shape[1:3]
            out_h, out_w = _out_hw(h, w, kh, kw, op["stride"], _pads(op["padding"], h, w, kh, kw, op["stride"]))
            pixels = out_h * out_w
            outputs = batch * pixels * layer.shape[-1]     # before any fused pooling
        else:
            outputs = batch * layer.shape[-1]
        record.macs = outputs * int(np.prod(layer.shape[:-1]))
        record.w_bits = layer.bits if layer.codes is not None else None
        record.a_bits = int(x.levels).bit_length() if x.levels is not None else None
        if record.w_bits is None or record.a_bits is None:
            record.path = "float"
        elif record.w_bits * record.a_bits <= POPCOUNT_MAX_PLANE_PAIRS:
            record.path = "popcount"
        else:
            record.path = "int-gemm"

    # ---------------------------------------------------------------- ops
    def _normalize(self, x, op):
        return _Map(elementwise.normalize(x.values, op.get("mean"), op["std"], tuple(op.get("pad", (0, 0)))))

    def _conv(self, x, op, levels=None):
        """The conv op; with ``levels`` (a fused activate), its output's codes at ``levels``."""
        call = (id(op), x.values.shape, x.levels, levels, num_threads())
        known = self._known_calls.get(call)
        if known is not None:
            plan, epilogue = known
            return _Map(plan.run(np.ascontiguousarray(x.values, np.uint8), epilogue, None), levels)
        layer = self.layers[op["layer"]]
        kh, kw = op["kernel"]
        stride, groups = op["stride"], op["groups"]
        pads = _pads(op["padding"], x.values.shape[1], x.values.shape[2], kh, kw, stride)
        if groups == 1:
            return self._quantized(self._conv_group(layer, x, slice(None), kh, kw, stride, pads, levels=levels,
                                                    remember=call, input_scale=op.get("input_scale")), levels)
        cin, per_group = layer.shape[2], op["out"] // groups
        if self._popcount(layer, x):
            # the kernel writes each group's channels straight into the layer's output (AlexNet's conv1 at
            # batch 128: a 96 MB map that np.concatenate copied once more)
            b, h, w = x.values.shape[:3]
            out = np.empty((b,) + _out_hw(h, w, kh, kw, stride, pads) + (op["out"],),
                           np.float32 if levels is None else np.uint8)
            for g in range(groups):
                xs = _Map(np.ascontiguousarray(x.values[..., g * cin:(g + 1) * cin]), x.levels)
                self._conv_group(layer, xs, slice(g * per_group, (g + 1) * per_group), kh, kw, stride, pads,
                                 levels=levels, into=(out, g * per_group))
            return self._quantized(out, levels)
        # each group into a contiguous array of its own (codes where the activate is fused), joined once
        parts = []
        for g in range(groups):
            xs = _Map(np.ascontiguousarray(x.values[..., g * cin:(g + 1) * cin]), x.levels)
            channels = slice(g * per_group, (g + 1) * per_group)
            part = self._conv_group(layer, xs, channels, kh, kw, stride, pads, levels=levels,
                                    input_scale=op.get("input_scale"))
            parts.append(part if levels is None or part.dtype == np.uint8 else elementwise.quantize(part, levels))
        return self._quantized(np.concatenate(parts, axis=-1), levels)

    @staticmethod
    def _popcount(layer, x):
        """Whether the layer runs on the popcount kernels for input ``x`` (quantized weights and codes, W x A
        bit planes at most ``POPCOUNT_MAX_PLANE_PAIRS``)."""
        return (layer.codes is not None and x.levels is not None
                and layer.bits * int(x.levels).bit_length() <= POPCOUNT_MAX_PLANE_PAIRS)

    @staticmethod
    def _quantized(values, levels):
        """``values`` as a map: float32 as they are, or (``levels`` given) quantized to codes if still float."""
        if levels is None:
            return _Map(values)
        if values.dtype != np.uint8:
            values = elementwise.quantize(values, levels)
        return _Map(values, levels)

    def _conv_group(self, layer, x, out_slice, kh, kw, stride, pads, levels=None, into=None, remember=None,
                    input_scale=None):
        """One group's output channels ``out_slice``, bias and batch norm applied.

        With ``levels``, the popcount and the direct float paths return the codes of the output at
        once; the others return float32 and leave the quantizing to the caller.  ``into = (array,
        offset)`` (popcount path only): the kernel writes the result into channels ``offset ..`` of
        ``array`` (see ``kernels.conv_popcount_codes``) and returns ``array``.  ``remember``: the key under
        which ``_conv`` finds the checked plan of a popcount call the next time (see ``_known_calls``).
        ``input_scale``: a float layer computes on ``x * input_scale`` (see ``passes.fold_input_scale``).
        """
        if layer.codes is None or x.levels is None:
            w = layer.scaled_float_w(input_scale)[..., out_slice]
            if w.shape[-1] % float_conv.LANES == 0:
                return float_conv.conv2d_affine(x.as_float(), w, _channels(layer.scale, out_slice),
                                                _channels(layer.shift, out_slice), stride, pads, levels=levels)
            z, _ = _conv_gemm(x.as_float(), w.reshape(-1, w.shape[-1]), kh, kw, stride, pads, np.float32)
            return layer.epilogue(z, out_slice)
        if self._popcount(layer, x):
            from . import kernels

            key = ("conv", out_slice.start)
            if key not in layer._planes:
                q = layer.codes[..., out_slice].transpose(3, 0, 1, 2)     # [out, kh, kw, cin]
                layer._planes[key] = kernels.prepare_weights(kernels.pack_planes(q.astype(np.uint8), layer.bits))
            # the kernel's tasks apply the affine map (and quantize) on their blocks while in cache
            codes = np.ascontiguousarray(x.values, np.uint8)
            call = (key, codes.shape, x.levels, levels, kh, kw, stride, pads, num_threads())
            if call not in layer._plans:
                if len(layer._plans) >= 16:
                    layer._plans.clear()
                # the same epilogue tuple on every call: the plan converts it once (kernels._Plan.run)
                epilogue = layer.affine_map(x.levels, out_slice) + (levels,)
                layer._plans[call] = (kernels.conv_codes_plan(codes.shape, int(x.levels).bit_length(),
                                                              layer._planes[key], (kh, kw), stride, pads), epilogue)
            plan, epilogue = layer._plans[call]
            if plan is not None:
                if remember is not None and into is None:
                    if len(self._known_calls) >= 256:
                        self._known_calls.clear()
                    self._known_calls[remember] = (plan, epilogue)
                # the engine's own codes and output (shapes and dtypes as the first, checked call's)
                return plan.run(codes, epilogue, into)
            target, offset = into if into is not None else (None, 0)
            return kernels.conv_popcount_codes(codes, int(x.levels).bit_length(), layer._planes[key], (kh, kw),
                                               stride, pads, epilogue=epilogue, out=target, out_offset=offset)
        q = layer.codes[..., out_slice].astype(np.float64)
        acc, sums = _conv_gemm(x.values, q.reshape(-1, q.shape[-1]), kh, kw, stride, pads, np.float64, with_sums=True)
        return layer.accumulators_to_output(acc.astype(np.int64), sums.astype(np.int64), x.levels, out_slice,
                                            quantize_levels=levels)

    def _fc(self, x, op, levels=None):
        layer = self.layers[op["layer"]]
        float_path = layer.codes is None or x.levels is None
        if op.get("clip_input") and not float_path:
            x = self._clip(x, op)           # (see passes.merge_clip_fc: the float path clips while copying)
        v = x.values
        if v.ndim == 4 and op["flatten"] == "chw":
            v = v.transpose(0, 3, 1, 2)
        v = np.ascontiguousarray(v).reshape(v.shape[0], -1)
        if float_path:
            if layer.dense_w is None:
                layer.dense_w = self._streamed(float_conv.pad_dense_weights(layer.float_w))
                layer.dense_affine = float_conv.pad_dense_affine(layer.scale, layer.shift, layer.dense_w.shape[-1])
            return self._quantized(float_conv.dense_affine(_Map(v, x.levels).as_float(), layer.dense_w,
                                                           layer.shape[-1], layer.scale, layer.shift, levels,
                                                           clip=op.get("clip_input", False),
                                                           padded_affine=layer.dense_affine), levels)
        if self._popcount(layer, x):
            from . import kernels

            if "fc" not in layer._planes:
                prepared = kernels.prepare_weights(kernels.pack_planes(
                    np.ascontiguousarray(layer.codes.T).astype(np.uint8), layer.bits))
                prepared.panels = self._streamed(prepared.panels)
                layer._planes["fc"] = prepared
            return self._quantized(kernels.gemm_popcount_codes(
                v.astype(np.uint8, copy=False), int(x.levels).bit_length(), layer._planes["fc"],
                epilogue=layer.affine_map(x.levels, slice(None)) + (levels,)), levels)
        else:
            rows = v.astype(np.float64)
            acc, sums = (rows @ layer.codes.astype(np.float64)).astype(np.int64), rows.sum(axis=1).astype(np.int64)
        return self._quantized(layer.accumulators_to_output(acc, sums, x.levels, slice(None), quantize_levels=levels),
                               levels)

    def _affine(self, x, op):
        scale, shift = self.affines[op["layer"]]
        v = x.as_float()
        if scale is not None:
            v = v * scale
        if shift is not None:
            v = v + shift
        return _Map(v.astype(np.float32, copy=False))

    def _affine_clip(self, x, op):
        scale, shift = self.affines[op["layer"]]
        return _Map(elementwise.affine_clip(x.as_float(), scale, shift))

    def _affine_activate(self, x, op):
        scale, shift = self.affines[op["layer"]]
        n = (1 << op["bits"]) - 1
        return _Map(elementwise.affine_quantize(x.as_float(), scale, shift, n), n)

    def _maxpool(self, x, op, levels=None):
        k, s = op["size"], op["stride"]
        v = x.values
        pads = tuple(op["pads"]) if "pads" in op else _pads(op["padding"], v.shape[1], v.shape[2], k, k, s)
        if x.levels is not None:
            # pooling codes: max commutes with the (monotone) dequantization
            pooled = _Map(elementwise.maxpool(v, k, s, pads), x.levels)
            return pooled if levels is None else self._activate(pooled, {"bits": levels.bit_length()})
        return _Map(elementwise.maxpool(v, k, s, pads, levels=levels), levels)

    def _avgpool(self, x, op):
        k, s = op["size"], op["stride"]
        v = x.as_float()
        if op["padding"] != "VALID":
            raise ValueError("{}: avgpool supports VALID padding only".format(self.path))
        return _Map(elementwise.avgpool(v, k, s))

    def _pad(self, x, op):
        b, a = op["before"], op["after"]
        mode = {"constant": "constant", "symmetric": "symmetric"}[op["mode"]]
        return _Map(np.pad(x.values, ((0, 0), (b, a), (b, a), (0, 0)), mode=mode), x.levels)

    def _relu(self, x, op):
        return x if x.levels is not None else _Map(np.maximum(x.values, np.float32(0)))

    def _clip(self, x, op):
        return x if x.levels is not None else _Map(np.clip(x.values, np.float32(0), np.float32(1)))

    def _activate(self, x, op):
        bits = op["bits"]
        if bits == 32:
            return _Map(np.clip(x.as_float(), np.float32(0), np.float32(1)))
        n = (1 << bits) - 1
        codes = elementwise.quantize(x.as_float(), n, np.uint8 if bits <= 8 else np.uint32)
        if self._trace is not None:
            clipped = np.clip(x.as_float(), np.float32(0), np.float32(1))
            self._trace.append((clipped * np.float32(n), codes, n))
        return _Map(codes, n)

    def _gap(self, x, op):
        return _Map(elementwise.global_average(x.as_float(), op.get("by", 1.0)))

    def _scale(self, x, op):
        return _Map(x.as_float() * np.float32(op["by"]))

    def _softmax(self, x, op):
        v = x.as_float()
        return _Map(elementwise.softmax(v.reshape(v.shape[0], -1)))


def huge_page_copy(array):
    """``array`` (4 MB or more) copied into an anonymous mapping of its own, advised for transparent huge pages.

    For weights that every call streams from memory (fully-connected layers): with
    :func:`dorefanet.memory.keep_freed_memory` they would come from malloc's heap in 4 KiB pages, and reading AlexNet's
    16 MB ``fct`` at batch 1 took 2.0 ms instead of 1.1 ms (page walks; same process, alternating calls).
    Smaller arrays, and systems without ``MADV_HUGEPAGE``, get ``array`` back.
    """
    if array.nbytes < (4 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return array
    region = mmap.mmap(-1, array.nbytes)
    region.madvise(mmap.MADV_HUGEPAGE)
    copy = np.frombuffer(region, dtype=array.dtype, count=array.size).reshape(array.shape)
    copy[...] = array
    return copy


def _sum_maps(maps):
    """The float32 sum of the maps, left to right, in one pass per term after the first two.

    (Python's ``sum`` started from 0, then copied the result once more: 3 passes over the maps for 2 terms.)
    """
    total = np.add(maps[0].as_float(), maps[1].as_float(), dtype=np.float32)
    for m in maps[2:]:
        np.add(total, m.as_float(), out=total)
    return total


def load_packed(path, huge_pages=False):
    """Load a packed model file (see :mod:`dorefanet.packed.format`); returns a :class:`PackedModel`.

    ``huge_pages``: weights streamed on every call go to mappings of their own advised for transparent
    huge pages (:func:`huge_page_copy`); the scripts and ``bench/`` ask for it, a library caller
    decides for its own process.
    """
    return PackedModel(path, huge_pages)
