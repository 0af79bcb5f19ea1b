"""The rotation plan (fastca.ca.rotation): its phases as time passes, the
moments it fixes, and the steps it refuses. On a software-key CA in this
process, with a manual clock; the HSM path runs end to end in
test_rotation_e2e.py and test_rotation_replicas.py."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fastca.ca.init import InitOptions, init_ca, install_cert
from fastca.ca.rotation import (Phase, activate_now, ca_view, cancel_rotation, finish_rotation, install_next_cert,
                                load_plan, start_rotation)
from fastca.clock import ManualClock
from fastca.config import CAConfig, IssuanceConfig
from fastca.errors import ConfigurationError
from tests.ca._upstream import UpstreamRoot
from tests.frontend.conftest import write_config

START = dt.datetime(2026, 12, 2, 9, 0, tzinfo=dt.timezone.utc)
MAX_TTL = 3600


def _ca(tmp_path: Path, clock: ManualClock, **options) -> Path:
    state = tmp_path / "state"
    init_ca(state, InitOptions(software_key=True, issuance=IssuanceConfig(default_ttl_seconds=600,
                                                                          max_ttl_seconds=MAX_TTL), **options),
            clock=clock)
    write_config(state, {"server": {"ca_watch_seconds": 2.0}})
    return state


def _subjects(certificates) -> list[str]:
    return [c.subject.rfc4514_string() for c in certificates]


def test_the_phases_follow_the_plan_as_time_passes(tmp_path: Path) -> None:
    clock = ManualClock(START)
    state = _ca(tmp_path, clock)
    old = ca_view(state, clock.utcnow())
    assert old.phase is Phase.STEADY and old.next is None

    plan = start_rotation(state, activate_after=dt.timedelta(hours=2), clock=clock)
    assert plan.activate_at == START + dt.timedelta(hours=2)
    # retire_at: activation + max TTL + two looks at the plan + ten seconds of skew.
    assert plan.retire_at == plan.activate_at + dt.timedelta(seconds=MAX_TTL + 2 * 2.0 + 10)
    assert load_plan(state) == plan          # what every reader of the directory sees

    distributing = ca_view(state, clock.utcnow())
    assert distributing.phase is Phase.DISTRIBUTING
    assert distributing.material.signing_cert == old.material.signing_cert     # the old key still signs
    assert distributing.signer == old.signer
    new_root = distributing.next.roots[0]
    assert list(distributing.roots) == [*old.roots, new_root]                   # old first, then the new
    assert new_root.subject != old.roots[0].subject

    clock.advance(2 * 3600 - 1)
    assert ca_view(state, clock.utcnow()).phase is Phase.DISTRIBUTING
    clock.advance(1)
    signing = ca_view(state, clock.utcnow())
    assert signing.phase is Phase.SIGNING_NEW
    assert signing.material.signing_cert == new_root and signing.signer == plan.next_signer
    assert list(signing.roots) == [*old.roots, new_root]                        # certificates of the old key live on
    assert set(_subjects(signing.intermediates)) == set(_subjects([old.material.signing_cert, new_root]))

    clock.set(plan.retire_at - dt.timedelta(seconds=1))
    assert ca_view(state, clock.utcnow()).phase is Phase.SIGNING_NEW
    clock.set(plan.retire_at)
    retired = ca_view(state, clock.utcnow())
    assert retired.phase is Phase.RETIRED and list(retired.roots) == [new_root]

    config = finish_rotation(state, clock=clock)
    assert config.signer == plan.next_signer
    assert not (state / "rotation").exists()
    steady = ca_view(state, clock.utcnow())
    assert steady.phase is Phase.STEADY
    assert steady.material.signing_cert == new_root and list(steady.roots) == [new_root]
    assert (state / config.signer.key_file).stat().st_mode & 0o777 == 0o600
    assert (state / old.signer.key_file).exists()       # the old key is kept, not destroyed


def test_retire_at_never_waits_past_the_old_chains_end(tmp_path: Path) -> None:
    clock = ManualClock(START)
    state = _ca(tmp_path, clock, root_lifetime_days=1)
    write_config(state, {"issuance": {"default_ttl_seconds": 600, "max_ttl_seconds": 7 * 86400}})
    plan = start_rotation(state, activate_after=dt.timedelta(hours=1), clock=clock)
    old_end = ca_view(state, clock.utcnow()).current.valid_until
    assert plan.retire_at == old_end + dt.timedelta(seconds=2 * 2.0 + 10)


def test_steps_out_of_order_are_refused_and_change_nothing(tmp_path: Path) -> None:
    clock = ManualClock(START)
    state = _ca(tmp_path, clock)
    with pytest.raises(ConfigurationError, match="no rotation is under way"):
        activate_now(state, clock=clock)
    with pytest.raises(ConfigurationError, match="no rotation is under way"):
        finish_rotation(state, clock=clock)
    plan = start_rotation(state, activate_after=dt.timedelta(hours=1), clock=clock)
    with pytest.raises(ConfigurationError, match="already under way"):
        start_rotation(state, activate_after=dt.timedelta(hours=1), clock=clock)
    with pytest.raises(ConfigurationError, match="does not sign yet"):
        finish_rotation(state, clock=clock)
    assert load_plan(state) == plan

    clock.advance(60)
    activated = activate_now(state, clock=clock)
    assert activated.activate_at == clock.utcnow()
    assert activated.retire_at == clock.utcnow() + dt.timedelta(seconds=MAX_TTL + 14)
    with pytest.raises(ConfigurationError, match="already signs"):
        activate_now(state, clock=clock)
    with pytest.raises(ConfigurationError, match="pass --force"):
        cancel_rotation(state, clock=clock)
    with pytest.raises(ConfigurationError, match=r"may be in use until .*pass --force"):
        finish_rotation(state, clock=clock)
    assert load_plan(state) == activated
    new_root = ca_view(state, clock.utcnow()).next.roots
    finish_rotation(state, force=True, clock=clock)
    finished = ca_view(state, clock.utcnow())
    assert finished.phase is Phase.STEADY and finished.roots == new_root
    assert load_plan(state) is None


def test_cancel_before_activation_takes_the_new_root_back(tmp_path: Path) -> None:
    clock = ManualClock(START)
    state = _ca(tmp_path, clock)
    before = ca_view(state, clock.utcnow())
    start_rotation(state, activate_after=dt.timedelta(hours=1), clock=clock)
    assert len(ca_view(state, clock.utcnow()).roots) == 2
    cancel_rotation(state, clock=clock)
    after = ca_view(state, clock.utcnow())
    assert after.phase is Phase.STEADY and after.roots == before.roots
    assert after.material.signing_cert == before.material.signing_cert
    # A new rotation can start again afterwards.
    assert start_rotation(state, activate_after=dt.timedelta(0), clock=clock).activate_at == clock.utcnow()
    assert ca_view(state, clock.utcnow()).phase is Phase.SIGNING_NEW


def test_an_intermediate_needs_a_csr_and_waits_for_its_certificate(tmp_path: Path) -> None:
    clock = ManualClock(dt.datetime.now(dt.timezone.utc))
    state = tmp_path / "state"
    upstream = UpstreamRoot("Corp Root")
    init_ca(state, InitOptions(software_key=True, csr_out=tmp_path / "first.csr"), clock=clock)
    upstream.sign_csr_into(tmp_path / "first.csr", tmp_path / "first")
    install_cert(state, tmp_path / "first" / "ca-cert.pem", None, tmp_path / "first" / "root-cert.pem", clock=clock)
    with pytest.raises(ConfigurationError, match="--csr-out"):
        start_rotation(state, activate_after=dt.timedelta(hours=1), clock=clock)
    assert load_plan(state) is None and not (state / "rotation").exists()

    plan = start_rotation(state, activate_after=dt.timedelta(hours=1), csr_out=tmp_path / "next.csr", clock=clock)
    assert plan.activate_at is None and plan.pending_csr == str((tmp_path / "next.csr").resolve())
    waiting = ca_view(state, clock.utcnow())
    assert waiting.phase is Phase.AWAITING_CERTIFICATE
    assert waiting.roots == waiting.current.roots and waiting.next is None
    with pytest.raises(ConfigurationError, match="install-cert"):
        activate_now(state, clock=clock)

    # A certificate for another key (the first CSR's) is refused; the plan still waits.
    upstream.sign_csr_into(tmp_path / "first.csr", tmp_path / "wrong")
    with pytest.raises(ConfigurationError, match="not a certificate for the new key"):
        install_next_cert(state, tmp_path / "wrong" / "ca-cert.pem", None, tmp_path / "wrong" / "root-cert.pem",
                          clock=clock)
    assert ca_view(state, clock.utcnow()).phase is Phase.AWAITING_CERTIFICATE

    upstream.sign_csr_into(tmp_path / "next.csr", tmp_path / "next")
    installed = install_next_cert(state, tmp_path / "next" / "ca-cert.pem", None,
                                  tmp_path / "next" / "root-cert.pem", clock=clock)
    assert installed.activate_at == clock.utcnow() + dt.timedelta(hours=1)
    distributing = ca_view(state, clock.utcnow())
    # The same upstream root: the bundle does not change, only the signing certificate will.
    assert distributing.phase is Phase.DISTRIBUTING and distributing.roots == waiting.roots
    clock.advance(3600)
    signing = ca_view(state, clock.utcnow())
    assert signing.phase is Phase.SIGNING_NEW
    assert signing.material.signing_cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) == \
        x509.load_pem_x509_csr((tmp_path / "next.csr").read_bytes()).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert signing.roots == waiting.roots


def test_a_damaged_plan_is_a_clear_error_naming_the_file(tmp_path: Path) -> None:
    clock = ManualClock(START)
    state = _ca(tmp_path, clock)
    start_rotation(state, activate_after=dt.timedelta(hours=1), clock=clock)
    plan_file = state / "rotation" / "plan.toml"
    plan_file.write_text(plan_file.read_text().replace("activate_after_seconds", "activate_afte"))
    with pytest.raises(ConfigurationError, match=r"plan\.toml is not a rotation plan"):
        ca_view(state, clock.utcnow())
    plan_file.write_text("started_at = [")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        ca_view(state, clock.utcnow())


def test_init_force_removes_a_rotation_in_progress(tmp_path: Path) -> None:
    clock = ManualClock(START)
    state = _ca(tmp_path, clock)
    start_rotation(state, activate_after=dt.timedelta(hours=1), clock=clock)
    init_ca(state, InitOptions(software_key=True, force=True), clock=clock)
    assert not (state / "rotation").exists()
    assert ca_view(state, clock.utcnow()).phase is Phase.STEADY


def test_a_failed_start_leaves_no_plan(tmp_path: Path) -> None:
    clock = ManualClock(START)
    state = _ca(tmp_path, clock)
    with pytest.raises(ConfigurationError, match="unknown key type"):
        start_rotation(state, activate_after=dt.timedelta(hours=1), key_type="dsa-1024", clock=clock)
    assert not (state / "rotation").exists()
    assert [name for name in os.listdir(state) if name.startswith("ca-key")] == ["ca-key.pem"]
    assert CAConfig.load(state).signer.key_file == "ca-key.pem"
