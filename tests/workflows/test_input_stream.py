"""Training input streams (workflows.pair_stream, workflows.shard_windows): each example once per
epoch of a rank, resume equal to an uninterrupted run, an order independent of the read tasks,
memory set by the window and not by the dataset, shard reads once per epoch, x0 drawn by id where
the model runs, and a corrupt shard that stops the stream naming it before any of its rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.workflows.helpers import fake_manifest, write_coupling
from workflows import pair_stream
from workflows.couplings import Coupling, CouplingFormat, encode_shard
from workflows.distributions import ImageShards, flip_coins, sample_by_id
from workflows.images import ImageDataset, ImageFormatError, flip, import_images, to_unit_interval
from workflows.pair_stream import CouplingSource, IndependentSource, StreamPlan
from workflows.settings import IndependentPairs, NoiseSpec, TrainConfig, TrainSettings
from workflows.settings.data import ImagesSpec
from workflows.settings.training import InputSettings
from workflows.shard_format import ShardEntry, sha256, shard_count, shard_name, shard_range
from workflows.shard_windows import copy_rows
from workflows.storage import location

RESOLUTION, SHARD = 32, 64
"""32² RGB images (3 KiB decoded) in shards of 64 (192 KiB): a window of 1 MB holds 5 shards."""
PI0 = NoiseSpec(shape=[3, RESOLUTION, RESOLUTION])


def make_images(folder, count: int, shard_size: int = SHARD, labels: bool = False) -> str:
    """An imported dataset of ``count`` random images; image i carries i in row 0 (channel 0: i mod
    256, channel 1: i div 256, constant along the row, so a flip keeps it). Labels i mod 3."""
    pixels = np.random.default_rng(count).integers(0, 256, (count, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    pixels[:, 0, :, 0] = (np.arange(count) % 256)[:, None]
    pixels[:, 0, :, 1] = (np.arange(count) // 256)[:, None]
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "images.npz", images=pixels, **({"labels": np.arange(count) % 3} if labels else {}))
    import_images(
        str(folder / "images.npz"),
        str(folder / "dataset"),
        resolution=RESOLUTION,
        channels=3,
        shard_size=shard_size,
        parallel=False,
    )
    return str(folder / "dataset")


def image_ids(x1: np.ndarray) -> np.ndarray:
    """The index each image carries (see :func:`make_images`)."""
    return x1[:, 0, 0, 0].astype(np.int64) + 256 * x1[:, 1, 0, 0].astype(np.int64)


def image_plan(uri: str, world: int = 2, rank_batch: int = 16, steps: int = 100, labels=None, **reading) -> StreamPlan:
    data = IndependentPairs(
        pi0=PI0, pi1=ImagesSpec(shape=[3, RESOLUTION, RESOLUTION], uri=uri, labels=labels), seed0=11, seed1=12
    )
    return StreamPlan(
        IndependentSource.open(data), world, rank_batch, steps, reading=InputSettings(**{"window_mb": 1, **reading})
    )


def read_in_process(plan: StreamPlan, rank: int, start_step: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(columns of rank ``rank``'s stream from ``start_step``, the epoch of each row), read here."""
    blocks, epochs = [], []
    for segment in plan.segments(rank, start_step):
        for block in plan.read_segment(rank, segment):
            blocks.append(block)
            epochs.append(np.full(len(block["step"]), segment.epoch))
    return {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0]}, np.concatenate(epochs)


def read_with_ray(plan: StreamPlan, rank: int, start_step: int = 0) -> dict[str, np.ndarray]:
    batches = list(plan.dataset(rank, start_step).iter_batches(batch_size=None, batch_format="numpy"))
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# -------------------------------------------------------------------------- exactly once, the values


def test_every_image_once_per_epoch_of_each_rank_and_once_per_epoch_over_the_ranks(tmp_path):
    count = 12 * SHARD + 40  # 13 shards, the last of 40: ranks get 7 and 6 shards, windows of 5
    plan = image_plan(make_images(tmp_path, count), steps=2 * count // 32 + 40)
    assert plan.window_shards == 5
    dataset = ImageDataset.open(plan.source.pi1.uri)
    first_epoch = []
    for rank in range(2):
        rows, epochs = read_in_process(plan, rank)
        ids = image_ids(rows["x1"])
        assert epochs.max() >= 2  # two whole epochs and part of a third
        for epoch in range(2):
            share = plan.windows(rank).share(epoch)
            expected = np.concatenate([np.arange(dataset.shards[s].start, dataset.shards[s].stop) for s in share])
            assert sorted(ids[epochs == epoch]) == sorted(expected)  # each of its shards' images, once
        first_epoch.append(ids[epochs == 0])
        np.testing.assert_array_equal(rows["x1"], dataset.take(ids))  # the stored images, as stored
        assert rows["x1"].dtype == np.uint8 and "x0" not in rows  # noise is drawn by the train worker
        np.testing.assert_array_equal(rows["pair_id"], rows["example"])
        np.testing.assert_array_equal(rows["step"], np.arange(len(ids)) // 16)
    assert sorted(np.concatenate(first_epoch)) == list(range(count))  # W ranks partition the epoch


def test_windows_shuffle_across_their_shards_and_change_every_epoch(tmp_path):
    plan = image_plan(make_images(tmp_path, 10 * SHARD), world=1, steps=2 * 10 * SHARD // 16)
    rows, epochs = read_in_process(plan, 0)
    ids = image_ids(rows["x1"])
    first = ids[epochs == 0][: 5 * SHARD]  # the first window: 5 shards
    assert len(np.unique(first // SHARD)) == 5
    # the first 64 rows (4 batches) mix the 5 shards; sequential reading would give one shard
    assert len(np.unique(first[:SHARD] // SHARD)) == 5
    assert not np.array_equal(ids[epochs == 0], ids[epochs == 1])


def test_label_filter_streams_only_those_labels_once_per_epoch(ray_session, tmp_path):
    count = 6 * SHARD
    plan = image_plan(make_images(tmp_path, count, labels=True), world=2, steps=count // 32 + 8, labels=[0, 2])
    assert sum(plan.source.images.rows) == np.count_nonzero(np.arange(count) % 3 != 1)  # counted by Ray tasks
    for rank in range(2):
        rows, epochs = read_in_process(plan, rank)
        ids = image_ids(rows["x1"])
        assert np.all(ids % 3 != 1)
        first = ids[epochs == 0]
        kept = sum(plan.source.images.rows[s] for s in plan.windows(rank).share(0))
        assert len(first) == len(set(first.tolist())) == kept


# -------------------------------------------------------------------------- resume and read tasks


def test_resume_in_the_middle_of_an_epoch_equals_the_uninterrupted_stream(tmp_path):
    plan = image_plan(make_images(tmp_path, 11 * SHARD + 10), steps=60)  # 12 shards, a window of 5 and one of 1
    for rank in range(2):
        whole, _ = read_in_process(plan, rank)
        for start in (7, 21, 25):  # inside the first window; the second window or the next epoch; the next epoch
            tail, _ = read_in_process(plan, rank, start)
            assert_same(tail, {key: values[start * 16 :] for key, values in whole.items()})


def test_the_ray_stream_is_the_planned_stream_whatever_the_number_of_read_tasks(ray_session, tmp_path):
    plan = image_plan(make_images(tmp_path, 11 * SHARD + 10), steps=60)
    many = StreamPlan(plan.source, 2, 16, 60, reading=InputSettings(window_mb=1, readers=3, cpus=1.5))
    for rank in range(2):
        planned, _ = read_in_process(plan, rank)
        assert_same(read_with_ray(plan, rank), planned)
        assert_same(read_with_ray(many, rank), planned)
        assert_same(read_with_ray(many, rank, 25), {key: values[25 * 16 :] for key, values in planned.items()})


def test_read_tasks_send_blocks_capped_in_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(pair_stream, "SEGMENT_BYTES", 100_000)  # 33 images of 3 KiB and their ids
    plan = image_plan(make_images(tmp_path, 4 * SHARD), world=1, steps=16)
    sizes = [len(block["step"]) for segment in plan.segments(0, 0) for block in plan.read_segment(0, segment)]
    assert sum(sizes) == 16 * 16 and max(sizes) == -(-100_000 // plan.source.row_bytes) == 33


# -------------------------------------------------------------------------- memory and reads


def test_a_read_task_holds_one_window_and_reads_each_shard_once_per_epoch(tmp_path, monkeypatch):
    """The bytes a read task holds are bounded by the window, not the dataset: the same at 4× the
    images; and each shard is read once per epoch (the reads of two whole epochs of both ranks)."""
    held, reads = [], []
    read_window, read_shard = pair_stream.read_window, ImageShards.read

    def recording_window(*args, **kwargs):
        window = read_window(*args, **kwargs)
        held.append(window.nbytes)
        return window

    def counting_read(self, shard, out):
        reads.append(shard)
        read_shard(self, shard, out)

    monkeypatch.setattr(pair_stream, "read_window", recording_window)
    monkeypatch.setattr(ImageShards, "read", counting_read)
    peaks = {}
    for factor in (1, 4):
        held.clear()
        reads.clear()
        count = factor * 10 * SHARD
        plan = image_plan(make_images(tmp_path / f"{factor}x", count), steps=count // 16)  # two epochs of each rank
        for rank in range(2):
            read_in_process(plan, rank)
        peaks[factor] = max(held)
        assert sorted(reads) == sorted(2 * list(range(10 * factor)))  # every shard twice: once per epoch
        window_rows = plan.window_shards * SHARD
        assert peaks[factor] <= window_rows * (plan.source.images.row_bytes + 8)  # images, ids and the order
    assert peaks[4] == peaks[1]


# -------------------------------------------------------------------------- couplings


def write_coupling_without_x0(output, pairs: int, shard_size: int) -> CouplingFormat:
    """A finished coupling of x1 = 2·x0 + 1 with x0 left out (regenerated from the seed)."""
    fmt = CouplingFormat(
        shape=[4],
        x0_stored=False,
        seed=5,
        pi0=NoiseSpec(shape=[4]),
        teacher_hash="none",
        solver="given",
        shard_size=shard_size,
    )
    entries = []
    for index in range(shard_count(pairs, shard_size)):
        start, stop = shard_range(index, shard_size, pairs)
        ids = np.arange(start, stop)
        x0 = sample_by_id(fmt.pi0, fmt.seed, ids)
        data = encode_shard(fmt, index, ids, x0, 2 * x0 + 1, torch.ones(stop - start))
        output.join(shard_name(index)).write_bytes(data)
        entry = ShardEntry(index, shard_name(index), start, stop, stop - start, sha256(data), len(data))
        entries.append(entry.as_dict())
    fake_manifest(output, "couple", "nox0", {"format": fmt.model_dump(mode="json"), "shards": entries, "pairs": pairs})
    return fmt


def test_a_coupling_without_x0_streams_each_pair_once_per_epoch_and_x0_is_drawn_by_pair_id(tmp_path):
    root = location(str(tmp_path))
    write_coupling_without_x0(root.join("pairs"), 1000, 64)
    plan = StreamPlan(CouplingSource(Coupling.open(root.join("pairs")), 3), 2, 8, 200)
    for rank in range(2):
        rows, epochs = read_in_process(plan, rank)
        assert "x0" not in rows
        share = plan.windows(rank).share(0)
        expected = np.concatenate([np.arange(s * 64, min(s * 64 + 64, 1000)) for s in share])
        assert sorted(rows["pair_id"][epochs == 0]) == sorted(expected)
        batch = {key: torch.from_numpy(values) for key, values in rows.items()}
        x0, x1 = plan.source.model_pairs(batch, "cpu")
        torch.testing.assert_close(x0, sample_by_id(NoiseSpec(shape=[4]), 5, rows["pair_id"]), rtol=0, atol=0)
        torch.testing.assert_close(x1, 2 * x0 + 1, rtol=0, atol=0)  # the stored pairs, unchanged


def test_a_coupling_with_x0_sends_its_stored_x0(tmp_path):
    root = location(str(tmp_path))
    x0 = torch.randn(300, 2)
    write_coupling(root.join("pairs"), x0, x0 + 3, shard_size=50)
    plan = StreamPlan(CouplingSource(Coupling.open(root.join("pairs")), 3), 1, 10, 30)
    rows, _ = read_in_process(plan, 0)
    np.testing.assert_array_equal(rows["x0"], x0.numpy()[rows["pair_id"]])
    np.testing.assert_array_equal(rows["x1"], x0.numpy()[rows["pair_id"]] + 3)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_independent_pairs_draw_x0_by_pair_id_on_the_device_and_scale_pixels(tmp_path, device):
    plan = image_plan(make_images(tmp_path, 2 * SHARD), steps=4)
    rows, _ = read_in_process(plan, 1)
    batch = {key: torch.from_numpy(values).to(device) for key, values in rows.items()}
    x0, x1 = plan.source.model_pairs(batch, device)
    assert x0.device.type == device and x1.dtype == torch.float32
    # the CPU draw of the old read tasks; on a GPU the same up to the float32 caveat of rf.noise
    torch.testing.assert_close(x0.cpu(), sample_by_id(PI0, 11, rows["example"]), rtol=0, atol=1e-6)
    # the streamed pixels scaled, and mirrored by the coin of their example (about half of them)
    mirrored = flip_coins(12, rows["example"]).numpy()
    assert 0 < mirrored.sum() < len(mirrored)
    expected = to_unit_interval(torch.from_numpy(flip(rows["x1"], mirrored)))
    torch.testing.assert_close(x1.cpu(), expected, rtol=0, atol=0)


# -------------------------------------------------------------------------- a corrupt shard


def corrupt(uri: str, shard: int) -> str:
    """Flip one byte in the middle of a shard (same size, other checksum); its URI."""
    target = location(uri).join(shard_name(shard))
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return target.uri


def test_a_corrupt_shard_mid_stream_stops_it_naming_the_shard_before_any_of_its_rows(ray_session, tmp_path):
    plan = image_plan(make_images(tmp_path, 12 * SHARD), world=1, steps=12 * SHARD // 16)
    segments = plan.segments(0, 0)
    bad = int(plan.windows(0).shards(0, 1)[0])  # in the second window of the first epoch
    uri = corrupt(plan.source.pi1.uri, bad)
    seen = []
    with pytest.raises(ImageFormatError, match=f"shard {uri} does not match the manifest"):
        for segment in segments:
            for block in plan.read_segment(0, segment):
                seen.append(image_ids(block["x1"]))
    seen = np.concatenate(seen)
    assert len(seen) == segments[0].rows and not np.any(seen // SHARD == bad)

    delivered = []
    with pytest.raises(Exception, match=f"shard {uri} does not match the manifest"):
        for batch in plan.dataset(0, 0).iter_batches(batch_size=16, batch_format="numpy"):
            delivered.append(image_ids(batch["x1"]))
    assert not delivered or not np.any(np.concatenate(delivered) // SHARD == bad)


def test_training_on_a_corrupt_image_shard_fails_naming_it_and_finishes_nothing(ray_session, tmp_path):
    from workflows.manifest import SUCCESS_FILE
    from workflows.stages import train

    uri = make_images(tmp_path, 6 * SHARD)
    bad = corrupt(uri, 4)
    config = TrainConfig(
        model={
            "kind": "unet",
            "config": {
                "in_channels": 3,
                "resolution": RESOLUTION,
                "base_channels": 8,
                "channel_mult": [1, 2],
                "num_res_blocks": 1,
                "attn_resolutions": [],
                "num_groups": 4,
            },
        },
        steps=6 * SHARD // 8,
        batch_size=8,
        checkpoint_every=10**6,
        max_failures=0,
        input={"window_mb": 1},
        data=IndependentPairs(pi0=PI0, pi1=ImagesSpec(shape=[3, RESOLUTION, RESOLUTION], uri=uri), seed0=1, seed1=2),
    )
    output = location(str(tmp_path / "train"))
    with pytest.raises(Exception, match=f"shard {bad} does not match the manifest"):
        train.run(config, {}, output)
    assert not output.join(SUCCESS_FILE).exists()


# -------------------------------------------------------------------------- settings


def test_the_window_decides_the_result_the_other_input_settings_do_not():
    assert TrainSettings().identity()["input"] == {"window_mb": 256}
    fast = TrainSettings(input={"cpus": 8, "readers": 4, "buffer_mb": 4096, "prefetch_batches": 8})
    assert fast.identity() == TrainSettings().identity()
    assert TrainSettings(input={"window_mb": 64}).identity() != TrainSettings().identity()


def test_a_shard_giving_other_rows_than_its_set_lists_is_named_and_nothing_is_copied():
    out = {"id": np.full(3, -1), "x1": np.zeros((3, 2), np.float32)}
    with pytest.raises(ValueError, match=r"shard s3://b/pairs/00001\.parquet gave 2 rows, its set lists 3"):
        copy_rows(out, {"id": np.arange(2), "x1": np.ones((2, 2), np.float32)}, "s3://b/pairs/00001.parquet")
    assert (out["id"] == -1).all() and not out["x1"].any()
