"""File-mounted certificates and the output writer (docs/reliability.md, case 33):
symlink swaps are picked up, a half-written pair or bogus PEM is never
served, the key file is never readable by others."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from fastca.agent import files as files_module
from fastca.agent.csr import new_key, private_key_pem
from fastca.agent.files import FileCertificates, FileRoot, MountedDirectory, file_reader, write_output
from fastca.agent.secrets import ROOT_CERT, WORKLOAD_CERT, SecretUnavailable
from tests.agent.conftest import WORKLOAD_ID, issue_leaf, make_authority, run, wait_until

ROOT = make_authority("root-1")


def make_pair(root=ROOT) -> tuple[bytes, bytes]:
    key = new_key("ec-p256")
    leaf = issue_leaf(root, key.public_key(), WORKLOAD_ID, 3600)
    return leaf.public_bytes(serialization.Encoding.PEM), private_key_pem(key)


def write_set(directory: Path, pair: tuple[bytes, bytes], root_pem: str = ROOT.pem) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert-chain.pem").write_bytes(pair[0])
    (directory / "key.pem").write_bytes(pair[1])
    (directory / "root-cert.pem").write_text(root_pem)


def kubelet_layout(mount: Path, generation: str, pair, root_pem: str = ROOT.pem) -> None:
    """What the kubelet does for a Secret volume: files in a timestamped
    directory, `..data` pointing at it (swapped atomically by rename), and
    top-level symlinks through `..data`."""
    write_set(mount / generation, pair, root_pem)
    tmp = mount / "..data_tmp"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(generation)
    os.replace(tmp, mount / "..data")
    for name in ("cert-chain.pem", "key.pem", "root-cert.pem"):
        link = mount / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)


# -- readers -------------------------------------------------------------------------------------------------------
def test_good_pair_is_read(tmp_path):
    pair = make_pair()
    write_set(tmp_path, pair)
    item = FileCertificates(tmp_path / "cert-chain.pem", tmp_path / "key.pem").read("default")
    assert item.certificate_chain == pair[0] and item.private_key == pair[1]
    assert item.version == FileCertificates(tmp_path / "cert-chain.pem", tmp_path / "key.pem").read("default").version
    root = FileRoot(tmp_path / "root-cert.pem").read("ROOTCA")
    assert root.is_root and root.trusted_ca == ROOT.pem.encode()
    assert len(root.version) == len(hashlib.sha256().hexdigest())


@pytest.mark.parametrize("cert,key,message", [
    (lambda p, q: p[0], lambda p, q: q[1], "does not match"),              # new cert, old key
    (lambda p, q: b"-----BEGIN CERTIFICATE-----\nbm9wZQ==\n-----END CERTIFICATE-----\n", lambda p, q: p[1],
     "PEM certificates"),
    (lambda p, q: b"hello", lambda p, q: p[1], "PEM certificates"),
    (lambda p, q: b"", lambda p, q: p[1], "PEM certificates"),
    (lambda p, q: p[0], lambda p, q: b"-----BEGIN PRIVATE KEY-----\nbm9wZQ==\n-----END PRIVATE KEY-----\n",
     "private key"),
    (lambda p, q: p[0], lambda p, q: p[0], "private key"),                  # a certificate where the key should be
    (lambda p, q: p[0][: len(p[0]) // 2], lambda p, q: p[1], "PEM certificates"),  # truncated mid-write
])
def test_bad_pairs_refused(tmp_path, cert, key, message):
    new, old = make_pair(), make_pair()
    (tmp_path / "c.pem").write_bytes(cert(new, old))
    (tmp_path / "k.pem").write_bytes(key(new, old))
    with pytest.raises(SecretUnavailable, match=message) as error:
        FileCertificates(tmp_path / "c.pem", tmp_path / "k.pem").read("default")
    assert b"PRIVATE" not in str(error.value).encode()     # never key material in messages


def test_missing_and_bogus_root_refused(tmp_path):
    with pytest.raises(SecretUnavailable):
        FileRoot(tmp_path / "absent.pem").read("ROOTCA")
    (tmp_path / "root.pem").write_text("not a certificate\n")
    with pytest.raises(SecretUnavailable):
        FileRoot(tmp_path / "root.pem").read("ROOTCA")


def test_resource_names():
    reader = file_reader("file-cert:/etc/certs/cert.pem~/etc/certs/key.pem")
    assert reader == FileCertificates(Path("/etc/certs/cert.pem"), Path("/etc/certs/key.pem"))
    assert file_reader("file-root:/etc/certs/root.pem") == FileRoot(Path("/etc/certs/root.pem"))
    for bad in ("file-cert:/only-cert.pem", "file-cert:~/k.pem", "file-root:", "default", "file-cert:a~"):
        assert file_reader(bad) is None


# -- the mounted directory --------------------------------------------------------------------------------------
class Recorder:
    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, name: str) -> None:
        self.names.append(name)


def test_symlink_swap_is_picked_up_and_notified(tmp_path):
    first, second = make_pair(), make_pair()
    other_root = make_authority("root-2")
    kubelet_layout(tmp_path, "..2026_01_01_00_00_00.1", first)

    async def main():
        source = MountedDirectory(tmp_path, poll_interval=0.05)
        heard = Recorder()
        source.subscribe(heard)
        try:
            item = await source.get(WORKLOAD_CERT)
            root = await source.get(ROOT_CERT)
            assert item.certificate_chain == first[0] and item.private_key == first[1]
            assert root.trusted_ca == ROOT.pem.encode()
            second_leaf = issue_leaf(other_root, serialization.load_pem_private_key(second[1], None).public_key(),
                                     WORKLOAD_ID, 3600).public_bytes(serialization.Encoding.PEM)
            kubelet_layout(tmp_path, "..2026_01_02_00_00_00.2", (second_leaf, second[1]),
                           other_root.pem + ROOT.pem)
            await wait_until(lambda: {WORKLOAD_CERT, ROOT_CERT} <= set(heard.names), 5)
            assert sorted(heard.names) == [ROOT_CERT, WORKLOAD_CERT]
            new_item = await source.get(WORKLOAD_CERT)
            assert new_item.certificate_chain == second_leaf and new_item.private_key == second[1]
            assert new_item.version != item.version
            assert (await source.get(ROOT_CERT)).trusted_ca == (other_root.pem + ROOT.pem).encode()
        finally:
            await source.stop()

    run(main())


def test_half_written_pair_keeps_the_old_one(tmp_path):
    old, new = make_pair(), make_pair()
    write_set(tmp_path, old)
    events = []

    async def main():
        source = MountedDirectory(tmp_path, poll_interval=0.05,
                                  on_event=lambda kind, name, **d: events.append((kind, name)))
        heard = Recorder()
        source.subscribe(heard)
        try:
            before = await source.get(WORKLOAD_CERT)
            (tmp_path / "cert-chain.pem").write_bytes(new[0])            # the key is not written yet
            await wait_until(lambda: ("file_invalid", WORKLOAD_CERT) in events, 5)
            await asyncio.sleep(0.3)                                      # several more polls
            assert heard.names == []
            served = await source.get(WORKLOAD_CERT)
            assert served == before                                       # the old, matching pair
            (tmp_path / "key.pem").write_bytes(new[1])                    # the pair is complete now
            await wait_until(lambda: heard.names == [WORKLOAD_CERT], 5)
            served = await source.get(WORKLOAD_CERT)
            assert (served.certificate_chain, served.private_key) == new
        finally:
            await source.stop()

    run(main())


def test_bogus_pem_is_refused_and_old_pair_kept(tmp_path):
    old = make_pair()
    write_set(tmp_path, old)

    async def main():
        source = MountedDirectory(tmp_path, poll_interval=0.05)
        heard = Recorder()
        source.subscribe(heard)
        try:
            before = await source.get(WORKLOAD_CERT)
            root_before = await source.get(ROOT_CERT)
            (tmp_path / "cert-chain.pem").write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
            (tmp_path / "root-cert.pem").write_text("garbage")
            assert await source.poll_once() == []
            await asyncio.sleep(0.3)
            assert heard.names == []
            assert await source.get(WORKLOAD_CERT) == before
            assert await source.get(ROOT_CERT) == root_before
        finally:
            await source.stop()

    run(main())


def test_nothing_valid_ever_is_unavailable(tmp_path):
    old, new = make_pair(), make_pair()
    (tmp_path / "cert-chain.pem").write_bytes(new[0])
    (tmp_path / "key.pem").write_bytes(old[1])

    async def main():
        source = MountedDirectory(tmp_path, poll_interval=0.05)
        try:
            with pytest.raises(SecretUnavailable, match="does not match"):
                await source.get(WORKLOAD_CERT)
            with pytest.raises(SecretUnavailable):
                await source.get(ROOT_CERT)                               # no root-cert.pem at all
            with pytest.raises(SecretUnavailable, match="unknown"):
                await source.get("something-else")
        finally:
            await source.stop()

    run(main())


def test_file_resources_are_watched_until_released(tmp_path):
    first, second = make_pair(), make_pair()
    (tmp_path / "a.crt").write_bytes(first[0])
    (tmp_path / "a.key").write_bytes(first[1])
    (tmp_path / "ca.crt").write_text(ROOT.pem)
    cert_name = f"file-cert:{tmp_path / 'a.crt'}~{tmp_path / 'a.key'}"
    root_name = f"file-root:{tmp_path / 'ca.crt'}"

    async def main():
        source = MountedDirectory(tmp_path / "unused", poll_interval=0.05)
        heard = Recorder()
        source.subscribe(heard)
        try:
            assert (await source.get(cert_name)).certificate_chain == first[0]
            assert (await source.get(root_name)).trusted_ca == ROOT.pem.encode()
            # atomic replacement by rename (new inodes)
            for name, data in (("a.key", second[1]), ("a.crt", second[0])):
                (tmp_path / f"{name}.new").write_bytes(data)
                os.replace(tmp_path / f"{name}.new", tmp_path / name)
            await wait_until(lambda: heard.names == [cert_name], 5)
            assert (await source.get(cert_name)).private_key == second[1]
            source.release(cert_name)
            (tmp_path / "a.crt").write_bytes(first[0])
            (tmp_path / "a.key").write_bytes(first[1])
            await asyncio.sleep(0.3)
            assert heard.names == [cert_name]                            # released: not watched any more
        finally:
            await source.stop()

    run(main())


# -- what may be read, and how long it may take (issue 13) -----------------------------------------------------
class _Fifo:
    """A FIFO with a writer that never closes (until ``close``): a plain
    ``open(...).read()`` of it blocks as long as the writer stays."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.writer = os.open(path, os.O_RDWR | os.O_NONBLOCK)   # O_RDWR: opening does not wait for a reader

    def close(self) -> None:
        writer, self.writer = self.writer, -1
        if writer >= 0:
            os.close(writer)                                    # a read blocked on it now ends


@pytest.fixture
def fifo(tmp_path):
    held = _Fifo(tmp_path / "root.fifo")
    try:
        yield held
    finally:
        held.close()


def _within(seconds: float, function, *args):
    """``function(*args)`` on a thread; fails (instead of hanging) if it blocks."""
    import concurrent.futures

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        return pool.submit(function, *args).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


def _refusal(path: Path) -> str:
    def read() -> str:
        with pytest.raises(SecretUnavailable) as error:
            FileRoot(path).read("ROOTCA")
        return str(error.value)
    return _within(5, read)


def test_a_fifo_is_refused_at_once(fifo):
    assert _refusal(fifo.path) == f"the root certificate file {fifo.path} is a FIFO, not a regular file; refused"
    name = f"file-cert:{fifo.path}~{fifo.path}"
    with pytest.raises(SecretUnavailable, match="certificate chain file .* is a FIFO"):
        _within(5, file_reader(name).read, name)


@pytest.mark.parametrize("kind", ["directory", "device", "oversize", "oversize-sparse"])
def test_what_is_not_a_small_regular_file_is_refused(tmp_path, kind):
    if kind == "directory":
        path, message = tmp_path, "is a directory, not a regular file; refused"
    elif kind == "device":
        path, message = Path("/dev/zero"), "is a character device, not a regular file; refused"
    else:
        path, message = tmp_path / "big.pem", "is larger than 1048576 bytes (1 MiB); refused"
        with path.open("wb") as handle:
            if kind == "oversize":
                handle.write((ROOT.pem * (files_module.MAX_FILE_BYTES // len(ROOT.pem) + 1)).encode())
            else:
                handle.truncate(1 << 40)                    # a terabyte of nothing: never read
    assert _refusal(path) == f"the root certificate file {path} {message}"


def test_a_regular_file_up_to_the_bound_is_read(tmp_path):
    bundle = ROOT.pem.encode()
    padding = b"#" * (files_module.MAX_FILE_BYTES - len(bundle) - 1) + b"\n"   # text around PEM is allowed
    (tmp_path / "roots.pem").write_bytes(padding + bundle)
    assert len((tmp_path / "roots.pem").read_bytes()) == files_module.MAX_FILE_BYTES
    link = tmp_path / "link.pem"
    link.symlink_to("roots.pem")                            # through a symlink, as a kubelet mount is
    assert FileRoot(link).read("ROOTCA").trusted_ca == padding + bundle


class _NaiveReader:
    """A reader that reads its file the way the agent used to (plain open and
    read, no checks): on a FIFO it blocks as long as the writer stays."""

    def __init__(self, path: Path) -> None:
        self.paths = (path,)
        self.calls = 0

    def read(self, name: str):
        from fastca.agent.secrets import SecretItem

        self.calls += 1
        with open(self.paths[0], "rb") as handle:
            data = handle.read()
        return SecretItem(name=name, version=hashlib.sha256(data).hexdigest(), trusted_ca=data)


def test_a_stuck_read_times_out_off_the_loop_and_recovers(fifo, tmp_path):
    name = f"file-root:{fifo.path}"
    reader = _NaiveReader(fifo.path)
    events = []

    async def main():
        files = files_module.FileSecrets(lambda n: reader if n == name else None, notify=events.append,
                                         poll_interval=0.05, read_timeout=0.3,
                                         on_event=lambda kind, n, **d: events.append((kind, n, d.get("stuck"))))
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        beat = asyncio.create_task(ticker())
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(SecretUnavailable, match=r"has not finished after 0\.\d s \(timeout 0\.3 s\)"):
                await files.get(name)
            assert 0.25 <= loop.time() - started < 2
            assert ticks >= 10                                 # the loop kept running meanwhile
            assert "has not finished" in files.health()[name]
            await asyncio.sleep(0.3)                           # several polls while it hangs
            assert reader.calls == 1                           # never a second read while one hangs
            assert events.count(("file_invalid", name, True)) == 1
            # The resource's file becomes a good one, and the old one's writer goes away: the hung read
            # ends (its late result is not used), the next poll reads the good file and tells the streams.
            good = tmp_path / "root.pem"
            good.write_text(ROOT.pem)
            reader.paths = (good,)
            fifo.close()
            await wait_until(lambda: files.health().get(name) == "", 5)
            await wait_until(lambda: not any(t.name == "fastca-agent-file-read" for t in threading.enumerate()), 5)
            assert (await files.get(name)).trusted_ca == ROOT.pem.encode()
            assert name in events
        finally:
            beat.cancel()
            await files.stop()

    run(main())


def test_a_hung_resource_keeps_its_last_content_and_others_are_served(tmp_path):
    (tmp_path / "ok.pem").write_text(ROOT.pem)
    (tmp_path / "hung.pem").write_text(ROOT.pem)
    gate = threading.Event()
    gate.set()

    class Hanging(FileRoot):
        def read(self, name):
            gate.wait()
            return super().read(name)

    hung, ok = f"file-root:{tmp_path / 'hung.pem'}", f"file-root:{tmp_path / 'ok.pem'}"
    readers = {hung: Hanging(tmp_path / "hung.pem"), ok: FileRoot(tmp_path / "ok.pem")}

    async def main():
        files = files_module.FileSecrets(readers.get, notify=lambda n: None, poll_interval=0.05, read_timeout=0.2)
        try:
            before = await files.get(hung)
            gate.clear()                                     # from now on its reads hang
            (tmp_path / "hung.pem").write_text(ROOT.pem + "\n")
            assert await files.get(hung) == before             # the last good content, after the timeout
            assert "has not finished" in files.health()[hung]
            loop = asyncio.get_running_loop()
            started = loop.time()
            assert (await files.get(ok)).trusted_ca == ROOT.pem.encode()
            assert loop.time() - started < 0.15                # not held up by the hung one
            assert files.health()[ok] == ""
            started = loop.time()
            assert await files.poll_once() == []
            assert loop.time() - started < 1                   # a poll waits at most one timeout
        finally:
            gate.set()
            await files.stop()

    run(main())


# -- output directory ---------------------------------------------------------------------------------------------
def test_output_files_and_modes(tmp_path, monkeypatch):
    key_pem, chain_pem, root_pem = b"KEY\n", b"CHAIN\n", b"ROOT\n"
    seen_modes = {}
    real_replace = os.replace

    def spy(src, dst):
        seen_modes[Path(dst).name] = stat.S_IMODE(os.stat(src).st_mode)
        return real_replace(src, dst)

    monkeypatch.setattr(files_module.os, "replace", spy)
    old_umask = os.umask(0)                  # the most permissive umask: the key must still be 0600
    try:
        write_output(tmp_path / "out", key_pem, chain_pem, root_pem)
        write_output(tmp_path / "out", b"KEY2\n", b"CHAIN2\n", root_pem)
    finally:
        os.umask(old_umask)
    out = tmp_path / "out"
    assert (out / "key.pem").read_bytes() == b"KEY2\n"
    assert (out / "cert-chain.pem").read_bytes() == b"CHAIN2\n"
    assert (out / "root-cert.pem").read_bytes() == root_pem
    assert stat.S_IMODE((out / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "cert-chain.pem").stat().st_mode) == 0o644
    assert stat.S_IMODE((out / "root-cert.pem").stat().st_mode) == 0o644
    assert seen_modes["key.pem"] == 0o600                 # already 0600 before it got its name
    assert sorted(p.name for p in out.iterdir()) == ["cert-chain.pem", "key.pem", "root-cert.pem"]


def test_output_write_failure_leaves_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_output(out, b"K\n", b"C\n", b"R\n")

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files_module.os, "replace", broken)
    with pytest.raises(OSError):
        write_output(out, b"K2\n", b"C2\n", b"R2\n")
    assert sorted(p.name for p in out.iterdir()) == ["cert-chain.pem", "key.pem", "root-cert.pem"]
    assert (out / "key.pem").read_bytes() == b"K\n"
