"""A local HTTP stand-in for the Kubeflow Pipelines v2beta1 REST API (no KFP backend runs here).

It keeps pipelines, versions, experiments, runs and recurring runs in memory, records every request,
and answers like the real API for the calls kubellm makes. Payloads are checked against
``kfp_server_api``'s v2beta1 models by the tests, not here: the stand-in accepts what it is sent.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class State:
    pipelines: dict[str, dict] = field(default_factory=dict)
    versions: dict[str, dict] = field(default_factory=dict)
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    recurring: dict[str, dict] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    token: str | None = None
    run_states: list[str] = field(default_factory=lambda: ["RUNNING", "SUCCEEDED"])


def _matches(filter_json: str | None, obj: dict) -> bool:
    if not filter_json:
        return True
    for p in json.loads(filter_json).get("predicates", []):
        if obj.get(p["key"]) != p.get("string_value", p.get("stringValue")):
            return False
    return True


def _multipart_file(body: bytes, content_type: str) -> bytes:
    boundary = content_type.split("boundary=")[1].encode()
    for part in body.split(b"--" + boundary):
        if b'name="uploadfile"' in part:
            return part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
    raise ValueError("no uploadfile part")


class _Handler(BaseHTTPRequestHandler):
    state: State
    lock = threading.Lock()

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self, method: str) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ctype = self.headers.get("Content-Type", "")
        body: Any = None
        if raw and ctype.startswith("application/json"):
            body = json.loads(raw)
        elif raw and ctype.startswith("multipart/form-data"):
            body = {"uploadfile": _multipart_file(raw, ctype).decode()}
        st = self.state
        with self.lock:
            st.requests.append(Recorded(method, url.path, query, body))
            if st.token and self.headers.get("Authorization") != f"Bearer {st.token}":
                return self._send(401, {"error": "Unauthorized", "code": 16, "message": "bad token"})
            q = {k: v[0] for k, v in query.items()}
            p = url.path.removeprefix("/apis/v2beta1")
            if method == "GET" and p == "/pipelines":
                items = [x for x in st.pipelines.values() if _matches(q.get("filter"), x)]
                return self._send(200, {"pipelines": items, "total_size": len(items)} if items else {})
            if method == "POST" and p == "/pipelines/upload":
                pid = str(uuid.uuid4())
                st.pipelines[pid] = {"pipeline_id": pid, "display_name": q["display_name"], "name": q["name"],
                                     "description": q.get("description", "")}
                return self._send(200, st.pipelines[pid])
            if method == "POST" and p == "/pipelines/upload_version":
                vid = str(uuid.uuid4())
                st.versions[vid] = {"pipeline_version_id": vid, "pipeline_id": q["pipelineid"],
                                    "display_name": q["display_name"], "name": q["name"],
                                    "package": body["uploadfile"]}
                return self._send(200, {k: v for k, v in st.versions[vid].items() if k != "package"})
            if method == "GET" and p.startswith("/pipelines/") and p.endswith("/versions"):
                pid = p.split("/")[2]
                items = [{k: v for k, v in x.items() if k != "package"} for x in st.versions.values()
                         if x["pipeline_id"] == pid and _matches(q.get("filter"), x)]
                return self._send(200, {"pipeline_versions": items} if items else {})
            if method == "GET" and p == "/experiments":
                items = [x for x in st.experiments.values() if _matches(q.get("filter"), x)]
                return self._send(200, {"experiments": items} if items else {})
            if method == "POST" and p == "/experiments":
                eid = str(uuid.uuid4())
                st.experiments[eid] = {"experiment_id": eid, **body}
                return self._send(200, st.experiments[eid])
            if method == "POST" and p == "/runs":
                rid = str(uuid.uuid4())
                st.runs[rid] = {"run_id": rid, **body, "state": "PENDING",
                                "_states": itertools.chain(st.run_states, itertools.repeat(st.run_states[-1]))}
                return self._send(200, {k: v for k, v in st.runs[rid].items() if not k.startswith("_")})
            if method == "GET" and p.startswith("/runs/"):
                run = st.runs[p.split("/")[2]]
                run["state"] = next(run["_states"])
                return self._send(200, {k: v for k, v in run.items() if not k.startswith("_")})
            if method == "GET" and p == "/recurringruns":
                items = [x for x in st.recurring.values() if x.get("experiment_id") == q.get("experiment_id")]
                return self._send(200, {"recurringRuns": items} if items else {})
            if method == "POST" and p == "/recurringruns":
                rid = str(uuid.uuid4())
                st.recurring[rid] = {"recurring_run_id": rid, **body}
                return self._send(200, st.recurring[rid])
            if method == "DELETE" and p.startswith("/recurringruns/"):
                st.recurring.pop(p.split("/")[2], None)
                return self._send(200, {})
            return self._send(404, {"error": f"no route {method} {p}", "code": 5, "message": "not found"})

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")


class KfpStandIn:
    """``with KfpStandIn() as kfp: … kfp.url …`` — serves on 127.0.0.1 on a free port, then stops."""

    def __init__(self) -> None:
        self.state = State()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> KfpStandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
