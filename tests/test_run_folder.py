"""A run folder you can trust (issue 27): a resume refuses a changed run, a finished run is not shortened, an
--overwrite leaves nothing of the old run, no non-finite image is written, every field is checked where it is
parsed, model folders stand alone or say what they need."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_own_data import _digits_folder

from parauni.cli import main

RUN = ["--train.batch_size=4", "--train.warmup=1", "--train.log_every=1", "--train.save_every=2", "--quiet"]


def _train(data: Path, out: Path, *extra: str, model: str = "tiny", stage: int = 1) -> int:
    argv = ["train", "--stage", str(stage), "--data", str(data), "--model", model, "--out", str(out)]
    return main([*argv, *RUN, *extra])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """Data and a finished 5-step Stage-I run (checkpoints at steps 2 and 4)."""
    root = tmp_path_factory.mktemp("finished")
    data = _digits_folder(root / "data")
    assert _train(data, root / "run", "--train.steps=5") == 0
    return data, root / "run"


def _killed_copy(run: Path, to: Path) -> Path:
    """``run`` as if killed after its step-4 checkpoint (no model written yet)."""
    import shutil

    shutil.copytree(run, to)
    for name in ("model.safetensors", "config.yaml", "run.json"):
        (to / name).unlink()
    return to


# ------------------------------------------------------------------------------- item 1: resume checks the run
@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("--seed=5", "seed was 0, now 5"),
        ("--lim.num_queries=4", "lim.num_queries was 8, now 4"),
        ("--train.batch_size=8", "train.batch_size was 4, now 8"),
        ("--train.seed=3", "train.seed was 0, now 3"),
        ("--train.weight_decay=0.1", "train.weight_decay was 0.05, now 0.1"),
        ("data", "data.captions_sha256 was"),
    ],
)
def test_a_resume_refuses_a_changed_model_data_or_optimizer(finished, tmp_path, capsys, change, says):
    data, run = finished
    killed = _killed_copy(run, tmp_path / "killed")
    if change == "data":
        other = _digits_folder(tmp_path / "other")
        (other / "03.txt").write_text("another caption")
        data, change = other, "--train.steps=5"
    capsys.readouterr()
    assert _train(data, killed, "--train.steps=5", change, "--resume") == 2
    err = _error(capsys)
    assert says in err and "--overwrite or another --out" in err
    assert not (killed / "model.safetensors").exists()


def test_a_resume_may_change_the_length_and_the_log_interval(finished, tmp_path, capsys):
    data, run = finished
    killed = _killed_copy(run, tmp_path / "killed")
    assert _train(data, killed, "--train.steps=6", "--train.log_every=2", "--resume") == 0
    assert "steps 4-6 of 6" in capsys.readouterr().out


# ----------------------------------------------------------------- item 3: a finished run is not shortened
@pytest.mark.parametrize("steps", [1, 3, 5])
def test_resuming_a_finished_run_with_no_more_steps_is_refused(finished, tmp_path, capsys, steps):
    data, run = finished
    import shutil

    copy = shutil.copytree(run, tmp_path / "run")
    model, log = (copy / "model.safetensors").read_bytes(), (copy / "train_log.jsonl").read_text()
    capsys.readouterr()
    assert _train(data, copy, f"--train.steps={steps}", "--resume") == 2
    assert "finished at step 5" in _error(capsys)
    assert (copy / "model.safetensors").read_bytes() == model
    assert (copy / "train_log.jsonl").read_text() == log


# ------------------------------------------------------------ item 5: --overwrite leaves nothing of the old run
class Killed(Exception):
    """Stands for a SIGKILL of the new run, after --overwrite was handled and before it saved anything."""


def test_a_killed_overwrite_leaves_no_old_model(tmp_path, capsys, monkeypatch):
    data = _digits_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert _train(data, run, "--train.steps=3", "--train.ema=0.5") == 0
    assert (run / "raw_trainable.safetensors").is_file() and (run / "model.safetensors").is_file()
    (run / "notes.txt").write_text("the user's own file")

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr("parauni.training.trainer.train", killed)
    with pytest.raises(Killed):
        _train(data, run, "--train.steps=3", "--overwrite")
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["generate", "--model", str(run), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    assert "config.yaml" in _error(capsys)
    assert _train(data, run, "--train.steps=3", "--overwrite") == 0  # an EMA run overwritten without EMA
    assert not (run / "raw_trainable.safetensors").exists()


# ------------------------------------------------------------------ item 4: no non-finite image is written
def test_a_non_finite_sample_is_an_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "x.png"
    argv = [
        "generate",
        "--model",
        "tiny",
        "--prompt",
        "a red circle",
        "--out",
        str(out),
        "--steps",
        "2",
        "--quiet",
    ]
    assert main([*argv, "--cfg", "1e30"]) == 2
    err = _error(capsys)
    assert "not finite" in err and "cfg=1e+30" in err and "--cfg" in err
    assert not out.exists()


def test_the_run_record_holds_no_absolute_path(finished):
    _, run = finished
    record = json.loads((run / "run.json").read_text())
    assert record["steps"] == 5 and record["command"].startswith(("parauni ", "pytest ", "__main__.py "))
    assert str(run.parent) not in (run / "run.json").read_text()


# ------------------------------------------------------------- item 7: every field checked where it is parsed
@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ("--train.seed=-1", "train.seed=-1 must be an integer from 0 to"),
        ("--train.seed=100000000000000000000000", "must be an integer from 0 to 4294967295"),
        ("--train.save_every=-1", "train.save_every=-1 must be >= 0"),
        ("--train.keep_last=-2", "train.keep_last=-2 must be >= 0"),
        ("--train.warmup=-5", "train.warmup=-5 must be >= 0"),
        ("--train.weight_decay=-0.1", "train.weight_decay=-0.1 must be >= 0"),
    ],
)
def test_bad_training_settings_are_one_line_before_any_work(tmp_path, capsys, setting, says):
    data = _digits_folder(tmp_path / "data")
    assert _train(data, tmp_path / "run", "--train.steps=2", setting) == 2
    assert says in _error(capsys)
    assert not (tmp_path / "run").exists()  # nothing half-made that would need --overwrite


def test_a_huge_generate_seed_and_a_non_text_prompt_are_one_line(tmp_path, capsys):
    argv = ["generate", "--model", "tiny", "--out", str(tmp_path / "o") + "/", "--steps", "2", "--quiet"]
    assert main([*argv, "--prompt", "a", "--seed", "99999999999999999999999"]) == 2
    assert "--seed 99999999999999999999999 must be an integer from 0 to" in _error(capsys)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": 5}\n')
    assert main([*argv, "--prompts-file", str(prompts)]) == 2
    assert f"{prompts}:2: 'prompt' is 5, not text" in _error(capsys)


def test_world_pretrain_into_a_file_is_one_line(tmp_path, capsys):
    out = tmp_path / "afile"
    out.write_text("x")
    assert main(["world", "pretrain", "--out", str(out)]) == 2
    assert "is an existing file, not a folder" in _error(capsys)


@pytest.mark.parametrize("text", ["{bad json", "{}", '{"files": {"a": 1}}'])
def test_a_broken_stage0_manifest_names_the_file(tmp_path, text):
    from parauni.world.release import ReleaseError, verify_release

    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ReleaseError, match="is not a Stage-0 release manifest"):
        verify_release(tmp_path)


def test_a_truncated_checkpoint_without_manifest_falls_back_naming_the_file(finished, tmp_path, capsys):
    data, run = finished
    killed = _killed_copy(run, tmp_path / "killed")
    newest = killed / "checkpoints" / "step_0000004"
    (newest / "manifest.json").unlink()  # as written before checkpoints had manifests
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    assert _train(data, killed, "--train.steps=5", "--resume") == 0
    out = capsys.readouterr().out
    assert f"{weights} cannot be read (truncated or damaged" in out and "at step 2" in out


# ---------------------------------------------------- item 2: a model folder stands alone or says what it needs
def test_a_stage2_folder_pins_its_base_and_can_stand_alone(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = _digits_folder(Path("data"))
    assert _train(data, Path("runs/base"), "--train.steps=2") == 0
    assert _train(data, Path("runs/s2"), "--train.steps=2", model="runs/base", stage=2) == 0
    assert (
        _train(data, Path("runs/alone"), "--train.steps=2", "--self-contained", model="runs/base", stage=2)
        == 0
    )
    saved = [
        p for p in Path("runs").rglob("*") if p.is_file() and p.suffix in (".json", ".yaml", ".md", ".jsonl")
    ]
    assert not [p for p in saved if str(tmp_path) in p.read_text()]  # no absolute path of this machine
    card = Path("runs/s2/README.md").read_text()
    assert "# ParaUni Stage 2 model" in card and "`../base/vlm`" in card and "| steps | 2 |" in card
    generate = ["generate", "--prompt", "a red circle", "--steps", "2", "--quiet", "--out"]
    assert main([*generate, "before.png", "--model", "runs/s2"]) == 0
    capsys.readouterr()
    assert _train(data, Path("runs/base"), "--train.steps=2", "--overwrite", "--seed=7") == 0
    assert main([*generate, "after.png", "--model", "runs/s2"]) == 2
    assert "runs/s2/../base/vlm/model.safetensors has changed since" in _error(capsys)
    Path("runs/base").rename("moved")
    assert main([*generate, "after.png", "--model", "runs/s2"]) == 2
    assert "config.json is missing" in _error(capsys)
    assert main([*generate, "alone.png", "--model", "runs/alone"]) == 0  # copied in: stands alone


# -------------------------------------------- item 6: a damaged model folder is one line before anything is built
@pytest.mark.parametrize(("damage", "says"), [("vlm/config.json", "vlm/config.json (the vlm's config) is missing"),
                                              ("vlm", "its vlm folder"), ("vae/diffusion_pytorch_model.safetensors",
                                              "holds no weights file")])  # fmt: skip
def test_a_missing_part_of_a_model_folder_is_named_before_any_build(
    finished, tmp_path, capsys, monkeypatch, damage, says
):
    import shutil

    from parauni.models.parauni import ParaUni

    _, run = finished
    folder = shutil.copytree(run, tmp_path / "model")
    target = folder / damage
    shutil.rmtree(target) if target.is_dir() else target.unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the folder was checked")

    monkeypatch.setattr(ParaUni, "from_config", refuse)
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    err = _error(capsys)
    assert says in err and "hf download" not in err
