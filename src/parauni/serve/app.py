"""The page of ``parauni serve``: three Gradio tabs (text to image, image to image, last layer vs all layers)
sharing one queue slot, the gate every request passes (time estimate, Stop), and the launch."""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .models import Served, reconstruct, text_to_image
from .requests import (
    MAX_CFG,
    ServeError,
    ServeSettings,
    Timings,
    check_int,
    check_prompt,
    check_size,
    check_time,
    estimate_seconds,
    max_sides,
    read_upload,
)

if TYPE_CHECKING:
    import gradio as gr

    from ..models.parauni import ParaUni

log = logging.getLogger(__name__)

PAGE_CSS = ".pixelated img { image-rendering: pixelated; }"  # small images (the world's 32 px) stay sharp
QUEUE_ID = "generation"  # the one concurrency slot every tab's generation waits for


# ------------------------------------------------------------------------------------------------- pages
def _answer(fn: Callable[..., Iterator[tuple]]) -> Callable[..., Iterator[tuple]]:
    """Run a handler (a generator of (gallery, status) updates); a refused request becomes (empty gallery,
    'Error: ...') in the status box, a cancelled one 'Cancelled.'."""
    from ..pipeline import GenerationCancelled

    def run(request, *args):
        try:
            yield from fn(getattr(request, "session_hash", None), *args)
        except GenerationCancelled:
            yield [], "Cancelled."
        except ValueError as err:  # ServeError, ImageReadError and the pipeline's own checks
            log.info("refused request: %s", err)
            yield [], f"Error: {err}"

    run.__annotations__ = {"request": _request_type()}  # Gradio passes the caller's gr.Request first
    return run


def _request_type() -> type:
    import gradio as gr

    return gr.Request


def _stop_own(gate: Gate) -> Callable:
    """The Stop button's handler: cancels the caller's own running generation, never another client's."""

    def stop(request) -> None:
        gate.stop(getattr(request, "session_hash", None))

    stop.__annotations__ = {"request": _request_type(), "return": None}
    return stop


@dataclass
class Gate:
    """What every request passes before it runs: its time estimate (refused over --max-seconds, announced
    over --notice-seconds), and the cancel flag of the running generation (one runs at a time), which only the
    client that started it can set (:meth:`stop`: a Stop from another browser session does nothing)."""

    settings: ServeSettings
    timings: Timings = field(default_factory=Timings)
    cancel: threading.Event = field(default_factory=threading.Event)
    owner: str | None = None  # the session (Gradio's session hash) of the running generation

    def admit(
        self,
        model: ParaUni,
        steps: object,
        height: object,
        width: object,
        images: int,
        session: str | None = None,
    ) -> str | None:
        """Check the request's time and make ``session`` the owner of the next generation; the announcement to
        show before it starts, or None when it is short."""
        steps = check_int("steps", steps, 1, self.settings.max_steps, "--max-steps")
        height, width = check_size(model, height, width, self.settings)
        seconds = check_time(
            estimate_seconds(self.timings(model), model, steps, height, width, images), self.settings
        )
        self.owner = session
        self.cancel.clear()
        if seconds > self.settings.notice_seconds:
            return f"about {seconds:.0f} s on this machine; working (Stop cancels)"
        return None

    def stop(self, session: str | None) -> bool:
        """The Stop button of ``session``: cancel the running generation if that session started it."""
        if session is None or session != self.owner:
            return False
        self.cancel.set()
        return True


class _Page:
    """The parts of the page: each tab's inputs and outputs, and its handler (a generator of (gallery,
    status) updates, run by :func:`_answer`)."""

    def __init__(self, gr, served: Served, settings: ServeSettings) -> None:
        self.gr, self.served, self.settings = gr, served, settings
        self.gate = Gate(settings)
        self.first = next(iter(served.models.values()))
        self.names = list(served.models)

    def sampling_controls(self, prefix: str, with_batch: bool) -> list:
        """steps, CFG, seed, height, width (and batch) inputs, with the first model's defaults."""
        gr, settings, s, step = self.gr, self.settings, self.first.config.sampling, self.first.size_multiple
        with gr.Row():
            steps = gr.Slider(
                1, settings.max_steps, value=min(s.steps, settings.max_steps), step=1, label="steps"
            )
            cfg = gr.Slider(0, MAX_CFG, value=s.cfg, step=0.5, label="CFG scale")
            seed = gr.Number(value=0, precision=0, label="seed", elem_id=f"{prefix}-seed")
        with gr.Row():
            sides = [
                gr.Number(
                    value=v,
                    precision=0,
                    step=step,
                    label=f"{n} (multiple of {step}, at most {hi})",
                    elem_id=f"{prefix}-{n}",
                )
                for n, v, hi in zip(
                    ("height", "width"), (s.height, s.width), max_sides(self.first, settings), strict=True
                )
            ]
            controls = [steps, cfg, seed, *sides]
            if with_batch:
                controls.append(gr.Slider(1, settings.max_batch, value=1, step=1, label="batch"))
        return controls

    def results(self, prefix: str, label: str, button_text: str, columns: int) -> tuple:
        """The run button, the stop button, the status box and the PNG gallery of one tab."""
        gr = self.gr
        with gr.Row():
            button = gr.Button(button_text, variant="primary", elem_id=f"{prefix}-generate")
            stop = gr.Button("Stop", variant="stop", elem_id=f"{prefix}-stop")
        # not queued: it must reach the server while a generation holds the one queue slot
        stop.click(_stop_own(self.gate), None, None, queue=False)
        status = gr.Textbox(label="status", interactive=False, elem_id=f"{prefix}-status")
        gallery = gr.Gallery(
            label=label,
            format="png",
            columns=columns,
            fit_columns=False,
            preview=False,
            object_fit="contain",
            elem_id=f"{prefix}-gallery",
            elem_classes="pixelated",
        )
        return button, status, gallery

    def t2i(self, session, name, prompt, steps, cfg, seed, height, width, batch):
        settings, model = self.settings, self.served.models[name]
        batch = check_int("batch", batch, 1, settings.max_batch, "--max-batch")
        check_prompt(prompt, settings)
        notice = self.gate.admit(model, steps, height, width, images=batch, session=session)
        if notice:
            yield [], notice
        sampling = dict(steps=steps, cfg=cfg, seed=seed, height=height, width=width, settings=settings)
        images = text_to_image(model, prompt, batch=batch, cancel=self.gate.cancel, **sampling)
        captions = [f"seed {int(seed) + i}" for i in range(len(images))]
        yield list(zip(images, captions, strict=True)), f"{len(images)} image(s) from {name}"

    def i2i(self, session, name, upload, steps, cfg, seed, height, width):
        settings, model = self.settings, self.served.models[name]
        read_upload(upload, settings)
        notice = self.gate.admit(model, steps, height, width, images=1, session=session)
        if notice:
            yield [], notice
        sampling = dict(steps=steps, cfg=cfg, seed=seed, height=height, width=width, settings=settings)
        image, out = reconstruct(model, upload, cancel=self.gate.cancel, **sampling)
        yield [(image, "input"), (out, f"reconstruction by {name}")], f"reconstructed by {name}"

    def compare(self, session, prompt, steps, cfg, seed, height, width):
        served = self.served
        check_prompt(prompt, self.settings)
        notices = [
            self.gate.admit(served.models[v.model], steps, height, width, images=1, session=session)
            for v in served.variants
        ]
        if any(notices):
            yield [], f"{len(served.variants)} columns, each " + next(n for n in notices if n)
        sampling = dict(steps=steps, cfg=cfg, seed=seed, height=height, width=width, settings=self.settings)
        images = [
            (
                text_to_image(
                    served.models[v.model],
                    prompt,
                    batch=1,
                    last_layer_only=v.last_layer_only,
                    cancel=self.gate.cancel,
                    **sampling,
                )[0],
                v.label,
            )
            for v in served.variants
        ]
        yield images, f"{len(images)} columns, seed {int(seed)}"

    def t2i_tab(self) -> None:
        gr, names = self.gr, self.names
        model = gr.Dropdown(names, value=names[0], label="model")
        prompt = gr.Textbox(
            label="prompt",
            placeholder="a photo of a red circle left of a blue square",
            max_length=self.settings.max_prompt_chars,
            elem_id="t2i-prompt",
        )
        controls = self.sampling_controls("t2i", with_batch=True)
        button, status, gallery = self.results("t2i", "images", "Generate", columns=4)
        for trigger, api in ((button.click, "t2i"), (prompt.submit, False)):
            trigger(
                _answer(self.t2i),
                [model, prompt, *controls],
                [gallery, status],
                concurrency_id=QUEUE_ID,
                api_name=api,
            )

    def i2i_tab(self) -> None:
        from ..training.data import IMAGE_SUFFIXES

        gr, names = self.gr, self.names
        gr.Markdown(
            'The VLM reads the uploaded image with the instruction "Keep the image as it is." and the DiT '
            f"regenerates it (PNG, JPEG, WebP or BMP, at most {self.settings.max_upload_bytes:,} bytes)."
        )
        model = gr.Dropdown(names, value=names[0], label="model")
        upload = gr.File(
            label="image", file_types=list(IMAGE_SUFFIXES), type="filepath", elem_id="i2i-upload"
        )
        controls = self.sampling_controls("i2i", with_batch=False)
        button, status, gallery = self.results("i2i", "input and reconstruction", "Reconstruct", columns=2)
        button.click(
            _answer(self.i2i), [model, upload, *controls], [gallery, status], concurrency_id=QUEUE_ID
        )

    def compare_tab(self) -> None:
        gr, variants = self.gr, self.served.variants
        columns = ", ".join(f"**{v.label}**" for v in variants)
        gr.Markdown(f"The same prompt and seed through each column: {columns}.\n\n{self.served.note}")
        prompt = gr.Textbox(label="prompt", max_length=self.settings.max_prompt_chars, elem_id="cmp-prompt")
        controls = self.sampling_controls("cmp", with_batch=False)
        button, status, gallery = self.results("cmp", "comparison", "Compare", columns=len(variants))
        for trigger in (button.click, prompt.submit):
            trigger(_answer(self.compare), [prompt, *controls], [gallery, status], concurrency_id=QUEUE_ID)


def build_app(served: Served, settings: ServeSettings) -> gr.Blocks:
    """The three-tab Gradio page for ``served`` under ``settings`` (not launched; see :func:`launch`), with no
    telemetry or version check (api.gradio.app)."""
    try:
        import gradio as gr
    except ImportError as err:
        raise ServeError("parauni serve needs Gradio: pip install -e '.[serve]'") from err

    page = _Page(gr, served, settings)
    models_md = "\n".join(f"* **{n}**: `{served.sources[n]}`" for n in page.names)
    with gr.Blocks(title="ParaUni", analytics_enabled=False) as app:
        gr.Markdown(
            "# ParaUni\nA frozen VLM's query features from all layers condition a SANA DiT.\n\n" + models_md
        )
        with gr.Tab("Text to image"):
            page.t2i_tab()
        with gr.Tab("Image to image"):
            page.i2i_tab()
        with gr.Tab("Last layer vs all layers"):
            page.compare_tab()
    return app


def launch(app: gr.Blocks, settings: ServeSettings, block: bool = True) -> None:
    """Queue (one generation at a time) and start the server on settings.host:settings.port, without a
    run-history page where this Gradio has one (it offers to save runs to a Hugging Face bucket).

    ``block=False`` returns once the server answers (tests); stop it with ``app.close()``.
    """
    app.queue(max_size=settings.max_queue, default_concurrency_limit=1)
    no_history = {"run_history": False} if "run_history" in inspect.signature(app.launch).parameters else {}
    app.launch(
        server_name=settings.host,
        server_port=settings.port,
        share=False,
        ssr_mode=False,  # no Node.js server beside the Python one
        max_file_size=settings.max_upload_bytes,
        show_error=True,
        css=PAGE_CSS,
        prevent_thread_lock=not block,
        quiet=not block,
        **no_history,
    )
