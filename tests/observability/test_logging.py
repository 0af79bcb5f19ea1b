"""JSON log lines with a request id; secrets never reach the output."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import structlog

from fastca.observability.logging import (
    REDACTED,
    bind_request,
    configure_logging,
    current_request_id,
    get_logger,
    log_many,
    new_request_id,
    redact,
)

JWT = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImFiYyJ9.eyJpc3MiOiJrdWJlcm5ldGVzIiwic3ViIjoic3lzdGVtIn0.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
PEM_KEY = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n"


@pytest.fixture(autouse=True)
def json_logging():
    configure_logging("info", json=True)
    yield
    # Leave the process as other tests expect it: no handler of ours on root.
    from fastca.observability import logging as module

    logging.getLogger().removeHandler(module._configured_handler)
    module._configured_handler = None
    module._configured = None
    logging.getLogger().setLevel(logging.WARNING)
    structlog.reset_defaults()


def lines(captured: str) -> list[dict]:
    return [json.loads(line) for line in captured.splitlines() if line.strip()]


def test_json_line_with_request_context(capsys: pytest.CaptureFixture[str]) -> None:
    log = get_logger("fastca.test")
    request_id = new_request_id()
    assert len(request_id) == 16 and request_id != new_request_id()
    with bind_request(request_id, "ipv4:10.0.0.7:51234", "CreateCertificate"):
        assert current_request_id() == request_id
        log.info("issued", serial="4a3f", batch=3)
    assert current_request_id() is None
    log.info("after")
    first, second = lines(capsys.readouterr().err)
    assert first["event"] == "issued" and first["level"] == "info" and first["logger"] == "fastca.test"
    assert first["request_id"] == request_id and first["peer"] == "ipv4:10.0.0.7:51234"
    assert first["method"] == "CreateCertificate" and first["batch"] == 3
    assert first["timestamp"].endswith("Z") and "T" in first["timestamp"]
    assert "request_id" not in second


def test_log_many_prints_what_the_logger_would(capsys: pytest.CaptureFixture[str]) -> None:
    entries = [{"request_id": f"r{i}", "identity": f"spiffe://td/ns/a/sa/{i}", "serial": f"{i:x}",
                "detail": f"Bearer {JWT}", "pin": "123456"} for i in range(3)]
    get_logger("fastca.batch").info("certificate issued", **entries[0])
    log_many("fastca.batch", "info", "certificate issued", entries)
    log_many("fastca.batch", "debug", "below the level", entries)
    single, *many = lines(capsys.readouterr().err)
    assert len(many) == 3
    del single["timestamp"]
    first = dict(many[0])
    assert first.pop("timestamp").endswith("Z")
    assert list(first) == list(single) and first == single     # same keys, same order, same redaction
    assert single["detail"] == f"Bearer {REDACTED}" and single["pin"] == REDACTED
    assert [m["request_id"] for m in many] == ["r0", "r1", "r2"]


def test_log_many_before_configuration_goes_through_structlog(capsys: pytest.CaptureFixture[str]) -> None:
    from fastca.observability import logging as module

    module._configured = None
    structlog.reset_defaults()
    log_many("fastca.batch", "info", "certificate issued", [{"serial": "ab"}])
    assert "certificate issued" in capsys.readouterr().out    # structlog's default: stdout


def test_secrets_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    log = get_logger("fastca.test")
    log.warning("authenticating", authorization=f"Bearer {JWT}", pin="123456", userPin="654321",
                SO_PIN="999999", detail=f"token was {JWT} from header Bearer abc-def.ghi",
                key_pem=PEM_KEY, dump=f"config:\n{PEM_KEY}", nested={"password": "hunter2", "ok": "fine"},
                key_type="ec-p256", mapping="kept", host="istiod.istio-system.svc")
    captured = capsys.readouterr().err
    for secret in (JWT, "123456", "654321", "999999", "hunter2", "MIGHAgEAMBMG", "abc-def.ghi"):
        assert secret not in captured
    (line,) = lines(captured)
    assert line["authorization"] == line["pin"] == line["userPin"] == line["SO_PIN"] == REDACTED
    assert line["detail"] == f"token was {REDACTED} from header Bearer {REDACTED}"
    assert line["nested"] == {"password": REDACTED, "ok": "fine"}
    assert "[REDACTED PRIVATE KEY]" in line["dump"]
    assert line["key_type"] == "ec-p256" and line["mapping"] == "kept" and line["host"] == "istiod.istio-system.svc"


def test_stdlib_records_share_format_and_redaction(capsys: pytest.CaptureFixture[str]) -> None:
    with bind_request("req-1", "peer", "M"):
        logging.getLogger("grpc._server").error("call failed with token %s", JWT)
    (line,) = lines(capsys.readouterr().err)
    assert line["logger"] == "grpc._server" and line["level"] == "error" and line["request_id"] == "req-1"
    assert JWT not in line["event"] and REDACTED in line["event"]


def test_exceptions_are_rendered_and_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    log = get_logger("fastca.test")
    try:
        raise RuntimeError(f"upstream said Bearer {JWT}")
    except RuntimeError:
        log.exception("failed")
    (line,) = lines(capsys.readouterr().err)
    assert "RuntimeError" in line["exception"] and JWT not in line["exception"]


def test_level_and_idempotent_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("warning")
    configure_logging("warning")
    log = get_logger("fastca.test")
    log.info("hidden")
    log.warning("shown")
    logging.getLogger("x").warning("stdlib once")
    events = [line["event"] for line in lines(capsys.readouterr().err)]
    assert events == ["shown", "stdlib once"]          # no duplicate handler
    configure_logging("info", json=False)
    log.info("console", token="abc")
    err = capsys.readouterr().err
    assert "console" in err and "abc" not in err
    with pytest.raises(ValueError):
        configure_logging("chatty")


def test_request_id_is_per_task(capsys: pytest.CaptureFixture[str]) -> None:
    log = get_logger("fastca.test")

    async def handle(i: int) -> None:
        with bind_request(f"req-{i}", f"peer-{i}", "M"):
            await asyncio.sleep(0.001 * (3 - i))
            log.info("done", i=i)

    async def main() -> None:
        await asyncio.gather(*(handle(i) for i in range(3)))

    asyncio.run(main())
    for line in lines(capsys.readouterr().err):
        assert line["request_id"] == f"req-{line['i']}" and line["peer"] == f"peer-{line['i']}"


def test_redact_helper() -> None:
    assert redact({"Authorization": "Bearer x", "list": [f"a {JWT}"]}) == {"Authorization": REDACTED,
                                                                           "list": [f"a {REDACTED}"]}
    assert redact("spiffe://cluster.local/ns/default/sa/app") == "spiffe://cluster.local/ns/default/sa/app"


def test_http_client_request_lines_only_at_debug(capsys: pytest.CaptureFixture[str]) -> None:
    """httpx logs every request (each TokenReview) at info; at info our log
    keeps its warnings only, at debug it shows them."""
    httpx_log = logging.getLogger("httpx")
    httpx_log.info("HTTP Request: POST https://api/tokenreviews")
    httpx_log.warning("connection trouble")
    assert [line["event"] for line in lines(capsys.readouterr().err)] == ["connection trouble"]
    configure_logging("debug")
    httpx_log.info("HTTP Request: POST https://api/tokenreviews")
    assert [line["event"] for line in lines(capsys.readouterr().err)] == ["HTTP Request: POST https://api/tokenreviews"]
    configure_logging("info")
