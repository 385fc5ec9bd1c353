"""Image datasets: import (folder, zip, npz/npy) to Parquet shards, verified reading, resume,
corrupt files, Ray-parallel equality and the ``rectiflow data import`` command. (The raw encoding
and the stage contract: ``test_images_stage.py``.)"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from workflows.cli import main
from workflows.images import (
    CorruptImageError,
    ImageDataset,
    ImageFormatError,
    ImageImportError,
    flip,
    flip_mask,
    import_images,
    to_unit_interval,
)
from workflows.storage import location

R = 8
# The importer without an actor pool even when the session's Ray is up (the Ray test and the
# command use the default: a pool when Ray is initialised).
_import = functools.partial(import_images, parallel=False)


def _rgb(seed: int, height: int = R, width: int = R) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# The sorted source order of this folder (label: sorted class-folder index, −1 at top level).
FOLDER = {
    "cat/a.png": 0,
    "cat/deeper/b.png": 0,
    "dog/c.jpg": 1,
    "dog/d.png": 1,
    "top.png": -1,
}


def _write_folder(root, corrupt: str | None = None) -> dict[str, np.ndarray]:
    """The FOLDER images (plus a non-image file and a hidden one); their expected pixels (C, R, R)."""
    expected = {}
    for seed, name in enumerate(FOLDER):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = _rgb(seed)
        data = _jpeg(pixels) if name.endswith(".jpg") else _png(pixels)
        path.write_bytes(data)
        decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # the same lossy decode for JPEG
        expected[name] = decoded.transpose(2, 0, 1)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored")
    if corrupt:
        (root / corrupt).write_bytes(_png(_rgb(99))[:40])  # a truncated PNG
    return expected


# -- round trips ---------------------------------------------------------------------------------


def test_folder_round_trip_local_and_s3(tmp_path, storage_root):
    expected = _write_folder(tmp_path / "src")
    dst = f"{storage_root}/images"
    manifest = _import(str(tmp_path / "src"), dst, resolution=R, shard_size=2)
    details = manifest.details
    assert manifest.kind == "import" and details["count"] == 5 and details["classes"] == ["cat", "dog"]
    assert details["source"]["kind"] == "folder" and details["skipped_count"] == 0 and details["encoding"] == "png"
    assert [s["name"] for s in details["shards"]] == [
        "shard-000000.parquet",
        "shard-000001.parquet",
        "shard-000002.parquet",
    ]
    assert [(s["start"], s["stop"], s["rows"]) for s in details["shards"]] == [(0, 2, 2), (2, 4, 2), (4, 5, 1)]
    assert str(tmp_path) not in json.dumps(details)  # the config names the source as typed; nothing else does

    dataset = ImageDataset.open(dst)
    assert dataset.count == len(dataset) == 5 and dataset.shape == (3, R, R)
    assert dataset.classes == ["cat", "dog"]
    np.testing.assert_array_equal(dataset.labels(), list(FOLDER.values()))
    images = dataset.take(np.arange(5))
    for position, name in enumerate(FOLDER):
        np.testing.assert_array_equal(images[position], expected[name], err_msg=name)

    # plain Parquet: any client reads the documented schema; `source` is relative
    shard = location(dst).join("shard-000001.parquet")
    table = pq.read_table(shard.path, filesystem=shard.arrow_fs)
    assert table.column_names == ["index", "image", "label", "height", "width", "source"]
    assert [str(t) for t in table.schema.types] == ["int64", "binary", "int64", "int32", "int32", "string"]
    assert table.column("source").to_pylist() == ["dog/c.jpg", "dog/d.png"]
    assert table.column("index").to_pylist() == [2, 3]
    index, pixels = dataset.read(dataset.shards[1])
    assert index.dtype == np.int64 and pixels.dtype == np.uint8 and pixels.shape == (2, 3, R, R)


def test_zip_round_trip_strips_common_root_folder(tmp_path):
    expected = {}
    with zipfile.ZipFile(tmp_path / "set.zip", "w") as archive:
        for seed, name in enumerate(["zebra/1.png", "ant/2.png", "ant/3.PNG", "loose.png"]):
            pixels = _rgb(seed)
            archive.writestr(f"set/{name}", _png(pixels))
            expected[name] = pixels.transpose(2, 0, 1)
        archive.writestr("set/readme.md", "text")
        archive.writestr("__MACOSX/set/._x.png", b"junk")
    manifest = _import(str(tmp_path / "set.zip"), str(tmp_path / "out"), resolution=R, shard_size=3)
    assert manifest.details["source"]["kind"] == "zip" and manifest.details["classes"] == ["ant", "zebra"]
    dataset = ImageDataset.open(str(tmp_path / "out"))
    order = ["ant/2.png", "ant/3.PNG", "loose.png", "zebra/1.png"]
    np.testing.assert_array_equal(dataset.take(range(4)), np.stack([expected[n] for n in order]))
    np.testing.assert_array_equal(dataset.labels(), [0, 0, -1, 1])


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NHW"])
def test_npz_round_trip_layouts(tmp_path, layout):
    rng = np.random.default_rng(3)
    channels = 1 if layout == "NHW" else 3
    pixels = rng.integers(0, 256, (7, channels, R, R), dtype=np.uint8)  # (N, C, H, W)
    stored = {"NCHW": pixels, "NHWC": pixels.transpose(0, 2, 3, 1), "NHW": pixels[:, 0]}[layout]
    np.savez_compressed(tmp_path / "a.npz", x=stored, y=np.arange(7, dtype=np.int32) % 3)
    manifest = _import(str(tmp_path / "a.npz"), str(tmp_path / "out"), resolution=R, shard_size=3)
    assert manifest.details["channels"] == channels and manifest.details["classes"] is None  # default: the array's
    dataset = ImageDataset.open(str(tmp_path / "out"))
    np.testing.assert_array_equal(dataset.take(range(7)), pixels)
    np.testing.assert_array_equal(dataset.labels(), np.arange(7) % 3)
    index, _ = dataset.read(dataset.shards[2])
    assert index.tolist() == [6]


def test_npy_from_s3_source_to_s3_and_grey_to_rgb(tmp_path, s3_bucket):
    pixels = np.random.default_rng(4).integers(0, 256, (5, R, R), dtype=np.uint8)
    buffer = io.BytesIO()
    np.save(buffer, pixels)
    location(f"{s3_bucket}/src/digits.npy").write_bytes(buffer.getvalue())
    manifest = _import(f"{s3_bucket}/src/digits.npy", f"{s3_bucket}/out", resolution=R, channels=3, shard_size=2)
    assert manifest.details["source"]["kind"] == "npy" and manifest.details["shape"] == [3, R, R]
    dataset = ImageDataset.open(f"{s3_bucket}/out")
    np.testing.assert_array_equal(dataset.take([4, 0]), np.repeat(pixels[[4, 0], None], 3, axis=1))
    np.testing.assert_array_equal(dataset.labels(), [-1] * 5)
    shard = location(f"{s3_bucket}/out/shard-000000.parquet")
    assert pq.read_table(shard.path, filesystem=shard.arrow_fs).column("source").to_pylist() == [
        "digits.npy[0]",
        "digits.npy[1]",
    ]


def test_array_sources_are_refused_with_reasons(tmp_path):
    out = str(tmp_path / "out")
    np.save(tmp_path / "float.npy", np.random.default_rng(0).random((3, R, R), dtype=np.float32))
    with pytest.raises(ImageImportError, match="float32.*only uint8.*refused"):
        _import(str(tmp_path / "float.npy"), out, resolution=R)
    np.save(tmp_path / "shape.npy", np.zeros((3, 5, R, R), dtype=np.uint8))
    with pytest.raises(ImageImportError, match=r"shape \[3, 5, 8, 8\]"):
        _import(str(tmp_path / "shape.npy"), out, resolution=R)
    np.savez(tmp_path / "keys.npz", pictures=np.zeros((3, R, R), dtype=np.uint8))
    with pytest.raises(ImageImportError, match=r"'images' or 'x'.*pictures"):
        _import(str(tmp_path / "keys.npz"), out, resolution=R)
    np.savez(tmp_path / "labels.npz", images=np.zeros((3, R, R), dtype=np.uint8), labels=np.zeros(2, dtype=np.int64))
    with pytest.raises(ImageImportError, match=r"labels 'labels' have shape \[2\]"):
        _import(str(tmp_path / "labels.npz"), out, resolution=R)
    with pytest.raises(ImageImportError, match="does not exist"):
        _import(str(tmp_path / "nothing"), out, resolution=R)
    assert not os.path.exists(out)


# -- geometry ------------------------------------------------------------------------------------


def test_resize_shorter_side_then_center_crop(tmp_path):
    # 32 wide x 16 high: four 8-px vertical bands. Shorter side 16 → 8 halves it (bands of 4 px),
    # the 8 center columns of 16 are bands 1 and 2.
    bands = np.repeat(np.array([10, 80, 160, 240], dtype=np.uint8), 8)
    wide = np.tile(bands, (16, 1))
    # 9 wide x 20 high, shorter side already 9 = R: no resampling, rows 5…13 of 20 kept exactly
    tall = np.arange(20 * 9, dtype=np.uint8).reshape(20, 9)
    (tmp_path / "src").mkdir()
    Image.fromarray(wide, mode="L").save(tmp_path / "src" / "a_wide.png")
    Image.fromarray(tall, mode="L").save(tmp_path / "src" / "b_tall.png")

    _import(str(tmp_path / "src"), str(tmp_path / "out8"), resolution=8, channels=1)
    out = ImageDataset.open(str(tmp_path / "out8")).take([0])[0, 0]
    assert out.shape == (8, 8)
    assert np.abs(out[:, 1:3].astype(int) - 80).max() <= 2 and np.abs(out[:, 5:7].astype(int) - 160).max() <= 2
    assert out.min() > 40 and out.max() < 200  # the outer bands (10, 240) were cropped away

    _import(str(tmp_path / "src"), str(tmp_path / "out9"), resolution=9, channels=1)
    np.testing.assert_array_equal(ImageDataset.open(str(tmp_path / "out9")).take([1])[0, 0], tall[5:14])


# -- corrupt files -------------------------------------------------------------------------------


def test_corrupt_image_names_the_file_and_marks_nothing_done(tmp_path):
    _write_folder(tmp_path / "src", corrupt="dog/broken.png")
    with pytest.raises(CorruptImageError, match="dog/broken.png.*--skip-corrupt"):
        _import(str(tmp_path / "src"), str(tmp_path / "out"), resolution=R, shard_size=2)
    assert not (tmp_path / "out" / "_SUCCESS.json").exists()
    with pytest.raises(ImageFormatError, match="_SUCCESS.json does not exist"):
        ImageDataset.open(str(tmp_path / "out"))


def test_skip_corrupt_counts_lists_and_keeps_index_ranges(tmp_path):
    expected = _write_folder(tmp_path / "src", corrupt="dog/broken.png")
    (tmp_path / "src" / "dog" / "empty.png").write_bytes(b"")
    manifest = _import(str(tmp_path / "src"), str(tmp_path / "out"), resolution=R, shard_size=2, skip_corrupt=True)
    # sorted: cat/a, cat/deeper/b, dog/broken, dog/c, dog/d, dog/empty, top
    details = manifest.details
    assert details["skipped_count"] == 2 and details["count"] == 5 and details["source"]["files"] == 7
    assert [(s["index"], s["name"]) for s in details["skipped"]] == [(2, "dog/broken.png"), (5, "dog/empty.png")]
    assert all(s["reason"] for s in details["skipped"])
    assert [(s["start"], s["stop"], s["rows"]) for s in details["shards"]] == [
        (0, 2, 2),
        (2, 4, 1),
        (4, 6, 1),
        (6, 7, 1),
    ]
    dataset = ImageDataset.open(str(tmp_path / "out"))
    assert dataset.count == 5 and len(dataset.skipped) == 2
    np.testing.assert_array_equal(dataset.take(range(5)), np.stack([expected[name] for name in FOLDER]))
    assert dataset.read(dataset.shards[1])[0].tolist() == [3]


# -- resume, refusal, integrity ------------------------------------------------------------------


def _state(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir()) if p.suffix == ".parquet"}


def test_rerun_writes_only_missing_shards_and_refuses_other_settings(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="rectiflow.images")
    _write_folder(tmp_path / "src")
    src, out = str(tmp_path / "src"), tmp_path / "out"
    first = _import(src, str(out), resolution=R, shard_size=2)
    before = _state(out)
    marker = (out / "_SUCCESS.json").stat().st_mtime_ns
    assert first.details["shards_written"] == 3

    again = _import(src, str(out), resolution=R, shard_size=2)  # finished: nothing written
    assert again == first and (out / "_SUCCESS.json").stat().st_mtime_ns == marker

    (out / "shard-000001.parquet").unlink()  # a finished import missing a shard: unmarked, completed
    caplog.clear()
    resumed = _import(src, str(out), resolution=R, shard_size=2)
    after = _state(out)
    assert after == {name: value for name, value in before.items() if name != "shard-000001.parquet"} | {
        "shard-000001.parquet": (after["shard-000001.parquet"][0], before["shard-000001.parquet"][1])
    }
    assert resumed.details["shards"] == first.details["shards"] and resumed.details["shards_written"] == 1
    assert "finished but misses shard-000001.parquet" in caplog.text
    assert "2 shards present" in caplog.text and "(1 written, 2 kept)" in caplog.text
    assert "3/3 shards done" in caplog.text and "images/s" in caplog.text

    (out / "_SUCCESS.json").unlink()  # an interrupted import: both shards kept, one written
    (out / "shard-000002.parquet").unlink()
    assert _import(src, str(out), resolution=R, shard_size=2).details["shards_written"] == 1
    assert _state(out)["shard-000000.parquet"] == before["shard-000000.parquet"]

    kept, finished = _state(out), (out / "_SUCCESS.json").read_bytes()
    with pytest.raises(ImageImportError, match=r"another configuration \(shape: \[3, 8, 8\] there vs \[3, 9, 9\]"):
        _import(src, str(out), resolution=R + 1, shard_size=2)
    (tmp_path / "src" / "new.png").write_bytes(_png(_rgb(7)))
    with pytest.raises(ImageImportError, match="finished import of another source.*files: 5 there vs 6 here"):
        _import(src, str(out), resolution=R, shard_size=2)
    assert _state(out) == kept and (out / "_SUCCESS.json").read_bytes() == finished  # refusals write nothing


def test_reader_verifies_manifest_and_shards(tmp_path):
    _write_folder(tmp_path / "src")
    out = tmp_path / "out"
    _import(str(tmp_path / "src"), str(out), resolution=R, shard_size=2)
    dataset = ImageDataset.open(str(out))

    shard = out / "shard-000001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ImageFormatError, match="shard-000001.parquet does not match the manifest"):
        dataset.read(dataset.shards[1])
    with pytest.raises(ImageFormatError, match="shard-000001.parquet"):
        ImageDataset.open(str(out), cache_shards=1).take([3])
    with pytest.raises(ImageFormatError, match="shard-000001.parquet"):
        dataset.labels()
    dataset.take([0, 4])  # other shards still read
    shard.write_bytes(bytes(data[:100]))
    with pytest.raises(ImageFormatError, match="shard-000001.parquet does not match.*100 bytes"):
        dataset.read(dataset.shards[1])
    shard.unlink()
    with pytest.raises(ImageFormatError, match="shard-000001.parquet listed in the manifest is missing"):
        dataset.read(dataset.shards[1])
    with pytest.raises(IndexError, match=r"position 5 is outside"):
        dataset.take([5])

    manifest_file = out / "_SUCCESS.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text("{not json")
    with pytest.raises(ImageFormatError, match="_SUCCESS.json is not valid JSON"):
        ImageDataset.open(str(out))
    manifest_file.write_text(json.dumps({"kind": "import"}))
    with pytest.raises(ImageFormatError, match="_SUCCESS.json is not a stage manifest: it has no hash"):
        ImageDataset.open(str(out))
    manifest_file.write_text(json.dumps(manifest | {"kind": "couple"}))
    with pytest.raises(ImageFormatError, match="_SUCCESS.json is the manifest of a 'couple' stage, not of an image"):
        ImageDataset.open(str(out))
    broken = dict(manifest["details"])
    del broken["count"]
    broken["resolution"] = "big"
    manifest_file.write_text(json.dumps(manifest | {"details": broken}))
    with pytest.raises(
        ImageFormatError,
        match="_SUCCESS.json is not a consistent image import: details.count: Field required; details.resolution",
    ):
        ImageDataset.open(str(out))
    manifest_file.write_text(json.dumps(manifest | {"details": manifest["details"] | {"count": 4}}))
    with pytest.raises(
        ImageFormatError, match="_SUCCESS.json is not a consistent image import: details: count 4 is not"
    ):
        ImageDataset.open(str(out))
    shards = manifest["details"]["shards"]
    manifest_file.write_text(json.dumps(manifest | {"details": manifest["details"] | {"shards": shards[::-1]}}))
    with pytest.raises(ImageFormatError, match="_SUCCESS.json: the shards are not shard-000000.parquet"):
        ImageDataset.open(str(out))


# -- Ray -----------------------------------------------------------------------------------------


def test_ray_parallel_import_is_byte_identical(tmp_path, ray_session):
    import ray

    assert ray.is_initialized()
    _write_folder(tmp_path / "src")
    for name in ("more/e.png", "more/f.png", "more/g.png"):
        (tmp_path / "src" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "src" / name).write_bytes(_png(_rgb(len(name) + ord(name[5]), 12, 10)))
    sequential = import_images(str(tmp_path / "src"), str(tmp_path / "seq"), resolution=R, shard_size=2, parallel=False)
    parallel = import_images(str(tmp_path / "src"), str(tmp_path / "par"), resolution=R, shard_size=2)
    assert parallel.details["shards"] == sequential.details["shards"] and len(parallel.details["shards"]) == 4
    for entry in sequential.details["shards"]:
        assert (tmp_path / "par" / entry["name"]).read_bytes() == (tmp_path / "seq" / entry["name"]).read_bytes()
    assert parallel.time["cpu_seconds"] > 0

    _write_folder(tmp_path / "bad", corrupt="cat/zz.png")  # an error inside an actor
    with pytest.raises(CorruptImageError, match="cat/zz.png"):
        import_images(str(tmp_path / "bad"), str(tmp_path / "badout"), resolution=R, shard_size=2)
    assert not (tmp_path / "badout" / "_SUCCESS.json").exists()


# -- the command ---------------------------------------------------------------------------------


def test_cli_data_import(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="rectiflow.images")
    _write_folder(tmp_path / "src")
    out = str(tmp_path / "out")
    assert (
        main(
            [
                "data",
                "import",
                str(tmp_path / "src"),
                out,
                "--resolution",
                str(R),
                "--shard-size",
                "2",
                "--channels",
                "1",
            ]
        )
        == 0
    )
    assert "5 images (0 skipped) of shape 1x8x8, png, in 3 shards" in capsys.readouterr().out
    assert "3/3 shards done" in caplog.text
    assert ImageDataset.open(out).shape == (1, R, R)

    for bad, message in [
        (["--resolution", "0"], "--resolution: expected a positive integer, got '0'"),
        (["--resolution", "8", "--channels", "2"], "--channels: invalid choice: 2"),
        (["--resolution", "8", "--shard-size", "x"], "--shard-size: expected a positive integer"),
        (["--resolution", "8", "--encoding", "jpeg"], "--encoding: invalid choice: 'jpeg'"),
        ([], "the following arguments are required: --resolution"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(["data", "import", str(tmp_path / "src"), out, *bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err

    assert main(["data", "import", str(tmp_path / "missing"), out, "--resolution", "8"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["data", "import", str(tmp_path / "src"), out, "--resolution", "9", "--shard-size", "2"]) == 2
    assert "another configuration" in capsys.readouterr().err
    _write_folder(tmp_path / "bad", corrupt="x.png")
    assert main(["data", "import", str(tmp_path / "bad"), str(tmp_path / "o2"), "--resolution", "8"]) == 1
    assert "x.png" in capsys.readouterr().err
    assert (
        main(
            [
                "data",
                "import",
                str(tmp_path / "bad"),
                str(tmp_path / "o2"),
                "--resolution",
                "8",
                "--skip-corrupt",
                "--encoding",
                "raw",
            ]
        )
        == 0
    )
    assert "(1 skipped) of shape 3x8x8, raw," in capsys.readouterr().out


# -- pixel helpers -------------------------------------------------------------------------------


def test_unit_interval_and_flip_helpers():
    import torch

    pixels = np.array([[[[0, 127, 255]]]], dtype=np.uint8)
    scaled = to_unit_interval(pixels)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled.reshape(-1), [-1.0, 127 / 127.5 - 1, 1.0], rtol=0, atol=1e-7)
    assert torch.equal(to_unit_interval(torch.from_numpy(pixels)), torch.from_numpy(scaled))

    images = np.arange(2 * 1 * 2 * 3, dtype=np.uint8).reshape(2, 1, 2, 3)
    flipped = flip(images, [True, False])
    np.testing.assert_array_equal(flipped[0], images[0][..., ::-1])
    np.testing.assert_array_equal(flipped[1], images[1])
    assert torch.equal(flip(torch.from_numpy(images), [True, False]), torch.from_numpy(flipped))
    with pytest.raises(ValueError, match="3 entries for 2 images"):
        flip(images, [True, False, True])

    mask = flip_mask(np.arange(4000), seed=1)
    assert 0.45 < mask.mean() < 0.55
    np.testing.assert_array_equal(flip_mask([7, 3], seed=1), mask[[7, 3]])  # per index, not per batch
    assert not np.array_equal(mask, flip_mask(np.arange(4000), seed=2))
    assert not np.array_equal(mask, flip_mask(np.arange(4000), seed=1, epoch=1))
