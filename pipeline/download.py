"""Download stage: fetch the two Open-I archives and extract them safely into ``data/raw``.

The archives come either from a local mirror folder, used in place, or over HTTP(S) with
resumable, retried and checksum-verified transfers. Extraction never writes outside its
destination folder: links, special files, unsafe paths and oversized members are skipped
and counted, and an archive that would extract to more than a set total is rejected.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import requests
import urllib3
from tqdm import tqdm

from pipeline.atomic import atomic_directory, write_text
from pipeline.config import DownloadParams
from pipeline.errors import PipelineError
from pipeline.logs import log_duration

logger = logging.getLogger(__name__)

REPORTS_ARCHIVE = "NLMCXR_reports.tgz"
IMAGES_ARCHIVE = "NLMCXR_png.tgz"
# Size in bytes and SHA-256 of the Open-I report archive, which contains ecgen-radiology/N.xml.
REPORTS_SIZE = 1_112_632
REPORTS_SHA256 = "8fb6de7eec73d8c3665067ad4bb003ccd57f971ae316d2642e1627ac7268667a"
CHECKSUMS_FILE = "SHA256SUMS"
STANDIN_NOTICE = "STANDIN-IMAGES.txt"

CHUNK_BYTES = 64 * 1024
MAX_BACKOFF_S = 60.0
MAX_TEXT_BYTES = 64 * 1024


class DownloadError(PipelineError, RuntimeError):
    """Raised when an archive cannot be fetched, or a mirror folder does not contain it."""


class DownloadTimeoutError(DownloadError):
    """Raised when the last attempt of a download received no data for ``timeout_s`` seconds."""


class ChecksumError(DownloadError):
    """Raised when a fetched or mirrored archive has the wrong size or SHA-256."""


class ArchiveError(DownloadError):
    """Raised when a file is not a readable gzip-compressed tar archive."""


class UnsafeArchiveError(ArchiveError):
    """Raised when an archive would extract to more than the allowed total size."""


class _TransientError(Exception):
    """A failed attempt that the next one may fix, such as a 5xx status or a truncated body."""


_RETRYABLE = (
    _TransientError,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
)


@dataclass(frozen=True)
class FetchResult:
    """A verified file on disk: its path, size in bytes and hex SHA-256."""

    path: Path
    size: int
    sha256: str


@dataclass
class ExtractStats:
    """Counts from one extraction: files written, bytes written and skipped members by reason."""

    extracted: int = 0
    extracted_bytes: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        """Return the counts as plain JSON-ready values."""
        return {
            "extracted": self.extracted,
            "extracted_bytes": self.extracted_bytes,
            "skipped": dict(sorted(self.skipped.items())),
        }


# ---------------------------------------------------------------------------------------
# HTTP download


def hash_file(path: Path | str, length: int | None = None) -> tuple[int, str]:
    """Return the size in bytes and hex SHA-256 of ``path``, or of its first ``length`` bytes."""
    size, hasher = _hash_prefix(Path(path), length)
    return size, hasher.hexdigest()


def _hash_prefix(path: Path, length: int | None) -> tuple[int, Any]:
    hasher = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while length is None or size < length:
            read_size = CHUNK_BYTES if length is None else min(CHUNK_BYTES, length - size)
            chunk = handle.read(read_size)
            if not chunk:
                break
            hasher.update(chunk)
            size += len(chunk)
    return size, hasher


def fetch(
    url: str,
    destination: Path | str,
    *,
    timeout_s: float,
    retries: int,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    backoff_s: float = 1.0,
) -> FetchResult:
    """Download ``url`` to ``destination`` through ``destination.part``, resuming and retrying.

    ``timeout_s`` is the maximum number of seconds that connecting, or any one read of the
    response, may wait. ``retries`` is the number of attempts after the first. Each retry
    waits ``backoff_s * 2**n`` seconds (at most 60) and resumes the partial file with a
    Range request. Connection errors, timeouts, truncated bodies and 5xx responses are
    retried, while 4xx responses other than 416 raise DownloadError at once. A size or SHA-256 mismatch deletes the partial file and
    raises ChecksumError. ``destination`` appears only after verification. If it already
    exists and ``expected_sha256`` matches it, no request is made.
    """
    destination = Path(destination)
    existing = _existing_result(destination, expected_size, expected_sha256)
    if existing is not None:
        return existing

    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    with requests.Session() as session:
        size, sha256 = _download_with_retries(
            session, url, part, timeout_s=timeout_s, retries=retries,
            backoff_s=backoff_s, expected_size=expected_size,
        )
    _verify_part(part, url, size, sha256, expected_size, expected_sha256)
    os.replace(part, destination)
    write_text(_sha256_record(destination), sha256 + "\n")
    logger.info("%s: saved %d bytes to %s (sha256 %s)", url, size, destination, sha256)
    return FetchResult(destination, size, sha256)


def _existing_result(
    destination: Path, expected_size: int | None, expected_sha256: str | None
) -> FetchResult | None:
    """Reuse a finished download when it matches the expected sha256, or else its own record.

    Without an expected sha256, the ``.sha256`` file written when the download finished
    stands in for it, so an unchanged archive is not fetched again on every run.
    """
    if not destination.is_file():
        return None
    record = _sha256_record(destination)
    expected = expected_sha256 or (record.read_text(encoding="utf-8").strip() if record.is_file() else None)
    if not expected:
        return None
    size, sha256 = hash_file(destination)
    if sha256 == expected.lower() and expected_size in (None, size):
        logger.info("%s: already present with the expected sha256, skipping the download", destination)
        return FetchResult(destination, size, sha256)
    logger.warning("%s: exists but its sha256 is %s, expected %s; downloading it again",
                   destination, sha256, expected)
    return None


def _sha256_record(destination: Path) -> Path:
    return destination.with_name(destination.name + ".sha256")


def _download_with_retries(
    session: requests.Session, url: str, part: Path, *, timeout_s: float, retries: int,
    backoff_s: float, expected_size: int | None,
) -> tuple[int, str]:
    last_error: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            return _attempt(session, url, part, timeout_s=timeout_s, expected_size=expected_size)
        except requests.exceptions.SSLError as error:
            raise DownloadError(f"{url}: TLS error: {error}") from error
        except _RETRYABLE as error:
            last_error = error
            if attempt == retries:
                break
            delay = min(backoff_s * 2**attempt, MAX_BACKOFF_S)
            logger.warning("%s: attempt %d of %d failed: %s; retrying in %.2f s from byte %d",
                           url, attempt + 1, retries + 1, _describe(error, timeout_s), delay, _file_size(part))
            time.sleep(delay)
        except requests.RequestException as error:
            raise DownloadError(f"{url}: request failed: {error}") from error

    error_class = DownloadTimeoutError if _is_timeout(last_error) else DownloadError
    raise error_class(
        f"{url}: download failed after {retries + 1} attempts; last error: "
        f"{_describe(last_error, timeout_s)}. The partial file {part} ({_file_size(part)} bytes) "
        "is kept, so the next run resumes it"
    ) from last_error


def _attempt(
    session: requests.Session, url: str, part: Path, *, timeout_s: float, expected_size: int | None
) -> tuple[int, str]:
    """Run one request and append its body to ``part``; return the file's size and SHA-256."""
    offset = _resume_offset(part, expected_size)
    with _request(session, url, offset, timeout_s) as response:
        status = response.status_code
        if status == 416:
            _accept_complete_part(response, url, part, offset, expected_size)
            return hash_file(part)
        if status == 206:
            _check_content_range(response, url, part, offset)
        elif status == 200:
            if offset:
                logger.warning("%s: server ignored the Range request; restarting from byte 0", url)
            offset = 0
        else:
            raise DownloadError(f"{url}: unexpected HTTP {status} {response.reason}; expected 200 or 206")
        return _stream_body(response, url, part, offset, expected_size)


def _resume_offset(part: Path, expected_size: int | None) -> int:
    offset = _file_size(part)
    if expected_size is not None and offset > expected_size:
        logger.warning("%s: %d bytes, more than the expected %d; starting again", part, offset, expected_size)
        part.unlink()
        return 0
    return offset


def _request(session: requests.Session, url: str, offset: int, timeout_s: float) -> requests.Response:
    # identity: a server that gzips the .tgz again would make the bytes differ from the checksum.
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    response = session.get(url, headers=headers, stream=True, timeout=timeout_s)
    status = response.status_code
    if status >= 500:
        response.close()
        raise _TransientError(f"HTTP {status} {response.reason}")
    if 400 <= status < 500 and status != 416:
        response.close()
        raise DownloadError(f"{url}: HTTP {status} {response.reason}; check download.base_url and the file name")
    return response


def _accept_complete_part(
    response: requests.Response, url: str, part: Path, offset: int, expected_size: int | None
) -> None:
    """Accept a 416 response to ``bytes=offset-`` if ``part`` already contains the whole file."""
    match = re.fullmatch(r"bytes \*/(\d+)", response.headers.get("Content-Range", "").strip())
    total = int(match.group(1)) if match else expected_size
    if offset and total == offset:
        logger.info("%s: partial file %s is already complete (%d bytes)", url, part, offset)
        return
    part.unlink(missing_ok=True)
    raise _TransientError(f"HTTP 416 for a resume at byte {offset} of a {total}-byte file; restarting from 0")


def _check_content_range(response: requests.Response, url: str, part: Path, offset: int) -> None:
    content_range = response.headers.get("Content-Range", "")
    match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
    if match and int(match.group(1)) == offset:
        return
    part.unlink(missing_ok=True)
    raise _TransientError(
        f"HTTP 206 with Content-Range {content_range!r} for a resume at byte {offset}; restarting from 0"
    )


def _stream_body(
    response: requests.Response, url: str, part: Path, offset: int, expected_size: int | None
) -> tuple[int, str]:
    """Write the body after ``offset`` bytes of ``part``, hashing the prefix and the new bytes."""
    _, hasher = _hash_prefix(part, offset) if offset else (0, hashlib.sha256())
    content_length = _int_header(response, "Content-Length")
    total = expected_size if expected_size is not None else _sum_or_none(offset, content_length)
    received = 0
    with part.open("ab" if offset else "wb") as out, _progress(part.name, total, offset) as bar:
        out.truncate(offset)
        # raw.stream skips requests' content decoding, so the bytes on disk are the bytes sent.
        for chunk in response.raw.stream(CHUNK_BYTES, decode_content=False):
            out.write(chunk)
            hasher.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
            if expected_size is not None and offset + received > expected_size:
                break

    size = offset + received
    if expected_size is not None and size > expected_size:
        part.unlink()
        raise ChecksumError(f"{url}: server sent more than the expected {expected_size} bytes; partial file deleted")
    if content_length is not None and received < content_length:
        raise _TransientError(f"body truncated after {received} of {content_length} bytes")
    return size, hasher.hexdigest()


def _verify_part(
    part: Path, url: str, size: int, sha256: str, expected_size: int | None, expected_sha256: str | None
) -> None:
    problems = []
    if expected_size is not None and size != expected_size:
        problems.append(f"expected {expected_size} bytes, got {size}")
    if expected_sha256 and sha256 != expected_sha256.lower():
        problems.append(f"expected sha256 {expected_sha256.lower()}, got {sha256}")
    if problems:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"{url}: downloaded file is invalid ({'; '.join(problems)}). The partial file was deleted, "
            "so the next run downloads it again from the start"
        )


def _progress(name: str, total: int | None, initial: int) -> tqdm:
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=name, mininterval=1.0, leave=False)


def _int_header(response: requests.Response, name: str) -> int | None:
    value = response.headers.get(name)
    return int(value) if value is not None and value.strip().isdigit() else None


def _sum_or_none(offset: int, length: int | None) -> int | None:
    return None if length is None else offset + length


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _is_timeout(error: BaseException | None) -> bool:
    # requests turns a read timeout during the body into ConnectionError(ReadTimeoutError).
    for _ in range(8):
        if error is None:
            return False
        if isinstance(error, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
            return True
        inner = error.args[0] if error.args and isinstance(error.args[0], BaseException) else None
        error = inner or error.__cause__ or error.__context__
    return False


def _describe(error: BaseException | None, timeout_s: float) -> str:
    if _is_timeout(error):
        return f"timed out: no data for {timeout_s} s ({error})"
    return str(error)


# ---------------------------------------------------------------------------------------
# Safe extraction


def safe_extract(
    archive: Path | str,
    destination: Path | str,
    *,
    max_member_bytes: int,
    max_total_bytes: int,
    suffixes: tuple[str, ...] | list[str] | None = None,
    flatten: bool = False,
) -> ExtractStats:
    """Extract the regular files of a .tar.gz ``archive`` into ``destination``, replacing it.

    Members are read one at a time and copied with a byte counter, so no file exceeds
    ``max_member_bytes`` bytes whatever its header claims. Skipped members are counted in
    ``ExtractStats.skipped`` under these reasons:

    - ``link``: a symbolic or hard link.
    - ``special_file``: a device or FIFO.
    - ``absolute_path``, ``parent_reference`` (a ``..`` component) and ``invalid_name``.
    - ``suffix``: the name does not end in one of ``suffixes``.
    - ``duplicate``: the name was seen before, and the first copy is kept.
    - ``too_large``: more than ``max_member_bytes``.
    - ``path_conflict``: a file where a folder is needed, or the reverse.

    Directory members are ignored because folders are created as files need them.
    ``flatten`` keeps only each member's base name.

    Files are written with default permissions, never the archive's modes. Extraction goes
    to a temporary folder that replaces ``destination`` only on success. Raises ArchiveError,
    leaving ``destination`` as it was, if ``archive`` is not a readable .tar.gz file or its
    gzip CRC-32 or length check fails. Raises UnsafeArchiveError, leaving
    ``destination`` as it was, once the extracted total would exceed ``max_total_bytes``.
    """
    archive = Path(archive)
    suffix_tuple = tuple(suffixes) if suffixes is not None else None
    stats = ExtractStats()
    with atomic_directory(destination) as staging, _open_archive(archive) as tar:
        seen: set[str] = set()
        for member in _members(tar, archive):
            relative, reason = _member_target(member, seen, suffix_tuple, flatten, max_member_bytes)
            if reason:
                stats.skipped[reason] += 1
            elif relative is not None:
                _extract_member(tar, member, archive, staging / relative, stats,
                                max_member_bytes=max_member_bytes, max_total_bytes=max_total_bytes)
        _check_gzip_trailer(tar, archive)
    _log_extract_stats(archive, Path(destination), stats)
    return stats


_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def _archive_error(archive: Path, error: BaseException) -> ArchiveError:
    return ArchiveError(
        f"{archive}: not a readable gzip-compressed tar archive ({type(error).__name__}: {error}). "
        "The file is probably truncated or corrupt: delete it and download it again"
    )


@contextlib.contextmanager
def _open_archive(archive: Path) -> Iterator[tarfile.TarFile]:
    try:
        tar = tarfile.open(archive, "r:gz")
    except FileNotFoundError:
        raise ArchiveError(f"{archive}: not found; run the download stage again") from None
    except _READ_ERRORS as error:
        raise _archive_error(archive, error) from error
    with tar:
        yield tar


def _members(tar: tarfile.TarFile, archive: Path) -> Iterator[tarfile.TarInfo]:
    """Yield members one header at a time, turning read errors into ArchiveError."""
    iterator = iter(tar)
    while True:
        try:
            member = next(iterator)
        except StopIteration:
            return
        except _READ_ERRORS as error:
            raise _archive_error(archive, error) from error
        yield member


def _check_gzip_trailer(tar: tarfile.TarFile, archive: Path) -> None:
    """Read the compressed stream to its end, so that gzip checks its CRC-32 and length trailer.

    tarfile stops at the end-of-archive marker, before the trailer, so without this a
    corrupted body that still parses as tar members would go unnoticed.
    """
    try:
        while tar.fileobj.read(CHUNK_BYTES):
            pass
    except _READ_ERRORS as error:
        raise _archive_error(archive, error) from error


def _member_target(
    member: tarfile.TarInfo, seen: set[str], suffixes: tuple[str, ...] | None, flatten: bool,
    max_member_bytes: int,
) -> tuple[PurePosixPath | None, str | None]:
    """Return the relative path to write ``member`` to, or the reason to skip it."""
    if member.isdir():
        return None, None
    if member.issym() or member.islnk():
        return None, "link"
    if not member.isreg():
        return None, "special_file"
    if member.name.startswith("/"):
        return None, "absolute_path"
    parts = [part for part in PurePosixPath(member.name).parts if part not in ("", ".")]
    if ".." in parts:
        return None, "parent_reference"
    if not parts:
        return None, "invalid_name"
    relative = PurePosixPath(parts[-1]) if flatten else PurePosixPath(*parts)
    if suffixes is not None and not relative.name.endswith(suffixes):
        return None, "suffix"
    if str(relative) in seen:
        return None, "duplicate"
    seen.add(str(relative))
    if member.size > max_member_bytes:
        return None, "too_large"
    return relative, None


def _extract_member(
    tar: tarfile.TarFile, member: tarfile.TarInfo, archive: Path, target: Path, stats: ExtractStats,
    *, max_member_bytes: int, max_total_bytes: int,
) -> None:
    if stats.extracted_bytes + member.size > max_total_bytes:
        raise UnsafeArchiveError(
            f"{archive}: member {member.name!r} would bring the extracted total above "
            f"max_total_bytes={max_total_bytes}; the archive may be a decompression bomb. "
            "Raise download.max_total_bytes only if the archive is trusted"
        )
    try:
        source = tar.extractfile(member)
        if source is None:
            stats.skipped["special_file"] += 1
            return
        with source:
            written = _copy_limited(source, target, max_member_bytes)
    except (FileExistsError, IsADirectoryError, NotADirectoryError):
        stats.skipped["path_conflict"] += 1
        return
    except _READ_ERRORS as error:
        raise _archive_error(archive, error) from error

    if written is None:
        stats.skipped["too_large"] += 1
        return
    stats.extracted += 1
    stats.extracted_bytes += written
    if stats.extracted_bytes > max_total_bytes:
        raise UnsafeArchiveError(f"{archive}: extracted total exceeds max_total_bytes={max_total_bytes}")


def _copy_limited(source: IO[bytes], target: Path, limit: int) -> int | None:
    """Copy ``source`` to a new file ``target``; return bytes written, or None past ``limit``.

    tarfile's extractfile returns exactly the header's size, which the caller has checked,
    so this counter is a second guard in case a reader returns more than the header states.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with target.open("xb") as out:
        while chunk := source.read(CHUNK_BYTES):
            written += len(chunk)
            if written > limit:
                break
            out.write(chunk)
    if written > limit:
        target.unlink()
        return None
    return written


_HARMLESS_SKIPS = {"suffix"}


def _log_extract_stats(archive: Path, destination: Path, stats: ExtractStats) -> None:
    logger.info("%s: extracted %d files (%d bytes) into %s", archive, stats.extracted,
                stats.extracted_bytes, destination)
    for reason, count in sorted(stats.skipped.items()):
        level = logging.INFO if reason in _HARMLESS_SKIPS else logging.WARNING
        logger.log(level, "%s: skipped %d members: %s", archive, count, reason)


# ---------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class _ArchiveSpec:
    name: str
    folder: str
    suffixes: tuple[str, ...]
    flatten: bool
    size: int | None
    sha256: str | None


REPORTS = _ArchiveSpec(REPORTS_ARCHIVE, "reports", (".xml",), False, REPORTS_SIZE, REPORTS_SHA256)
# NOTE: Open-I publishes no checksum for NLMCXR_png.tgz. Unless the source folder has a
# SHA256SUMS file, the download is checked only by its length and by extracting it.
IMAGES = _ArchiveSpec(IMAGES_ARCHIVE, "images", (".png",), True, None, None)


@dataclass(frozen=True)
class _Source:
    """Folder-level facts about where the archives come from: a mirror path or a base URL."""

    location: str
    kind: str
    checksums: dict[str, str]
    standin_images: bool


def run(
    params: DownloadParams,
    raw_dir: Path = Path("data/raw"),
    downloads_dir: Path = Path("data/downloads"),
) -> dict[str, Any]:
    """Fetch and extract the Open-I archives and write ``raw_dir/manifest.json``.

    Reports go to ``raw_dir/reports/ecgen-radiology/*.xml`` and, when ``params.images`` is
    true, images to ``raw_dir/images/*.png``. The returned manifest has these keys:

    - ``source`` and ``source_kind``: the mirror folder or base URL, and ``mirror`` or ``url``.
    - ``standin_images``: true when the source folder contains STANDIN-IMAGES.txt, which
      means the pixels are stand-ins that do not show the reported findings.
    - ``archives``: one entry per archive with its source, size in bytes, sha256, the
      checksum lists it was verified against, the extraction counts and the output folder.
    """
    raw_dir = Path(raw_dir)
    # The stage declares this folder as an output, so it exists even when a mirror is used.
    Path(downloads_dir).mkdir(parents=True, exist_ok=True)
    manifest_path = raw_dir / "manifest.json"
    # No manifest while the stage runs, so an existing manifest always describes a finished run.
    manifest_path.unlink(missing_ok=True)
    specs = [REPORTS, IMAGES] if params.images else [REPORTS]

    with log_duration(logger, "download stage"):
        source = _describe_source(params)
        archives = {spec.name: _obtain_and_extract(spec, params, source, raw_dir, Path(downloads_dir))
                    for spec in specs}
    if not params.images:
        # An empty images folder keeps the stage's declared outputs complete and drops
        # images left by an earlier run, which would otherwise count as present.
        with atomic_directory(raw_dir / IMAGES.folder):
            pass
        logger.info("download.images is false: %s is empty", raw_dir / IMAGES.folder)

    manifest = {
        "source": source.location,
        "source_kind": source.kind,
        "standin_images": bool(params.images and source.standin_images),
        "archives": archives,
    }
    write_text(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    logger.info("wrote %s", manifest_path)
    return manifest


def _obtain_and_extract(
    spec: _ArchiveSpec, params: DownloadParams, source: _Source, raw_dir: Path, downloads_dir: Path
) -> dict[str, Any]:
    expected_sha256, checked_against = _expected_sha256(spec, source)
    with log_duration(logger, f"get {spec.name}"):
        if source.kind == "mirror":
            result = _verify_mirror_file(spec, Path(source.location), expected_sha256, checked_against)
            origin = str(result.path)
        else:
            origin = f"{source.location}/{spec.name}"
            result = fetch(origin, downloads_dir / spec.name, timeout_s=params.timeout_s,
                           retries=params.retries, expected_size=spec.size,
                           expected_sha256=expected_sha256, backoff_s=params.backoff_s)

    output = raw_dir / spec.folder
    with log_duration(logger, f"extract {spec.name}"):
        stats = safe_extract(result.path, output, max_member_bytes=params.max_member_bytes,
                             max_total_bytes=params.max_total_bytes, suffixes=spec.suffixes,
                             flatten=spec.flatten)
    entry = {"source": origin, "size": result.size, "sha256": result.sha256,
             "verified_against": checked_against, "output": str(output), **stats.as_dict()}
    if spec is IMAGES:
        entry["standin_images"] = source.standin_images
    return entry


def _describe_source(params: DownloadParams) -> _Source:
    if params.mirror:
        mirror = Path(params.mirror)
        if mirror.exists() and not mirror.is_dir():
            raise DownloadError(
                f"download.mirror {mirror}: is a file, expected a folder; set download.mirror to the folder that holds "
                "NLMCXR_reports.tgz and NLMCXR_png.tgz"
            )
        if not mirror.is_dir():
            raise DownloadError(f"download.mirror {mirror}: folder not found; {_mirror_fix(mirror)}")
        sums_path = mirror / CHECKSUMS_FILE
        sums = parse_sha256sums(sums_path.read_text(encoding="utf-8"), str(sums_path)) if sums_path.is_file() else {}
        return _Source(str(mirror), "mirror", sums, (mirror / STANDIN_NOTICE).is_file())

    base_url = params.base_url.rstrip("/")
    # Optional files beside the archives; a mirror folder served over HTTP contains both.
    sums_url = f"{base_url}/{CHECKSUMS_FILE}"
    sums_text = _fetch_optional_text(sums_url, params.timeout_s)
    sums = parse_sha256sums(sums_text, sums_url) if sums_text is not None else {}
    notice = params.images and _fetch_optional_text(f"{base_url}/{STANDIN_NOTICE}", params.timeout_s) is not None
    return _Source(base_url, "url", sums, bool(notice))


def _mirror_fix(mirror: Path) -> str:
    return (f"create the mirror with `../shared/tools/make-openi-mirror {mirror}`, or set download.mirror to null "
            "to download from download.base_url")


def parse_sha256sums(text: str, source: str) -> dict[str, str]:
    """Parse ``sha256sum`` output (``HEX  NAME`` or ``HEX *NAME`` lines) into {name: hex}."""
    sums = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.rstrip("\r"))
        if match is None:
            raise DownloadError(f"{source}: line {number} is not a 'SHA256  NAME' line: {line!r}")
        sums[match.group(2)] = match.group(1).lower()
    return sums


def _fetch_optional_text(url: str, timeout_s: float) -> str | None:
    """Return the text at ``url``, or None if the server responds 403, 404 or 410."""
    try:
        with requests.get(url, stream=True, timeout=timeout_s) as response:
            if response.status_code in (403, 404, 410):
                logger.info("%s: not present (HTTP %d)", url, response.status_code)
                return None
            response.raise_for_status()
            body = response.raw.read(MAX_TEXT_BYTES + 1, decode_content=True)
    except requests.RequestException as error:
        raise DownloadError(f"{url}: request failed: {error}") from error
    if len(body) > MAX_TEXT_BYTES:
        raise DownloadError(f"{url}: larger than {MAX_TEXT_BYTES} bytes; expected a short text file")
    return body.decode("utf-8", errors="replace")


def _expected_sha256(spec: _ArchiveSpec, source: _Source) -> tuple[str | None, list[str]]:
    """Return the SHA-256 that ``spec``'s file must have and the names of the lists that state it."""
    candidates = []
    if spec.sha256:
        candidates.append(("known Open-I checksum", spec.sha256))
    if spec.name in source.checksums:
        candidates.append((f"{source.location}/{CHECKSUMS_FILE}", source.checksums[spec.name]))
    elif source.checksums:
        logger.warning("%s/%s does not list %s", source.location, CHECKSUMS_FILE, spec.name)

    values = {value for _, value in candidates}
    if len(values) > 1:
        listing = ", ".join(f"{label}: {value}" for label, value in candidates)
        raise ChecksumError(f"{spec.name}: checksums disagree ({listing}); rebuild or replace the source")
    return (values.pop() if values else None), [label for label, _ in candidates]


def _verify_mirror_file(
    spec: _ArchiveSpec, mirror: Path, expected_sha256: str | None, checked_against: list[str]
) -> FetchResult:
    path = mirror / spec.name
    if not path.is_file():
        raise DownloadError(f"{path}: not found in mirror folder {mirror}; {_mirror_fix(mirror)}")
    size, sha256 = hash_file(path)
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise ChecksumError(
            f"{path}: sha256 is {sha256}, expected {expected_sha256} ({', '.join(checked_against)}); "
            f"the file is corrupt or replaced, {_mirror_fix(mirror)}"
        )
    if spec.size is not None and size != spec.size:
        raise ChecksumError(f"{path}: {size} bytes, expected {spec.size}; {_mirror_fix(mirror)}")
    if expected_sha256 is None:
        logger.warning("%s: no checksum to verify against (add it to %s)", path, CHECKSUMS_FILE)
    logger.info("%s: using the mirror copy in place (%d bytes, sha256 %s)", path, size, sha256)
    return FetchResult(path, size, sha256)
