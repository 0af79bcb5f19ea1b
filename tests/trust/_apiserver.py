"""An in-memory Kubernetes API server over HTTPS on 127.0.0.1, speaking the
real JSON for what the trust-bundle publisher uses: Namespaces (list, get,
watch), ConfigMaps (get, list, create, replace, merge-patch, delete, watch;
per namespace and across all, with ``fieldSelector=metadata.name=...``) and
coordination.k8s.io/v1 Leases (get, create, replace). Every object carries a
``resourceVersion`` from one counter; a replace whose resourceVersion is not
the stored one is 409 Conflict; a watch is a chunked stream of JSON lines
(ADDED / MODIFIED / DELETED), from the resourceVersion asked for, ended after
``timeoutSeconds``; a resourceVersion older than the last ``compact()`` is
an ERROR event with 410 Gone, as etcd compaction makes it. Requests need
the bearer token (401 otherwise).

Tests change the cluster through the same store (``create_namespace``,
``edit_configmap``, ``delete_configmap``…), which emits the same events."""

from __future__ import annotations

import contextlib
import copy
import json
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.authn._pki import make_root, serving_pair

TOKEN = "stand-in-bearer-token"
COORDINATION = "/apis/coordination.k8s.io/v1"


@dataclass
class _Event:
    rv: int
    resource: str           # "namespaces", "configmaps", "leases"
    type: str
    obj: dict[str, Any]


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class KubeStandIn:
    def __init__(self, tmp: Path, *, token: str = TOKEN) -> None:
        self.token = token
        # bearer token -> who (the requests record who made each one)
        self.tokens: dict[str, str] = {token: "default"}
        ca = make_root("stand-in apiserver CA")
        cert_pem, key_pem = serving_pair(ca)
        self.ca_file = tmp / "apiserver-ca.pem"
        self.ca_file.write_bytes(ca.pem)
        (tmp / "apiserver.pem").write_bytes(cert_pem)
        (tmp / "apiserver.key").write_bytes(key_pem)
        self._cond = threading.Condition()
        self._rv = 0
        self._compacted = 0
        self._stopping = False
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            "namespaces": {}, "configmaps": {}, "leases": {}}
        self._events: list[_Event] = []
        self.requests: list[tuple[str, str, int, str]] = []       # (method, path, status, who)
        self.conflicts: dict[str, int] = {"configmaps": 0, "leases": 0}
        # Writes by "someone else" slipped in just before the next N Lease
        # replaces, between their read and their write: each of those gets 409.
        self.interleave_lease_writes = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer._handle(self, body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp / "apiserver.pem", tmp / "apiserver.key")
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> KubeStandIn:
        threading.Thread(target=lambda: self.server.serve_forever(poll_interval=0.05), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def write_kubeconfig(self, path: Path, *, who: str | None = None) -> Path:
        """A kubeconfig for this server; ``who`` gets a bearer token of its own."""
        token = self.token
        if who is not None:
            token = f"token-{who}"
            self.tokens[token] = who
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url,
                                                          "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "fastca", "user": {"token": token}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "fastca"}}],
        }
        path.write_text(json.dumps(config))       # JSON is YAML
        return path

    # -- the store (tests use these too) ----------------------------------------------

    def _record(self, resource: str, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Under the lock: a new resourceVersion for obj, and its event."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        self._events.append(_Event(self._rv, resource, kind, copy.deepcopy(obj)))
        self._cond.notify_all()
        return copy.deepcopy(obj)

    def _new(self, resource: str, kind: str, api_version: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        key = (namespace, body.get("metadata", {}).get("name", ""))
        if not key[1]:
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        if key in self.objects[resource]:
            raise ApiError(409, "AlreadyExists", f'{resource} "{key[1]}" already exists')
        obj = copy.deepcopy(body)
        obj["kind"], obj["apiVersion"] = kind, api_version
        meta = obj.setdefault("metadata", {})
        if namespace:
            meta["namespace"] = namespace
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now())
        meta.pop("resourceVersion", None)
        self.objects[resource][key] = obj
        return self._record(resource, "ADDED", obj)

    def _replace(self, resource: str, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        current = self._get(resource, namespace, name)
        asked = body.get("metadata", {}).get("resourceVersion")
        if asked and asked != current["metadata"]["resourceVersion"]:
            self.conflicts[resource] = self.conflicts.get(resource, 0) + 1
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {resource} "{name}": the object '
                           "has been modified; please apply your changes to the latest version and try again")
        obj = copy.deepcopy(body)
        obj["kind"], obj["apiVersion"] = current["kind"], current["apiVersion"]
        meta = obj.setdefault("metadata", {})
        for field in ("name", "namespace", "uid", "creationTimestamp"):
            if field in current["metadata"]:
                meta[field] = current["metadata"][field]
        self.objects[resource][(namespace, name)] = obj
        return self._record(resource, "MODIFIED", obj)

    def _get(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        try:
            return self.objects[resource][(namespace, name)]
        except KeyError:
            raise ApiError(404, "NotFound", f'{resource} "{name}" not found') from None

    def _delete(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        obj = self._get(resource, namespace, name)
        del self.objects[resource][(namespace, name)]
        return self._record(resource, "DELETED", obj)

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        with self._cond:
            self._new("namespaces", "Namespace", "v1", "", {
                "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **(labels or {})}},
                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})

    def delete_namespace(self, name: str) -> None:
        """Terminating first, then its ConfigMaps go, then it does (as the
        namespace controller does it)."""
        with self._cond:
            ns = self._get("namespaces", "", name)
            ns["status"]["phase"] = "Terminating"
            self._record("namespaces", "MODIFIED", ns)
            for key in [k for k in self.objects["configmaps"] if k[0] == name]:
                self._delete("configmaps", *key)
            self._delete("namespaces", "", name)

    def configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            obj = self.objects["configmaps"].get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def put_configmap(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """Create the ConfigMap, or set its data (a remote cluster's istiod)."""
        with self._cond:
            if (namespace, name) in self.objects["configmaps"]:
                self.edit_configmap(namespace, name, data)
            else:
                self._new("configmaps", "ConfigMap", "v1", namespace, {"metadata": {"name": name}, "data": data})

    def edit_configmap(self, namespace: str, name: str, data: dict[str, str],
                       labels: dict[str, str] | None = None) -> None:
        with self._cond:
            obj = copy.deepcopy(self._get("configmaps", namespace, name))
            obj["data"] = data
            if labels is not None:
                obj["metadata"]["labels"] = labels
            obj["metadata"].pop("resourceVersion", None)
            self._replace("configmaps", namespace, name, obj)

    def delete_configmap(self, namespace: str, name: str) -> None:
        with self._cond:
            self._delete("configmaps", namespace, name)

    def lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            obj = self.objects["leases"].get((namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def touch_lease(self, namespace: str, name: str) -> None:
        """Someone else writes the Lease (an annotation): whoever holds a copy
        read before now gets 409 on its next replace."""
        with self._cond:
            self._touch_locked(namespace, name)

    def _touch_locked(self, namespace: str, name: str) -> None:
        obj = copy.deepcopy(self._get("leases", namespace, name))
        obj["metadata"].setdefault("annotations", {})["touched"] = str(time.monotonic_ns())
        obj["metadata"].pop("resourceVersion", None)
        self._replace("leases", namespace, name, obj)

    def compact(self) -> None:
        """Forget the event history: a watch from before now gets 410 Gone."""
        with self._cond:
            self._compacted = self._rv
            self._events.clear()

    def writes(self, resource: str = "configmaps", who: str | None = None) -> list[tuple[str, str, int, str]]:
        """The write requests on ``resource`` that succeeded (by ``who``)."""
        with self._cond:
            return [r for r in self.requests if r[0] in ("POST", "PUT", "PATCH", "DELETE")
                    and f"/{resource}" in r[1] and r[2] < 300 and (who is None or r[3] == who)]

    # -- HTTP ----------------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        split = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        method = handler.command
        status = 200
        authorization = handler.headers.get("Authorization") or ""
        who = self.tokens.get(authorization.removeprefix("Bearer "), "?")
        try:
            if who == "?":
                raise ApiError(401, "Unauthorized", "Unauthorized")
            route = self._route(split.path)
            if method == "GET" and str(query.get("watch")).lower() in ("true", "1") and route[2] is None:
                with self._cond:
                    self.requests.append((method, split.path, 200, who))
                self._watch(handler, route[0], route[1], query)
                return
            with self._cond:
                status, payload = self._call(method, route, query, body)
        except ApiError as error:
            status, payload = error.code, error.status()
        except (ValueError, KeyError) as error:
            status, payload = 400, ApiError(400, "BadRequest", str(error)).status()
        with self._cond:
            self.requests.append((method, split.path, status, who))
        data = json.dumps(payload).encode()
        self._headers(handler, status, {"Content-Length": str(len(data))})
        with contextlib.suppress(OSError):          # the client went away (ssl.SSLError is an OSError)
            handler.wfile.write(data)

    @staticmethod
    def _headers(handler: BaseHTTPRequestHandler, status: int, extra: dict[str, str]) -> None:
        handler.send_response(status)
        for name, value in {"Content-Type": "application/json", **extra}.items():
            handler.send_header(name, value)
        handler.end_headers()

    @staticmethod
    def _route(path: str) -> tuple[str, str | None, str | None]:
        """(resource, namespace or None for all, name or None)."""
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
        elif parts[:3] == ["apis", "coordination.k8s.io", "v1"]:
            rest = parts[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if rest == ["namespaces"]:
            return "namespaces", "", None
        if len(rest) == 2 and rest[0] == "namespaces":
            return "namespaces", "", rest[1]
        if len(rest) == 1 and rest[0] in ("configmaps", "leases"):
            return rest[0], None, None
        if len(rest) in (3, 4) and rest[0] == "namespaces" and rest[2] in ("configmaps", "leases"):
            return rest[2], rest[1], rest[3] if len(rest) == 4 else None
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _matches(self, resource: str, namespace: str | None, query: dict[str, str], obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        if resource != "namespaces" and namespace is not None and meta.get("namespace") != namespace:
            return False
        selector = query.get("fieldSelector")
        if selector:
            for term in selector.split(","):
                field, _, value = term.partition("=")
                actual = meta.get(field.removeprefix("metadata.")) if field.startswith("metadata.") else None
                if actual != value.lstrip("="):
                    return False
        return True

    _KINDS = {"namespaces": ("Namespace", "v1"), "configmaps": ("ConfigMap", "v1"),
              "leases": ("Lease", "coordination.k8s.io/v1")}

    def _call(self, method: str, route: tuple[str, str | None, str | None], query: dict[str, str],
              body: bytes) -> tuple[int, Any]:
        resource, namespace, name = route
        kind, api_version = self._KINDS[resource]
        ns = namespace or ""
        if name is None and method == "GET":
            items = [copy.deepcopy(o) for o in self.objects[resource].values()
                     if self._matches(resource, namespace, query, o)]
            return 200, {"kind": f"{kind}List", "apiVersion": api_version,
                         "metadata": {"resourceVersion": str(self._rv)}, "items": items}
        if name is None and method == "POST":
            if resource == "namespaces" or namespace is None:
                raise ApiError(405, "MethodNotAllowed", "not supported here")
            parent = self.objects["namespaces"].get(("", ns))
            if parent is None:
                raise ApiError(404, "NotFound", f'namespaces "{ns}" not found')
            if parent["status"]["phase"] == "Terminating":
                raise ApiError(403, "Forbidden", f"unable to create new content in namespace {ns} "
                               "because it is being terminated")
            return 201, self._new(resource, kind, api_version, ns, json.loads(body))
        if name is None:
            raise ApiError(405, "MethodNotAllowed", method)
        if method == "GET":
            return 200, copy.deepcopy(self._get(resource, ns, name))
        if resource == "namespaces":
            raise ApiError(405, "MethodNotAllowed", "namespaces are changed by the test only")
        if method == "PUT":
            if resource == "leases" and self.interleave_lease_writes > 0:
                self.interleave_lease_writes -= 1
                self._touch_locked(ns, name)
            return 200, self._replace(resource, ns, name, json.loads(body))
        if method == "PATCH":
            current = copy.deepcopy(self._get(resource, ns, name))
            merged = _merge(current, json.loads(body))
            merged["metadata"].pop("resourceVersion", None)
            return 200, self._replace(resource, ns, name, merged)
        if method == "DELETE":
            self._delete(resource, ns, name)
            return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}
        raise ApiError(405, "MethodNotAllowed", method)

    def _watch(self, handler: BaseHTTPRequestHandler, resource: str, namespace: str | None,
               query: dict[str, str]) -> None:
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 1800)
        self._headers(handler, 200, {"Transfer-Encoding": "chunked"})

        def send(event: dict[str, Any]) -> None:
            line = json.dumps(event).encode() + b"\n"
            handler.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
            handler.wfile.flush()

        try:
            with self._cond:
                asked = query.get("resourceVersion") or ""
                pending: list[dict[str, Any]] = []
                if asked in ("", "0"):
                    cursor = self._rv
                    pending = [{"type": "ADDED", "object": copy.deepcopy(o)}
                               for o in self.objects[resource].values()
                               if self._matches(resource, namespace, query, o)]
                elif int(asked) < self._compacted:
                    error = ApiError(410, "Expired", f"too old resource version: {asked} ({self._compacted})")
                    pending = [{"type": "ERROR", "object": error.status()}]
                    cursor = -1
                else:
                    cursor = int(asked)
            for event in pending:
                send(event)
            while cursor >= 0:
                with self._cond:
                    while True:
                        if self._stopping or time.monotonic() >= deadline:
                            cursor = -1
                            break
                        fresh = [e for e in self._events if e.rv > cursor]
                        if fresh:
                            cursor = fresh[-1].rv
                            break
                        self._cond.wait(min(0.5, max(0.01, deadline - time.monotonic())))
                if cursor < 0:
                    break
                for event in fresh:
                    if event.resource == resource and self._matches(resource, namespace, query, event.obj):
                        send({"type": event.type, "object": event.obj})
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()
        except OSError:
            pass
        handler.close_connection = True
