"""The import as a stage (``workflows.stages.import_images.run``) and the raw uint8 encoding: the
stage contract (kind, hash, inputs, shape), PNG and raw imports giving the same pixels, the shard
vocabulary and footer, resumption rules, and the per-shard reading API a stream builds on."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from workflows.images import CorruptImageError, ImageDataset, ImageFormatError, ImageImportError, decode_shard
from workflows.images.builtin import digits_array
from workflows.images.sources import listed
from workflows.manifest import Manifest
from workflows.settings import ImportConfig, stage_hash
from workflows.shard_format import footer_info
from workflows.stages.import_images import import_listed, run
from workflows.storage import location

DIGITS = ImportConfig(source="sklearn:digits", shape=[1, 8, 8], shard_size=700)


def _sequential(config: ImportConfig, output) -> Manifest:
    """``run(config, {}, output)`` without an actor pool even when the session's Ray is up (only
    the parallel tests pay for one)."""
    with listed(config.source) as source:
        return import_listed(config, source, location(str(output)), parallel=False)


def _folder(root, corrupt: str | None = None) -> None:
    """Six RGB images of odd sizes in two classes (and optionally a truncated PNG)."""
    rng = np.random.default_rng(5)
    for number in range(6):
        path = root / ("a" if number % 2 else "b") / f"{number}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (9 + number, 12, 3), dtype=np.uint8)).save(path)
    if corrupt:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
        (root / corrupt).write_bytes(buffer.getvalue()[:40])


def test_digits_stage_png_and_raw_give_identical_pixels(tmp_path):
    png = run(DIGITS, {}, location(str(tmp_path / "png")))
    raw = _sequential(DIGITS.model_copy(update={"encoding": "raw"}), tmp_path / "raw")
    assert png.kind == raw.kind == "import" and png.hash == stage_hash("import", DIGITS.identity(), {})
    assert png.stage == "png" and png.inputs == {} and png.config["source"] == "sklearn:digits"
    assert png.hash != raw.hash and (png.details["encoding"], raw.details["encoding"]) == ("png", "raw")
    assert png.details["count"] == raw.details["count"] == 1797 and png.details["source"] == raw.details["source"]

    images, labels = digits_array()
    for manifest in (png, raw):
        dataset = ImageDataset.open(str(tmp_path / manifest.stage))
        assert dataset.encoding == manifest.details["encoding"] and dataset.shape == (1, 8, 8)
        np.testing.assert_array_equal(dataset.take(range(dataset.count)), images[:, None])  # every image
        np.testing.assert_array_equal(dataset.labels(), labels)

    raw_set = ImageDataset.open(str(tmp_path / "raw"))
    shard = tmp_path / "raw" / "shard-000001.parquet"
    footer, info = footer_info(shard.read_bytes(), str(shard))
    assert sorted(info) == ["encoding", "format_version", "identity", "kind", "shard", "skipped", "start", "stop"]
    assert (info["kind"], info["shard"], info["start"], info["stop"], info["skipped"], info["encoding"]) == (
        "images",
        1,
        700,
        1400,
        [],
        "raw",
    )
    assert footer.schema.to_arrow_schema().field("image").type == pa.binary(64)  # FIXED_LEN_BYTE_ARRAY
    entry = raw_set.shards[1]
    index, pixels = decode_shard(raw_set.shard_bytes(entry), entry, raw_set.shape, "raw", str(shard))
    assert index.tolist() == list(range(700, 1400)) and not pixels.flags.owndata  # a view of the Parquet buffer
    np.testing.assert_array_equal(pixels[:, 0], images[700:1400])
    wrong = (
        r"shard-000001.parquet has columns \(index int64, image fixed_size_binary\[64\], .*\), "
        r"expected \(index int64, image binary, "
    )
    with pytest.raises(ImageFormatError, match=wrong):
        decode_shard(raw_set.shard_bytes(entry), entry, raw_set.shape, "png", str(shard))


def test_folder_png_and_raw_agree_with_skipped_images(tmp_path):
    _folder(tmp_path / "src", corrupt="a/zz.png")
    datasets = []
    for encoding in ("png", "raw"):
        config = ImportConfig(
            source=str(tmp_path / "src"), shape=[3, 8, 8], shard_size=4, encoding=encoding, skip_corrupt=True
        )
        manifest = _sequential(config, tmp_path / encoding)
        assert [item["name"] for item in manifest.details["skipped"]] == ["a/zz.png"]
        assert [(s["start"], s["stop"], s["rows"]) for s in manifest.details["shards"]] == [(0, 4, 3), (4, 7, 3)]
        datasets.append(ImageDataset.open(str(tmp_path / encoding)))
    png, raw = datasets
    np.testing.assert_array_equal(png.take(range(6)), raw.take(range(6)))
    np.testing.assert_array_equal(png.labels(), raw.labels())
    indices = [[dataset.read(entry)[0].tolist() for entry in dataset.shards] for dataset in datasets]
    assert indices[0] == indices[1] == [[0, 1, 2], [4, 5, 6]]


def test_stage_refuses_inputs_bad_shapes_and_foreign_shards(tmp_path):
    with pytest.raises(ImageImportError, match=r"takes no inputs; got \['pi1'\]"):
        run(DIGITS, {"pi1": location(str(tmp_path / "x"))}, location(str(tmp_path / "out")))
    for shape in ([2, 8, 8], [1, 8, 9], [1, 0, 0], [8, 8]):
        with pytest.raises(ImageImportError, match=rf"shape must be \[C, R, R\].*got \[{', '.join(map(str, shape))}\]"):
            run(DIGITS.model_copy(update={"shape": shape}), {}, location(str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shard-000003.parquet").write_bytes(b"left over")
    with pytest.raises(ImageImportError, match="holds shard-000003.parquet, but this import has only 3 shards"):
        _sequential(DIGITS, tmp_path / "out")
    (tmp_path / "out" / "shard-000003.parquet").unlink()
    (tmp_path / "out" / "shard-000001.parquet").write_bytes(b"not a shard")  # rewritten, not kept
    manifest = _sequential(DIGITS, tmp_path / "out")
    assert manifest.details["shards_written"] == 3
    np.testing.assert_array_equal(ImageDataset.open(str(tmp_path / "out")).take([701])[0, 0], digits_array()[0][701])


def test_a_shard_with_skips_is_kept_only_by_an_import_that_skips(tmp_path):
    _folder(tmp_path / "src", corrupt="b/zz.png")  # sorted: a/1 a/3 a/5 b/0 | b/2 b/4 b/zz
    out = tmp_path / "out"
    skipping = ImportConfig(source=str(tmp_path / "src"), shape=[3, 8, 8], shard_size=4, skip_corrupt=True)
    _sequential(skipping, out)
    (out / "_SUCCESS.json").unlink()  # as if interrupted
    first = (out / "shard-000000.parquet").stat().st_mtime_ns
    strict = skipping.model_copy(update={"skip_corrupt": False})
    with pytest.raises(CorruptImageError, match="b/zz.png.*--skip-corrupt"):
        _sequential(strict, out)
    assert (out / "shard-000000.parquet").stat().st_mtime_ns == first  # a shard without skips was kept
    assert _sequential(skipping, out).details["shards_written"] == 0


def test_parallel_builtin_import_equals_sequential(tmp_path, ray_session):
    from workflows.images import import_images

    raw = {"encoding": "raw", "resolution": 8, "shard_size": 500}
    sequential = import_images("sklearn:digits", str(tmp_path / "seq"), parallel=False, **raw)
    parallel = import_images("sklearn:digits", str(tmp_path / "par"), **raw)  # each actor materialises digits
    assert parallel.details["shards"] == sequential.details["shards"] and parallel.details["shards_written"] == 4
    for entry in sequential.details["shards"]:
        assert (tmp_path / "par" / entry["name"]).read_bytes() == (tmp_path / "seq" / entry["name"]).read_bytes()
