"""Secrets never travel inside a config: URI fields refuse credentials, other secret-like values are
refused at validation, and :func:`redact` masks whatever secret-like text reaches a log anyway.

A config is not a secret store. It is compiled into the pipeline YAML (which the Kubeflow UI shows to
everyone with access to the namespace), passed as ``--set`` arguments to training pods (``kubectl get
pytorchjob -o yaml``) and logged to MLflow as params and ``config.json`` (readable by every MLflow
user). Credentials belong in Kubernetes Secrets (``platform.*.secret_env``) or in the environment
variables the tools read themselves (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``, ``AWS_*``,
``HF_TOKEN``).
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterator
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator

WHERE_CREDENTIALS_GO = (
    "put credentials in a Kubernetes Secret (platform secret_env) or the tool's own "
    "environment variables (MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_ACCESS_KEY_ID, HF_TOKEN)"
)
MASK = "***"

# Values that are secrets whatever the field (the formats the tokens' issuers document), with what
# replaces them in a log.
_SECRET_VALUES = (
    ("credentials in a URL", re.compile(r"(?<=://)[^/\s@'\"]+@"), MASK + "@"),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[^-]*(-----END [A-Z ]*PRIVATE KEY-----)?"), MASK),
    ("an AWS access key", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), MASK),
    ("a GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"), MASK),
    ("a Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"), MASK),
    ("an API key", re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"), MASK),
    ("a Slack token", re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), MASK),
    # Header and payload of a JSON Web Token are base64url JSON objects: they start with '{"', "eyJ".
    ("a JSON Web Token", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), MASK),
    (
        "credentials in a URI query",
        re.compile(
            r"(?i)(?<=[?&;])((?:[a-z_]*password|passwd|pwd|[a-z_]*token|auth|api[_-]?key|apikey|key|[a-z_]*secret"
            r"|sig|signature|credential|x-amz-[a-z-]+)=)[^&#\s'\"]+"
        ),
        r"\1" + MASK,
    ),
    (
        "an Authorization header",
        re.compile(r"(?i)\b((?:proxy-)?authorization\s*[:=]\s*(?:(?:bearer|basic|token|digest)\s+)?)[^\s'\",;]+"),
        r"\1" + MASK,
    ),
    # Not prose ("the bearer certificates"): a token has a digit or punctuation somewhere.
    ("a bearer token", re.compile(r"\b([Bb]earer\s+)(?=\S*[0-9._~+/=-])[A-Za-z0-9._~+/=-]{12,}"), r"\1" + MASK),
)
# Keys whose value is a secret (free-form maps such as pod env or annotations). Whole trailing words
# only: ``max_prompt_tokens`` and ``secret_env`` (a Secret's *name*) are no secrets.
_SECRET_KEY = re.compile(
    r"(?i)(^|[_.-])(password|passwd|passphrase|token|api[_-]?key|secret[_-]?key"
    r"|access[_-]?key|private[_-]?key|credentials?)$"
)


# Random-looking keys under any key name. Tokens of the base64 alphabets are measured rather than matched:
# an AWS secret access key has no prefix. What counts (``_random_looking``): upper and lower case mixed
# with digits, hex excluded (hashes, fingerprints, run ids and commits are hex), a Shannon entropy of at
# least 4 bits a character, and a character class that changes at half the characters or more (words,
# camel case and paths change far less often). Measured on 263,000 strings (the string constants of
# kubellm, its tests, transformers, mlflow, kfp, datasets and huggingface_hub, every config and compiled
# pipeline): one flagged, a Hub token in huggingface_hub's tests; of 10,000 random 40-character AWS-style
# keys, 99.7 % flagged.
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{40}(?![A-Za-z0-9+/=])")
_TOKEN_RUN = re.compile(r"[A-Za-z0-9+/=_-]{32,}")
_TOKEN_PIECE = re.compile(r"[A-Za-z0-9+=]{20,}")  # between the /, - and _ of paths, Hub ids and names


def _class(char: str) -> int:
    return 0 if char.isupper() else 1 if char.islower() else 2 if char.isdigit() else 3


def _random_looking(token: str, changes: float) -> bool:
    if not (re.search("[A-Z]", token) and re.search("[a-z]", token) and sum(c.isdigit() for c in token) >= 2):
        return False
    counts = collections.Counter(token).values()
    entropy = -sum(n / len(token) * math.log2(n / len(token)) for n in counts)
    changed = sum(_class(a) != _class(b) for a, b in zip(token, token[1:], strict=False)) / (len(token) - 1)
    return entropy >= 4.0 and changed >= changes


def _random_tokens(text: str) -> Iterator[str]:
    """Substrings of ``text`` that look like generated keys (see above)."""
    yield from (t for t in _AWS_SECRET.findall(text) if _random_looking(t, 0.4))
    for run in _TOKEN_RUN.findall(text):
        yield from (p for p in _TOKEN_PIECE.findall(run) if _random_looking(p, 0.5))


def secret_in(text: str) -> str | None:
    """What secret-like thing ``text`` holds ("credentials in a URL", "a random-looking key" …), or
    ``None``. Never says the secret itself."""
    kind = next((kind for kind, pattern, _ in _SECRET_VALUES if pattern.search(text)), None)
    if kind is None and next(_random_tokens(text), None) is not None:
        kind = "a random-looking key (an access key or token)"
    return kind


def mask_secrets(text: str) -> str:
    """``text`` with every secret-like part masked (:data:`MASK`)."""
    for _, pattern, replacement in _SECRET_VALUES:
        text = pattern.sub(replacement, text)
    for token in set(_random_tokens(text)):
        text = text.replace(token, MASK)
    return text


def _no_userinfo(value: str) -> str:
    parts = urlsplit(value)
    if parts.netloc and "@" in parts.netloc:  # never echo the value: it holds the secret
        raise ValueError(
            f"credentials in the URI ({parts.scheme}://USER[:PASSWORD]@…) are refused: the config "
            f"is logged and compiled; {WHERE_CREDENTIALS_GO}"
        )
    return value


Uri = Annotated[str, AfterValidator(_no_userinfo)]
"""A URI (or a path) that carries no user-info: ``https://user:pw@host`` is refused at validation."""


def _leaves(doc: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(dotted path, last key, value) of every scalar in nested dicts and lists."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(doc, list | tuple):
        for i, value in enumerate(doc):
            yield from _leaves(value, f"{path}.{i}" if path else str(i))
    else:
        yield path, path.rsplit(".", 1)[-1], doc


def _secret_kind(key: str, value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    if _SECRET_KEY.search(key):
        return f"a value under the secret-looking key {key!r}"
    return secret_in(value)


def find_secrets(doc: Any) -> list[str]:
    """``"<dotted.path>: <what it looks like>"`` for every secret-like value in a config document."""
    return [
        f"{path}: holds {kind}" for path, key, value in _leaves(doc) if (kind := _secret_kind(key, value)) is not None
    ]


def redact(doc: Any, key: str = "") -> Any:
    """A copy of ``doc`` (nested dicts, lists, scalars) with secret-like values masked: a secret-named
    key's whole value, a URL's user-info and known token formats inside strings. What goes to MLflow
    params and ``config.json`` passes through here."""
    if isinstance(doc, dict):
        return {k: redact(v, str(k)) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [redact(v, key) for v in doc]
    if not isinstance(doc, str) or not doc:
        return doc
    if _SECRET_KEY.search(key):
        return MASK
    return mask_secrets(doc)
