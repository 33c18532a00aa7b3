"""Reading user images for ``--run``: decoded by content, as BGR uint8, with one-line errors."""
import os

import cv2
import numpy as np

__all__ = ["ImageReadError", "read_image_bgr"]


class ImageReadError(ValueError):
    """An image file is missing or cannot be decoded (one-line message naming the file)."""


def read_image_bgr(path):
    """Decode ``path`` by its content (JPEG, PNG, BMP, ... whatever the extension) as BGR uint8 HxWx3."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ImageReadError("{}: cannot read file ({})".format(path, err.strerror or err)) from None
    image = None
    if data:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        what = "empty file" if not data else "not a decodable image (JPEG, PNG, BMP, ...)"
        raise ImageReadError("{}: {}".format(path, what))
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageReadError("{}: image has no pixels".format(os.fspath(path)))
    return image
