"""A stand-in for Kubeflow Trainer's progress endpoint (``KUBEFLOW_TRAINER_SERVER_URL``), on 127.0.0.1.

As strict as the controller's: HTTPS with a certificate from a CA made here (a client that does not
trust that CA cannot connect), a bearer token that must be the current one (the test rotates it: the
old one is refused with 401), the body's ``trainerStatus`` validated against the TrainJob CRD's own
schema (vendored in kubellm; ``lastUpdatedTime`` required, as its CEL rule says) and the arrival times
kept, so a test can check the 5 s throttle. ``mode`` makes it misbehave: ``"500"`` answers every request
with an error, ``"hang"`` never answers (until the stand-in stops).
"""

from __future__ import annotations

import datetime
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from kfp_standin import self_signed_certificate  # noqa: E402  (one certificate maker for every stand-in)


def trainer_status_schema() -> dict[str, Any]:
    from kubellm.k8s.schema import crd_schema, vendored_crd

    crd = vendored_crd("trainer.kubeflow.org", "TrainJob")
    return crd_schema(crd, "v1alpha1")["properties"]["status"]["properties"]["trainerStatus"]


class TrainerStandIn:
    def __init__(self, directory: Path, token: str, mode: str = "ok") -> None:
        import jsonschema

        self.directory = directory
        self.ca, key = self_signed_certificate(directory)
        self.token_file = directory / "token"
        self.token_file.write_text(token + "\n")
        self.token = token
        self.mode = mode
        self.accepted: list[tuple[float, dict[str, Any]]] = []  # (arrival, trainerStatus)
        self.refused: list[tuple[int, str]] = []  # (status, why)
        self._stop = threading.Event()
        validator = jsonschema.Draft202012Validator(
            trainer_status_schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                arrived = time.monotonic()
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if standin.mode == "hang":
                    standin._stop.wait(120)
                    return
                if standin.mode == "500":
                    return self._answer(500, "stand-in told to fail")
                if self.headers.get("Authorization") != f"Bearer {standin.token}":
                    return self._answer(401, f"token {self.headers.get('Authorization')!r}")
                try:
                    status = json.loads(body)["trainerStatus"]
                except (ValueError, KeyError, TypeError) as err:
                    return self._answer(400, f"body: {err}")
                problems = [e.message for e in validator.iter_errors(status)]
                if "lastUpdatedTime" not in status:
                    problems.append("lastUpdatedTime is required when trainerStatus is present")
                else:  # date-time as the API server parses it (jsonschema checks formats only with extras)
                    try:
                        datetime.datetime.fromisoformat(status["lastUpdatedTime"])
                    except (TypeError, ValueError):
                        problems.append(f"lastUpdatedTime {status['lastUpdatedTime']!r} is not RFC 3339")
                if problems:
                    return self._answer(400, "; ".join(problems))
                standin.accepted.append((arrived, status))
                self._answer(200, "")

            def _answer(self, code: int, why: str) -> None:
                if code != 200:
                    standin.refused.append((code, why))
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.ca, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def rotate(self, token: str) -> None:
        """The kubelet's rotation: a new token in the file, the old one refused from now on."""
        tmp = self.token_file.with_name(".token.tmp")
        tmp.write_text(token + "\n")
        tmp.replace(self.token_file)
        self.token = token

    def env(self, ca: Path | None = None) -> dict[str, str]:
        return {
            "KUBEFLOW_TRAINER_SERVER_URL": self.url,
            "KUBEFLOW_TRAINER_SERVER_CA_CERT": str(ca or self.ca),
            "KUBEFLOW_TRAINER_SERVER_TOKEN": str(self.token_file),
        }

    def __enter__(self) -> TrainerStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()
