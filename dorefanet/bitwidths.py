"""Bit-width checks shared by the quantizers (``dorefa``) and the layer table (``layer_bits``).

TensorFlow-free, so that the packed engine's ``--eval`` / ``--run`` can check flags without it;
``dorefa`` re-exports these names.
"""
import numbers

__all__ = ["TERNARY", "check_bits"]

#: The weight "bit width" that selects Trained Ternary Quantization.
TERNARY = "t"


def _check_width(value, what, allow_ternary=False):
    allowed = "an integer from 1 to 32" + (" or 't' (TTQ)" if allow_ternary else "")
    if allow_ternary and isinstance(value, str) and value == TERNARY:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError("invalid {}: {!r}; expected {}".format(what, value, allowed))
    if not 1 <= int(value) <= 32:
        raise ValueError("invalid {}: {!r}; expected {}".format(what, value, allowed))
    return int(value)


def check_bits(bitW, bitA, bitG):
    """Validate a (W, A, G) triple and return it normalised to ints (or ``'t'`` for W).

    Raises ``ValueError`` naming the bad value: widths are integers in 1..32
    (32 = not quantized); W may be ``'t'`` (TTQ), which implies A = G = 32.
    """
    bitW = _check_width(bitW, "weight bit width (W)", allow_ternary=True)
    bitA = _check_width(bitA, "activation bit width (A)")
    bitG = _check_width(bitG, "gradient bit width (G)")
    if bitW == TERNARY and (bitA, bitG) != (32, 32):
        raise ValueError("W = 't' (TTQ) implies A = G = 32, got A = {}, G = {}".format(bitA, bitG))
    return bitW, bitA, bitG
