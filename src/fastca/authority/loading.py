"""Building an Authority from a state directory: the CA material and signer
that lifecycle code (fastca.ca) loads, put together with the stages."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from fastca.audit.record import IssuanceRecord
from fastca.authority.admission import Admission
from fastca.authority.authority import Authority
from fastca.authority.stages import AuditSink
from fastca.ca.material import load_ca_material, open_signer
from fastca.clock import Clock
from fastca.config import CAConfig, IssuanceConfig, ServerConfig
from fastca.errors import CANotReady

__all__ = ["load_authority"]


def load_authority(name: str, state_dir: Path, *, admission: Admission, audit: AuditSink, clock: Clock,
                   issuance: IssuanceConfig | None = None, server: ServerConfig | None = None,
                   executor: Executor | None = None,
                   on_recorded: Callable[[list[IssuanceRecord]], None] | None = None,
                   observe_sign: Callable[[float], None] | None = None,
                   observe_batch: Callable[[int, float], None] | None = None,
                   wait_for_signer: bool = False) -> Authority:
    """The Authority of the CA in ``state_dir``. ``issuance`` overrides that
    CA's own [issuance] table (the server's default signer uses the server's);
    ``server`` gives the batch settings. With ``wait_for_signer`` an HSM that
    is not there yet gives an Authority that is not ready until it is."""
    config = CAConfig.load(state_dir)
    if config.pending_csr is not None:
        raise CANotReady(f"the CA in {state_dir} waits for its certificate: sign {config.pending_csr} "
                         "upstream, then run `fastca init --install-cert`")
    material = load_ca_material(state_dir, clock.utcnow())
    server = server or config.server
    signer = open_signer(config.signer, state_dir, expected_public_key=material.signing_cert.public_key(),
                         start_unavailable=wait_for_signer)
    try:
        return Authority(name, material, signer, issuance=issuance or config.issuance, admission=admission,
                         audit=audit, clock=clock, executor=executor, batch_max=server.batch_max,
                         batch_delay_s=server.batch_delay_us / 1e6, queue_limit=server.queue_limit,
                         on_recorded=on_recorded, observe_sign=observe_sign, observe_batch=observe_batch)
    except BaseException:
        signer.close()
        raise
