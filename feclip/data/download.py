"""Downloads: a resumable, verified download, the extraction in place, and the source table's views.

The source table, :data:`SOURCES` (homepage, licence, archive URL when one is public, size and sha256
(None when not known: then completeness is checked against the server's Content-Length only; no checksum
is ever guessed), manual steps for datasets behind a form, Kaggle or a file-sharing page, and the layout
expected under ``$DATA_ROOT/<DEFAULT_DIRS[name]>``), is declared by the reader modules and derived in
:mod:`feclip.data.catalogue`; this module reads it.

:func:`download_file` writes to ``<file>.part``, resumes it with an HTTP ``Range`` request, verifies
the size and the sha256, and only then renames it to ``<file>``; a file that fails verification is
deleted and never taken as complete. (The ``.part`` name is fixed, not a unique temporary name as
:mod:`feclip.fileio` gives, because a later run resumes it.) :func:`fetch` downloads and extracts one
dataset in place. :class:`DownloadProgress` reports a transfer: a tqdm bar on a terminal, a line every
10 % or every minute elsewhere.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from feclip.data.catalogue import DATASETS, DEFAULT_DIRS, SOURCES, dataset_info
from feclip.data.spec import Source
from feclip.errors import ConfigError, DatasetError
from feclip.fileio import atomic_write_text

__all__ = [
    "SOURCES",
    "DownloadError",
    "DownloadProgress",
    "Source",
    "describe",
    "download_file",
    "download_hint",
    "extract_archive",
    "fetch",
    "source_table",
]


class DownloadError(DatasetError):
    """A download failed or its file does not verify (size, checksum, archive format)."""


def describe(name: str) -> str:
    """A readable block: title, homepage, licence, archive (with what is verified), folder, layout,
    manual steps."""
    src = _source(name)
    lines = [f"{src.name}: {src.title}", f"  homepage: {src.homepage}", f"  licence:  {src.licence}"]
    if src.url:
        check = (
            f"sha256 {src.sha256} (from {src.checksum_source})" if src.sha256 else "sha256 unknown: size only"
        )
        lines += [f"  archive:  {src.url}", f"  verify:   {check}"]
    else:
        lines.append("  archive:  none public; manual steps below")
    lines.append(f"  folder:   $DATA_ROOT/{DEFAULT_DIRS.get(src.name, src.name)} (default)")
    lines.append(f"  layout:   {src.layout}")
    lines.append("  manual steps:")
    lines += ["    " + line for line in src.manual.splitlines()]
    return "\n".join(lines)


def source_table() -> str:
    """One line per dataset: its folder under ``DATA_ROOT``, how it is obtained, its licence."""
    lines = [f"{'dataset':<14} {'folder under DATA_ROOT':<24} {'download':<10} licence"]
    for name in DATASETS:
        src = SOURCES.get(name)
        kind = (
            "-"
            if src is None
            else ("archive" if src.url else "generated" if name == "synthetic" else "manual")
        )
        licence = src.licence if src else "yours"
        lines.append(f"{name:<14} {DEFAULT_DIRS.get(name, '(your path)'):<24} {kind:<10} {licence}")
    return "\n".join(lines)


def _source(name: str) -> Source:
    dataset_info(name)  # unknown name -> ConfigError listing the names
    if name not in SOURCES:
        raise ConfigError(
            f"{name} is your own data: there is nothing to download (datasets: {', '.join(SOURCES)})"
        )
    return SOURCES[name]


# ---------------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------------


def sha256_of(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(chunk_size), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(path: Path, size: int | None, sha256: str | None) -> None:
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DownloadError(f"{path} has {actual} bytes, expected {size}")
    if sha256 is not None:
        got = sha256_of(path)
        if got != sha256.lower():
            raise DownloadError(f"{path}: sha256 {got} does not match the expected {sha256}")


class DownloadProgress:
    """A ``progress(bytes_so_far, total_or_None)`` callback for :func:`download_file` and :func:`fetch`.

    On a terminal (``file.isatty()``), a tqdm bar in bytes (starting at the bytes a resumed ``.part``
    already holds). Elsewhere (a redirected stderr, a SLURM ``.err`` file, a CI log), one line when the
    transfer starts, then one at every ``every_percent`` of a known size and one every ``every_s``
    seconds in between (the only ones when the size is unknown), so that the log stays readable:
    ``<desc>: 12.6 MB / 125.8 MB (10 %), 3.1 MB/s``. :func:`download_file` calls :meth:`close` when the
    transfer ends.

    Args:
        desc: what is downloaded (the bar's and the lines' label).
        file: where to write; ``None``: ``sys.stderr`` at the first report.
        terminal: force the bar (True) or the lines (False); ``None``: ``file.isatty()``.
        every_percent, every_s: the lines' spacing.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self,
        desc: str,
        *,
        file=None,
        terminal: bool | None = None,
        every_percent: float = 10.0,
        every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.desc, self.file, self.terminal = desc, file, terminal
        self.every_percent, self.every_s, self.clock = every_percent, every_s, clock
        self._bar = None
        self._start: tuple[float, int] | None = None  # (time, bytes) of the first report
        self._last: tuple[float, float] | None = None  # (time, step) of the last line

    def __call__(self, done: int, total: int | None) -> None:
        if self._start is None:
            self.file = self.file if self.file is not None else sys.stderr
            if self.terminal is None:
                isatty = getattr(self.file, "isatty", None)
                self.terminal = bool(isatty and isatty())
            self._start = (self.clock(), done)
            if self.terminal:
                from tqdm.auto import tqdm

                self._bar = tqdm(
                    total=total,
                    initial=done,
                    desc=self.desc,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    file=self.file,
                    dynamic_ncols=True,
                )
                return
        if self._bar is not None:
            if total is not None and self._bar.total != total:
                self._bar.total = total
            self._bar.update(done - self._bar.n)
            return
        now = self.clock()
        step = float(int(100.0 * done / total // self.every_percent)) if total else -1.0
        if self._last is None or step != self._last[1] or now - self._last[0] >= self.every_s:
            self._last = (now, step)
            self._line(done, total, now)

    def _line(self, done: int, total: int | None, now: float) -> None:
        amount = f"{done / 1e6:.1f} MB" + (
            f" / {total / 1e6:.1f} MB ({100.0 * done / total:.0f} %)" if total else ""
        )
        start_time, start_bytes = self._start
        rate = f", {(done - start_bytes) / 1e6 / (now - start_time):.1f} MB/s" if now > start_time else ""
        print(f"{self.desc}: {amount}{rate}", file=self.file, flush=True)

    def close(self) -> None:
        """End the bar (lines need no ending)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _total_from_content_range(value: str | None) -> tuple[int, int | None] | None:
    match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", value or "")
    if not match:
        return None
    return int(match.group(1)), (None if match.group(2) == "*" else int(match.group(2)))


def download_file(
    url: str,
    dest: str | Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` and verifying before the final rename.

    Args:
        url: http(s) URL.
        dest: the final file; the transfer goes to ``<dest>.part``.
        size: expected size in bytes (None: the server's total is used).
        sha256: expected hex digest (None: size only).
        timeout: socket timeout in seconds.
        progress: called as ``progress(bytes_so_far, total_or_None)`` when the transfer starts (with the
            bytes a resumed ``.part`` holds) and after every block, e.g. a :class:`DownloadProgress`;
            its ``close()``, when it has one, is called when the transfer ends.

    Returns:
        ``dest``.

    Raises:
        DownloadError: HTTP/network failure (the ``.part`` file is kept for a later resume), or a file
            that is too large or fails the checksum (the ``.part`` file is deleted).
    """
    dest = Path(dest)
    created = _missing_folders(dest.parent)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _download(url, dest, size, sha256, timeout, chunk_size, progress)
    except BaseException:
        _clean_up(dest.with_name(dest.name + ".part"), created)
        raise
    finally:
        close = getattr(progress, "close", None)
        if close is not None:
            close()


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        missing.append(path)
    return missing


def _clean_up(part: Path, created: list[Path]) -> None:
    """After a failed download: delete an empty ``.part`` (a partial one is kept for a resume), then the
    folders this download created, when they are empty. An offline attempt leaves nothing behind."""
    try:
        if part.is_file() and part.stat().st_size == 0:
            part.unlink()
    except OSError:
        pass
    for folder in created:  # deepest first
        try:
            folder.rmdir()  # only an empty folder
        except OSError:
            break


def _download(url, dest: Path, size, sha256, timeout, chunk_size, progress) -> Path:
    part = dest.with_name(dest.name + ".part")
    if dest.exists():
        try:
            _verify(dest, size, sha256)
        except DownloadError as err:
            raise DownloadError(f"{err}; delete it to download it again") from None
        return dest
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    headers = {"User-Agent": "feclip-data/0.1"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    total: int | None = size
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left to send: the partial file is complete (verified below)
            response = None
            match = re.match(r"bytes \*/(\d+)", err.headers.get("Content-Range") or "")
            total = total or (int(match.group(1)) if match else None)
        else:
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(f"{url}: cannot connect ({getattr(err, 'reason', err)})") from None
    if response is not None:
        with response:
            if response.status == 206:
                span = _total_from_content_range(response.headers.get("Content-Range"))
                if span is None or span[0] != offset:
                    raise DownloadError(f"{url}: the server answered the resume request with a wrong range")
                server_total = span[1]
                mode = "ab"
            else:  # 200: the server ignored the Range header; start again
                offset, mode = 0, "wb"
                length = response.headers.get("Content-Length")
                server_total = int(length) if length and length.isdigit() else None
            if size is not None and server_total is not None and server_total != size:
                raise DownloadError(f"{url}: the server reports {server_total} bytes, expected {size}")
            total = size if size is not None else server_total
            done = offset
            if progress is not None:
                progress(done, total)
            try:
                with part.open(mode) as handle:
                    while block := response.read(chunk_size):
                        handle.write(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
            except (OSError, http.client.HTTPException) as err:
                raise DownloadError(
                    f"{url}: transfer interrupted after {done} bytes ({err}); run again to resume from {part}"
                ) from None
    got = part.stat().st_size if part.exists() else 0
    if total is not None and got < total:
        raise DownloadError(f"{url}: incomplete, {got} of {total} bytes; run again to resume from {part}")
    if total is not None and got > total:
        part.unlink()
        raise DownloadError(f"{url}: {got} bytes, more than the expected {total}; deleted {part}, run again")
    if sha256 is not None:
        digest = sha256_of(part)
        if digest != sha256.lower():
            part.unlink()
            raise DownloadError(
                f"{url}: sha256 {digest} does not match the expected {sha256}; deleted {part} "
                "(corrupt or changed upstream), run again to download afresh"
            )
    part.replace(dest)
    return dest


# ---------------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------------


def extract_archive(archive: str | Path, dest: str | Path) -> None:
    """Extract a tar (any compression) or zip archive into ``dest``, refusing paths that leave ``dest``."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                if not (root / member.name).resolve().is_relative_to(root):
                    raise DownloadError(f"{archive}: member {member.name!r} would be written outside {dest}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(dest, members=members)
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if not (root / name).resolve().is_relative_to(root):
                    raise DownloadError(f"{archive}: member {name!r} would be written outside {dest}")
            zf.extractall(dest)
    else:
        raise DownloadError(f"{archive} is neither a tar nor a zip archive")


def fetch(
    name: str | Source,
    data_root: str | Path,
    *,
    folder: str | None = None,
    keep_archive: bool = True,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download and extract one dataset into ``data_root/<folder>``; return that folder.

    ``folder`` defaults to ``DEFAULT_DIRS[name]``, the folder a run looks in when the dataset's ``dir``
    is not set (a run with ``dir: X`` looks in ``data_root/X``). Skips the download when the verified
    archive is there, and the extraction when a marker says it was done. A dataset with no public
    archive raises :class:`DownloadError` carrying the manual steps. A download that fails before any
    byte arrived (offline, HTTP error) leaves no folder behind; a partial one keeps its ``.part`` file
    for a resume.
    """
    src = name if isinstance(name, Source) else _source(name)
    target = Path(data_root).expanduser() / (folder or DEFAULT_DIRS.get(src.name, src.name))
    if src.url is None or src.filename is None:
        raise DownloadError(f"{src.name} has no public archive; manual steps:\n{src.manual}")
    marker = target / f".feclip_extracted_{src.filename}.json"
    if marker.is_file():
        log(f"{src.name}: already downloaded and extracted in {target}")
        return target
    archive = target / src.filename
    log(f"{src.name}: downloading {src.url} -> {archive}")
    if src.sha256 is None:
        log(f"{src.name}: no known sha256 for this archive; verifying its size only")
    try:
        download_file(src.url, archive, size=src.size, sha256=src.sha256, progress=progress)
    except DownloadError as err:
        raise DownloadError(f"{err}\nIf the URL no longer works, the manual steps:\n{src.manual}") from None
    log(f"{src.name}: extracting {archive} into {target}")
    extract_archive(archive, target)
    atomic_write_text(marker, json.dumps({"url": src.url, "sha256": src.sha256, "time": time.time()}))
    if not keep_archive:
        archive.unlink()
    return target


def download_hint(name: str, data_root: str | Path, folder: str | None = None) -> str:
    """One sentence saying how to get dataset ``name`` where a run looks for it, ``data_root/<folder>``
    (``folder`` None: the dataset's default folder): the command that produces exactly that layout."""
    default = DEFAULT_DIRS.get(name)
    where = Path(data_root) / (folder if folder is not None else (default or ""))
    dir_flag = f" --dir {folder}" if folder is not None and folder != default else ""
    if name == "synthetic":
        if where.name in ("set_a", "set_b"):
            return f"Generate it with `feclip-data synth {where.parent}`"
        return (
            f"Generate the synthetic sets with `feclip-data synth {where}` and point `dir` at one set "
            f"(`{Path(folder or default or '') / 'set_a'}`)"
        )
    src = SOURCES.get(name)
    if src is None:
        return f"{name} is your own data: put it at {where} (layout: {dataset_info(name).layout})"
    if src.url is None:
        return (
            f"It has no public archive: `feclip-data download {name} --root {data_root}` prints the manual "
            f"steps; put the files at {where}"
        )
    return f"Get it with `feclip-data download {name} --root {data_root}{dir_flag}`"
