"""Output locations checked before any work, and files written with the permissions the umask asks for.

Every command that writes calls :func:`check_output_dir` or :func:`check_output_file` on its ``--out``
before it loads a model or computes anything, so a path it cannot use fails in one line (what is wrong, and
the fix) instead of after the work, and nothing already there is replaced without ``--overwrite``.

safetensors creates its files with mode 0600 whatever the umask; :func:`save_safetensors` writes (atomically)
and then gives the file the mode ``0666 & ~umask`` that ``open()`` would have given it, so teammates on shared
storage can read weights as they read every other file of a run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import ConfigError


class OutputPathError(ConfigError):
    """An output location cannot be used (a file where a folder goes, read-only, or already there)."""


def umask() -> int:
    """The process umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | Path) -> None:
    """Give ``path`` the mode a plain ``open()`` would have: ``0666 & ~umask`` (files written by libraries
    that create them 0600, such as safetensors)."""
    os.chmod(path, 0o666 & ~umask())


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` written atomically (temporary file, then rename) with umask permissions."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    apply_umask(tmp)
    tmp.replace(path)
    return path


def _nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable(path: Path, flag: str) -> None:
    """Raise OutputPathError unless a folder or file can be created at ``path`` (which may not exist yet)."""
    base = _nearest_existing(path)
    if not base.is_dir():
        raise OutputPathError(
            f"{flag} {path}: {base} is a file, not a folder; remove it or choose another {flag} path"
        )
    try:  # os.access is not enough: it says yes to root on read-only mounts and ignores ACLs
        fd, probe = tempfile.mkstemp(dir=base, prefix=".parauni-write-check-")
    except OSError as err:
        raise OutputPathError(
            f"{flag} {path}: cannot write in {base} ({err.strerror or err}); choose a folder you can write to"
        ) from err
    os.close(fd)
    os.unlink(probe)


def check_output_dir(
    path: str | Path, flag: str = "--out", *, overwrite: bool = False, resumable: bool = False
) -> Path:
    """Check that the output folder ``path`` can be created or written, before any work.

    Args:
        path: the folder (it may not exist yet).
        flag: the command-line flag that named it (for the message).
        overwrite: the user allows replacing what the folder holds.
        resumable: an existing non-empty folder is fine (the command continues or adds to what is there,
            and checks its own files); otherwise a non-empty folder needs ``overwrite``.

    Returns:
        ``path`` as a Path. Raises :class:`OutputPathError` (one line: what is wrong and the fix).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(
            f"{flag} {path} is an existing file, not a folder; choose a folder path (or remove the file)"
        )
    if path.is_dir() and any(path.iterdir()) and not resumable and not overwrite:
        raise OutputPathError(
            f"{flag} {path} already holds files; pass --overwrite to replace them or choose an empty folder"
        )
    _check_creatable(path / ".probe" if path.is_dir() else path, flag)
    return path


def check_output_file(path: str | Path, flag: str = "--out", *, overwrite: bool = False) -> Path:
    """Check that the file ``path`` can be written (its folder created), before any work.

    An existing file needs ``overwrite``; an existing folder at ``path`` is always refused.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{flag} {path} is a folder; give a file path (e.g. {path / 'out.json'})")
    if path.exists() and not overwrite:
        raise OutputPathError(
            f"{flag} {path} already exists; pass --overwrite to replace it or choose another file name"
        )
    _check_creatable(path.parent, flag)
    return path


def read_lines(path: str | Path, flag: str) -> list[str]:
    """The lines of a UTF-8 text file; a ConfigError naming the file (and the line) for anything unreadable.

    Args:
        path: the file.
        flag: the command-line flag that named it (for the message), e.g. ``--prompts-file``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{flag} {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    lines = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            lines.append(raw.decode("utf-8").removeprefix("\ufeff") if number == 1 else raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"{path}, line {number}: byte {raw[err.start]:#04x} at column {err.start + 1} is not UTF-8; "
                "save the file as UTF-8"
            ) from err
    return lines


def read_json(path: str | Path, what: str = "file"):
    """A JSON file's value; a ConfigError naming the file, the line and the column for anything unreadable.

    Args:
        path: the file.
        what: what it is, for the message (e.g. ``"checkpoint state"``).
    """
    import json

    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {err.start}); it is damaged") from err
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{what} {path}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}); it is damaged"
        ) from err


def drop_machine_paths(folder: str | Path) -> None:
    """Remove ``_name_or_path`` (the absolute folder a component was loaded from on the training machine) from
    every Hugging Face ``config.json`` below ``folder``: a saved folder names nothing of the machine it was
    written on."""
    for path in Path(folder).rglob("config.json"):
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue  # not a Hugging Face config: left as it is
        if isinstance(data, dict) and "_name_or_path" in data:
            del data["_name_or_path"]
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
