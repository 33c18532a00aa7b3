"""``--export-onnx``: a packed model as a standard ONNX graph with QuantizeLinear / DequantizeLinear (QDQ).

The graph is derived from the packed file's program and arrays alone (no
TensorFlow; the ``onnx`` package is imported only here, on first use).  Every
quantized grid is an integer tensor and one float32 scale (docs/onnx.md):

* DoReFa weights (1 < W <= 15): the odd codes ``2q - m`` (``m = 2^W - 1``) as int8
  (W <= 7) or int16 (W <= 15) and ``DequantizeLinear`` with scale ``1/m``;
  BWN (W = 1): int8 codes +-1 with scale ``E``;
* DoReFa activations (A <= 16): ``Clip(0, 1)``, ``QuantizeLinear`` to uint8
  (A <= 8) or uint16 with scale ``1/n`` (``n = 2^A - 1``), ``DequantizeLinear``;
* TTQ weights (Wp, 0, -Wn: two scalars, no one uniform grid), float layers,
  W >= 16 and A >= 17 stay float32 (exact values; A >= 17 as Clip, Mul, Round, Mul).

Opset 21 is the first with int16 / uint16 QuantizeLinear and DequantizeLinear
(8-bit weights have 511 codes, -255..255).  Maps are NCHW inside the graph; its
input ``input`` is what the script feeds its graph (NHWC BGR, dynamic batch)
and its output ``output`` the softmax probabilities.  The tensor of each
activation's integer codes is named ``<op>/codes`` (the tests read them).
"""
import json
import os

import numpy as np

from .format import read_packed, unpack_weight_planes
from .program import same_pads

__all__ = ["OnnxExportError", "DEFAULT_OPSET", "MIN_OPSET", "CODES_SUFFIX", "onnx_model", "export_onnx",
           "import_onnx"]

#: The first opset with int16 / uint16 QuantizeLinear and DequantizeLinear.
MIN_OPSET = 21
DEFAULT_OPSET = 21
#: Name suffix of the tensors that hold an activation's integer codes.
CODES_SUFFIX = "/codes"


class OnnxExportError(ValueError):
    """The model cannot be written as ONNX (one-line message)."""


def import_onnx():
    """The ``onnx`` module, or :class:`OnnxExportError` naming the package to install."""
    try:
        import onnx
        import onnx.checker
        import onnx.helper
        import onnx.numpy_helper
    except ImportError as err:
        raise OnnxExportError("--export-onnx needs the Python package onnx (pip install onnx): {}".format(
            err)) from None
    return onnx


class _Value:
    """A map or vector of the program: its ONNX tensor, its form and, for codes' values, its levels.

    ``form``: ``"image"`` (the NHWC input), ``"map"`` (NCHW, ``dims`` = (C, H, W)) or
    ``"vector"`` (``dims`` = (n,)).  ``levels``: n when every value is ``c / n``.
    """

    def __init__(self, name, form, dims, levels=None, dtype=np.float32):
        self.name, self.form, self.dims, self.levels, self.dtype = name, form, tuple(dims), levels, dtype


class _Graph:
    """Collects nodes and initializers with unique names."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.helper = onnx.helper
        self.nodes, self.initializers = [], []
        self._names = set()
        self._constants = {}
        self.counts = {"quantized weights": 0, "float weights": 0, "quantized activations": 0}

    def unique(self, name):
        candidate, k = name, 1
        while candidate in self._names:
            k += 1
            candidate = "{}_{}".format(name, k)
        self._names.add(candidate)
        return candidate

    def constant(self, name, array, share=False):
        """An initializer holding ``array`` (its dtype kept); ``share``: one per (dtype, value) for small ones."""
        array = np.asarray(array)
        key = (array.dtype.str, array.shape, array.tobytes()) if share else None
        if key in self._constants:
            return self._constants[key]
        tensor = self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), self.unique(name))
        self.initializers.append(tensor)
        if share:
            self._constants[key] = tensor.name
        return tensor.name

    def scalar(self, value, dtype=np.float32):
        value = np.asarray(value, dtype)
        return self.constant("const_{}_{}".format(np.dtype(dtype).name, value.item()), value, share=True)

    def node(self, op_type, inputs, name, output=None, **attrs):
        """One node; its output (and node name) is ``output`` when given (the graph's output), else ``name`` made
        unique."""
        if output is None:
            output = self.unique(name)
        else:
            self._names.add(output)
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [output], name=output, **attrs))
        return output


def _pads(padding, h, w, kh, kw, stride):
    """ONNX ``pads`` (top, left, bottom, right) of a window op, as the engine pads."""
    if padding == "VALID":
        return [0, 0, 0, 0]
    (top, bottom), (left, right) = same_pads(h, kh, stride), same_pads(w, kw, stride)
    return [top, left, bottom, right]


def _window_out(size, kernel, stride, before, after):
    return (size + before + after - kernel) // stride + 1


class _Exporter:
    def __init__(self, onnx, header, arrays):
        self.g = _Graph(onnx)
        self.header, self.arrays = header, arrays
        self.onnx = onnx
        self._nchw = {}

    # ------------------------------------------------------------ forms
    def as_map(self, v, where):
        """``v`` as an NCHW float32 map (the NHWC image transposed)."""
        if v.form == "map":
            return v
        if v.form != "image":
            raise OnnxExportError("{}: reads a vector where a feature map is expected".format(where))
        if v.name not in self._nchw:     # one transposition whatever reads the image
            h, w, c = v.dims
            name = self.as_float(v, where).name
            self._nchw[v.name] = _Value(self.g.node("Transpose", [name], "input_nchw", perm=[0, 3, 1, 2]), "map",
                                        (c, h, w))
        return self._nchw[v.name]

    def as_float(self, v, where):
        if v.dtype == np.float32:
            return v
        return _Value(self.g.node("Cast", [v.name], "input_float", to=self.onnx.TensorProto.FLOAT), v.form, v.dims,
                      v.levels)

    def as_vector(self, v, order, where):
        """``v`` flattened per image in ``order`` (``hwc``: the engine's NHWC reshape, or ``chw``)."""
        if v.form == "vector":
            return v
        if v.form == "image":
            v = self.as_map(v, where)
        name = v.name
        c, h, w = v.dims
        if order == "hwc" and h * w > 1:
            name = self.g.node("Transpose", [name], where + "/nhwc", perm=[0, 2, 3, 1])
        return _Value(self.g.node("Flatten", [name], where + "/flatten", axis=1), "vector", (c * h * w,), v.levels)

    def per_channel(self, v, values, name):
        """A per-channel constant shaped to broadcast over ``v`` (NCHW map, NHWC image or vector)."""
        values = np.asarray(values, np.float32).reshape(-1)
        if v.form == "map":
            values = values.reshape(-1, 1, 1)
        return self.g.constant(name, values)

    def affine(self, v, layer, where):
        """``v * <layer>/scale + <layer>/shift`` (each when present), float32 as the engine."""
        name = v.name
        scale, shift = self.arrays.get(layer + "/scale"), self.arrays.get(layer + "/shift")
        channels = v.dims[0]
        for field, value, op in (("scale", scale, "Mul"), ("shift", shift, "Add")):
            if value is None:
                continue
            if value.shape != (channels,):
                raise OnnxExportError("{}/{} has {} values for {} channels".format(layer, field, value.size, channels))
            name = self.g.node(op, [name, self.per_channel(v, value, layer + "/" + field)], where + "/" + field)
        return _Value(name, v.form, v.dims)

    # ------------------------------------------------------------ weights
    def weight(self, layer, conv):
        """The layer's float32 weights in ONNX layout (conv ``[out, in/groups, kh, kw]``, fc ``[in, out]``)."""
        spec = self.header["layers"].get(layer)
        if spec is None:
            raise OnnxExportError("the program's layer {} has no weights in the file".format(layer))
        kind, shape = spec["kind"], tuple(spec["shape"])

        def layout(a):
            return np.ascontiguousarray(a.transpose(3, 2, 0, 1) if conv else a)

        if kind == "float":
            self.g.counts["float weights"] += 1
            return self.g.constant(layer + "/W", layout(np.asarray(self.arrays[layer + "/W"], np.float32)))
        planes = unpack_weight_planes(self.arrays[layer + "/planes"], shape)
        if kind == "ternary":
            wp, wn = np.float32(self.arrays[layer + "/Wp"]), np.float32(self.arrays[layer + "/Wn"])
            self.g.counts["float weights"] += 1
            values = np.where(planes[0] == 1, wp, np.where(planes[1] == 1, -wn, np.float32(0)))
            return self.g.constant(layer + "/W", layout(values.astype(np.float32)))
        if kind == "binary":
            codes, scale = planes[0].astype(np.int8) * np.int8(2) - np.int8(1), np.float32(self.arrays[layer + "/E"])
        else:
            bits = int(spec["bits"])
            m = (1 << bits) - 1
            q = np.zeros(shape, np.int64)
            for b in range(bits):
                q |= planes[b].astype(np.int64) << b
            if bits > 15:
                # no integer type of DequantizeLinear holds 2q - m exactly: the graph's float32 values
                self.g.counts["float weights"] += 1
                values = np.float32(2) * (q.astype(np.float32) * (np.float32(1) / np.float32(m))) - np.float32(1)
                return self.g.constant(layer + "/W", layout(values))
            codes = (2 * q - m).astype(np.int8 if bits <= 7 else np.int16)
            scale = np.float32(1) / np.float32(m)
        self.g.counts["quantized weights"] += 1
        codes_name = self.g.constant(layer + "/W_codes", layout(codes))
        zero = self.g.scalar(0, codes.dtype)
        return self.g.node("DequantizeLinear", [codes_name, self.g.constant(layer + "/W_scale", scale), zero],
                           layer + "/W")

    # ------------------------------------------------------------ ops
    def run(self):
        header = self.header
        shape = header["input"]
        h, w, c = int(shape["height"]), int(shape["width"]), int(shape["channels"])
        dtype = np.dtype(shape.get("dtype", "float32"))
        if dtype not in (np.float32, np.uint8):
            raise OnnxExportError("input dtype {} is not float32 or uint8".format(dtype))
        registers = {"x": _Value("input", "image", (h, w, c), dtype=dtype.type)}
        program = header["program"]
        for i, op in enumerate(program):
            kind = op["op"]
            where = op.get("layer") or "op{}_{}".format(i, kind)
            last = i == len(program) - 1 and op.get("dst", "x") == "x"
            if kind == "add":
                values = [registers[s] for s in op["src"]]
                result = self.add(values, where)
            else:
                method = getattr(self, "op_" + kind, None)
                if method is None:
                    raise OnnxExportError("op {} ({}) has no ONNX form".format(i, kind))
                result = method(registers[op.get("src", "x")], op, where, "output" if last else None)
            registers[op.get("dst", "x")] = result
        out = registers["x"]
        if out.name != "output":
            out = _Value(self.g.node("Identity", [self.as_vector(out, "hwc", "output").name], "output", "output"),
                         "vector", (int(np.prod(out.dims)),))
        return (h, w, c), dtype, out.dims[0]

    def op_normalize(self, v, op, where, output):
        v = self.as_float(v, where)
        name = v.name
        if op.get("mean"):
            name = self.g.node("Sub", [name, self.per_channel(v, op["mean"], where + "/mean")], where + "/sub")
        name = self.g.node("Div", [name, self.per_channel(v, op["std"], where + "/std")], where + "/div",
                           output)
        return _Value(name, v.form, v.dims)

    def op_conv(self, v, op, where, output):
        v = self.as_map(v, where)
        layer = op["layer"]
        c, h, w = v.dims
        (kh, kw), stride, groups = op["kernel"], int(op["stride"]), int(op["groups"])
        spec_shape = self.header["layers"][layer]["shape"]
        if len(spec_shape) != 4 or spec_shape[2] * groups != c or spec_shape[3] != op["out"]:
            raise OnnxExportError("{}: weights {} do not fit a {}-channel input in {} groups".format(
                layer, spec_shape, c, groups))
        pads = _pads(op["padding"], h, w, kh, kw, stride)
        out = self.g.node("Conv", [v.name, self.weight(layer, conv=True)], where + "/conv", kernel_shape=[kh, kw],
                          strides=[stride, stride], pads=pads, group=groups, dilations=[1, 1])
        dims = (int(op["out"]), _window_out(h, kh, stride, pads[0], pads[2]), _window_out(w, kw, stride, pads[1],
                                                                                           pads[3]))
        return self.finish(self.affine(_Value(out, "map", dims), layer, where), output)

    def op_fc(self, v, op, where, output):
        layer = op["layer"]
        v = self.as_vector(v, op["flatten"], where)
        spec_shape = self.header["layers"][layer]["shape"]
        if len(spec_shape) != 2 or spec_shape[0] != v.dims[0]:
            raise OnnxExportError("{}: weights {} do not fit {} inputs".format(layer, spec_shape, v.dims[0]))
        out = self.g.node("MatMul", [v.name, self.weight(layer, conv=False)], where + "/matmul")
        return self.finish(self.affine(_Value(out, "vector", (int(op["out"]),)), layer, where), output)

    def op_affine(self, v, op, where, output):
        v = self.as_map(v, where) if v.form == "image" else v
        return self.finish(self.affine(v, op["layer"], where), output)

    def op_maxpool(self, v, op, where, output):
        return self.pool("MaxPool", v, op, where, output)

    def op_avgpool(self, v, op, where, output):
        if op["padding"] != "VALID":
            raise OnnxExportError("{}: avgpool supports VALID padding only".format(where))
        return self.pool("AveragePool", v, op, where, output)

    def pool(self, kind, v, op, where, output):
        v = self.as_map(v, where)
        c, h, w = v.dims
        size, stride = int(op["size"]), int(op["stride"])
        pads = _pads(op["padding"], h, w, size, size, stride)
        # MaxPool's padded positions never win, as the engine's (TensorFlow's SAME)
        out = self.g.node(kind, [v.name], where, output, kernel_shape=[size, size], strides=[stride, stride],
                          pads=pads)
        dims = (c, _window_out(h, size, stride, pads[0], pads[2]), _window_out(w, size, stride, pads[1], pads[3]))
        return _Value(out, "map", dims, v.levels if kind == "MaxPool" else None)

    def op_pad(self, v, op, where, output):
        v = self.as_map(v, where)
        before, after = int(op["before"]), int(op["after"])
        c, h, w = v.dims
        if op["mode"] == "constant" or (op["mode"] == "symmetric" and max(before, after) <= 1):
            # numpy's symmetric padding repeats the edge row first: by one row it is ONNX's edge padding
            mode = "constant" if op["mode"] == "constant" else "edge"
            pads = self.g.constant(where + "/pads", np.array([0, 0, before, before, 0, 0, after, after], np.int64))
            out = self.g.node("Pad", [v.name, pads], where, output, mode=mode)
        elif op["mode"] == "symmetric":
            # wider: gather the rows and columns numpy.pad(mode="symmetric") takes
            out = v.name
            for axis, size in ((2, h), (3, w)):
                index = np.pad(np.arange(size, dtype=np.int64), (before, after), mode="symmetric")
                out = self.g.node("Gather", [out, self.g.constant(where + "/index", index)],
                                  where + ("/rows" if axis == 2 else "/columns"), output if axis == 3 else None,
                                  axis=axis)
        else:
            raise OnnxExportError("{}: pad mode {!r} has no ONNX form".format(where, op["mode"]))
        return _Value(out, "map", (c, h + before + after, w + before + after), v.levels)

    def op_relu(self, v, op, where, output):
        if v.levels is not None:
            return self.finish(v, output)     # codes' values are >= 0 already
        v = self.as_map(v, where) if v.form == "image" else v
        return _Value(self.g.node("Relu", [v.name], where, output), v.form, v.dims)

    def op_clip(self, v, op, where, output):
        if v.levels is not None:
            return self.finish(v, output)     # in [0, 1] already
        return self.clip(v, where, output)

    def clip(self, v, where, output=None):
        v = self.as_map(v, where) if v.form == "image" else v
        return _Value(self.g.node("Clip", [v.name, self.g.scalar(0.0), self.g.scalar(1.0)], where + "/clip", output),
                      v.form, v.dims)

    def op_activate(self, v, op, where, output):
        bits = int(op["bits"])
        if bits == 32:
            return self.finish(v, output) if v.levels is not None else self.clip(v, where, output)
        n = (1 << bits) - 1
        clipped = self.clip(v, where)
        step = np.float32(1) / np.float32(n)
        self.g.counts["quantized activations"] += 1
        if bits <= 16:
            # QuantizeLinear: round half to even of x / scale, saturated to the type's range
            dtype = np.uint8 if bits <= 8 else np.uint16
            scale, zero = self.g.constant(where + "/step", step), self.g.scalar(0, dtype)
            codes = self.g.node("QuantizeLinear", [clipped.name, scale, zero], where + CODES_SUFFIX)
            value = self.g.node("DequantizeLinear", [codes, scale, zero], where + "/value", output)
        else:
            # no 32-bit QuantizeLinear: the engine's float32 round(x * n) * (1 / n), Round rounding halves to even
            scaled = self.g.node("Mul", [clipped.name, self.g.scalar(float(n))], where + "/scaled")
            codes = self.g.node("Round", [scaled], where + CODES_SUFFIX)
            value = self.g.node("Mul", [codes, self.g.constant(where + "/step", step)], where + "/value", output)
        return _Value(value, v.form, v.dims, n)

    def op_gap(self, v, op, where, output):
        v = self.as_map(v, where)
        pooled = self.g.node("GlobalAveragePool", [v.name], where)
        return _Value(self.g.node("Flatten", [pooled], where + "/flatten", output, axis=1), "vector", (v.dims[0],))

    def op_scale(self, v, op, where, output):
        v = self.as_map(v, where) if v.form == "image" else v
        return _Value(self.g.node("Mul", [v.name, self.g.scalar(float(op["by"]))], where, output), v.form, v.dims)

    def add(self, values, where):
        values = [self.as_map(v, where) if v.form == "image" else v for v in values]
        if len({(v.form, v.dims) for v in values}) != 1:
            raise OnnxExportError("{}: adds maps of different shapes".format(where))
        total = values[0].name
        for v in values[1:]:
            total = self.g.node("Add", [total, v.name], where)
        return _Value(total, values[0].form, values[0].dims)

    def op_softmax(self, v, op, where, output):
        v = self.as_vector(v, "hwc", where)
        return _Value(self.g.node("Softmax", [v.name], where, output, axis=-1), "vector", v.dims)

    def finish(self, v, output):
        """``v`` under the name ``output`` when it is the graph's output."""
        if output is None or v.name == output:
            return v
        return _Value(self.g.node("Identity", [v.name], output, output), v.form, v.dims, v.levels)


def onnx_model(header, arrays, opset=DEFAULT_OPSET):
    """The ONNX ``ModelProto`` of a packed model given as its header and arrays (see :func:`read_packed`)."""
    return _build(header, arrays, opset)[0]


def _build(header, arrays, opset):
    """``(model, counts)``: the checked ``ModelProto`` and how many weights and activations are quantized."""
    onnx = import_onnx()
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= int(opset) <= newest:
        raise OnnxExportError("opset {} is not supported: the graph needs {} to {} (int16 and uint16 "
                              "QuantizeLinear / DequantizeLinear)".format(opset, MIN_OPSET, newest))
    exporter = _Exporter(onnx, header, arrays)
    (h, w, c), dtype, classes = exporter.run()
    helper, g = onnx.helper, exporter.g
    element = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        g.nodes, "{}_dorefa_{}".format(header["model"], header["bits"]).replace(",", "_").replace("-", "_"),
        [helper.make_tensor_value_info("input", element, ["batch", h, w, c])],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", int(classes)])],
        initializer=g.initializers)
    opset_id = helper.make_opsetid("", int(opset))
    model = helper.make_model(graph, opset_imports=[opset_id], producer_name="dorefanet",
                              ir_version=helper.find_min_ir_version_for([opset_id]),
                              doc_string="{} at --dorefa {}: DoReFa-Net toolkit, --export-onnx (docs/onnx.md); input "
                                         "NHWC BGR {} as the script feeds its graph".format(
                                             header["model"], header["bits"], np.dtype(dtype).name))
    meta = {"model": header["model"], "bits": header["bits"], "classes": str(classes)}
    if header.get("layer_bits"):
        meta["layer_bits"] = json.dumps(header["layer_bits"], sort_keys=True)
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    return model, dict(g.counts)


def export_onnx(source, out, opset=DEFAULT_OPSET, arrays=None):
    """Write the ONNX graph of a packed model to ``out``; return ``(bytes written, counts)``.

    ``counts``: how many weight tensors are quantized (``DequantizeLinear``) or float, and how many
    activations quantized (``QuantizeLinear``).

    ``source`` is a packed file's path, or its header (a dict) with ``arrays``.
    """
    from dorefanet.atomic_file import atomic_open

    if not str(out).endswith(".onnx"):
        raise OnnxExportError("{}: an ONNX model file must end in .onnx".format(out))
    header = source
    if arrays is None:
        header, arrays = read_packed(source)
    model, counts = _build(header, arrays, opset)
    with atomic_open(out, "wb") as f:
        f.write(model.SerializeToString())
    return os.path.getsize(out), counts
