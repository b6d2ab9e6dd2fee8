"""``parauni serve`` without a browser: request validation, uploads, the generation helpers, model discovery."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from parauni.cli import main
from parauni.models.parauni import CONFIG_FILE
from parauni.pipeline import GenerationCancelled
from parauni.serve import (
    Gate,
    ServeError,
    ServeSettings,
    build_app,
    check_cfg,
    check_int,
    check_prompt,
    check_size,
    check_time,
    comparison_variants,
    demo_sources,
    estimate_seconds,
    last_layer_scale_fn,
    launch,
    load_served,
    max_sides,
    parse_model_spec,
    read_upload,
    reconstruct,
    text_to_image,
)
from parauni.utils.run_files import RL_LOG

SETTINGS = ServeSettings(max_prompt_chars=20, max_steps=8, max_scale=2, max_batch=3, max_upload_bytes=4096)
SAMPLING = dict(steps=2, cfg=4.5, seed=0, height=64, width=96, settings=SETTINGS)


@pytest.mark.parametrize(
    "field, value",
    [("port", 0), ("port", 70000), ("port", "80"), ("max_steps", 0), ("max_batch", True), ("max_scale", 2.0)],
)
def test_settings_reject_bad_values(field, value):
    with pytest.raises(ServeError, match=field):
        ServeSettings(**{field: value})


def test_settings_default_to_this_machine_only():
    assert ServeSettings().host == "127.0.0.1"


def test_check_prompt():
    assert check_prompt("  a red circle ", SETTINGS) == "a red circle"
    for bad in ("", "   ", None, 3):
        with pytest.raises(ServeError, match="prompt is empty"):
            check_prompt(bad, SETTINGS)
    with pytest.raises(ServeError, match=r"21 characters; the limit is 20 \(--max-prompt-chars\)"):
        check_prompt("x" * 21, SETTINGS)


def test_check_int():
    assert check_int("steps", 4.0, 1, 8) == 4
    assert isinstance(check_int("steps", 4.0, 1, 8), int)
    with pytest.raises(ServeError, match="whole number"):
        check_int("steps", 2.5, 1, 8)
    for bad in (None, True, "4", math.nan, math.inf):
        with pytest.raises(ServeError, match="not a number"):
            check_int("steps", bad, 1, 8)
    with pytest.raises(
        ServeError, match=r"steps=9 is out of range: it must be between 1 and 8 \(--max-steps\)"
    ):
        check_int("steps", 9, 1, 8, "--max-steps")
    with pytest.raises(ServeError, match="between 1 and 8$"):  # below the range: no flag to raise
        check_int("steps", 0, 1, 8, "--max-steps")


def test_check_cfg():
    assert check_cfg(0) == 0.0 and check_cfg(4.5) == 4.5
    for bad in (-1, 21, math.nan, None):
        with pytest.raises(ServeError, match="CFG"):
            check_cfg(bad)


def test_check_size(tiny_model):
    assert tiny_model.size_multiple == 8
    assert check_size(tiny_model, 64.0, 96, SETTINGS) == (64, 96)
    with pytest.raises(
        ServeError, match="width=60 does not fit this model: sides must be multiples of 8, e.g. 56 or 64"
    ):
        check_size(tiny_model, 64, 60, SETTINGS)
    with pytest.raises(
        ServeError, match=r"height=136 is out of range.*2 x the model's sampling size; --max-scale"
    ):
        check_size(tiny_model, 136, 64, SETTINGS)
    with pytest.raises(ServeError, match="height=4 is out of range"):
        check_size(tiny_model, 4, 64, SETTINGS)


def _png(path: Path, size=(40, 30)) -> Path:
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def test_read_upload(tmp_path):
    assert read_upload(_png(tmp_path / "ok.png"), SETTINGS).size == (40, 30)
    fake = tmp_path / "notes.png"
    fake.write_text("this is a text file, not a picture")
    with pytest.raises(ServeError, match="the upload notes.png is not an image that can be read"):
        read_upload(fake, SETTINGS)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(5000))
    with pytest.raises(
        ServeError, match=r"big.png has 5,004 bytes; the limit is 4,096 \(--max-upload-bytes\)"
    ):
        read_upload(big, SETTINGS)
    with pytest.raises(ServeError, match="no image uploaded"):
        read_upload(None, SETTINGS)
    with pytest.raises(ServeError, match="gone.png is gone"):
        read_upload(tmp_path / "gone.png", SETTINGS)


def test_text_to_image_sizes_batch_and_seeds(tiny_model):
    images = text_to_image(tiny_model, "a red circle", batch=2, **SAMPLING)
    assert [im.size for im in images] == [(96, 64), (96, 64)]
    # image i uses seed + i: the second image of seed 0 is the first of seed 1
    again = text_to_image(tiny_model, "a red circle", batch=1, **{**SAMPLING, "seed": 1})
    assert list(images[1].getdata()) == list(again[0].getdata())
    with pytest.raises(ServeError, match=r"batch=4 is out of range.*\(--max-batch\)"):
        text_to_image(tiny_model, "a red circle", batch=4, **SAMPLING)
    with pytest.raises(ServeError, match=r"steps=9 is out of range.*\(--max-steps\)"):
        text_to_image(tiny_model, "a red circle", batch=1, **{**SAMPLING, "steps": 9})


def test_last_layer_mask_is_the_deepest_layer_alone(tiny_model):
    batch = tiny_model.encode_prompts(["a red circle", "two blue squares"])
    per_layer = tiny_model.per_layer_conditions(batch)  # (B, L_sel, Q, C)
    deepest = tiny_model.lim.layers.index(max(tiny_model.lim.layers))
    masked = tiny_model.lim.aggregate(per_layer, last_layer_scale_fn(tiny_model)(per_layer))
    torch.testing.assert_close(masked, per_layer[:, deepest])
    assert not torch.allclose(masked, tiny_model.lim.aggregate(per_layer, None))
    last = text_to_image(tiny_model, "a red circle", batch=1, last_layer_only=True, **SAMPLING)[0]
    every = text_to_image(tiny_model, "a red circle", batch=1, **SAMPLING)[0]
    assert list(last.getdata()) != list(every.getdata())


def test_reconstruct(tiny_model, tmp_path):
    image, out = reconstruct(tiny_model, _png(tmp_path / "in.png"), **SAMPLING)
    assert image.size == out.size == (96, 64)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"GIF? no")
    with pytest.raises(ServeError, match="not an image"):
        reconstruct(tiny_model, fake, **SAMPLING)


def test_parse_model_spec():
    assert parse_model_spec("runs/stage2") == ("stage2", "runs/stage2")
    assert parse_model_spec("base=runs/stage2") == ("base", "runs/stage2")
    assert parse_model_spec("tiny") == ("tiny", "tiny")
    with pytest.raises(ServeError, match="--model is empty"):
        parse_model_spec("")


def _model_folder(path: Path, rl: bool = False) -> str:
    path.mkdir(parents=True)
    (path / CONFIG_FILE).write_text("name: x\n")
    if rl:
        (path / RL_LOG).write_text("{}\n")
    return str(path)


def test_demo_sources(tmp_path):
    with pytest.raises(ServeError, match="run `parauni demo` first or pass --model DIR"):
        demo_sources(tmp_path)
    _model_folder(tmp_path / "stage2")
    assert demo_sources(tmp_path) == {"Stage II": str(tmp_path / "stage2")}
    _model_folder(tmp_path / "stage3", rl=True)
    assert list(demo_sources(tmp_path)) == ["Stage III", "Stage II"]  # after RL first: the default model


def test_comparison_masks_the_all_layer_model_before_rl(tiny_model, tmp_path):
    sources = {
        "Stage III": _model_folder(tmp_path / "s3", rl=True),
        "Stage II": _model_folder(tmp_path / "s2"),
    }
    variants, note = comparison_variants({"Stage III": tiny_model, "Stage II": tiny_model}, sources)
    assert [(v.label, v.model, v.last_layer_only) for v in variants] == [
        ("Stage II: last layer only (LIM mask)", "Stage II", True),
        ("Stage II: all 4 layers", "Stage II", False),
        ("Stage III: all 4 layers, after RL", "Stage III", False),
    ]
    assert "No last-layer model is served" in note and "VLM layer (3)" in note and "after RL" in note


def test_comparison_uses_a_trained_last_layer_model(tiny_model, make_tiny, tmp_path):
    last = make_tiny(["lim.layers=last"]).eval()
    sources = {"openuni": _model_folder(tmp_path / "a"), "parauni": _model_folder(tmp_path / "b")}
    variants, note = comparison_variants({"parauni": tiny_model, "openuni": last}, sources)
    assert [(v.label, v.last_layer_only) for v in variants] == [
        ("openuni: last layer (trained)", False),
        ("parauni: all 4 layers", False),
    ]
    assert note == ""


def test_cli_serve_without_demo_output(tmp_path, capsys):
    assert main(["serve", "--demo-dir", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert (
        "parauni serve: error: no model to serve" in err and "run `parauni demo` first or pass --model" in err
    )


def test_cli_serve_rejects_bad_settings(capsys):
    assert main(["serve", "--model", "tiny", "--max-steps", "0"]) == 2
    assert "max_steps=0 must be a positive integer" in capsys.readouterr().err


def test_cli_serve_rejects_duplicate_names(capsys):
    assert main(["serve", "--model", "tiny", "--model", "x=tiny", "--model", "x=tiny"]) == 2
    assert "model name(s) ['x'] given twice" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ sizes, time, cancel


def test_allowed_sizes_follow_the_model(tiny_model, make_tiny):
    assert max_sides(tiny_model, SETTINGS) == (128, 128)  # 2 x the tiny preset's 64 px
    assert max_sides(tiny_model, ServeSettings(max_scale=3)) == (192, 192)
    small = make_tiny(sampling={"height": 32, "width": 48})
    assert max_sides(small, SETTINGS) == (64, 96)
    with pytest.raises(ServeError, match=r"width=104 is out of range: it must be between 8 and 96"):
        check_size(small, 32, 104, SETTINGS)


def test_time_estimate_scales_with_steps_images_and_pixels(tiny_model):
    one = estimate_seconds(0.5, tiny_model, steps=1, height=64, width=64, images=1)
    assert one == pytest.approx(0.5)
    assert estimate_seconds(0.5, tiny_model, steps=10, height=128, width=64, images=3) == pytest.approx(30.0)
    assert check_time(119.0, ServeSettings()) == 119.0
    with pytest.raises(
        ServeError, match=r"about 121 s on this machine; the limit is 120 s \(--max-seconds\)"
    ):
        check_time(121.0, ServeSettings())


def test_gate_announces_long_requests_and_refuses_longer_ones(tiny_model):
    gate = Gate(ServeSettings(max_steps=50, notice_seconds=10, max_seconds=100))
    gate.timings.one_step[id(tiny_model)] = 1.0  # as if a one-step generation took 1 s here
    assert gate.admit(tiny_model, 5, 64, 64, images=1) is None
    assert (
        gate.admit(tiny_model, 20, 64, 64, images=1) == "about 20 s on this machine; working (Stop cancels)"
    )
    with pytest.raises(ServeError, match="about 160 s"):
        gate.admit(tiny_model, 20, 128, 128, images=2)


def test_timings_measure_a_one_step_generation_once(tiny_model):
    gate = Gate(ServeSettings())
    first = gate.timings(tiny_model)
    assert 0 < first < 60 and gate.timings(tiny_model) == first


def test_a_set_cancel_event_stops_the_generation(tiny_model):
    gate = Gate(ServeSettings())
    gate.cancel.set()
    with pytest.raises(GenerationCancelled):
        text_to_image(tiny_model, "a red circle", batch=1, cancel=gate.cancel, **SAMPLING)


def test_a_stop_cancels_only_the_callers_own_generation(tiny_model):
    """Issue 27, item 8: the Stop of another browser session (another Gradio session hash) leaves the running
    generation alone; the Stop of the session that started it cancels it."""
    from types import SimpleNamespace

    from parauni.serve import _stop_own

    gate = Gate(ServeSettings())
    gate.admit(tiny_model, 2, 64, 64, images=1, session="mine")
    stop = _stop_own(gate)
    stop(SimpleNamespace(session_hash="someone else"))
    stop(None)
    assert not gate.cancel.is_set() and gate.owner == "mine"
    stop(SimpleNamespace(session_hash="mine"))
    assert gate.cancel.is_set()
    with pytest.raises(GenerationCancelled):
        text_to_image(tiny_model, "a red circle", batch=1, cancel=gate.cancel, **SAMPLING)


def test_the_app_refuses_an_oversized_request(tiny_model, tmp_path):
    """A 1024x1024 request to a model trained at 64 px, sent over HTTP, is refused in the status box."""
    pytest.importorskip("gradio", reason="parauni serve needs Gradio: pip install -e '.[serve]'")
    from gradio_client import Client

    folder = tmp_path / "tiny"
    tiny_model.save_pretrained(folder)
    settings = ServeSettings(port=_free_port(), max_steps=8)
    app = build_app(load_served([f"tiny={folder}"], []), settings)
    launch(app, settings, block=False)
    try:
        client = Client(f"http://127.0.0.1:{settings.port}/", verbose=False)
        gallery, status = client.predict("tiny", "a red circle", 2, 4.5, 0, 1024, 1024, 1, api_name="/t2i")
        assert gallery == []
        assert status == (
            "Error: height=1024 is out of range: it must be between 8 and 128 "
            "(2 x the model's sampling size; --max-scale)"
        )
        gallery, status = client.predict("tiny", "a red circle", 2, 4.5, 0, 64, 64, 1, api_name="/t2i")
        assert status == "1 image(s) from tiny" and len(gallery) == 1
    finally:
        app.close()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
