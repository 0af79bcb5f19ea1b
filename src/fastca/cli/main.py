"""`fastca` — init | issue | inspect | hsm list.

Errors from fastca's own tree print as one line (their public text) and exit
with status 2; nothing prints a PIN or key.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from fastca.ca.state import default_state_dir
from fastca.config import IssuanceConfig
from fastca.cli import inspect_cmd, risk_cmd
from fastca.cli.audit_cmd import audit_app
from fastca.cli.ca_cmd import ca_app
from fastca.errors import ConfigurationError, FastcaError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="fastca: a high-performance CA for service meshes, with its key in an HSM.")
hsm_app = typer.Typer(no_args_is_help=True, help="Look at PKCS#11 modules and tokens.")
app.add_typer(hsm_app, name="hsm")
app.add_typer(audit_app, name="audit")
app.add_typer(ca_app, name="ca")
app.command("risk")(risk_cmd.risk)
err = Console(stderr=True, emoji=False, soft_wrap=True)
out = Console(emoji=False)

StateOption = typer.Option(None, "--state", help="state directory [default: $FASTCA_STATE_DIR or ./.fastca]")


def _state(state: Optional[Path]) -> Path:
    return state if state is not None else default_state_dir()


@app.command()
def init(
    state: Optional[Path] = StateOption,
    trust_domain: str = typer.Option("cluster.local", help="SPIFFE trust domain; the root's O="),
    key_type: str = typer.Option("ec-p256", help="ec-p256 | ec-p384 | rsa-2048 | rsa-3072"),
    key_uri: Optional[str] = typer.Option(None, help="use an existing HSM: pkcs11:token=…;object=…?module-path=…"
                                          "&pin-source=file:… (key found or generated there)"),
    software_key: bool = typer.Option(False, "--software-key", help="keep the CA key in a 0600 PEM file (no HSM)"),
    import_istio_cacerts: Optional[Path] = typer.Option(None, help="import an Istio cacerts directory; "
                                                        "its key goes into the token"),
    csr_out: Optional[Path] = typer.Option(None, help="write an intermediate-CA CSR for an upstream root"),
    install_cert: Optional[Path] = typer.Option(None, help="finish --csr-out: the issued CA certificate"),
    chain: Optional[Path] = typer.Option(None, help="with --install-cert: intermediates up to the root"),
    root: Optional[Path] = typer.Option(None, help="with --install-cert: the root bundle"),
    default_ttl: int = typer.Option(86400, help="default workload certificate TTL, seconds"),
    max_ttl: int = typer.Option(90 * 86400, help="largest TTL a caller may ask for, seconds"),
    force: bool = typer.Option(False, "--force", help="replace an existing CA (destroys its key)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Create the CA (embedded SoftHSM token + self-signed root by default)."""
    from fastca.ca.init import InitOptions, init_ca, install_cert as finish_install

    state_dir = _state(state)
    if install_cert is not None:
        if root is None:
            raise ConfigurationError("--install-cert needs --root (the root bundle)")
        config = finish_install(state_dir, install_cert, chain, root)
    else:
        config = init_ca(state_dir, InitOptions(
            trust_domain=trust_domain, key_type=key_type, key_uri=key_uri, software_key=software_key,
            import_istio_cacerts=import_istio_cacerts, csr_out=csr_out, force=force,
            issuance=IssuanceConfig(default_ttl_seconds=default_ttl, max_ttl_seconds=max_ttl)))
    summary = {"state": str(state_dir), "trust_domain": config.trust_domain, "backend": config.signer.backend,
               "key": config.signer.key_uri or config.signer.key_file, "pending_csr": config.pending_csr}
    if as_json:
        print(json.dumps(summary))
    elif config.pending_csr:
        print(f"CA key ready in {state_dir}; have {config.pending_csr} signed by your root, then run\n"
              f"  fastca init --state {state_dir} --install-cert CERT --chain CHAIN --root ROOT")
    else:
        print(f"CA ready in {state_dir} (trust domain {config.trust_domain}, key {summary['key']})\n"
              f"  root bundle for agents: {state_dir / 'root-cert.pem'}")


def _local_user() -> str:
    """Who ran the command, for the audit record: the effective user, and the
    user sudo was run by, if any."""
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    via = os.environ.get("SUDO_USER")
    return f"unix:{name}(uid={uid})" + (f" via sudo by {via}" if via and via != name else "")


@app.command()
def issue(
    csr: Path = typer.Option(..., help="PEM or DER CSR file"),
    identity: str = typer.Option(..., help="SPIFFE ID to certify, e.g. spiffe://cluster.local/ns/default/sa/app"),
    ttl: int = typer.Option(0, help="seconds; 0 means the configured default"),
    state: Optional[Path] = StateOption,
    out: Optional[Path] = typer.Option(None, help="write the chain here instead of stdout"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Issue one workload certificate; prints the chain as Istio returns it."""
    from fastca.audit.config import open_audit_log
    from fastca.authority import Admission, LocalPrincipal, load_authority
    from fastca.clock import SYSTEM_CLOCK
    from fastca.config import CAConfig
    from fastca.policy.request import RequestPolicy

    try:
        data = csr.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {csr}: {exc.strerror}") from None
    state_dir = _state(state)
    config = CAConfig.load(state_dir)
    # The audit log opens first: a certificate that cannot be recorded is not made.
    with open_audit_log(config.audit, state_dir) as audit:
        admission = Admission(signer="default", trust_domain=config.trust_domain,
                              policy=RequestPolicy(config.policy, clock=SYSTEM_CLOCK), node_authorizer=None)
        authority = load_authority("default", state_dir, admission=admission, audit=audit, clock=SYSTEM_CLOCK)
        try:
            issued = authority.issue_local(LocalPrincipal("cli", _local_user()), identity=identity, csr=data,
                                           ttl_seconds=ttl, request_id=f"cli-{os.getpid()}-{secrets.token_hex(4)}")
        finally:
            authority.close()
    if as_json:
        text = json.dumps({"serial": f"{issued.serial:x}", "identity": issued.identity,
                           "not_before": issued.not_before.isoformat(), "not_after": issued.not_after.isoformat(),
                           "key_type": issued.key_type, "sha256": issued.fingerprint_sha256,
                           "cert_chain": list(issued.chain)}) + "\n"
    else:
        text = "".join(issued.chain)
    if out is not None:
        out.write_text(text)
    else:
        sys.stdout.write(text)


@app.command()
def inspect(
    file: Path = typer.Argument(..., help="certificate(s) or CSR, PEM or DER"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Show a certificate or CSR: subject, SANs, validity, key, extensions, fingerprints."""
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {file}: {exc.strerror}") from None
    described = inspect_cmd.describe(data)
    if as_json:
        print(json.dumps(described, indent=2))
    else:
        inspect_cmd.render(described, out)


@app.command()
def serve(
    state: Optional[Path] = StateOption,
    listen: Optional[str] = typer.Option(None, help="gRPC address [default: server.listen, 127.0.0.1:15012]"),
    metrics: Optional[str] = typer.Option(None, help="Prometheus address [default: server.metrics_listen, "
                                          "127.0.0.1:15014]"),
    mtls_listen: Optional[str] = typer.Option(None, help="an extra port that requires a client certificate (the "
                                              "main port asks for one and verifies it if given)"),
    plaintext: bool = typer.Option(False, "--plaintext", help="no TLS (Istio's :15010 case)"),
    workers: Optional[int] = typer.Option(None, min=1, max=64, help="server processes sharing the port "
                                          "(SO_REUSEPORT) [default: server.workers, 0 there = one per CPU]"),
) -> None:
    """Serve istio.v1.auth.IstioCertificateService until SIGTERM."""
    from fastca.config import CAConfig
    from fastca.frontend.server import serve as run_server
    from fastca.observability.logging import configure_logging

    configure_logging()
    state_dir = _state(state)
    config = CAConfig.load(state_dir)
    overrides = {key: value for key, value in (("listen", listen), ("metrics_listen", metrics),
                                               ("mtls_listen", mtls_listen)) if value is not None}
    if plaintext:
        overrides["plaintext"] = True
    if overrides:
        config = config.model_copy(update={"server": config.server.model_copy(update=overrides)})
    count = workers or config.server.worker_count()
    if count > 1:
        from fastca.frontend.workers import supervise

        sys.exit(supervise(state_dir, config, count))
    run_server(state_dir, config)


@app.command()
def agent(
    config_file: Optional[Path] = typer.Option(None, "--config", help="agent TOML file"),
    ca_addr: Optional[str] = typer.Option(None, help="CA address HOST:PORT (CA_ADDR); :15010 means plaintext"),
    ca_root: Optional[Path] = typer.Option(None, help="root bundle that the CA's certificate chains to (CA_ROOT_CA)"),
    ca_server_name: Optional[str] = typer.Option(None, help="name the CA's certificate must carry, if not the host "
                                                 "of --ca-addr"),
    socket: Optional[Path] = typer.Option(None, help="SDS Unix socket [./var/run/secrets/workload-spiffe-uds/socket]"),
    trust_domain: Optional[str] = typer.Option(None, help="trust domain (TRUST_DOMAIN)"),
    namespace: Optional[str] = typer.Option(None, help="workload namespace (POD_NAMESPACE)"),
    service_account: Optional[str] = typer.Option(None, help="workload service account (SERVICE_ACCOUNT)"),
    token_file: Optional[Path] = typer.Option(None, help="service-account token, re-read on every CA call"),
    cert: Optional[Path] = typer.Option(None, help="client certificate for the CA (VMs)"),
    key: Optional[Path] = typer.Option(None, help="its key"),
    ttl: Optional[str] = typer.Option(None, help="certificate TTL: seconds or a duration like 24h (SECRET_TTL)"),
    key_type: Optional[str] = typer.Option(None, help="rsa-2048 (default, as istio-agent) | ec-p256 | ec-p384"),
    mounted_dir: Optional[Path] = typer.Option(None, help="serve cert-chain.pem/key.pem/root-cert.pem from here "
                                               "instead of a CA"),
    output_dir: Optional[Path] = typer.Option(None, help="also write each new key/chain/root here"),
    metrics: Optional[str] = typer.Option(None, help="Prometheus address [127.0.0.1:15020]"),
) -> None:
    """The node agent: certificates from an Istio-compatible CA, served to Envoy over SDS."""
    from fastca.agent.config import AgentConfig
    from fastca.agent.main import run_agent
    from fastca.observability.logging import configure_logging

    configure_logging()
    config = AgentConfig.load(config_file, ca_addr=ca_addr, ca_root=ca_root, ca_server_name=ca_server_name,
                              socket=socket, trust_domain=trust_domain,
                              namespace=namespace, service_account=service_account, token_file=token_file,
                              client_cert=cert, client_key=key, ttl_seconds=ttl, key_type=key_type,
                              mounted_dir=mounted_dir, output_dir=output_dir, metrics_listen=metrics)
    run_agent(config)


@hsm_app.command("list")
def hsm_list(
    state: Optional[Path] = StateOption,
    module: Optional[str] = typer.Option(None, help="PKCS#11 module path [default: the state's, else SoftHSM]"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Tokens and keys of the configured PKCS#11 module, as PKCS#11 URIs."""
    from fastca.ca import hsm, softhsm
    from fastca.config import CAConfig
    from fastca.signing.pkcs11_uri import Pkcs11Uri

    state_dir = _state(state)
    conf, uri = None, None
    if (state_dir / "fastca.toml").exists():
        config = CAConfig.load(state_dir)
        if config.signer.key_uri:
            uri = Pkcs11Uri.parse(config.signer.key_uri)
        conf_path = config.path(state_dir, config.signer.softhsm_conf)
        conf = str(conf_path.resolve()) if conf_path else None
    module_path = module or (uri.module_path if uri and uri.module_path else softhsm.find_softhsm_module())
    listings = hsm.list_tokens(module_path, conf, uri)
    if as_json:
        print(json.dumps([listing.__dict__ for listing in listings], indent=2))
        return
    from rich.table import Table

    table = Table(title=f"PKCS#11 module {module_path}")
    for column in ("token", "object", "type", "key type", "URI"):
        table.add_column(column, overflow="fold")
    for listing in listings:
        if not listing.objects:
            table.add_row(listing.label, "", "", "", listing.token_uri)
        for obj in listing.objects:
            table.add_row(listing.label, obj["label"], obj["type"], obj.get("key_type", ""), obj["uri"])
    out.print(table)


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except FastcaError as error:
        # The operator at this terminal may see the internal detail too; no
        # message in the tree carries a PIN or key.
        detail = str(error)
        text = error.public_message if detail == error.public_message else f"{error.public_message}: {detail}"
        err.print(f"fastca: error: {text}", highlight=False, markup=False)
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as error:
        # Usage errors (typer's vendored click) know how to show themselves.
        show, exit_code = getattr(error, "show", None), getattr(error, "exit_code", None)
        if callable(show) and isinstance(exit_code, int):
            show()
            sys.exit(exit_code)
        raise
    # Without standalone mode, click returns a command's typer.Exit code instead of exiting with it.
    if isinstance(code, int) and code:
        sys.exit(code)
