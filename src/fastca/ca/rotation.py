"""Rotating the CA's signing key and certificate without downtime.

A rotation is a plan in the state directory: ``rotation/plan.toml`` and the
next CA's certificates beside it (``rotation/ca-cert.pem``,
``cert-chain.pem``, ``root-cert.pem``). The plan fixes its moments in
advance, so every server that reads the directory (each worker, each
replica) computes the same phase from its own clock and switches on its
own, without a restart and without talking to the others:

    awaiting-certificate   the new key is in the HSM and its CSR is with the upstream CA
                           (an intermediate); nothing changes yet
    distributing           the roots handed out (ROOTCA, istio-ca-root-cert, GetTrustBundle)
                           are the old and the new ones; certificates are still signed with
                           the old key, so agents learn the new root before anything needs it
    signing-with-new-key   from ``activate_at``: certificates are signed with the new key;
                           both roots stay, because certificates of the old key are in use
    old-root-retired       from ``retire_at``, when the last certificate the old key can
                           have signed has expired: the bundle holds the new roots only

``finish_rotation`` then makes the next CA the state directory's own (its
files and signer replace the old ones) and removes the plan; a server
reading the directory sees nothing change at that point.

``retire_at`` is ``activate_at`` plus the longest lifetime a certificate of
this CA can get (``issuance.max_ttl_seconds``, never past the old chain's own
end)
plus a margin (two looks at the plan, ``server.ca_watch_seconds`` each, and
ten seconds of clock skew) for a server that sees the activation late. It is
written into the plan when the activation moment is, so every reader agrees
on it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import os
import re
import shutil
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from fastca.ca import hsm
from fastca.ca.certificates import DEFAULT_ROOT_LIFETIME, ca_csr, self_signed_root
from fastca.ca.init import install_issued_certificate, new_software_key, write_pem
from fastca.ca.material import CAMaterial, load_ca_material, open_signer, validate_material
from fastca.ca.softhsm import write_secret_file
from fastca.ca.state import CERT_CHAIN_FILE, ROOT_CERT_FILE, SIGNING_CERT_FILE
from fastca.clock import SYSTEM_CLOCK, Clock
from fastca.config import CAConfig, SignerConfig, resolve_path, write_lifecycle
from fastca.errors import ConfigurationError
from fastca.signing.pkcs11_uri import Pkcs11Uri

__all__ = ["Phase", "RotationPlan", "CAView", "ROTATION_DIR", "load_plan", "ca_view",
           "start_rotation", "install_next_cert", "activate_now", "cancel_rotation", "finish_rotation"]

ROTATION_DIR = "rotation"
_PLAN_FILE = "plan.toml"
# Beyond two looks at the plan (server.ca_watch_seconds), for clock skew between replicas.
_SKEW = dt.timedelta(seconds=10)
_STAMP = re.compile(r"-\d{8}T\d{6}Z$")


class Phase(enum.Enum):
    STEADY = "steady"
    AWAITING_CERTIFICATE = "awaiting-certificate"
    DISTRIBUTING = "distributing"
    SIGNING_NEW = "signing-with-new-key"
    RETIRED = "old-root-retired"


@dataclass(frozen=True)
class RotationPlan:
    started_at: dt.datetime
    next_signer: SignerConfig
    activate_after: dt.timedelta           # from the moment the new certificate is in place
    retention: dt.timedelta                # longest life of a certificate the old key signs
    activate_at: dt.datetime | None = None   # None while the new certificate is awaited
    retire_at: dt.datetime | None = None
    pending_csr: str | None = None

    def phase(self, now: dt.datetime) -> Phase:
        if self.activate_at is None:
            return Phase.AWAITING_CERTIFICATE
        if now < self.activate_at:
            return Phase.DISTRIBUTING
        if self.retire_at is None or now < self.retire_at:
            return Phase.SIGNING_NEW
        return Phase.RETIRED


@dataclass(frozen=True)
class CAView:
    """What a server reading the state directory at ``now`` does: sign with
    ``material`` through ``signer`` and hand out ``roots`` as its own."""

    phase: Phase
    material: CAMaterial
    signer: SignerConfig
    roots: tuple[x509.Certificate, ...]
    current: CAMaterial
    next: CAMaterial | None
    plan: RotationPlan | None

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """Every signing and intermediate certificate still in use: what
        completes a path for a client certificate of either key."""
        out: list[x509.Certificate] = []
        for material in (self.current, self.next):
            if material is None:
                continue
            for certificate in (material.signing_cert, *material.intermediates):
                if certificate not in out:
                    out.append(certificate)
        return tuple(out)


def _rotation_dir(state_dir: Path) -> Path:
    return state_dir / ROTATION_DIR


def _utc(value: object, key: str) -> dt.datetime:
    if not isinstance(value, dt.datetime) or value.tzinfo is None:
        raise ConfigurationError(f"rotation plan: {key} is not a date-time with a time zone")
    return value.astimezone(dt.timezone.utc)


def load_plan(state_dir: Path) -> RotationPlan | None:
    path = _rotation_dir(state_dir) / _PLAN_FILE
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return None
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(f"{path} is not valid TOML: {error}") from None
    try:
        return RotationPlan(
            started_at=_utc(data.get("started_at"), "started_at"),
            next_signer=SignerConfig(**data["next_signer"]),
            activate_after=dt.timedelta(seconds=int(data["activate_after_seconds"])),
            retention=dt.timedelta(seconds=int(data["retention_seconds"])),
            activate_at=_utc(data["activate_at"], "activate_at") if "activate_at" in data else None,
            retire_at=_utc(data["retire_at"], "retire_at") if "retire_at" in data else None,
            pending_csr=data.get("pending_csr"))
    except (KeyError, TypeError, ValueError, ValidationError) as error:
        raise ConfigurationError(f"{path} is not a rotation plan fastca wrote: {error}") from None


def _write_plan(state_dir: Path, plan: RotationPlan) -> None:
    body: dict[str, object] = {
        "started_at": plan.started_at,
        "activate_after_seconds": int(plan.activate_after.total_seconds()),
        "retention_seconds": int(plan.retention.total_seconds()),
        "next_signer": plan.next_signer.model_dump(exclude_none=True),
    }
    for key in ("activate_at", "retire_at", "pending_csr"):
        if getattr(plan, key) is not None:
            body[key] = getattr(plan, key)
    directory = _rotation_dir(state_dir)
    directory.mkdir(mode=0o700, exist_ok=True)
    tmp = directory / (_PLAN_FILE + ".tmp")
    tmp.write_text("# A CA rotation in progress; see `fastca ca status`. Written by `fastca ca rotate`.\n"
                   + tomli_w.dumps(body))
    os.replace(tmp, directory / _PLAN_FILE)


def _next_material(state_dir: Path, now: dt.datetime) -> CAMaterial:
    return load_ca_material(_rotation_dir(state_dir), now)


def ca_view(state_dir: Path, now: dt.datetime, config: CAConfig | None = None) -> CAView:
    """The CA a server reading ``state_dir`` signs with at ``now``, and the roots it hands out."""
    config = config or CAConfig.load(state_dir)
    current = load_ca_material(state_dir, now)
    plan = load_plan(state_dir)
    if plan is None:
        return CAView(Phase.STEADY, current, config.signer, current.roots, current, None, None)
    phase = plan.phase(now)
    if phase is Phase.AWAITING_CERTIFICATE:
        return CAView(phase, current, config.signer, current.roots, current, None, plan)
    upcoming = _next_material(state_dir, now)
    both = tuple(dict.fromkeys((*current.roots, *upcoming.roots)))
    if phase is Phase.DISTRIBUTING:
        return CAView(phase, current, config.signer, both, current, upcoming, plan)
    if phase is Phase.SIGNING_NEW:
        return CAView(phase, upcoming, plan.next_signer, both, current, upcoming, plan)
    return CAView(phase, upcoming, plan.next_signer, upcoming.roots, current, upcoming, plan)


# -- the operator's steps ---------------------------------------------------------


def _stamp(now: dt.datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%SZ")


def _next_signer_config(state_dir: Path, signer: SignerConfig, key_type: str, now: dt.datetime) -> SignerConfig:
    """A new key beside the current one: in the same token under a new
    label, or (software backend) in a new 0600 file; made now."""
    if key_type not in hsm.KEY_TYPES:
        raise ConfigurationError(f"unknown key type {key_type!r}; choose one of {', '.join(hsm.KEY_TYPES)}")
    if signer.backend == "software":
        name = f"ca-key-{_stamp(now)}.pem"
        key = new_software_key(key_type)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
        write_secret_file(state_dir / name, pem.rstrip("\n"))
        return SignerConfig(backend="software", key_file=name, key_type=key_type)
    if not signer.key_uri:
        raise ConfigurationError("signer.key_uri is not set in fastca.toml")
    uri = Pkcs11Uri.parse(signer.key_uri)
    base = _STAMP.sub("", uri.object or "fastca-ca")
    next_uri = dataclasses.replace(uri, object=f"{base}-{_stamp(now)}", type="private", id=None)
    conf = resolve_path(state_dir, signer.softhsm_conf)
    conf_text = str(conf.resolve()) if conf else None
    if hsm.key_exists(next_uri, conf_text):
        raise ConfigurationError(f"the token already holds a key labelled {next_uri.object!r}")
    hsm.generate_key(next_uri, key_type, conf_text)
    return signer.model_copy(update={"key_uri": str(next_uri), "key_type": key_type})


def _retire_at(activate_at: dt.datetime, plan: RotationPlan, current: CAMaterial, config: CAConfig) -> dt.datetime:
    # No certificate outlives its chain, so the old chain's end bounds it too.
    margin = dt.timedelta(seconds=2 * config.server.ca_watch_seconds) + _SKEW
    return min(activate_at + plan.retention, current.valid_until) + margin


def _require_no_plan(state_dir: Path) -> None:
    plan = load_plan(state_dir)
    if plan is not None:
        raise ConfigurationError(f"a rotation is already under way ({plan.phase(SYSTEM_CLOCK.utcnow()).value}); "
                                 "see `fastca ca status`, or `fastca ca rotate cancel`")


def start_rotation(state_dir: Path, *, activate_after: dt.timedelta, key_type: str | None = None,
                   csr_out: Path | None = None, root_lifetime: dt.timedelta = DEFAULT_ROOT_LIFETIME,
                   clock: Clock = SYSTEM_CLOCK) -> RotationPlan:
    """A new key in the HSM and, for a self-signed root, a new root: its
    roots go out from now, and it signs from ``now + activate_after``. An
    intermediate under an upstream root writes a CSR to ``csr_out`` instead;
    ``install_next_cert`` finishes it."""
    now = clock.utcnow()
    config = CAConfig.load(state_dir)
    if config.pending_csr is not None:
        raise ConfigurationError("the CA is still waiting for its first certificate (`fastca init --install-cert`)")
    _require_no_plan(state_dir)
    if activate_after < dt.timedelta(0):
        raise ConfigurationError("--activate-after cannot be negative")
    current = load_ca_material(state_dir, now)
    self_signed = current.signing_cert in current.roots
    if not self_signed and csr_out is None:
        raise ConfigurationError("this CA is an intermediate under an upstream root: pass --csr-out FILE, have "
                                 "the upstream CA sign it, then run `fastca ca rotate install-cert`")
    kind = key_type or config.signer.key_type or _key_type_of(current.signing_cert)
    directory = _rotation_dir(state_dir)
    if directory.exists():
        shutil.rmtree(directory)     # what a failed start left (no plan file in it)
    directory.mkdir(mode=0o700)
    try:
        next_signer = _next_signer_config(state_dir, config.signer, kind, now)
        signer = open_signer(next_signer, state_dir)
        plan = RotationPlan(started_at=now, next_signer=next_signer, activate_after=activate_after,
                            retention=dt.timedelta(seconds=config.issuance.max_ttl_seconds))
        try:
            if csr_out is not None:
                request = ca_csr(signer, config.trust_domain)
                csr_out.write_bytes(request.public_bytes(serialization.Encoding.PEM))
                plan = _replace(plan, pending_csr=str(csr_out.resolve()))
            else:
                root = self_signed_root(signer, config.trust_domain, now=now, lifetime=root_lifetime,
                                        common_name=f"fastca root {now:%Y-%m-%d %H:%M:%S}Z")
                for name in (SIGNING_CERT_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE):
                    write_pem(directory / name, [root])
                validate_material(root, [root], [root], now)
                activate_at = now + activate_after
                plan = _replace(plan, activate_at=activate_at,
                                retire_at=_retire_at(activate_at, plan, current, config))
        finally:
            signer.close()
        _write_plan(state_dir, plan)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return plan


def _key_type_of(certificate: x509.Certificate) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = certificate.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name, "ec-p256")
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa-3072" if key.key_size >= 3072 else "rsa-2048"
    raise ConfigurationError("the CA key is neither EC nor RSA")


def _replace(plan: RotationPlan, **changes: object) -> RotationPlan:
    return dataclasses.replace(plan, **changes)  # type: ignore[arg-type]


def _plan_or_error(state_dir: Path) -> RotationPlan:
    plan = load_plan(state_dir)
    if plan is None:
        raise ConfigurationError("no rotation is under way; start one with `fastca ca rotate start`")
    return plan


def install_next_cert(state_dir: Path, cert: Path, chain: Path | None, root: Path,
                      clock: Clock = SYSTEM_CLOCK) -> RotationPlan:
    """The upstream CA's certificate for the new key: its roots go out from
    now, and it signs from ``now + activate_after``."""
    now = clock.utcnow()
    plan = _plan_or_error(state_dir)
    if plan.phase(now) is not Phase.AWAITING_CERTIFICATE:
        raise ConfigurationError("the new CA already has its certificate")
    install_issued_certificate(_rotation_dir(state_dir), state_dir, plan.next_signer, cert, chain, root, now,
                               whose="the new key")
    current = load_ca_material(state_dir, now)
    activate_at = now + plan.activate_after
    plan = _replace(plan, pending_csr=None, activate_at=activate_at,
                    retire_at=_retire_at(activate_at, plan, current, CAConfig.load(state_dir)))
    _write_plan(state_dir, plan)
    return plan


def activate_now(state_dir: Path, clock: Clock = SYSTEM_CLOCK) -> RotationPlan:
    """Sign with the new key from now on (instead of at the planned moment)."""
    now = clock.utcnow()
    plan = _plan_or_error(state_dir)
    phase = plan.phase(now)
    if phase is Phase.AWAITING_CERTIFICATE:
        raise ConfigurationError("the new key has no certificate yet: run `fastca ca rotate install-cert` first")
    if phase is not Phase.DISTRIBUTING:
        raise ConfigurationError(f"the new key already signs (phase {phase.value})")
    current = load_ca_material(state_dir, now)
    plan = _replace(plan, activate_at=now, retire_at=_retire_at(now, plan, current, CAConfig.load(state_dir)))
    _write_plan(state_dir, plan)
    return plan


def cancel_rotation(state_dir: Path, *, force: bool = False, clock: Clock = SYSTEM_CLOCK) -> None:
    """Give the rotation up: the new roots leave the bundle. Once the new
    key signs, its certificates would chain to a root no longer handed out,
    so that needs ``force``. The new key stays in the token."""
    plan = _plan_or_error(state_dir)
    phase = plan.phase(clock.utcnow())
    if phase in (Phase.SIGNING_NEW, Phase.RETIRED) and not force:
        raise ConfigurationError(f"the new key already signs (phase {phase.value}): cancelling now strands the "
                                 "certificates it signed; pass --force to cancel anyway")
    shutil.rmtree(_rotation_dir(state_dir))


def finish_rotation(state_dir: Path, *, force: bool = False, clock: Clock = SYSTEM_CLOCK) -> CAConfig:
    """Make the next CA the state directory's own: its certificates and
    signer replace the old ones and the plan goes. Before ``retire_at``
    certificates of the old key may still be in use (peers would stop
    trusting them), so that needs ``force``; before activation it is refused."""
    now = clock.utcnow()
    plan = _plan_or_error(state_dir)
    phase = plan.phase(now)
    if phase in (Phase.AWAITING_CERTIFICATE, Phase.DISTRIBUTING):
        raise ConfigurationError(f"the new key does not sign yet (phase {phase.value}); "
                                 "`fastca ca rotate activate` comes first")
    if phase is Phase.SIGNING_NEW and not force:
        assert plan.retire_at is not None
        raise ConfigurationError(f"certificates signed by the old key may be in use until "
                                 f"{plan.retire_at:%Y-%m-%dT%H:%M:%S}Z; finishing now removes the old root "
                                 "they chain to; pass --force to finish anyway")
    upcoming = _next_material(state_dir, now)
    directory = _rotation_dir(state_dir)
    # The top-level files first: a reader in between sees the plan's next
    # CA either way, so no server flips back and forth.
    for name in (SIGNING_CERT_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE):
        shutil.copyfile(directory / name, state_dir / (name + ".tmp"))
        os.replace(state_dir / (name + ".tmp"), state_dir / name)
    write_lifecycle(state_dir, signer=plan.next_signer)
    shutil.rmtree(directory)
    config = CAConfig.load(state_dir)
    if load_ca_material(state_dir, now).signing_cert != upcoming.signing_cert:
        raise ConfigurationError("the state directory changed while the rotation was finished; check it")
    return config
