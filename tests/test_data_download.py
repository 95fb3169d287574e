"""Downloads against a local HTTP server on 127.0.0.1: fresh, resumed (Range), restarted, truncated,
checksum mismatch, extraction in place; and the source table's honesty (no invented checksums)."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from feclip.data import DEFAULT_DIRS, list_samples
from feclip.data.download import (
    SOURCES,
    DownloadError,
    DownloadProgress,
    Source,
    describe,
    download_file,
    extract_archive,
    fetch,
)


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        server = self.server
        server.requests.append(self.headers.get("Range"))
        if self.path != "/data.tar":
            self.send_error(404)
            return
        data = server.payload
        start = 0
        match = re.match(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and server.ranges:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_next:  # announce the full length, send half, hang up
            server.cut_next = False
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.payload = _tar_bytes(
        {f"cat/test/good/{i:03d}.png": _png() for i in range(3)}
        | {
            "cat/test/hole/000.png": _png(),
            "cat/ground_truth/hole/000_mask.png": _png(),
            "cat/train/good/0.png": _png(),
        }
        | {"padding.bin": b"".join(hashlib.sha256(bytes([i])).digest() for i in range(256)) * 4}
    )
    httpd.requests, httpd.ranges, httpd.cut_next = [], True, False
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/data.tar"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fresh_download_verified(server, tmp_path):
    dest = tmp_path / "a.tar"
    seen = []
    out = download_file(
        server.url,
        dest,
        size=len(server.payload),
        sha256=_sha(server.payload),
        chunk_size=1024,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert out == dest and dest.read_bytes() == server.payload
    assert not dest.with_name("a.tar.part").exists()
    assert seen[-1] == (len(server.payload), len(server.payload))
    # a complete, verified file is not fetched again
    download_file(server.url, dest, sha256=_sha(server.payload))
    assert len(server.requests) == 1


_LINE = re.compile(r"^cat: (\d+\.\d) MB / (\d+\.\d) MB \((\d+) %\)(, [\d.]+ MB/s)?$")


def test_progress_off_a_terminal_is_a_line_per_ten_percent(server, tmp_path):
    out = io.StringIO()  # not a terminal: lines, not a bar
    progress = DownloadProgress("cat", file=out)
    download_file(server.url, tmp_path / "a.tar", chunk_size=1024, progress=progress)
    lines = out.getvalue().splitlines()
    blocks = -(-len(server.payload) // 1024)
    assert blocks > 30 and 10 <= len(lines) <= 11, lines  # the start, then one per 10 % (not per block)
    parsed = [_LINE.match(line) for line in lines]
    assert all(parsed), lines
    percents = [int(m.group(3)) for m in parsed]
    assert percents[0] == 0 and percents[-1] == 100 and percents == sorted(set(percents))
    assert {float(m.group(2)) for m in parsed} == {round(len(server.payload) / 1e6, 1)}
    assert "\r" not in out.getvalue()


def test_progress_on_a_terminal_is_a_tqdm_bar_from_the_resumed_bytes(server, tmp_path, monkeypatch):
    import tqdm.auto

    made = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append((kwargs, self))

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    (tmp_path / "a.tar.part").write_bytes(server.payload[:1000])
    out = io.StringIO()
    download_file(
        server.url,
        tmp_path / "a.tar",
        chunk_size=1024,
        progress=DownloadProgress("cat", file=out, terminal=True),
    )
    assert server.requests == ["bytes=1000-"]
    ((kwargs, bar),) = made
    assert kwargs["initial"] == 1000 and kwargs["total"] == len(server.payload) and kwargs["unit"] == "B"
    assert bar.n == len(server.payload)
    assert "cat" in out.getvalue() and "100%" in out.getvalue()  # the bar's last state, closed


def test_progress_of_an_unknown_size_is_a_line_per_minute():
    now = [0.0]
    out = io.StringIO()
    progress = DownloadProgress("x", file=out, terminal=False, clock=lambda: now[0])
    for t, done in [
        (0.0, 0),
        (30.0, 5_000_000),
        (61.0, 10_000_000),
        (100.0, 12_000_000),
        (125.0, 20_000_000),
    ]:
        now[0] = t
        progress(done, None)
    assert out.getvalue().splitlines() == ["x: 0.0 MB", "x: 10.0 MB, 0.2 MB/s", "x: 20.0 MB, 0.2 MB/s"]
    # a known size: a line per 10 %, and one a minute in between
    out = io.StringIO()
    progress = DownloadProgress("y", file=out, terminal=False, clock=lambda: now[0])
    for t, done in [(0.0, 0), (10.0, 10), (70.0, 50), (75.0, 60), (80.0, 150), (90.0, 1000)]:
        now[0] = t
        progress(done, 1000)
    assert [line.split(" (")[1].split(")")[0] for line in out.getvalue().splitlines()] == [
        "0 %",
        "5 %",
        "15 %",
        "100 %",
    ]


def test_resume_from_partial_file_with_range(server, tmp_path):
    dest = tmp_path / "a.tar"
    part = tmp_path / "a.tar.part"
    part.write_bytes(server.payload[:1000])
    download_file(server.url, dest, sha256=_sha(server.payload))
    assert server.requests == ["bytes=1000-"]
    assert dest.read_bytes() == server.payload and not part.exists()


def test_server_without_range_restarts(server, tmp_path):
    server.ranges = False
    part = tmp_path / "a.tar.part"
    part.write_bytes(b"x" * 700)  # would corrupt the file if appended to
    download_file(server.url, tmp_path / "a.tar", sha256=_sha(server.payload))
    assert (tmp_path / "a.tar").read_bytes() == server.payload


def test_truncated_transfer_is_kept_for_resume(server, tmp_path):
    dest = tmp_path / "a.tar"
    server.cut_next = True
    with pytest.raises(DownloadError, match=r"(interrupted|incomplete).*run again to resume"):
        download_file(server.url, dest, size=len(server.payload), sha256=_sha(server.payload))
    part = tmp_path / "a.tar.part"
    assert not dest.exists() and 0 < part.stat().st_size < len(server.payload)
    download_file(server.url, dest, size=len(server.payload), sha256=_sha(server.payload))
    assert server.requests[-1] == f"bytes={len(server.payload) // 2}-"
    assert dest.read_bytes() == server.payload


def test_checksum_mismatch_is_an_error_and_not_complete(server, tmp_path):
    dest = tmp_path / "a.tar"
    with pytest.raises(DownloadError, match="sha256 .* does not match"):
        download_file(server.url, dest, sha256="0" * 64)
    assert not dest.exists() and not (tmp_path / "a.tar.part").exists()
    with pytest.raises(DownloadError, match="server reports"):
        download_file(server.url, dest, size=len(server.payload) + 1)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(server.url.replace("data.tar", "nope"), dest)


def test_complete_partial_file_gets_416_then_verifies(server, tmp_path):
    (tmp_path / "a.tar.part").write_bytes(server.payload)
    download_file(server.url, tmp_path / "a.tar", sha256=_sha(server.payload))
    assert server.requests == [f"bytes={len(server.payload)}-"]
    assert (tmp_path / "a.tar").read_bytes() == server.payload


def test_fetch_extracts_in_place_and_is_idempotent(server, tmp_path):
    source = Source(
        name="mvtec",
        title="local test archive",
        homepage="-",
        licence="-",
        layout="-",
        manual="steps",
        url=server.url,
        filename="data.tar",
        size=len(server.payload),
        sha256=_sha(server.payload),
    )
    logs: list[str] = []
    target = fetch(source, tmp_path, log=logs.append)
    assert target == tmp_path / DEFAULT_DIRS["mvtec"]
    samples = list_samples("mvtec", target)
    assert len(samples) == 4 and sum(s.label for s in samples) == 1
    fetch(source, tmp_path, log=logs.append)
    assert "already downloaded and extracted" in logs[-1] and len(server.requests) == 1
    bad = Source(**{**source.__dict__, "sha256": "f" * 64, "name": "visa", "url": server.url})
    with pytest.raises(DownloadError, match=r"(?s)sha256.*manual steps"):
        fetch(bad, tmp_path, log=logs.append)
    assert not (tmp_path / "visa" / "data.tar").exists()


def test_extract_refuses_paths_outside(tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DownloadError, match="outside"):
        extract_archive(evil, tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()
    (tmp_path / "plain.txt").write_text("hi")
    with pytest.raises(DownloadError, match="neither a tar nor a zip"):
        extract_archive(tmp_path / "plain.txt", tmp_path / "dest")


def test_source_table():
    assert set(SOURCES) == set(DEFAULT_DIRS)
    for name, src in SOURCES.items():
        assert src.licence and src.layout and src.manual, name
        if src.sha256 is not None:
            assert re.fullmatch(r"[0-9a-f]{64}", src.sha256) and src.checksum_source, name
            assert src.url is not None
        assert name in describe(name)
    for name in ("dagm", "brainmri", "br35h"):
        assert SOURCES[name].url is None and "kaggle datasets download" in SOURCES[name].manual
    assert SOURCES["kvasir"].sha256 is None  # not known: size only, never guessed


# ---------------------------------------------------------------------------------------------------
# The MVTec AD mirror, failed downloads, and the command a run's "not found" error gives
# ---------------------------------------------------------------------------------------------------


def test_mvtec_url_is_anomalibs_current_mirror():
    src = SOURCES["mvtec"]
    assert src.url == (
        "https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/download/"
        "420938113-1629960298/mvtec_anomaly_detection.tar.xz"
    )
    assert src.sha256 == "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"  # unchanged
    assert "38536" not in src.url and "404" in src.manual


def _closed_port_url() -> str:
    import socket

    with socket.socket() as sock:  # a port nothing listens on: the connection is refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/mvtec_anomaly_detection.tar.xz"


def _source(url: str, **kw) -> Source:
    return Source(
        name="mvtec",
        title="t",
        homepage="-",
        licence="-",
        layout="-",
        manual="the manual steps",
        url=url,
        filename="data.tar",
        **kw,
    )


@pytest.mark.parametrize("data_root_exists", [False, True])
def test_failed_download_leaves_nothing_behind(server, tmp_path, data_root_exists, monkeypatch):
    data_root = tmp_path / "data"
    if data_root_exists:
        data_root.mkdir()
    with pytest.raises(DownloadError, match=r"(?s)cannot connect.*the manual steps"):
        fetch(_source(_closed_port_url()), data_root, log=lambda _: None)
    assert not (data_root / "mvtec").exists()  # offline: no empty DATA_ROOT/mvtec/
    assert data_root.exists() == data_root_exists  # nor a DATA_ROOT that was not there before
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(_source(server.url.replace("data.tar", "gone")), data_root, log=lambda _: None)
    assert not (data_root / "mvtec").exists() and data_root.exists() == data_root_exists
    # an interrupted transfer keeps its partial file (and so its folder) for a resume
    server.cut_next = True
    with pytest.raises(DownloadError, match="resume"):
        fetch(_source(server.url, size=len(server.payload)), data_root, log=lambda _: None)
    assert (data_root / "mvtec" / "data.tar.part").stat().st_size > 0
    # a folder that was already there is never removed
    other = tmp_path / "kept"
    (other / "mvtec").mkdir(parents=True)
    with pytest.raises(DownloadError):
        fetch(_source(_closed_port_url()), other, log=lambda _: None)
    assert (other / "mvtec").is_dir()


def test_download_hint_gives_a_command_producing_the_layout_the_run_reads(
    server, tmp_path, monkeypatch, capsys
):
    from feclip.apps import data as cli
    from feclip.config import DatasetRef, PathsConfig
    from feclip.data.download import download_hint
    from feclip.engine.run_data import dataset_root, list_dataset
    from feclip.errors import DatasetError

    data_root = tmp_path / "data"
    paths = PathsConfig(data_root=str(data_root))
    for ref, command in (
        (DatasetRef(name="mvtec"), f"feclip-data download mvtec --root {data_root}`"),
        (
            DatasetRef(name="mvtec", dir="mvtec_copy"),
            f"feclip-data download mvtec --root {data_root} --dir mvtec_copy`",
        ),
    ):
        with pytest.raises(DatasetError) as err:
            dataset_root(ref, paths)
        message = str(err.value)
        assert command in message and f"--root {data_root}/mvtec" not in message
        # running that command (against a local copy of the archive) gives the folder the run looks in
        local = Source(**{**SOURCES["mvtec"].__dict__, "url": server.url, "sha256": _sha(server.payload)})
        monkeypatch.setitem(SOURCES, "mvtec", local)
        argv = command.rstrip("`").split()[1:]
        assert cli.main(argv) == 0
        assert "ready at" in capsys.readouterr().out
        assert dataset_root(ref, paths) == data_root / (ref.dir or "mvtec")
        assert len(list_dataset(ref, paths)) == 4
    assert "feclip-data download mvtec --root data`" in download_hint("mvtec", "data") + "`"
    assert "--dir" not in download_hint("visa", "data", "visa")
    assert "prints the manual" in download_hint("dagm", "data") and "data/dagm" in download_hint(
        "dagm", "data"
    )
    assert (
        download_hint("synthetic", "data", "synthetic/set_b")
        == "Generate it with `feclip-data synth data/synthetic`"
    )
    assert "your own data" in download_hint("folder", "data", "mine")
