"""File-mounted certificates and the output writer (docs/reliability.md, case 33):
symlink swaps are picked up, a half-written pair or bogus PEM is never
served, the key file is never readable by others."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
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
            assert source.poll_once() == []
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
