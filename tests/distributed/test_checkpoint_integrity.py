"""Checkpoint integrity without reading the files back: the writer's checksum (XXH3-128, taken as the
bytes are written) is the one a resume verifies against; manifests of the earlier SHA-256 format still
verify; a file not as its writer wrote it is refused before the checkpoint is published. Single
process: the manifest code shares files between ranks only when a process group exists."""

import hashlib
import json
import os

import pytest
import xxhash

from megatron_ext.compat.checkpoint_writer import CHECKSUM_SUFFIX, ChecksummedFile, checksummed_open, file_checksum
from megatron_ext.training.checkpoint import MANIFEST, CheckpointError, verify_checkpoint, write_manifest

# Small writes are hashed in line, large ones beside the write in a second thread: both, in order.
CHUNKS = [b"header", os.urandom(3 << 20), b"", os.urandom(5000), os.urandom(1 << 20)]


def _write(path, chunks=CHUNKS):
    with checksummed_open(str(path), "wb") as f:
        for chunk in chunks:
            assert f.write(chunk) == len(chunk)
        assert f.tell() == sum(map(len, chunks))
        f.flush()
        os.fsync(f.fileno())


def test_the_checksum_taken_while_writing_is_the_files(tmp_path):
    data, path = b"".join(CHUNKS), tmp_path / "__0_0.distcp"
    _write(path)
    recorded = json.loads((tmp_path / ("__0_0.distcp" + CHECKSUM_SUFFIX)).read_text())
    assert path.read_bytes() == data
    assert recorded == {"bytes": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    assert file_checksum(path) == recorded["xxh3_128"]


def test_only_sequential_binary_writes_are_checksummed(tmp_path):
    with pytest.raises(OSError, match="seeking is not supported"):
        with ChecksummedFile(str(tmp_path / "a"), "wb") as f:
            f.seek(0)
    with checksummed_open(tmp_path / "b.txt", "w") as f:  # text files open as they would
        f.write("text")
    assert not (tmp_path / ("b.txt" + CHECKSUM_SUFFIX)).exists()
    assert not (tmp_path / ("a" + CHECKSUM_SUFFIX)).exists(), "a failed write leaves no checksum"


def test_the_manifest_takes_the_writers_checksum_and_a_resume_verifies_it(tmp_path):
    _write(tmp_path / "__0_0.distcp")
    (tmp_path / "common.pt").write_bytes(b"small file written by the rank itself")
    writers = json.loads((tmp_path / ("__0_0.distcp" + CHECKSUM_SUFFIX)).read_text())
    write_manifest(tmp_path)
    files = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert files["__0_0.distcp"] == writers
    assert files["common.pt"]["xxh3_128"] == file_checksum(tmp_path / "common.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["__0_0.distcp", "common.pt", MANIFEST]
    assert verify_checkpoint(tmp_path) is None
    data = bytearray((tmp_path / "__0_0.distcp").read_bytes())
    data[len(data) // 2] ^= 1  # one bit flipped on disk
    (tmp_path / "__0_0.distcp").write_bytes(bytes(data))
    assert verify_checkpoint(tmp_path) == "__0_0.distcp does not match its checksum"


def test_a_file_not_as_its_writer_wrote_it_is_not_published(tmp_path):
    _write(tmp_path / "__0_0.distcp")
    with open(tmp_path / "__0_0.distcp", "ab") as f:  # changed after its writer closed it
        f.write(b"more")
    with pytest.raises(CheckpointError, match="__0_0.distcp has .* bytes on disk, but its writer wrote"):
        write_manifest(tmp_path)
    assert not (tmp_path / MANIFEST).exists()


def test_a_manifest_of_the_sha256_format_still_verifies(tmp_path):
    files = {"__0_0.distcp": os.urandom(4096), "common.pt": b"common", ".metadata": b"metadata"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    manifest = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    (tmp_path / MANIFEST).write_text(json.dumps({"files": manifest}))
    assert verify_checkpoint(tmp_path) is None
    (tmp_path / "common.pt").write_bytes(b"COMMON")
    assert verify_checkpoint(tmp_path) == "common.pt does not match its checksum"
