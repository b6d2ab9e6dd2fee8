"""The public API of ``import parauni`` (issue 16): the README's Python example, and a light import."""

from __future__ import annotations

import subprocess
import sys

import parauni


def test_import_parauni_does_not_load_torch():
    code = "import sys, parauni; assert 'torch' not in sys.modules, 'import parauni loaded torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_readme_example_runs(tmp_path):
    model = parauni.ParaUni.load("tiny")  # a preset: random weights
    images = parauni.generate(model, ["a red circle left of a blue square"], steps=2, seed=0, progress=False)
    assert images.shape[0] == 1 and images.shape[1] == 3
    parauni.tensor_to_pil(images[0]).save(tmp_path / "x.png")
    assert (tmp_path / "x.png").is_file()


def test_every_public_name_resolves():
    for name in parauni.__all__:
        assert getattr(parauni, name) is not None
    assert issubclass(parauni.ParaUniError, Exception)
    assert parauni.ModelConfig().sampling.steps >= 1
