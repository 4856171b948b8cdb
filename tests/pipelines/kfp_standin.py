"""A local stand-in for the Kubeflow Pipelines v2beta1 REST API, single- or multi-user (no KFP backend here).

A real HTTP server on 127.0.0.1 that ``kfp.Client`` talks to unchanged. It keeps pipelines, versions,
experiments, runs and recurring runs in memory, records every request, and is strict the way the real
API server is where kubellm depends on it:

- **multi-user**: listing or creating experiments, runs and recurring runs without a namespace (directly,
  or through an experiment that has one) is refused with the API server's own words (HTTP 400,
  ``Invalid input error: An experiment cannot have an empty namespace in multi-user mode`` …, as in
  kubeflow/pipelines ``backend/src/apiserver/server/{experiment,run,job}_server.go``); objects are only
  visible in their namespace. Single-user mode ignores namespaces, as ``ReplaceNamespace`` does there.
- **authentication**: a bearer token must be one of the live tokens (``rotate`` expires the old ones, as
  the kubelet's rotation plus a token's expiry do), or the session cookie must match (what the gateway's
  oauth2-proxy checks for Dex/OIDC users). Anything else: HTTP 401.
- **paging**: ``page_size`` (default 20, as the server's) and an opaque ``next_page_token``.
- **payloads**: every JSON body is checked against ``kfp_server_api``'s v2beta1 models — unknown fields,
  wrong types and enum values are rejected with HTTP 400 like protojson does — and so is every response
  the stand-in sends (a stand-in bug answers 500 rather than passing silently).
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

API = "/apis/v2beta1"
DEFAULT_PAGE_SIZE = 20
#: int64 fields: the OpenAPI models type them as strings, protojson takes a number or a string.
INT64_FIELDS = {"max_concurrency", "interval_second", "long_value"}
#: Predicate operations by enum number (protojson takes the number or the name; kfp sends the number).
OPERATIONS = {
    1: "EQUALS",
    2: "NOT_EQUALS",
    3: "GREATER_THAN",
    5: "GREATER_THAN_EQUALS",
    6: "LESS_THAN",
    7: "LESS_THAN_EQUALS",
    8: "IN",
    9: "IS_SUBSTRING",
}


class Rejected(Exception):
    """An API error: HTTP status, gRPC code and the message the real server would send."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def invalid(message: str) -> Rejected:
    return Rejected(400, 3, message)


def model_problems(obj: Any, model: str, path: str = "") -> list[str]:
    """Why ``obj`` is not a valid JSON ``model`` of kfp_server_api (empty when it is): unknown fields,
    wrong JSON types, unknown enum values — recursively."""
    import kfp_server_api

    cls = getattr(kfp_server_api.models, model)
    if getattr(cls, "allowable_values", None):  # an enum
        return [] if obj in cls.allowable_values else [f"{path or model}: invalid value {obj!r} for enum {model}"]
    if not isinstance(obj, dict):
        return [f"{path or model}: expected an object, got {type(obj).__name__}"]
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    problems = []
    for key, value in obj.items():
        if key not in by_json:
            problems.append(f'unknown field "{path}{key}"')
            continue
        problems += _type_problems(value, cls.openapi_types[by_json[key]], f"{path}{key}", key)
    return problems


def _type_problems(value: Any, typ: str, path: str, key: str) -> list[str]:
    import kfp_server_api

    if value is None:
        return []
    if typ.startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [p for i, v in enumerate(value) for p in _type_problems(v, typ[5:-1], f"{path}[{i}]", key)]
    if typ.startswith("dict("):
        if not isinstance(value, dict):
            return [f"{path}: expected an object"]
        inner = typ[5:-1].split(", ", 1)[1]
        return [p for k, v in value.items() for p in _type_problems(v, inner, f"{path}.{k}", key)]
    if typ == "object":
        return []
    if typ == "str":
        ok = isinstance(value, str) or (key in INT64_FIELDS and isinstance(value, int) and not isinstance(value, bool))
        return [] if ok else [f"{path}: expected a string, got {value!r}"]
    if typ == "int":
        return [] if isinstance(value, int) and not isinstance(value, bool) else [f"{path}: expected an integer"]
    if typ == "bool":
        return [] if isinstance(value, bool) else [f"{path}: expected true/false, got {value!r}"]
    if typ == "datetime":
        return [] if isinstance(value, str) else [f"{path}: expected an RFC 3339 timestamp"]
    if hasattr(kfp_server_api.models, typ):
        return model_problems(value, typ, f"{path}.")
    return [f"{path}: unknown type {typ}"]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def _matches(filter_json: str | None, obj: dict) -> bool:
    """The EQUALS predicates of a v2beta1 filter (protojson: snake_case or camelCase, enum name or number)."""
    if not filter_json:
        return True
    predicates = [
        {_snake(k): OPERATIONS.get(v, v) if _snake(k) == "operation" else v for k, v in p.items()}
        for p in json.loads(filter_json).get("predicates", [])
    ]
    if problems := model_problems({"predicates": predicates}, "V2beta1Filter"):
        raise invalid(f"Failed to create list options: Invalid filter: {'; '.join(problems)}")
    for pred in predicates:
        if pred.get("operation") != "EQUALS":
            raise invalid(f"the stand-in supports EQUALS predicates only, got {pred.get('operation')!r}")
        if obj.get(pred["key"]) != pred.get("string_value"):
            return False
    return True


def _page(items: list[dict], q: dict[str, str], key: str) -> dict[str, Any]:
    """One page of ``items`` and the token of the next (opaque to clients, an offset here)."""
    size = int(q.get("page_size") or 0) or DEFAULT_PAGE_SIZE
    token = q.get("page_token") or ""
    try:
        start = int(base64.urlsafe_b64decode(token.encode()).decode()) if token else 0
    except ValueError:
        raise invalid(f"Invalid input error: Invalid page token {token!r}") from None
    page = items[start : start + size]
    out: dict[str, Any] = {"total_size": len(items)} if items else {}
    if page:
        out[key] = page
    if start + size < len(items):
        out["next_page_token"] = base64.urlsafe_b64encode(str(start + size).encode()).decode()
    return out


def _multipart_file(body: bytes, content_type: str) -> bytes:
    boundary = content_type.split("boundary=")[1].strip('"').encode()
    for part in body.split(b"--" + boundary):
        if b'name="uploadfile"' in part:
            return part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
    raise invalid("Failed to create a pipeline: Failed to read pipeline file: uploadfile is missing")


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    authorization: str | None
    cookie: str | None


@dataclass
class State:
    """Everything the server holds; tests read and arrange it directly."""

    multi_user: bool = False
    tokens: set[str] = field(default_factory=set)
    """Live bearer tokens; empty with no cookie either: no authentication (a port-forward)."""
    expired: set[str] = field(default_factory=set)
    cookie: str | None = None
    """The one valid ``name=value`` session cookie."""
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, dict] = field(default_factory=dict)
    packages: dict[str, str] = field(default_factory=dict)
    """Uploaded YAML by pipeline version id."""
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    recurring: dict[str, dict] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    run_states: list[str] = field(default_factory=lambda: ["RUNNING", "SUCCEEDED"])
    """States a run reports on successive reads; the last one repeats."""
    run_error: str | None = None
    """The error message a FAILED run carries."""
    on_get_run: Callable[[int], None] | None = None
    """Called with the read count before each run read is answered (e.g. to rotate tokens mid-wait)."""
    run_reads: int = 0
    problems: list[str] = field(default_factory=list)
    """Responses that did not match kfp_server_api's models (a stand-in bug; tests assert it is empty)."""

    def rotate(self, new_token: str) -> None:
        """Issue ``new_token`` and expire every token issued before it."""
        self.expired |= self.tokens
        self.tokens = {new_token}

    def ns(self, namespace: str | None) -> str:
        """The namespace as the server stores it: single-user mode drops it (``ReplaceNamespace``)."""
        return (namespace or "") if self.multi_user else ""


class _Handler(BaseHTTPRequestHandler):
    state: State
    lock = threading.Lock()

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, obj: Any) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(obj, bytes) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authenticate(self) -> None:
        st = self.state
        if not st.tokens and not st.expired and st.cookie is None:
            return
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Bearer "):
            if auth[7:] in st.tokens:
                return
            raise Rejected(
                401,
                16,
                "Authentication failure: Unauthenticated: Review.Status.Authenticated is "
                "false: Failed to authenticate token review",
            )
        if st.cookie and st.cookie in [c.strip() for c in (self.headers.get("Cookie") or "").split(";")]:
            return
        raise Rejected(401, 16, "Unauthenticated: Request header error: there is no user identity header.")

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ctype = self.headers.get("Content-Type", "")
        st = self.state
        with self.lock:
            body: Any = None
            try:
                if raw and ctype.startswith("application/json"):
                    body = json.loads(raw)
                elif raw and ctype.startswith("multipart/form-data"):
                    body = {"uploadfile": _multipart_file(raw, ctype).decode()}
                st.requests.append(
                    Recorded(method, url.path, q, body, self.headers.get("Authorization"), self.headers.get("Cookie"))
                )
                if not url.path.startswith(API):
                    raise Rejected(404, 5, f"Not Found: {url.path}")
                self._authenticate()
                status, out, model = self._route(method, url.path.removeprefix(API), q, body)
            except Rejected as err:
                return self._send(
                    err.status,
                    {
                        "error": err.message,
                        "code": err.code,
                        "message": err.message,
                        "details": [{"@type": "type.googleapis.com/google.rpc.Status"}],
                    },
                )
            if model and (problems := model_problems(out, model)):
                st.problems += problems
                return self._send(500, {"error": "stand-in bug", "code": 13, "message": "; ".join(problems)})
            return self._send(status, out)

    # routes ------------------------------------------------------------------------------------------
    def _route(self, method: str, p: str, q: dict[str, str], body: Any) -> tuple[int, Any, str | None]:
        st = self.state
        parts = p.strip("/").split("/")
        if method == "GET" and p == "/healthz":
            return 200, {"multi_user": st.multi_user}, "V2beta1GetHealthzResponse"
        if method == "GET" and p == "/pipelines":
            ns = st.ns(q.get("namespace"))
            items = [x for x in st.pipelines.values() if x["namespace"] == ns and _matches(q.get("filter"), x)]
            return 200, _page([_public(x) for x in items], q, "pipelines"), "V2beta1ListPipelinesResponse"
        if method == "POST" and p == "/pipelines/upload":
            return 200, self._upload_pipeline(q, body), "V2beta1Pipeline"
        if method == "POST" and p == "/pipelines/upload_version":
            return 200, self._upload_version(q, body), "V2beta1PipelineVersion"
        if method == "GET" and len(parts) == 3 and parts[0] == "pipelines" and parts[2] == "versions":
            self._pipeline(parts[1])
            items = [x for x in st.versions.values() if x["pipeline_id"] == parts[1] and _matches(q.get("filter"), x)]
            return 200, _page(items, q, "pipeline_versions"), "V2beta1ListPipelineVersionsResponse"
        if method == "GET" and p == "/experiments":
            ns = st.ns(q.get("namespace"))
            if st.multi_user and not ns:
                raise invalid(
                    "List experiments failed: Failed to authorize with API: Invalid input error: "
                    "An experiment cannot have an empty namespace in multi-user mode"
                )
            items = [x for x in st.experiments.values() if x["namespace"] == ns and _matches(q.get("filter"), x)]
            return 200, _page([_public(x) for x in items], q, "experiments"), "V2beta1ListExperimentsResponse"
        if method == "POST" and p == "/experiments":
            return 200, _public(self._create_experiment(body)), "V2beta1Experiment"
        if method == "GET" and p == "/runs":
            items = self._scoped(
                st.runs,
                q,
                "Failed to list runs: Failed to list runs due to authorization error. "
                "Check if you have permission to access namespace : Invalid input "
                "error: A resource cannot have an empty namespace in multi-user mode",
            )
            return 200, _page(items, q, "runs"), "V2beta1ListRunsResponse"
        if method == "POST" and p == "/runs":
            return 200, _public(self._create_run(body)), "V2beta1Run"
        if method == "GET" and len(parts) == 2 and parts[0] == "runs":
            return 200, _public(self._read_run(parts[1])), "V2beta1Run"
        if method == "GET" and p == "/recurringruns":
            items = self._scoped(
                st.recurring,
                q,
                "Failed to list jobs: Failed to list recurring runs due to "
                "authorization error. Check if you have permission to access "
                "namespace : Invalid input error: a recurring run cannot have an "
                "empty namespace in multi-user mode",
            )
            # the one list whose JSON name is camelCase (its proto field sets json_name)
            return 200, _page(items, q, "recurringRuns"), "V2beta1ListRecurringRunsResponse"
        if method == "POST" and p == "/recurringruns":
            return 200, _public(self._create_recurring(body)), "V2beta1RecurringRun"
        if method == "DELETE" and len(parts) == 2 and parts[0] == "recurringruns":
            if st.recurring.pop(parts[1], None) is None:
                raise Rejected(
                    404, 5, f"Failed to delete a recurring run: ResourceNotFoundError: Job {parts[1]} not found."
                )
            return 200, {}, None
        raise Rejected(404, 5, f"Not Found: {method} {API}{p}")

    def _pipeline(self, pipeline_id: str) -> dict:
        if pipeline_id not in self.state.pipelines:
            raise Rejected(404, 5, f"Failed to get pipeline: ResourceNotFoundError: Pipeline {pipeline_id} not found.")
        return self.state.pipelines[pipeline_id]

    def _experiment(self, experiment_id: str) -> dict:
        if experiment_id not in self.state.experiments:
            raise Rejected(404, 5, f"ResourceNotFoundError: Experiment {experiment_id} not found.")
        return self.state.experiments[experiment_id]

    def _upload_pipeline(self, q: dict[str, str], body: Any) -> dict:
        st = self.state
        name = q.get("display_name") or q.get("name")
        if not name or not body:
            raise invalid("Failed to create a pipeline: Invalid input error: pipeline name and file are required")
        pid = str(uuid.uuid4())
        st.pipelines[pid] = {
            "pipeline_id": pid,
            "display_name": name,
            "name": q.get("name", name),
            "description": q.get("description", ""),
            "created_at": _now(),
            "namespace": st.ns(q.get("namespace")),
        }
        self._add_version(pid, name, q.get("description", ""), body["uploadfile"])  # as the server does
        return _public(st.pipelines[pid])

    def _upload_version(self, q: dict[str, str], body: Any) -> dict:
        self._pipeline(q.get("pipelineid", ""))
        name = q.get("display_name") or q.get("name")
        if not name or not body:
            raise invalid("Failed to create a pipeline version: Invalid input error: name and file are required")
        return self._add_version(q["pipelineid"], name, q.get("description", ""), body["uploadfile"])

    def _add_version(self, pipeline_id: str, name: str, description: str, package: str) -> dict:
        vid = str(uuid.uuid4())
        self.state.versions[vid] = {
            "pipeline_version_id": vid,
            "pipeline_id": pipeline_id,
            "display_name": name,
            "name": name,
            "description": description,
            "created_at": _now(),
        }
        self.state.packages[vid] = package
        return self.state.versions[vid]

    def _create_experiment(self, body: Any) -> dict:
        st = self.state
        if problems := model_problems(body, "V2beta1Experiment"):
            raise invalid(f"proto: {'; '.join(problems)}")
        ns = st.ns(body.get("namespace"))
        if st.multi_user and not ns:
            raise invalid(
                "Failed to create a experiment: Failed to authorize the request: Invalid input error: "
                "An experiment cannot have an empty namespace in multi-user mode"
            )
        if not body.get("display_name"):
            raise invalid("Failed to create a experiment: Invalid input error: Experiment must have a non-empty name")
        eid = str(uuid.uuid4())
        st.experiments[eid] = {
            **body,
            "experiment_id": eid,
            "namespace": ns,
            "created_at": _now(),
            "storage_state": "AVAILABLE",
        }
        return st.experiments[eid]

    def _namespace_of(self, body: dict, what: str) -> str:
        """The namespace a run or recurring run gets: its experiment's (or its own), required when multi-user."""
        ns = st_ns = self.state.ns(body.get("namespace"))
        if body.get("experiment_id"):
            ns = self._experiment(body["experiment_id"])["namespace"]
            if st_ns and st_ns != ns:
                raise invalid(f"Failed to create a {what} due to invalid experimentId and namespace combination")
        return ns

    def _check_version(self, body: dict) -> None:
        ref = body.get("pipeline_version_reference") or {}
        if not (ref.get("pipeline_version_id") in self.state.versions or body.get("pipeline_spec")):
            raise invalid(f"Invalid input error: pipeline version {ref.get('pipeline_version_id')!r} not found")

    def _admit(self, body: Any, model: str, what: str, no_name: str, no_namespace: str) -> str:
        """The checks a new run or recurring run passes, in the real server's order; returns its namespace."""
        if problems := model_problems(body, model):
            raise invalid(f"proto: {'; '.join(problems)}")
        if not body.get("display_name"):
            raise invalid(no_name)
        ns = self._namespace_of(body, what)
        if self.state.multi_user and not ns:
            raise invalid(no_namespace)
        self._check_version(body)
        return ns

    def _create_run(self, body: Any) -> dict:
        ns = self._admit(
            body,
            "V2beta1Run",
            "run",
            "Failed to create a new run: Failed to create a run due to invalid name: Invalid input "
            "error: The run name is empty. Please specify a valid name",
            "Failed to create a new run: Invalid input error: A run cannot have an empty namespace in multi-user mode",
        )
        rid = str(uuid.uuid4())
        self.state.runs[rid] = {
            **body,
            "run_id": rid,
            "state": "PENDING",
            "created_at": _now(),
            "storage_state": "AVAILABLE",
            "_namespace": ns,
            "_reads": 0,
        }
        return self.state.runs[rid]

    def _read_run(self, run_id: str) -> dict:
        st = self.state
        if run_id not in st.runs:
            raise Rejected(404, 5, f"Failed to get a run: ResourceNotFoundError: Run {run_id} not found.")
        st.run_reads += 1
        if st.on_get_run is not None:
            st.on_get_run(st.run_reads)
        run = st.runs[run_id]
        run["state"] = st.run_states[min(run["_reads"], len(st.run_states) - 1)]
        run["_reads"] += 1
        if run["state"] == "FAILED" and st.run_error:
            run["error"] = {"code": 2, "message": st.run_error}
        return run

    def _scoped(self, store: dict[str, dict], q: dict[str, str], refusal: str) -> list[dict]:
        """The runs or recurring runs a list request sees: those of its experiment, else of its namespace
        (required in multi-user mode: ``refusal`` is the server's words)."""
        ns = self.state.ns(q.get("namespace"))
        if experiment_id := q.get("experiment_id"):
            ns = self._experiment(experiment_id)["namespace"]
        if self.state.multi_user and not ns:
            raise invalid(refusal)
        return [
            _public(x)
            for x in store.values()
            if (x["experiment_id"] == experiment_id if experiment_id else x["_namespace"] == ns)
        ]

    def _create_recurring(self, body: Any) -> dict:
        ns = self._admit(
            body,
            "V2beta1RecurringRun",
            "recurring run",
            "Failed to create a recurring run: Invalid input error: Recurring run name is empty. "
            "Please specify a valid name",
            "Failed to create a recurring run: Invalid input error: Recurring run cannot have an "
            "empty namespace in multi-user mode",
        )
        rid = str(uuid.uuid4())
        self.state.recurring[rid] = {
            **body,
            "recurring_run_id": rid,
            "namespace": ns,
            "created_at": _now(),
            "status": "ENABLED" if body.get("mode") == "ENABLE" else "DISABLED",
            "max_concurrency": str(body.get("max_concurrency", "")),
            "_namespace": ns,
        }
        return self.state.recurring[rid]

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A CA-flagged self-signed certificate for 127.0.0.1 and its key: serve with it, trust it as the bundle."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kfp-standin")])
    now = dt.datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "standin-cert.pem", directory / "standin-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def _public(obj: dict) -> dict:
    """The object as the API returns it: no stand-in bookkeeping, no empty namespace (protojson omits it)."""
    return {k: v for k, v in obj.items() if not k.startswith("_") and not (k == "namespace" and not v)}


class KfpStandIn:
    """``with KfpStandIn(multi_user=True, tokens={"t"}) as kfp: … kfp.url …`` — 127.0.0.1, a free port."""

    def __init__(
        self,
        *,
        multi_user: bool = False,
        tokens: set[str] | None = None,
        cookie: str | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """``tls``: (certificate, key) PEM files to serve HTTPS with (a private CA's certificate)."""
        self.state = State(multi_user=multi_user, tokens=set(tokens or ()), cookie=cookie)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> KfpStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
