import os
import threading

import pytest

from tests.workflows.helpers import fake_manifest
from workflows.manifest import SUCCESS_FILE
from workflows.storage import StorageError, location


def test_parse_local_and_remote_uris(tmp_path):
    assert location(str(tmp_path)).uri == str(tmp_path)
    assert location(f"file://{tmp_path}").uri == str(tmp_path)
    assert location("s3://bucket/a/b/").uri == "s3://bucket/a/b"
    assert location("s3://bucket/a").join("b", "c.json").uri == "s3://bucket/a/b/c.json"


@pytest.mark.parametrize(
    "uri, message",
    [
        ("s3://AKIAEXAMPLE:secret@bucket/x", "embeds credentials"),
        ("s3://", "no bucket"),
        ("nosuchproto://x/y", "unknown protocol"),
        ("file://otherhost/x", "names a host"),
        ("s3://bucket/x?versionId=3", "query"),
        ("", "non-empty"),
    ],
)
def test_bad_uris_are_refused(uri, message):
    with pytest.raises(StorageError, match=message):
        location(uri)


def test_credentials_do_not_appear_in_the_error():
    with pytest.raises(StorageError) as error:
        location("s3://AKIAEXAMPLE:verysecret@bucket/x")
    assert "verysecret" not in str(error.value) and "AKIAEXAMPLE" not in str(error.value)


@pytest.mark.parametrize("part", ["..", "../x", "/abs", "a//b", "a/../../b"])
def test_join_refuses_climbing_out(part):
    with pytest.raises(StorageError, match="not a plain relative path"):
        location("s3://bucket/root").join(part)


def test_write_read_list_delete(storage_root):
    root = location(storage_root)
    target = root.join("stage", "_SUCCESS.json")
    assert not target.exists()
    target.write_json({"a": 1})
    assert target.exists() and target.read_json() == {"a": 1}
    root.join("stage", "shard-00001.parquet").write_bytes(b"x" * 10)
    assert root.join("stage").list_names() == ["_SUCCESS.json", "shard-00001.parquet"]
    assert root.join("stage", "shard-00001.parquet").size() == 10
    assert root.join("missing").list_names() == []
    root.join("stage").delete()
    assert not target.exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        target.read_bytes()


def test_create_is_exclusive(storage_root):
    target = location(storage_root).join("lease.json")
    assert target.create_bytes(b"first")
    assert not target.create_bytes(b"second")
    assert target.read_bytes() == b"first"


def test_local_create_has_one_winner_among_racing_threads(tmp_path):
    target = location(str(tmp_path)).join("lease.json")
    results = []
    threads = [
        threading.Thread(target=lambda i=i: results.append((i, target.create_bytes(str(i).encode()))))
        for i in range(16)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, won in results if won]
    assert len(winners) == 1
    assert target.read_bytes() == str(winners[0]).encode()


def test_local_write_leaves_no_temporary_files(tmp_path):
    target = location(str(tmp_path)).join("a", "b.bin")
    target.write_bytes(b"1")
    target.write_bytes(b"22")
    assert os.listdir(tmp_path / "a") == ["b.bin"]
    assert target.read_bytes() == b"22"


def test_temporaries_of_killed_writers_are_swept_before_a_manifest(tmp_path):
    """A writer killed between its temporary write and the rename leaves ``.NAME.tmp-HEX``; the
    manifest write removes exactly those files (also in sub-folders) and nothing else — not the
    lease's, which another run creating the lease at that moment may be about to link."""
    stage = location(str(tmp_path / "stage"))
    stage.join("shard-000001.parquet").write_bytes(b"whole")
    orphans = [stage.join(".shard-000003.parquet.tmp-" + "ab" * 16), stage.join("ray", ".x.json.tmp-" + "0f" * 16)]
    kept = [
        stage.join(".shard-000004.parquet.tmp-short"),
        stage.join("notes.tmp-" + "ab" * 16),
        stage.join("._LEASE.json.tmp-" + "cd" * 16),
    ]
    for path in orphans + kept:
        os.makedirs(os.path.dirname(path.path), exist_ok=True)
        with open(path.path, "wb") as handle:
            handle.write(b"partial")
    fake_manifest(stage, "test", "h" * 16, {})
    assert not [path for path in orphans if path.exists()]
    assert all(path.exists() for path in kept) and stage.join("shard-000001.parquet").read_bytes() == b"whole"
    assert stage.join(SUCCESS_FILE).read_json()["kind"] == "test"


def test_read_json_names_the_file(tmp_path):
    bad = location(str(tmp_path)).join("bad.json")
    bad.write_bytes(b"{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        bad.read_json()


def test_arrow_filesystem_sees_the_same_objects(storage_root):
    import pyarrow.fs

    root = location(storage_root)
    root.join("x.txt").write_bytes(b"hello")
    info = root.arrow_fs.get_file_info(root.join("x.txt").path)
    assert info.type == pyarrow.fs.FileType.File and info.size == 5


def test_compare_and_swap_succeeds_only_at_the_version_read(storage_root):
    """``replace_if`` and ``delete_if`` act only when the object is still the version read (S3:
    If-Match on the real HTTP endpoint; local: a flock-guarded compare)."""
    target = location(storage_root).join("stage", "_LEASE.json")
    with pytest.raises(FileNotFoundError):
        target.read_versioned()
    assert target.replace_if(b"x", "0" * 64) is None  # nothing to replace
    assert target.create_bytes(b"first")
    data, version = target.read_versioned()
    assert data == b"first"
    newer = target.replace_if(b"second", version)
    assert newer is not None and newer != version and target.read_bytes() == b"second"
    assert target.replace_if(b"third", version) is None and target.read_bytes() == b"second"  # stale version
    assert not target.delete_if(version) and target.exists()
    assert target.read_versioned()[1] == newer
    assert target.delete_if(newer) and not target.exists()
    assert not target.delete_if(newer)


def test_of_many_concurrent_swaps_from_one_version_exactly_one_wins(storage_root):
    import threading

    target = location(storage_root).join("stage", "_LEASE.json")
    target.create_bytes(b"start")
    _, version = target.read_versioned()
    results: list[str | None] = [None] * 8
    barrier = threading.Barrier(8)

    def swap(i: int) -> None:
        barrier.wait()
        results[i] = target.replace_if(f"writer {i}".encode(), version)

    threads = [threading.Thread(target=swap, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, result in enumerate(results) if result is not None]
    assert len(winners) == 1 and target.read_bytes() == f"writer {winners[0]}".encode()
