"""`fastca ca status` and `fastca ca rotate start | install-cert | activate |
cancel | finish`: the CA's rotation, as fastca.ca.rotation plans it.

Registered in cli/main.py with ``app.add_typer(ca_app, name="ca")``.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any, Optional

import typer
from cryptography import x509
from rich.console import Console

from fastca.ca.material import CAMaterial
from fastca.ca.rotation import (
    CAView,
    Phase,
    activate_now,
    ca_view,
    cancel_rotation,
    finish_rotation,
    install_next_cert,
    start_rotation,
)
from fastca.ca.state import default_state_dir
from fastca.cli.audit_cmd import parse_duration
from fastca.clock import SYSTEM_CLOCK
from fastca.config import CAConfig
from fastca.errors import ConfigurationError

__all__ = ["ca_app"]

ca_app = typer.Typer(no_args_is_help=True, help="The CA itself: its status and its rotation.")
rotate_app = typer.Typer(no_args_is_help=True, help="Rotate the CA's key and certificate without downtime.")
ca_app.add_typer(rotate_app, name="rotate")
_out = Console(emoji=False, soft_wrap=True)

StateOption = typer.Option(None, "--state", help="state directory [default: $FASTCA_STATE_DIR or ./.fastca]")

_NEXT_STEP = {
    Phase.STEADY: "nothing to do; `fastca ca rotate start` begins a rotation",
    Phase.AWAITING_CERTIFICATE: "have the CSR signed upstream, then `fastca ca rotate install-cert`",
    Phase.DISTRIBUTING: "agents are receiving the new root; the new key signs from activate_at "
                        "(`fastca ca rotate activate` for now)",
    Phase.SIGNING_NEW: "the old root stays until retire_at, when the last certificate of the old key has expired",
    Phase.RETIRED: "the old root is out of the bundle; `fastca ca rotate finish` makes the new CA the state's own",
}


def _state(state: Optional[Path]) -> Path:
    return state if state is not None else default_state_dir()


def _certificate(certificate: x509.Certificate) -> dict[str, Any]:
    try:
        ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
    except x509.ExtensionNotFound:
        ski = None
    return {"subject": certificate.subject.rfc4514_string(), "subject_key_id": ski,
            "not_after": certificate.not_valid_after_utc.isoformat(),
            "self_signed": certificate.issuer == certificate.subject}


def _material(material: CAMaterial | None) -> dict[str, Any] | None:
    if material is None:
        return None
    return {"signing": _certificate(material.signing_cert), "roots": [_certificate(r) for r in material.roots]}


def _iso(moment: dt.datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _describe(view: CAView) -> dict[str, Any]:
    described: dict[str, Any] = {
        "phase": view.phase.value,
        "signing_now": _certificate(view.material.signing_cert),
        "signing_key": view.signer.key_uri or view.signer.key_file,
        "bundle": [_certificate(r) for r in view.roots],
        "current": _material(view.current), "next": _material(view.next)}
    plan = view.plan
    if plan is not None:
        described["plan"] = {"started_at": _iso(plan.started_at), "activate_at": _iso(plan.activate_at),
                             "retire_at": _iso(plan.retire_at), "pending_csr": plan.pending_csr,
                             "next_key": plan.next_signer.key_uri or plan.next_signer.key_file}
    described["next_step"] = _NEXT_STEP[view.phase]
    return described


def _show(described: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(described, indent=2))
        return
    _out.print(f"phase: [bold]{described['phase']}[/bold]", highlight=False)
    signing = described["signing_now"]
    _out.print(f"signing with: {signing['subject']} (SKI {signing['subject_key_id']}, until "
               f"{signing['not_after']})\n  key: {described['signing_key']}", highlight=False, markup=False)
    _out.print("roots handed out:", highlight=False)
    for root in described["bundle"]:
        _out.print(f"  {root['subject']} (SKI {root['subject_key_id']}, until {root['not_after']})",
                   highlight=False, markup=False)
    plan = described.get("plan")
    if plan:
        for key in ("started_at", "activate_at", "retire_at", "pending_csr", "next_key"):
            if plan[key]:
                _out.print(f"{key}: {plan[key]}", highlight=False, markup=False)
    _out.print(f"next: {described['next_step']}", highlight=False, markup=False)


def _status(state_dir: Path) -> dict[str, Any]:
    return _describe(ca_view(state_dir, SYSTEM_CLOCK.utcnow()))


@ca_app.command("status")
def status(state: Optional[Path] = StateOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """The rotation phase, the CA signing now, the roots handed out, what comes next."""
    _show(_status(_state(state)), as_json)


def _duration(text: str, option: str) -> dt.timedelta:
    value = parse_duration(text)
    if value is None:
        raise ConfigurationError(f"{option}: {text!r} is not a duration (seconds, or 30m, 12h, 7d)")
    return value


@rotate_app.command("start")
def rotate_start(
    state: Optional[Path] = StateOption,
    activate_after: Optional[str] = typer.Option(None, help="how long the new root goes out before the new key "
                                                 "signs [default: issuance.default_ttl_seconds, by when every "
                                                 "agent has renewed and received it]"),
    key_type: Optional[str] = typer.Option(None, help="the new key's type [default: the current one's]"),
    csr_out: Optional[Path] = typer.Option(None, help="an intermediate: write the new key's CSR here for the "
                                           "upstream CA"),
    root_lifetime_days: int = typer.Option(3650, min=1, help="a self-signed root: the new root's lifetime"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Generate the new key in the HSM and its certificate (or CSR); the new root goes out now."""
    state_dir = _state(state)
    config = CAConfig.load(state_dir)
    after = (_duration(activate_after, "--activate-after") if activate_after is not None
             else dt.timedelta(seconds=config.issuance.default_ttl_seconds))
    start_rotation(state_dir, activate_after=after, key_type=key_type, csr_out=csr_out,
                   root_lifetime=dt.timedelta(days=root_lifetime_days))
    _show(_status(state_dir), as_json)


@rotate_app.command("install-cert")
def rotate_install_cert(
    cert: Path = typer.Option(..., help="the new CA certificate the upstream CA issued"),
    root: Path = typer.Option(..., help="the upstream root bundle"),
    chain: Optional[Path] = typer.Option(None, help="intermediates between it and the root"),
    state: Optional[Path] = StateOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Finish `rotate start --csr-out`: the new certificate's roots go out now."""
    state_dir = _state(state)
    install_next_cert(state_dir, cert, chain, root)
    _show(_status(state_dir), as_json)


@rotate_app.command("activate")
def rotate_activate(state: Optional[Path] = StateOption, as_json: bool = typer.Option(False, "--json")) -> None:
    """Sign with the new key from now on instead of at activate_at."""
    state_dir = _state(state)
    activate_now(state_dir)
    _show(_status(state_dir), as_json)


@rotate_app.command("cancel")
def rotate_cancel(state: Optional[Path] = StateOption,
                  force: bool = typer.Option(False, "--force", help="even after the new key signed")) -> None:
    """Give the rotation up before the new key signs: its roots leave the bundle."""
    state_dir = _state(state)
    cancel_rotation(state_dir, force=force)
    _show(_status(state_dir), False)


@rotate_app.command("finish")
def rotate_finish(state: Optional[Path] = StateOption,
                  force: bool = typer.Option(False, "--force", help="before retire_at: the old root leaves "
                                             "while certificates it signed may be in use"),
                  as_json: bool = typer.Option(False, "--json")) -> None:
    """Retire the old root (at retire_at, or now with --force) and make the new CA the state's own."""
    state_dir = _state(state)
    finish_rotation(state_dir, force=force)
    _show(_status(state_dir), as_json)
