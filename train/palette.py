"""One colour per tumour class and region, the same in every figure (`show`, the run figures,
TensorBoard and MLflow images, the class-balance bars and the Dice curves), and the one legend
that says so.

The classes take the colours BraTS figures use: oedema green, necrosis / non-enhancing tumour red,
enhancing tumour yellow. A region takes the colour of its outermost class (WT green, TC red, ET
yellow) and channels are painted outermost first (WT, then TC, then ET), so a region overlay shows
each voxel in the colour of its innermost region, which is the colour of its class: a region
figure and a class figure of the same segmentation look the same. The releases' other classes
have colours of their own: resection cavity cyan, cyst magenta, gross tumour volume orange.
"""

from __future__ import annotations

import numpy as np

_GREEN, _RED, _YELLOW = (0.2, 1.0, 0.2), (1.0, 0.2, 0.2), (1.0, 1.0, 0.2)
# name -> (RGB in [0, 1], colour word, paint rank: lower is painted first, i.e. under)
_TABLE = {
    "WT": (_GREEN, "green", 0), "ED": (_GREEN, "green", 1), "SNFH": (_GREEN, "green", 1),
    "TC": (_RED, "red", 2), "NCR/NET": (_RED, "red", 3), "NETC": (_RED, "red", 3), "NET": (_RED, "red", 3),
    "ET": (_YELLOW, "yellow", 4),
    "RC": ((0.2, 1.0, 1.0), "cyan", 5), "CC": ((1.0, 0.2, 1.0), "magenta", 6), "GTV": ((1.0, 0.6, 0.1), "orange", 7),
}
_UNKNOWN = ((0.3, 0.5, 1.0), "blue", 8)  # a channel name no release of the table has


def colour(name: str) -> np.ndarray:
    """RGB in [0, 1] of a class or region."""
    return np.array(_TABLE.get(name, _UNKNOWN)[0])


def colour_word(name: str) -> str:
    return _TABLE.get(name, _UNKNOWN)[1]


def line_colour(name: str) -> tuple[float, float, float]:
    """The same hue, darker, for lines and bars on a white background (yellow would not show)."""
    return tuple(float(v) * 0.8 for v in colour(name))


def paint_order(names) -> list[int]:
    """Channel indices, outermost first: the order overlays paint them in."""
    return sorted(range(len(names)), key=lambda i: (_TABLE.get(names[i], _UNKNOWN)[2], i))


def legend(names) -> str:
    """The one legend: each channel's colour, outermost first, and how the regions nest."""
    parts = [f"{names[i]} {colour_word(names[i])}" for i in paint_order(names)]
    nested = [n for n in ("WT", "TC", "ET") if n in names]
    note = f" ({' > '.join(nested)}: a voxel shows its innermost)" if len(nested) > 1 else ""
    return ", ".join(parts) + note
