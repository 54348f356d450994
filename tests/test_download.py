"""Tests for the download stage against a real local HTTP server and real tar files."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_server import FileServer

from pipeline.config import DownloadParams
from pipeline.download import (
    IMAGES_ARCHIVE,
    REPORTS_ARCHIVE,
    REPORTS_SHA256,
    ArchiveError,
    ChecksumError,
    DownloadError,
    DownloadTimeoutError,
    UnsafeArchiveError,
    fetch,
    hash_file,
    run,
    safe_extract,
)

SHARED = Path(os.environ.get("CXRGEN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MAKE_MIRROR = SHARED / "tools" / "make-openi-mirror"
REPORT_COUNT = 3955  # XML reports in the Open-I report archive
MB = 2**20

needs_shared = pytest.mark.skipif(
    not MAKE_MIRROR.is_file(), reason=f"make-openi-mirror not found under {SHARED}; set CXRGEN_SHARED"
)


# ---------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture
def payload() -> bytes:
    """1 MiB of pseudo-random bytes, so that any misplaced byte changes the checksum."""
    return hashlib.sha256(b"seed").digest() * (MB // 32)


@pytest.fixture
def served(tmp_path: Path, payload: bytes) -> Path:
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "blob.bin").write_bytes(payload)
    return folder


@pytest.fixture
def server(served: Path) -> Iterator[FileServer]:
    with FileServer(served) as running:
        yield running


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not MAKE_MIRROR.is_file():
        pytest.skip(f"make-openi-mirror not found under {SHARED}; set CXRGEN_SHARED")
    folder = tmp_path_factory.mktemp("mirror")
    subprocess.run([str(MAKE_MIRROR), str(folder), "--studies", "5"], check=True, capture_output=True)
    return folder


def fetch_blob(server: FileServer, destination: Path, **kwargs: object):
    options = {"timeout_s": 5.0, "retries": 3, "backoff_s": 0.01} | kwargs
    return fetch(f"{server.url}/blob.bin", destination, **options)  # type: ignore[arg-type]


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


# ---------------------------------------------------------------------------------------
# fetch


def test_fetch_plain_with_checksum(server: FileServer, tmp_path: Path, payload: bytes) -> None:
    destination = tmp_path / "out" / "blob.bin"

    result = fetch_blob(server, destination, expected_size=len(payload), expected_sha256=sha256_of(payload))

    assert result.path == destination
    assert result.size == len(payload)
    assert result.sha256 == sha256_of(payload)
    assert destination.read_bytes() == payload
    assert not destination.with_name("blob.bin.part").exists()
    assert len(server.records) == 1
    assert server.records[0].range is None


def test_fetch_existing_file_skips_network(server: FileServer, tmp_path: Path, payload: bytes) -> None:
    destination = tmp_path / "blob.bin"
    fetch_blob(server, destination, expected_sha256=sha256_of(payload))

    result = fetch_blob(server, destination, expected_sha256=sha256_of(payload))

    assert result.sha256 == sha256_of(payload)
    assert len(server.records) == 1


def test_fetch_resumes_after_dropped_connection(server: FileServer, tmp_path: Path, payload: bytes) -> None:
    server.set_faults(drop_after=300_000, count=1)
    destination = tmp_path / "blob.bin"

    result = fetch_blob(server, destination, expected_sha256=sha256_of(payload))

    assert result.sha256 == sha256_of(payload)
    assert destination.read_bytes() == payload
    assert len(server.records) == 2
    resumed = server.records[1]
    assert resumed.status == 206
    assert resumed.range is not None
    start = int(resumed.range.removeprefix("bytes=").removesuffix("-"))
    assert 0 < start <= 300_000


def test_fetch_resumes_part_of_killed_run(server: FileServer, tmp_path: Path, payload: bytes) -> None:
    destination = tmp_path / "blob.bin"
    # A process killed mid-download leaves the bytes it had written in the .part file.
    destination.with_name("blob.bin.part").write_bytes(payload[:123_457])

    result = fetch_blob(server, destination, expected_size=len(payload), expected_sha256=sha256_of(payload))

    assert result.sha256 == sha256_of(payload)
    assert [(record.range, record.status) for record in server.records] == [("bytes=123457-", 206)]
    assert not destination.with_name("blob.bin.part").exists()


def test_fetch_truncated_body_then_retry(server: FileServer, tmp_path: Path, payload: bytes) -> None:
    server.set_faults(truncate_after=500_000, count=1)
    destination = tmp_path / "blob.bin"

    result = fetch_blob(server, destination, expected_size=len(payload), expected_sha256=sha256_of(payload))

    assert result.sha256 == sha256_of(payload)
    assert [record.status for record in server.records] == [200, 206]
    assert server.records[1].range is not None


def test_fetch_server_ignoring_range_restarts(server: FileServer, tmp_path: Path, payload: bytes) -> None:
    destination = tmp_path / "blob.bin"
    # Wrong bytes in the partial file: appending the full body to them would fail the checksum.
    destination.with_name("blob.bin.part").write_bytes(b"x" * 1000)
    server.set_faults(ignore_range=True)

    result = fetch_blob(server, destination, expected_sha256=sha256_of(payload))

    assert result.sha256 == sha256_of(payload)
    assert destination.read_bytes() == payload
    assert server.records[0].range == "bytes=1000-"
    assert server.records[0].status == 200


def test_fetch_wrong_content_range_restarts(server: FileServer, tmp_path: Path, payload: bytes) -> None:
    destination = tmp_path / "blob.bin"
    destination.with_name("blob.bin.part").write_bytes(payload[:1000])
    server.set_faults(wrong_content_range=True, count=1)

    result = fetch_blob(server, destination, expected_sha256=sha256_of(payload))

    assert result.sha256 == sha256_of(payload)
    assert [record.range for record in server.records] == ["bytes=1000-", None]


def test_fetch_complete_part_gets_416(server: FileServer, tmp_path: Path, payload: bytes) -> None:
    destination = tmp_path / "blob.bin"
    destination.with_name("blob.bin.part").write_bytes(payload)

    result = fetch_blob(server, destination, expected_sha256=sha256_of(payload))

    assert result.sha256 == sha256_of(payload)
    assert [record.status for record in server.records] == [416]
    assert destination.read_bytes() == payload


def test_fetch_wrong_checksum_leaves_nothing(server: FileServer, tmp_path: Path, payload: bytes) -> None:
    destination = tmp_path / "blob.bin"

    with pytest.raises(ChecksumError) as caught:
        fetch_blob(server, destination, expected_sha256="0" * 64)

    assert "0" * 64 in str(caught.value)
    assert sha256_of(payload) in str(caught.value)
    assert not destination.exists()
    assert not destination.with_name("blob.bin.part").exists()


def test_fetch_wrong_size_leaves_nothing(server: FileServer, tmp_path: Path, payload: bytes) -> None:
    destination = tmp_path / "blob.bin"

    with pytest.raises(ChecksumError, match=f"expected {len(payload) + 1} bytes, got {len(payload)}"):
        fetch_blob(server, destination, expected_size=len(payload) + 1)

    assert not destination.exists()
    assert not destination.with_name("blob.bin.part").exists()


def test_fetch_oversized_body_stops(server: FileServer, tmp_path: Path) -> None:
    destination = tmp_path / "blob.bin"

    with pytest.raises(ChecksumError, match="more than the expected 1000 bytes"):
        fetch_blob(server, destination, expected_size=1000)

    assert not destination.exists()
    assert not destination.with_name("blob.bin.part").exists()


def test_fetch_404_fails_at_once(server: FileServer, tmp_path: Path) -> None:
    url = f"{server.url}/missing.bin"

    with pytest.raises(DownloadError) as caught:
        fetch(url, tmp_path / "missing.bin", timeout_s=5, retries=3, backoff_s=0.01)

    assert url in str(caught.value)
    assert "404" in str(caught.value)
    assert len(server.records) == 1


def test_fetch_500_retried_then_fails(server: FileServer, tmp_path: Path) -> None:
    server.set_faults(status=500)

    with pytest.raises(DownloadError) as caught:
        fetch_blob(server, tmp_path / "blob.bin", retries=2)

    assert f"{server.url}/blob.bin" in str(caught.value)
    assert "500" in str(caught.value)
    assert len(server.records) == 3
    assert not (tmp_path / "blob.bin").exists()


def test_fetch_500_then_success(server: FileServer, tmp_path: Path, payload: bytes) -> None:
    server.set_faults(status=503, count=2)

    result = fetch_blob(server, tmp_path / "blob.bin", retries=2, expected_sha256=sha256_of(payload))

    assert result.sha256 == sha256_of(payload)
    assert [record.status for record in server.records] == [503, 503, 200]


@pytest.mark.parametrize("stall_after", [None, 100_000], ids=["before_headers", "mid_body"])
def test_fetch_stall_times_out(server: FileServer, tmp_path: Path, stall_after: int | None) -> None:
    server.set_faults(stall_s=30, stall_after=stall_after)
    started = time.monotonic()

    with pytest.raises(DownloadTimeoutError, match="timed out"):
        fetch_blob(server, tmp_path / "blob.bin", timeout_s=0.5, retries=1)

    assert time.monotonic() - started < 5
    assert len(server.records) == 2
    assert not (tmp_path / "blob.bin").exists()


def test_fetch_connection_refused(tmp_path: Path) -> None:
    # Bind and close a socket to get a local port with nothing listening.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(DownloadError, match=f"127.0.0.1:{port}/x.bin: download failed after 2 attempts"):
        fetch(f"http://127.0.0.1:{port}/x.bin", tmp_path / "x.bin", timeout_s=1, retries=1, backoff_s=0.01)


# ---------------------------------------------------------------------------------------
# safe_extract


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_special(tar: tarfile.TarFile, name: str, kind: bytes, linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    tar.addfile(info)


def make_tgz(path: Path, build) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        build(tar)
    return path


def extract(archive: Path, destination: Path, **kwargs: object):
    options = {"max_member_bytes": MB, "max_total_bytes": 10 * MB} | kwargs
    return safe_extract(archive, destination, **options)  # type: ignore[arg-type]


def test_extract_plain_members(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        add_special(tar, "ecgen-radiology", tarfile.DIRTYPE)
        add_file(tar, "ecgen-radiology/1.xml", b"<a/>")
        add_file(tar, "./ecgen-radiology/2.xml", b"<b/>")

    stats = extract(make_tgz(tmp_path / "a.tgz", build), tmp_path / "out")

    assert stats.extracted == 2
    assert stats.extracted_bytes == 8
    assert stats.skipped == {}
    assert (tmp_path / "out" / "ecgen-radiology" / "1.xml").read_bytes() == b"<a/>"
    assert (tmp_path / "out" / "ecgen-radiology" / "2.xml").read_bytes() == b"<b/>"


def test_extract_skips_unsafe_members(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outside = tmp_path / "outside.txt"

    def build(tar: tarfile.TarFile) -> None:
        add_file(tar, str(outside), b"absolute")
        add_file(tar, "../outside.txt", b"traversal")
        add_file(tar, "ok/../../outside.txt", b"nested traversal")
        add_special(tar, "sym", tarfile.SYMTYPE, linkname=str(outside))
        add_special(tar, "sym-rel", tarfile.SYMTYPE, linkname="../outside.txt")
        add_special(tar, "hard", tarfile.LNKTYPE, linkname="../outside.txt")
        add_file(tar, "sym/escape.txt", b"through the link")
        add_special(tar, "fifo", tarfile.FIFOTYPE)
        add_special(tar, "dev", tarfile.CHRTYPE)
        add_special(tar, "blk", tarfile.BLKTYPE)
        add_file(tar, "good.txt", b"good")

    archive = make_tgz(tmp_path / "evil.tgz", build)
    with tarfile.open(archive) as check:
        assert check.getnames()[0] == str(outside)  # tarfile keeps the leading slash

    with caplog.at_level(logging.INFO, logger="pipeline.download"):
        stats = extract(archive, tmp_path / "out")

    assert stats.extracted == 2
    assert "skipped 3 members: link" in caplog.text
    assert "skipped 2 members: parent_reference" in caplog.text
    assert stats.skipped["absolute_path"] == 1
    assert stats.skipped["parent_reference"] == 2
    assert stats.skipped["link"] == 3
    assert stats.skipped["special_file"] == 3
    assert not outside.exists()
    assert files_under(tmp_path) == {"evil.tgz", "out", "out/good.txt", "out/sym", "out/sym/escape.txt"}
    assert not (tmp_path / "out" / "sym").is_symlink()


def test_extract_duplicate_keeps_first(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        add_file(tar, "a.txt", b"first")
        add_file(tar, "./a.txt", b"second")
        add_file(tar, "a.txt", b"third")

    stats = extract(make_tgz(tmp_path / "dup.tgz", build), tmp_path / "out")

    assert stats.extracted == 1
    assert stats.skipped["duplicate"] == 2
    assert (tmp_path / "out" / "a.txt").read_bytes() == b"first"


def test_extract_skips_member_over_limit(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        add_file(tar, "bomb.bin", bytes(10 * MB))
        add_file(tar, "small.bin", b"ok")

    archive = make_tgz(tmp_path / "bomb.tgz", build)
    assert archive.stat().st_size < 100_000  # 10 MiB of zeros compress to about 10 KB at gzip level 9

    stats = extract(archive, tmp_path / "out", max_member_bytes=MB)

    assert stats.skipped["too_large"] == 1
    assert stats.extracted == 1
    assert files_under(tmp_path / "out") == {"small.bin"}


def test_extract_total_limit_raises(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        for index in range(5):
            add_file(tar, f"part{index}.bin", bytes(MB // 2))

    archive = make_tgz(tmp_path / "many.tgz", build)
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "old.txt").write_text("previous run")

    with pytest.raises(UnsafeArchiveError, match="max_total_bytes=2097152"):
        extract(archive, destination, max_member_bytes=MB, max_total_bytes=2 * MB)

    assert files_under(destination) == {"old.txt"}
    assert files_under(tmp_path) == {"many.tgz", "out", "out/old.txt"}


def test_extract_replaces_previous_output(tmp_path: Path) -> None:
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "stale.txt").write_text("old")

    extract(make_tgz(tmp_path / "a.tgz", lambda tar: add_file(tar, "new.txt", b"new")), destination)

    assert files_under(destination) == {"new.txt"}


def test_extract_suffix_filter_and_flatten(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        add_file(tar, "deep/dir/a.png", b"png")
        add_file(tar, "notes.txt", b"txt")
        add_file(tar, "other/a.png", b"same base name")

    stats = extract(make_tgz(tmp_path / "a.tgz", build), tmp_path / "out", suffixes=(".png",), flatten=True)

    assert stats.extracted == 1
    assert stats.skipped == {"suffix": 1, "duplicate": 1}
    assert (tmp_path / "out" / "a.png").read_bytes() == b"png"


def test_extract_path_conflict(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        add_file(tar, "a", b"file")
        add_file(tar, "a/b", b"needs a folder")

    stats = extract(make_tgz(tmp_path / "a.tgz", build), tmp_path / "out")

    assert stats.extracted == 1
    assert stats.skipped["path_conflict"] == 1
    assert (tmp_path / "out" / "a").read_bytes() == b"file"


def test_extract_not_gzip(tmp_path: Path) -> None:
    archive = tmp_path / "fake.tgz"
    archive.write_bytes(b"<html>this is an error page, not an archive</html>")

    with pytest.raises(ArchiveError, match="fake.tgz: not a readable gzip-compressed tar archive") as caught:
        extract(archive, tmp_path / "out")

    assert "download it again" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_extract_plain_tar_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "plain.tgz"
    with tarfile.open(archive, "w") as tar:
        add_file(tar, "a.txt", b"uncompressed")

    with pytest.raises(ArchiveError, match="plain.tgz"):
        extract(archive, tmp_path / "out")


def test_extract_truncated_archive(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        for index in range(20):
            add_file(tar, f"{index}.bin", os.urandom(50_000))

    archive = make_tgz(tmp_path / "full.tgz", build)
    cut = tmp_path / "cut.tgz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])

    with pytest.raises(ArchiveError, match="cut.tgz") as caught:
        extract(cut, tmp_path / "out")

    assert "download it again" in str(caught.value)
    assert not (tmp_path / "out").exists()
    assert files_under(tmp_path) == {"full.tgz", "cut.tgz"}


def corrupt_crc_trailer(data: bytes) -> bytes:
    """Flip the gzip trailer's CRC-32, the 4 bytes before the 4-byte length at the end."""
    return data[:-8] + bytes(byte ^ 0xFF for byte in data[-8:-4]) + data[-4:]


def corrupt_stored_member(data: bytes) -> bytes:
    """Change one byte of the last member's data, which compresslevel=0 stores uncompressed."""
    position = data.rindex(b"Z" * 1000) + 500
    return data[:position] + b"Y" + data[position + 1 :]


@pytest.mark.parametrize("corrupt", [corrupt_crc_trailer, corrupt_stored_member], ids=["crc_trailer", "member_data"])
def test_extract_crc_mismatch_keeps_previous(tmp_path: Path, corrupt) -> None:
    archive = tmp_path / "bad.tgz"
    with tarfile.open(archive, "w:gz", compresslevel=0) as tar:
        add_file(tar, "a.txt", b"first member")
        add_file(tar, "z.txt", b"Z" * 5000)
    archive.write_bytes(corrupt(archive.read_bytes()))
    with tarfile.open(archive, "r:gz") as tar:
        assert len(tar.getmembers()) == 2  # the members still parse; only the gzip trailer check fails
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "old.txt").write_text("previous run")

    with pytest.raises(ArchiveError, match="bad.tgz: not a readable gzip-compressed tar archive") as caught:
        extract(archive, destination)

    assert "CRC check failed" in str(caught.value)
    assert files_under(destination) == {"old.txt"}
    assert files_under(tmp_path) == {"bad.tgz", "out", "out/old.txt"}


def test_extract_missing_archive(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="absent.tgz: not found"):
        extract(tmp_path / "absent.tgz", tmp_path / "out")


# ---------------------------------------------------------------------------------------
# run


def expected_image_names(mirror: Path) -> set[str]:
    with tarfile.open(mirror / IMAGES_ARCHIVE) as tar:
        return {Path(name).name for name in tar.getnames() if name.endswith(".png")}


def mirror_sums(mirror: Path) -> dict[str, str]:
    lines = (mirror / "SHA256SUMS").read_text().splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines)}


def check_raw_output(raw: Path, manifest: dict, mirror: Path) -> None:
    images = expected_image_names(mirror)
    reports = manifest["archives"][REPORTS_ARCHIVE]
    assert reports["extracted"] == REPORT_COUNT
    assert reports["skipped"] == {}
    assert reports["sha256"] == REPORTS_SHA256
    assert len(list((raw / "reports" / "ecgen-radiology").glob("*.xml"))) == REPORT_COUNT
    assert files_under(raw / "reports") == {"ecgen-radiology"} | {
        f"ecgen-radiology/{path.name}" for path in (raw / "reports" / "ecgen-radiology").iterdir()
    }

    image_entry = manifest["archives"][IMAGES_ARCHIVE]
    assert image_entry["extracted"] == len(images)
    assert image_entry["sha256"] == mirror_sums(mirror)[IMAGES_ARCHIVE]
    assert image_entry["size"] == (mirror / IMAGES_ARCHIVE).stat().st_size
    assert files_under(raw / "images") == images
    assert json.loads((raw / "manifest.json").read_text()) == manifest


@needs_shared
def test_run_from_mirror(mirror: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    downloads = tmp_path / "downloads"

    manifest = run(DownloadParams(mirror=str(mirror)), raw_dir=raw, downloads_dir=downloads)

    check_raw_output(raw, manifest, mirror)
    assert manifest["source_kind"] == "mirror"
    assert manifest["standin_images"] is True
    assert manifest["archives"][IMAGES_ARCHIVE]["standin_images"] is True
    assert manifest["archives"][REPORTS_ARCHIVE]["source"] == str(mirror / REPORTS_ARCHIVE)
    assert len(manifest["archives"][REPORTS_ARCHIVE]["verified_against"]) == 2
    assert list(downloads.iterdir()) == []  # a mirror is used in place, never copied


@needs_shared
def test_run_reports_only(mirror: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"

    manifest = run(DownloadParams(mirror=str(mirror), images=False), raw_dir=raw)

    assert list(manifest["archives"]) == [REPORTS_ARCHIVE]
    assert manifest["standin_images"] is False
    assert (raw / "images").is_dir()
    assert not list((raw / "images").iterdir())


@needs_shared
def test_run_mirror_missing_archive(mirror: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial-mirror"
    partial.mkdir()
    (partial / REPORTS_ARCHIVE).symlink_to(mirror / REPORTS_ARCHIVE)

    with pytest.raises(DownloadError) as caught:
        run(DownloadParams(mirror=str(partial)), raw_dir=tmp_path / "raw")

    assert str(partial) in str(caught.value)
    assert "make-openi-mirror" in str(caught.value)
    assert not (tmp_path / "raw" / "manifest.json").exists()


@needs_shared
def test_run_mirror_checksum_mismatch(mirror: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bad-mirror"
    copy.mkdir()
    (copy / REPORTS_ARCHIVE).symlink_to(mirror / REPORTS_ARCHIVE)
    (copy / IMAGES_ARCHIVE).symlink_to(mirror / IMAGES_ARCHIVE)
    (copy / "SHA256SUMS").write_text(f"{'ab' * 32}  {IMAGES_ARCHIVE}\n")

    with pytest.raises(ChecksumError, match=f"expected {'ab' * 32}"):
        run(DownloadParams(mirror=str(copy)), raw_dir=tmp_path / "raw")


@needs_shared
def test_run_mirror_malformed_checksums(mirror: Path, tmp_path: Path) -> None:
    copy = tmp_path / "odd-mirror"
    copy.mkdir()
    (copy / REPORTS_ARCHIVE).symlink_to(mirror / REPORTS_ARCHIVE)
    (copy / "SHA256SUMS").write_text(f"{REPORTS_SHA256}  {REPORTS_ARCHIVE}\nnot a checksum line\n")

    with pytest.raises(DownloadError, match="SHA256SUMS: line 2 is not a 'SHA256  NAME' line"):
        run(DownloadParams(mirror=str(copy), images=False), raw_dir=tmp_path / "raw")


@needs_shared
def test_run_over_http(mirror: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    downloads = tmp_path / "downloads"
    with FileServer(mirror) as http:
        params = DownloadParams(base_url=http.url, timeout_s=5, retries=2, backoff_s=0.01)
        manifest = run(params, raw_dir=raw, downloads_dir=downloads)
        second = run(params, raw_dir=raw, downloads_dir=downloads)

    check_raw_output(raw, second, mirror)
    assert manifest == second
    assert manifest["source_kind"] == "url"
    assert manifest["standin_images"] is True
    assert manifest["archives"][REPORTS_ARCHIVE]["source"] == f"{http.url}/{REPORTS_ARCHIVE}"
    assert hash_file(downloads / REPORTS_ARCHIVE)[1] == REPORTS_SHA256
    assert sorted(path.name for path in downloads.iterdir()) == [
        IMAGES_ARCHIVE, f"{IMAGES_ARCHIVE}.sha256", REPORTS_ARCHIVE, f"{REPORTS_ARCHIVE}.sha256",
    ]
    archive_gets = [record.path for record in http.records if record.path.endswith(".tgz")]
    assert archive_gets == [f"/{REPORTS_ARCHIVE}", f"/{IMAGES_ARCHIVE}"]  # the second run fetched nothing


@needs_shared
def test_run_without_checksums_reuses_finished_download(mirror: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    for name in (REPORTS_ARCHIVE, IMAGES_ARCHIVE):
        shutil.copyfile(mirror / name, served / name)
    downloads = tmp_path / "downloads"
    with FileServer(served) as http:
        params = DownloadParams(base_url=http.url, timeout_s=5, retries=1, backoff_s=0.01)
        run(params, raw_dir=tmp_path / "raw", downloads_dir=downloads)
        run(params, raw_dir=tmp_path / "raw", downloads_dir=downloads)

    image_gets = [record.path for record in http.records if record.path == f"/{IMAGES_ARCHIVE}"]
    assert image_gets == [f"/{IMAGES_ARCHIVE}"]
    recorded = (downloads / f"{IMAGES_ARCHIVE}.sha256").read_text().strip()
    assert recorded == hash_file(served / IMAGES_ARCHIVE)[1]
