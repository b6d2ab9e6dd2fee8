"""The device commands and the world's training run on."""

from __future__ import annotations

import os

import torch


def default_device() -> str:
    """``$PARAUNI_DEVICE`` if set (e.g. ``cuda:1``, ``cpu``), else ``cuda`` when a GPU is visible, else ``cpu``."""
    return os.environ.get("PARAUNI_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
