"""``--summary``: what each layer of a model costs, derived from its one description (no TensorFlow here).

The rows come from the model's packed program (:mod:`dorefanet.packed.program`,
itself derived from ``network(net, x)``), the bits from its
:class:`dorefanet.bits.LayerPlan`, and the float variables from the
``{name: shape}`` of its checkpoint.  Nothing here reads or writes a file.

What the numbers count, per row (one per ``conv`` / ``fc``, and one per batch
norm that is not folded into a layer, kind ``bn``):

* ``params``: trained scalars: ``W``, ``b``, TTQ's ``Wp`` / ``Wn`` and the
  folded batch norm's ``gamma`` / ``beta`` (its moving statistics are not
  trained, but they are stored: see ``float_bytes``);
* ``macs``: multiply-accumulates of one image: ``kh*kw*(cin/groups)*cout*oh*ow``
  for a convolution, ``nin*cout`` for a fully-connected layer, 0 for a batch norm
  (scale-and-shift work is not counted anywhere);
* ``bops``: ``macs * W * A``, an unquantized side counted as 32 bits and a
  ternary (TTQ) weight as 2 bits (its two planes);
* ``float_bytes``: the layer's variables in the float ``.npz`` (``--export``):
  4 bytes (float32) per element of ``W``, ``b``, ``Wp``, ``Wn``, ``gamma``,
  ``beta``, ``mean/EMA`` and ``variance/EMA``;
* ``packed_bytes``: the ``nbytes`` of the layer's arrays in the packed file
  (``--export-packed``): weight planes (``W * ceil(n/8)`` uint8), ``E`` /
  ``Wp`` / ``Wn`` scalars, float ``W`` (4 or 2 bytes an element) and the folded
  ``scale`` / ``shift`` vectors.  The file's JSON header and the zip / ``.npy``
  framing are not included.
"""
import json
import math

__all__ = ["TERNARY_BITS", "layer_macs", "summarise", "format_table", "to_json"]

#: Bits a ternary (TTQ, W = 't') weight counts as in bit operations: the engine reads two planes.
TERNARY_BITS = 2

_SUFFIXES = ("/mean/EMA", "/variance/EMA", "/gamma", "/beta", "/Wp", "/Wn", "/W", "/b")
_TRAINED = ("/gamma", "/beta", "/Wp", "/Wn", "/W", "/b")


def _owner(name):
    """``'conv1/W'`` -> ``('conv1', '/W')``; the owner is a layer or a batch norm."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)], suffix
    return None, None


def _window_out(size, kernel, stride, padding):
    return -(-size // stride) if padding == "SAME" else (size - kernel) // stride + 1


def _output_shape(op, shape):
    if op["op"] == "conv":
        (kh, kw), stride = op["kernel"], op["stride"]
        return (_window_out(shape[0], kh, stride, op["padding"]), _window_out(shape[1], kw, stride, op["padding"]),
                op["out"])
    if op["op"] == "fc":
        return (op["out"],)
    return tuple(shape)   # a batch norm keeps the shape


def layer_macs(op, input_shape):
    """Multiply-accumulates of ``op`` (a program ``conv`` / ``fc``) on one image whose map is ``input_shape``."""
    if op["op"] == "conv":
        kh, kw = op["kernel"]
        oh, ow, cout = _output_shape(op, input_shape)
        return kh * kw * (input_shape[-1] // op["groups"]) * cout * oh * ow
    if op["op"] == "fc":
        return math.prod(input_shape) * op["out"]
    return 0


def _weight_packed_bytes(kind_w, n, float_bytes_per_element):
    """Bytes of a layer's weight arrays in the packed file for W = ``kind_w`` (None: stored in float)."""
    planes = math.ceil(n / 8)
    if kind_w is None or kind_w == 32:
        return n * float_bytes_per_element
    if kind_w == "t":
        return 2 * planes + 4 + 4       # planes, Wp, Wn
    if kind_w == 1:
        return planes + 4               # planes, E
    return kind_w * planes


def summarise(program, plan, input_shape, variables, first_last_dtype="float32"):
    """The summary of a model: ``{"layers": [row, ...], "totals": {...}}`` (see the module docstring).

    ``program``: the model's packed program; ``plan``: its ``LayerPlan``;
    ``input_shape``: ``(height, width, channels)`` of one image; ``variables``:
    ``{name: shape}`` of its float checkpoint; ``first_last_dtype``: how
    ``--export-packed`` stores the layers the model keeps in float.
    """
    from dorefanet.packed.program import layer_inputs

    owned = {}
    for name, shape in variables.items():
        owner, suffix = _owner(name)
        owned.setdefault(owner, []).append((suffix, math.prod(shape)))
    rows = []
    for op, shape in layer_inputs(program, input_shape, kinds=("conv", "fc", "affine")):
        name = op["layer"]
        # a layer owns its own variables and those of the batch norm folded into it
        mine = owned.pop(name, []) + (owned.pop(op["bn"], []) if op.get("bn") else [])
        out = _output_shape(op, shape)
        channels = out[-1]
        folded = 2 * 4 * channels if op.get("bn") or op["op"] == "affine" else (4 * channels if op.get("bias") else 0)
        row = {"layer": name, "kind": "bn" if op["op"] == "affine" else op["op"], "output_shape": list(out),
               "params": sum(n for s, n in mine if s in _TRAINED), "float_bytes": 4 * sum(n for _, n in mine)}
        if op["op"] == "affine":
            row.update(w=None, a=None, g=None, macs=0, bops=0, packed_bytes=folded)
        else:
            w, a, g = plan.layers[name]   # (32, 32, 32) for a layer left in float
            macs = layer_macs(op, shape)
            n = dict(mine).get("/W")
            element = 2 if first_last_dtype == "float16" and not plan.quantized_by_default[name] else 4
            row.update(w=w, a=a, g=g, macs=macs, bops=macs * (TERNARY_BITS if w == "t" else w) * a,
                       packed_bytes=_weight_packed_bytes(None if w == 32 else w, n, element) + folded)
        rows.append(row)
    if any(owned.values()):
        raise ValueError("variables of no layer in the program: {}".format(", ".join(sorted(
            "{}{}".format(o, s) for o, items in owned.items() for s, _ in items))))
    macs = sum(r["macs"] for r in rows)
    bops = sum(r["bops"] for r in rows)
    float_bytes = sum(r["float_bytes"] for r in rows)
    packed = sum(r["packed_bytes"] for r in rows)
    totals = {"params": sum(r["params"] for r in rows), "float_bytes": float_bytes, "packed_bytes": packed,
              "compression": float_bytes / packed, "macs": macs, "bops": bops,
              "bops_vs_32": bops / (macs * 32 * 32)}
    return {"layers": rows, "totals": totals}


def _bits(value):
    return "-" if value is None else str(value)


def format_table(summary, title):
    """The plain terminal table of :func:`summarise`'s result, headed by ``title``."""
    head = ("layer", "kind", "output", "W", "A", "G", "params", "MACs", "BOPs", "float B", "packed B")
    lines = [[r["layer"], r["kind"], "x".join(map(str, r["output_shape"])), _bits(r["w"]), _bits(r["a"]),
              _bits(r["g"]), str(r["params"]), str(r["macs"]), str(r["bops"]), str(r["float_bytes"]),
              str(r["packed_bytes"])] for r in summary["layers"]]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    left = 2   # names and kinds left-aligned, numbers right-aligned

    def fmt(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    t = summary["totals"]
    out = [title,
           "(per image; BOPs = MACs x W x A, an unquantized side as 32; packed B = the layer's arrays in the "
           "--export-packed file, without its JSON header and zip framing; float B = float32 variables in the .npz)",
           fmt(head), fmt(["-" * w for w in widths])]
    out += [fmt(line) for line in lines]
    out += ["",
            "parameters     {}".format(t["params"]),
            "float size     {} bytes ({:.2f} MB)".format(t["float_bytes"], t["float_bytes"] / 1e6),
            "packed size    {} bytes ({:.2f} MB)".format(t["packed_bytes"], t["packed_bytes"] / 1e6),
            "compression    {:.2f}x".format(t["compression"]),
            "MACs           {}".format(t["macs"]),
            "BOPs           {}".format(t["bops"]),
            "BOPs vs 32,32,32  {:.4f}".format(t["bops_vs_32"])]
    return "\n".join(out)


def to_json(summary, **fields):
    """One JSON object: ``fields`` (model, bits...), ``layers`` and ``totals``."""
    return json.dumps(dict(fields, **summary), sort_keys=False)
