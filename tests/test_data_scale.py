"""Data at scale: webdataset tar shards, local Hugging Face datasets, the resumable sharded order, corrupt
samples skipped and counted, and ``parauni extract-latents`` (split over processes, resumable) then training
on the latents."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from parauni.cli import main
from parauni.models.parauni import ParaUni
from parauni.training.data import DataError, Record
from parauni.training.latents import (
    LatentShardSource,
    encoder_key,
    extract_latents,
    finish_extraction,
    vae_encoder,
)
from parauni.training.sources import data_kind, pixel_source, training_source
from parauni.training.streaming import RecordsSource, ShardOrder
from parauni.training.tar_shards import TarShardSource, expand_braces, resolve_shards

SIZE = 64  # the tiny preset's image size (8 x 8 latents)


def _png(seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40 + seed % 7, 50, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shards(folder, shards: int = 3, per_shard: int = 4, corrupt: bool = True) -> list[str]:
    """Tar shards of ``per_shard`` samples each; with ``corrupt``, shard 0 holds an unreadable image and
    shard 1 a sample without caption. Returns the good captions."""
    folder.mkdir(parents=True, exist_ok=True)
    good = []
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                key, n = f"{s:03d}{i:03d}", s * per_shard + i
                if corrupt and (s, i) == (0, 1):
                    _add(tar, f"{key}.png", b"\x89PNG truncated")
                    _add(tar, f"{key}.txt", b"a broken image")
                elif corrupt and (s, i) == (1, 2):
                    _add(tar, f"{key}.jpg", _png(n, "JPEG"))
                elif i == 3:  # caption as JSON, image as webp, plus a member the reader ignores
                    _add(tar, f"{key}.webp", _png(n, "WEBP"))
                    _add(tar, f"{key}.json", json.dumps({"caption": f"sample {n}", "width": 50}).encode())
                    _add(tar, f"{key}.cls", b"3")
                    good.append(f"sample {n}")
                else:
                    _add(tar, f"{key}.png", _png(n))
                    _add(tar, f"{key}.txt", f"sample {n}".encode())
                    good.append(f"sample {n}")
    return good


def test_brace_and_glob_patterns(tmp_path):
    assert expand_braces("s-{0008..0010}.tar") == ["s-0008.tar", "s-0009.tar", "s-0010.tar"]
    assert expand_braces("{a,b}/x{1..2}") == ["a/x1", "a/x2", "b/x1", "b/x2"]
    _write_shards(tmp_path / "d", shards=3, corrupt=False)
    names = [p.name for p in resolve_shards(str(tmp_path / "d" / "shard-{000001..000002}.tar"))]
    assert names == ["shard-000001.tar", "shard-000002.tar"]
    assert len(resolve_shards(str(tmp_path / "d" / "*.tar"))) == len(resolve_shards(str(tmp_path / "d"))) == 3
    assert data_kind(str(tmp_path / "d")) == data_kind(str(tmp_path / "d" / "*.tar")) == "tar"
    with pytest.raises(DataError, match="2 of the 3 tar shards .* do not exist: .*shard-000003.tar"):
        resolve_shards(str(tmp_path / "d" / "shard-{000002..000004}.tar"))
    with pytest.raises(DataError, match="does not exist"):
        data_kind(str(tmp_path / "nothing"))


def test_shard_order_visits_every_sample_once_per_epoch():
    sizes = [3, 0, 5, 2, 4]
    order = ShardOrder(sizes, seed=7, shards_per_group=2)
    n = sum(sizes)
    for epoch in range(2):
        seen = [order.member(*order.locate(i)) for i in range(epoch * n, (epoch + 1) * n)]
        assert sorted(seen) == sorted((s, p) for s, k in enumerate(sizes) for p in range(k))
    first = [order.member(*order.locate(i)) for i in range(n)]
    assert first != [order.member(*order.locate(i)) for i in range(n, 2 * n)], "epochs must reshuffle"
    assert first != [ShardOrder(sizes, 8, 2).member(*ShardOrder(sizes, 8, 2).locate(i)) for i in range(n)]


def test_tar_shards_skip_and_count_corrupt_samples(tmp_path):
    good = _write_shards(tmp_path / "d")
    src = TarShardSource(tmp_path / "d", SIZE)
    assert src.sizes == [4, 4, 4] and not src.encoded
    with pytest.warns(UserWarning, match="skipped corrupt sample"):
        inputs, captions = src.examples(list(range(len(src))), seed=0)
    assert inputs.shape == (12, 3, SIZE, SIZE) and inputs.min() >= -1 and inputs.max() <= 1
    assert set(captions) == set(good), "every good sample appears in an epoch; corrupt ones are replaced"
    assert sorted(src.skipped) == ["shard-000000.tar:000001", "shard-000001.tar:001002"]
    assert "image cannot be read" in src.skipped["shard-000000.tar:000001"]
    assert "missing caption" in src.skipped["shard-000001.tar:001002"]
    src.examples(list(range(len(src), 2 * len(src))), seed=0)
    assert len(src.skipped) == 2, "a corrupt sample is counted once"
    # the per-shard counts are cached beside the shards and reused
    assert len(list((tmp_path / "d" / ".parauni_cache").glob("shards-*.json"))) == 1


def test_sharded_order_is_deterministic_across_a_resume(tmp_path):
    _write_shards(tmp_path / "d", shards=4, per_shard=3, corrupt=False)
    batch = 4

    def step(source, s):  # what the trainer asks for at step s (one process): indices s * batch + offset
        with torch.no_grad():
            return source.examples(list(range(s * batch, (s + 1) * batch)), seed=3)

    run = TarShardSource(tmp_path / "d", SIZE, shards_per_group=2)
    first = [step(run, s) for s in range(6)]  # two epochs of 12 samples
    resumed = TarShardSource(
        tmp_path / "d", SIZE, shards_per_group=2
    )  # a new process after a crash at step 4
    for s in (4, 5):
        inputs, captions = step(resumed, s)
        assert captions == first[s][1] and torch.equal(inputs, first[s][0])
    epoch0 = [c for _, caps in first[:3] for c in caps]
    epoch1 = [c for _, caps in first[3:] for c in caps]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_records_source_reads_a_folder_and_counts_unreadable_files(tmp_path):
    (tmp_path / "a.png").write_bytes(_png(0))
    (tmp_path / "b.png").write_bytes(b"not an image")
    src = RecordsSource([Record(tmp_path / "a.png", "a"), Record(tmp_path / "b.png", "b")], SIZE)
    samples = list(src.canonical(0, 2))
    assert samples[0][1] == "a" and samples[0][0].shape == (3, SIZE, SIZE)
    assert "image cannot be read" in samples[1].reason


def test_hf_dataset_folders(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    rows = {
        "picture": [{"bytes": _png(i), "path": None} for i in range(5)] + [{"bytes": b"junk", "path": None}],
        "text": ["red", "green", None, "blue", "cyan", "broken"],
        "extra": list(range(6)),
    }
    features = datasets.Features(
        {"picture": datasets.Image(), "text": datasets.Value("string"), "extra": datasets.Value("int64")}
    )
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train-0.parquet"))
    for folder in ("disk", "pq"):
        spec = str(tmp_path / folder)
        assert data_kind(spec) == "hf"
        src = pixel_source(spec, SIZE, options=_options(image_column="picture", caption_column="text"))
        assert len(src) == 6
        with pytest.warns(UserWarning, match="skipped corrupt sample"):
            inputs, captions = src.examples(list(range(6)), seed=0)
        assert inputs.shape == (6, 3, SIZE, SIZE)
        assert set(captions) == {"red", "green", "blue", "cyan"}
        assert sorted(src.skipped) == [f"{folder}[2]", f"{folder}[5]"]
    with pytest.raises(DataError, match=r"no column\(s\) \['image'\].*--image-column"):
        pixel_source(str(tmp_path / "disk"), SIZE, options=_options(caption_column="text"))


def _options(**kwargs):
    from parauni.training.sources import DataOptions

    return DataOptions(**kwargs)


def test_extract_latents_split_over_processes_resume_then_train(tmp_path, tiny_model, capsys):
    data = tmp_path / "shards"
    _write_shards(data, shards=2, per_shard=4)  # 8 samples, 2 corrupt
    source = pixel_source(str(data), SIZE)
    encode, key = vae_encoder(tiny_model.config, None)
    # the key hashes the weights the CLI's model gets too: a fresh build from the same config (the session's
    # tiny_model may have been changed in place by an earlier test)
    assert key == encoder_key(ParaUni.from_config(tiny_model.config).vae)
    options = dict(image_size=SIZE, encoder_key=key, shard_size=3, batch_size=2, progress=False)
    # two processes of `accelerate launch`, run one after the other: each writes every other shard
    split = tmp_path / "split"
    with pytest.warns(UserWarning):
        assert extract_latents(source, encode, split, rank=0, num_processes=2, **options).written == 2
    with pytest.raises(DataError, match="1 of 3 latent shards are missing"):
        finish_extraction(split)
    assert extract_latents(source, encode, split, rank=1, num_processes=2, **options).written == 1
    manifest = finish_extraction(split)
    assert manifest["sizes"] == [2, 3, 1] and len(manifest["skipped"]) == 2
    assert manifest["latent_shape"] == [8, 8, 8]

    # the CLI on one process gives the same latents; they are the model's own VAE encoding of the images
    one = tmp_path / "one"
    args = ["extract-latents", "--data", str(data), "--model", "tiny", "--out", str(one), "--quiet"]
    args += ["--batch-size", "2"]  # the batch of the split run: the same float arithmetic
    with pytest.warns(UserWarning, match="skipped corrupt sample"):
        assert main([*args, "--shard-size", "3", "--image-size", str(SIZE)]) == 0
    assert "latents of 6 samples (2 corrupt skipped)" in capsys.readouterr().out
    a, b = LatentShardSource(split), LatentShardSource(one)
    first = [s for s in source.canonical(0, 3) if isinstance(s, tuple)]
    expected = tiny_model.encode_images(torch.stack([x for x, _ in first])).detach()
    for j in range(3):
        assert torch.equal(a.read(j, list(range(a.sizes[j])))[0][0], b.read(j, list(range(b.sizes[j])))[0][0])
    got = torch.stack([x for x, _ in b.read(0, [0, 1])])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert [c for _, c in b.read(0, [0, 1])] == [c for _, c in first]

    # resume: a lost shard is written again, the others are kept; other options are refused
    (one / "shard-000001.safetensors").unlink()
    assert main([*args, "--shard-size", "3", "--image-size", str(SIZE)]) == 0
    assert "wrote 1 shard(s), 2 already done" in capsys.readouterr().out
    assert main([*args, "--shard-size", "4", "--image-size", str(SIZE)]) == 2
    assert "other options" in capsys.readouterr().err

    # a training run reads the latents folder as an encoded source (its image size from the manifest)
    assert data_kind(str(one)) == "latents"
    src = training_source(str(one), SIZE)
    assert src.encoded and src.examples([0, 5, 9], seed=0)[0].shape == (3, 8, 8, 8)
    run = tmp_path / "run"
    train = ["train", "--stage", "1", "--data", str(one), "--model", "tiny", "--out", str(run), "--quiet"]
    overrides = ["--train.steps=2", "--train.batch_size=2", "--train.warmup=1", "--train.log_every=1"]
    assert main(train + overrides) == 0
    out = capsys.readouterr().out
    assert "data (latents): 6 image-caption pairs" in out and "skipped 2 unreadable or corrupt" in out
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1] and all(np.isfinite(r["loss"]) for r in log)
    assert (
        main(
            [
                "train",
                "--stage",
                "1",
                "--data",
                str(one),
                "--model",
                "tiny",
                "--out",
                str(tmp_path / "run_128"),
                "--image-size",
                "128",
            ]
        )
        == 2
    )
    assert "train at --image-size 64" in capsys.readouterr().err


def test_cli_train_streams_tar_shards_by_pattern(tmp_path, capsys):
    _write_shards(tmp_path / "d", shards=2, per_shard=4)
    run = tmp_path / "run"
    pattern = str(tmp_path / "d" / "shard-{000000..000001}.tar")
    args = ["train", "--stage", "1", "--data", pattern, "--model", "tiny", "--out", str(run), "--quiet"]
    with pytest.warns(UserWarning, match="skipped corrupt sample"):
        code = main(
            [*args, "--image-size", str(SIZE), "--train.steps=2", "--train.batch_size=4", "--train.warmup=1"]
        )
    assert code == 0
    out = capsys.readouterr().out
    assert "data (tar): 8 image-caption pairs" in out and "corrupt sample(s) while streaming" in out
    assert (run / "model.safetensors").is_file()
