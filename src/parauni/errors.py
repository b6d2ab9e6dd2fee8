"""The project's own errors: what ``parauni`` answers in one line instead of a traceback.

Every check of something a user gives (a flag, a config value, a file, a folder, downloaded weights) raises a
subclass of :class:`ParaUniError` whose message names the value and the fix. The command line catches this
base class only: any other exception is a bug and keeps its traceback.

Each class also derives from the built-in exception the check raised before it had a class of its own
(``ValueError`` for bad values, ``OSError`` for unloadable weights, ``RuntimeError`` for a run that stopped),
so ``except ValueError`` in callers and ``pytest.raises(ValueError)`` in tests keep working.

Classes that belong to one place (``ReleaseError`` of a Stage-0 release, ``ServeError`` of the web app, ...)
are defined there, as subclasses of these.
"""

from __future__ import annotations


class ParaUniError(Exception):
    """A user's mistake or an unusable input; the message names it and says what to do."""


class ConfigError(ParaUniError, ValueError):
    """A value the user gave is invalid (a config key or value, a command-line flag, a prompt, an image size,
    settings that do not fit together); the message names it and the fix."""


class DataError(ParaUniError, ValueError):
    """Data (training pairs, prompts, metadata, benchmark files) cannot be used; the message says why."""


class MissingFileError(DataError, FileNotFoundError):
    """A file or folder the user named does not exist, or lacks a part it needs; the message says which."""


class ImageReadError(DataError):
    """An image file could not be read; the message names the file."""


class WeightsError(ParaUniError, OSError):
    """Weights could not be found or loaded; the message names the component, the source and the fix."""


class CheckpointError(ParaUniError, RuntimeError):
    """A checkpoint is missing, truncated or does not match the model; the message names the problem."""


class TrainingDiverged(ParaUniError, RuntimeError):
    """A training loop stopped itself (e.g. MAX_BAD_STEPS non-finite steps in a row); the message says which
    setting to change."""
