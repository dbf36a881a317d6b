"""Drawing helpers shared by the figure modules (clinician pages, method pages, the review contact
sheet, the risk plots).

Uses matplotlib's object API on the Agg canvas (no pyplot state), so every figure is drawn headless
and never changes the caller's backend.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from diffseg.atomic import atomic_path

FINAL_COLOUR, TRUTH_COLOUR = "lime", "yellow"


def new_figure(size_in: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size_in)
    FigureCanvasAgg(fig)  # attaches the Agg canvas (tight_layout and savefig need one)
    return fig


def save_png(fig: Figure, path: str | os.PathLike, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def image_panel(ax, array, title: str, fontsize: float = 8, **imshow_kwargs):
    """An image panel without axes; returns the image (for a colour scale)."""
    im = ax.imshow(array, **imshow_kwargs)
    ax.set_title(title, fontsize=fontsize)
    ax.set_axis_off()
    return im


def outline(ax, mask: np.ndarray, colour: str) -> None:
    if 0 < mask.sum() < mask.size:  # a constant mask has no outline (contour would warn)
        ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.2)


def add_note(fig: Figure, note: str, top: bool = True) -> None:
    """A line in the top-right (or bottom-left) corner saying where the data come from (e.g. synthetic demo data)."""
    if note:
        x, y, ha, va = (0.99, 0.99, "right", "top") if top else (0.01, 0.01, "left", "bottom")
        fig.text(x, y, note, ha=ha, va=va, fontsize=10, color="tab:red", fontweight="bold")


def colourbar(ax, image, label: str) -> None:
    """A colour scale beside the panel whose label stays inside the figure (saved without cropping)."""
    bar = ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03, format=FormatStrFormatter("%.2g"))
    bar.set_label(label, fontsize=8)  # no offset text ('1e-5') above the bar, where it hits the title
    bar.ax.tick_params(labelsize=7)
