"""Writing matplotlib figures (object-oriented API only: no pyplot state, so any thread may
draw) as PNG files, atomically."""

from __future__ import annotations

import io
import os

from matplotlib.figure import Figure

from stages.io import atomic_write

DPI = 100  # a figure of figsize (w, h) inches is a (100 w) x (100 h) pixel PNG


def save_png(fig: Figure, path: str | os.PathLike) -> None:
    """``fig`` as a PNG of exactly ``figsize * DPI`` pixels at ``path`` (no tight bounding box,
    which would change the size: ``tight_layout`` arranges the axes inside it instead)."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write(path, buf.getvalue())
