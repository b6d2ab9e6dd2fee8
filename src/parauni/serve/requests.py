"""The requests of ``parauni serve``: its settings (the limits every request is checked against), the checks of
a request's values, and the estimate of its time on this machine.

Torch and the model code are imported inside the functions that use them: ``parauni --help`` reads
:class:`ServeSettings` to list the serve flags, and should not load them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import check_cfg as config_check_cfg
from ..errors import ConfigError, ParaUniError

if TYPE_CHECKING:
    from PIL import Image

    from ..models.parauni import ParaUni
    from ..pipeline import GenerationOptions

MAX_CFG = 20.0
MAX_SEED = 2**32 - 1


class ServeError(ParaUniError, ValueError):
    """A request (or a setup) the app refuses; the message is shown to the user as is."""


@dataclass
class ServeSettings:
    """Where the app listens and the limits every request is checked against (flags of ``parauni serve``)."""

    host: str = "127.0.0.1"
    port: int = 7860
    max_prompt_chars: int = 500
    max_steps: int = 50
    max_scale: int = 2  # each side at most this multiple of the model's sampling (training) size
    max_batch: int = 4
    max_upload_bytes: int = 10_000_000
    max_queue: int = 16  # waiting requests beyond this are turned away by Gradio
    max_seconds: int = 120  # requests estimated to take longer are refused
    notice_seconds: int = 10  # requests estimated to take longer are announced before they start

    def __post_init__(self) -> None:
        for name in (
            "max_prompt_chars",
            "max_steps",
            "max_scale",
            "max_batch",
            "max_upload_bytes",
            "max_queue",
            "max_seconds",
            "notice_seconds",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ServeError(f"{name}={value!r} must be a positive integer")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ServeError(f"port={self.port!r} must be an integer in 1..65535")
        if not self.host:
            raise ServeError("host is empty; give an address such as 127.0.0.1 (this machine only)")


SETTING_FLAGS = tuple(f.name for f in dataclasses.fields(ServeSettings))
SETTING_HELP = {
    "host": "address to listen on: 127.0.0.1 is this machine only, 0.0.0.0 opens the app to the network",
    "port": "port to listen on",
    "max_prompt_chars": "longest prompt accepted, in characters",
    "max_steps": "most denoising steps a request may ask for",
    "max_scale": "largest image height / width a request may ask for, as a multiple of the model's sampling "
    "size (the size it was trained at)",
    "max_batch": "most images per text-to-image request",
    "max_upload_bytes": "largest image upload accepted, in bytes",
    "max_queue": "most requests waiting for the one generation slot; more are turned away",
    "max_seconds": "requests estimated to take longer than this many seconds on this machine are refused",
    "notice_seconds": "requests estimated to take longer than this many seconds are announced with the "
    "estimate before they start",
}


# ------------------------------------------------------------------------------------------- validation
def check_prompt(prompt: object, settings: ServeSettings) -> str:
    """The stripped prompt, or a ServeError saying what is wrong with it."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ServeError("the prompt is empty; describe the image to generate")
    prompt = prompt.strip()
    if len(prompt) > settings.max_prompt_chars:
        raise ServeError(
            f"the prompt has {len(prompt)} characters; the limit is {settings.max_prompt_chars} "
            "(--max-prompt-chars)"
        )
    return prompt


def check_int(name: str, value: object, lo: int, hi: int, flag: str = "") -> int:
    """``value`` as an int in [lo, hi] (Gradio numbers may arrive as integral floats)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ServeError(f"{name}={value!r} is not a number")
    if value != int(value):
        raise ServeError(f"{name}={value} must be a whole number")
    value = int(value)
    if not lo <= value <= hi:
        limit = f" ({flag})" if flag and value > hi else ""
        raise ServeError(f"{name}={value} is out of range: it must be between {lo} and {hi}{limit}")
    return value


def check_cfg(cfg: object) -> float:
    """The classifier-free guidance scale: the library's rule (:func:`parauni.config.check_cfg`) within the
    app's limit ``MAX_CFG``."""
    try:
        return config_check_cfg(cfg, "CFG", most=MAX_CFG)
    except ConfigError as err:
        raise ServeError(str(err)) from err


def max_sides(model: ParaUni, settings: ServeSettings) -> tuple[int, int]:
    """The largest (height, width) a request may ask of ``model``: ``--max-scale`` times its sampling size,
    rounded down to its size step."""
    m, s = model.size_multiple, model.config.sampling
    return tuple(max(m, settings.max_scale * side // m * m) for side in (s.height, s.width))


def check_size(model: ParaUni, height: object, width: object, settings: ServeSettings) -> tuple[int, int]:
    """(height, width) within :func:`max_sides` that fit the model's VAE and DiT (multiples of its size step)."""
    m = model.size_multiple
    limits = max_sides(model, settings)
    sides = [
        check_int(n, v, m, hi, f"{settings.max_scale} x the model's sampling size; --max-scale")
        for (n, v), hi in zip((("height", height), ("width", width)), limits, strict=True)
    ]
    for name, value in zip(("height", "width"), sides, strict=True):
        if value % m:
            lo = (value // m) * m
            raise ServeError(
                f"{name}={value} does not fit this model: sides must be multiples of {m}, e.g. {lo} or {lo + m}"
            )
    return sides[0], sides[1]


def checked_options(
    model: ParaUni,
    settings: ServeSettings,
    steps: object,
    cfg: object,
    seed: object,
    height: object,
    width: object,
    batch: object = 1,
) -> GenerationOptions:
    """A request's sampling values, each checked in this order (a ServeError naming the value and, where
    one applies, the limit's flag), as the options of its one ``generate`` call of ``batch`` images."""
    from ..pipeline import GenerationOptions

    steps = check_int("steps", steps, 1, settings.max_steps, "--max-steps")
    cfg = check_cfg(cfg)
    seed = check_int("seed", seed, 0, MAX_SEED)
    batch = check_int("batch", batch, 1, settings.max_batch, "--max-batch")
    height, width = check_size(model, height, width, settings)
    return GenerationOptions(seed=seed, batch_size=batch, steps=steps, cfg=cfg, height=height, width=width)


def estimate_seconds(
    one_step: float, model: ParaUni, steps: int, height: int, width: int, images: int
) -> float:
    """Seconds a request will take: ``one_step`` (a one-step generation of one image at the model's sampling
    size, timed on this machine) times steps x images x the request's pixels over the sampling size's.

    An upper estimate: the prompt encoding and decoding that a one-step timing includes are counted again
    for every step.
    """
    s = model.config.sampling
    return one_step * steps * images * (height * width) / (s.height * s.width)


def check_time(seconds: float, settings: ServeSettings) -> float:
    """``seconds`` if within --max-seconds, else a ServeError with the estimate and what to lower."""
    if seconds > settings.max_seconds:
        raise ServeError(
            f"this request would take about {seconds:.0f} s on this machine; the limit is "
            f"{settings.max_seconds} s (--max-seconds): lower the steps, the size or the batch"
        )
    return seconds


class Timings:
    """The one-step timing of each served model, measured on first use (a one-step generation of one
    image at the model's sampling size)."""

    def __init__(self) -> None:
        self.one_step: dict[int, float] = {}

    def __call__(self, model: ParaUni) -> float:
        from ..pipeline import generate

        key = id(model)
        if key not in self.one_step:
            start = time.perf_counter()
            generate(model, ["a timing run"], steps=1, batch_size=1, progress=False)
            self.one_step[key] = time.perf_counter() - start
        return self.one_step[key]


def read_upload(path: str | Path | None, settings: ServeSettings) -> Image.Image:
    """The uploaded file as an RGB image; a ServeError for no file, a file over the limit or a non-image."""
    from PIL import Image

    from ..utils.images import ImageReadError, read_image

    if path is None or not str(path):
        raise ServeError("no image uploaded; choose an image file first")
    path = Path(path)
    if not path.is_file():
        raise ServeError(f"the upload {path.name} is gone; upload the image again")
    size = path.stat().st_size
    if size > settings.max_upload_bytes:
        raise ServeError(
            f"the upload {path.name} has {size:,} bytes; the limit is {settings.max_upload_bytes:,} "
            "(--max-upload-bytes)"
        )
    try:
        return read_image(path)
    except (ImageReadError, Image.DecompressionBombError) as err:
        raise ServeError(
            f"the upload {path.name} is not an image that can be read (or it is corrupt)"
        ) from err
