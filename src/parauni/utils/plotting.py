"""Matplotlib for writing figures to files, set up in one place."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the file-only Agg backend, chosen when a figure is first drawn rather than at
    import time (importing a module of ours never changes matplotlib's state for a program that uses it)."""
    import matplotlib  # lazy: matplotlib takes a second to import and only the figure writers need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
