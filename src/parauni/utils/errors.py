"""Errors shared by the training loops and the command line.

:class:`TrainingDiverged` is what a loop raises when it stops on its own because training went wrong in a way
the user fixes with a setting (too many non-finite steps in a row). It is a ``RuntimeError``, so code that
catches those keeps working, and ``parauni`` prints its message as one line instead of a traceback.
"""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """A training loop stopped itself (e.g. MAX_BAD_STEPS non-finite steps in a row); the message says which
    setting to change."""
