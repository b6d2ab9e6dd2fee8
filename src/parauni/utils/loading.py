"""Loading Hugging Face weights from a local folder or a hub id, with errors that say what to do.

Nothing is downloaded when the machine is offline (``HF_HUB_OFFLINE=1``): an id must be in the Hugging Face
cache, a folder must exist. Every component loader of the project (VLM, DiT, VAE, reward models, detectors,
answerers) goes through `load_pretrained`, so a missing weight is always answered the same way: the
component, where it was looked for, and the repository to download.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import WeightsError


def is_local(source: str | Path) -> bool:
    """Whether `source` means a local folder: a ``Path``, something on disk, or a string that starts like a
    path ("/", ".", "~") or has more than one "/". Anything else ("name", "owner/name") is a Hugging Face id."""
    text = str(source)
    return (
        isinstance(source, Path)
        or Path(text).expanduser().exists()
        or text.startswith(("/", ".", "~"))
        or text.count("/") > 1
    )


def checked_source(
    source: str | Path, what: str, repo: str | None = None, error: type[Exception] = WeightsError
) -> str:
    """`source` as the string ``from_pretrained`` takes; a local folder that does not exist raises `error`.

    `repo`: the Hugging Face repository the weights usually come from (named in the message).
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return str(path)
    if is_local(source):
        fix = (
            f"put a copy of the Hugging Face repo {repo} there (e.g. `hf download {repo} --local-dir {path}`) "
            f"or pass the id {repo!r}"
            if repo
            else "check the path"
        )
        raise error(f"{what}: local folder {path} does not exist; {fix}")
    return text


def load_pretrained(
    loader: Callable,
    source: str | Path,
    what: str,
    repo: str | None = None,
    error: type[Exception] = WeightsError,
    **kwargs,
):
    """``loader(source, **kwargs)`` (a ``from_pretrained``), turning any failure into `error` with the fix."""
    where = checked_source(source, what, repo, error)
    try:
        return loader(where, **kwargs)
    except Exception as err:  # hub, file-format and config errors alike: name the source and the fix
        if Path(where).exists():
            hint = f"the folder {where} exists but is incomplete or of another model type"
        else:
            hint = (
                f"{where!r} is neither a local folder nor in the Hugging Face cache (this machine may be offline); "
                f"download it first (`hf download {where}`) or give a local folder"
            )
            if repo and repo != where:
                hint += f" (the usual repo: {repo})"
        raise error(f"could not load the {what} from {where!r}: {hint}. Cause: {err}") from err
