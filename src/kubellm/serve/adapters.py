"""Many LoRA adapters on one shared base: what is loaded, the checks before loading, the served names.

A team serving twenty fine-tunes of one base model should pay for the base once. ``kubellm serve``
loads the base model once and any number of LoRA adapters beside it, unmerged, with peft (``serve.adapters``,
``--adapter NAME=URI``, or at run time through vLLM's routes ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``); each adapter is served under its own name next to the base
(:meth:`kubellm.serve.predictor.LLMModel.view`), and the batching engine mixes rows of different
adapters in one batch (:mod:`kubellm.serve.engine`, ``per_row_adapters``).

Before an adapter is loaded, it is checked, each failure one line naming the adapter:

- it is a LoRA adapter directory (``adapter_config.json`` with ``peft_type: LORA``, safetensors weights);
- its rank (``r``, and every ``rank_pattern`` entry) is at most ``serve.max_lora_rank`` (vLLM's
  ``--max-lora-rank``), and loading it keeps the count within ``serve.max_adapters`` (``--max-loras``);
- it fits **this** base: every module its weights touch exists in the base with the input and output
  sizes of the adapter's ``lora_A``/``lora_B`` (read from the safetensors header, no weights loaded), and
  when the adapter records the content fingerprint of the base it was trained on (``kubellm-base.json``,
  written when the registry stores an adapter version, :mod:`kubellm.tracking.registry`), that
  fingerprint is the served base's. A structurally identical but different base (another fine-tune of
  the same architecture) is only caught by the fingerprint; an adapter without one is trusted on shapes.

Why peft and not our own LoRA kernels: peft's mixed-batch forward (``adapter_names=``) is what the field
uses for per-row adapters on transformers models, and it already handles rank, scaling, dropout (off at
inference), DoRA-less LoRA variants and embedding adapters. vLLM's punica kernels need a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubellm.errors import ServingError

#: Written next to an adapter's weights by the registry: the base model it was trained on.
BASE_RECORD = "kubellm-base.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class AdapterInfo:
    """One served adapter."""

    name: str
    source: str
    """As given: a directory or a ``models:/`` URI."""
    path: str
    """The local directory loaded."""
    rank: int
    base_fingerprint: str | None = None
    """Content fingerprint of the base it was trained on, when the adapter records one."""


def inspect_adapter(name: str, path: str | Path, max_rank: int) -> tuple[int, str | None]:
    """``(rank, recorded base fingerprint)`` of the LoRA adapter at ``path``, or a one-line
    :class:`ServingError` when it is not one this server may load."""
    path = Path(path)
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ServingError(f"adapter {name}: {path} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ServingError(f"adapter {name}: {config_file} is not valid JSON: {err}") from None
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ServingError(f"adapter {name}: {path} is a {config.get('peft_type')!r} adapter, not LoRA")
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise ServingError(f"adapter {name}: {path} has no {ADAPTER_WEIGHTS} (kubellm loads safetensors only)")
    ranks = [int(config.get("r") or 0), *(int(v) for v in (config.get("rank_pattern") or {}).values())]
    rank = max(ranks)
    if rank > max_rank:
        raise ServingError(
            f"adapter {name}: rank {rank} is above this server's max_lora_rank {max_rank} (serve.max_lora_rank)"
        )
    recorded = None
    record = path / BASE_RECORD
    if record.is_file():
        try:
            recorded = json.loads(record.read_text(encoding="utf-8")).get("fingerprint")
        except ValueError as err:
            raise ServingError(f"adapter {name}: {record} is not valid JSON: {err}") from None
    return rank, recorded


def check_fits_base(name: str, path: str | Path, base: Any) -> None:
    """Refuse (one line) an adapter whose weights do not fit the modules of ``base`` (a transformers
    model, maybe with LoRA layers already injected: their ``in_features``/``out_features`` are the
    wrapped layer's)."""
    from safetensors import safe_open

    modules = dict(base.named_modules())
    with safe_open(str(Path(path) / ADAPTER_WEIGHTS), framework="pt") as weights:
        for key in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
            module_name, kind = _lora_module(key)
            if module_name is None:
                continue
            module = modules.get(module_name)
            if module is None:
                raise ServingError(
                    f"adapter {name}: base mismatch: the base model has no module {module_name} "
                    "(trained on another architecture)"
                )
            shape = weights.get_slice(key).get_shape()
            expected = getattr(module, "in_features" if kind == "A" else "out_features", None)
            got = shape[1] if kind == "A" else shape[0]
            if expected is not None and int(expected) != int(got):
                side = "input" if kind == "A" else "output"
                raise ServingError(
                    f"adapter {name}: base mismatch: {module_name} has {side} size {expected} in "
                    f"the base, {got} in the adapter (trained on another base model)"
                )


def check_fingerprint(name: str, recorded: str | None, served: str | None) -> None:
    """Refuse an adapter that records a base fingerprint other than the served base's."""
    if recorded and served and recorded != served:
        raise ServingError(
            f"adapter {name}: base mismatch: trained on a base with fingerprint {recorded[:12]}, "
            f"this server's base is {served[:12]} ({BASE_RECORD})"
        )


def _lora_module(key: str) -> tuple[str | None, str]:
    """``base_model.model.X.lora_A.weight`` → ``("X", "A")``; other keys (``modules_to_save``) → None."""
    for kind in ("A", "B"):
        marker = f".lora_{kind}."
        if marker in key:
            module = key.split(marker, 1)[0]
            return module.removeprefix("base_model.model."), kind
    return None, ""


def parse_adapter_args(items: list[str]) -> dict[str, str]:
    """``["name=uri", ...]`` (``kubellm serve --adapter``) as a mapping; one line for a malformed item."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            raise ServingError(f"--adapter {item!r}: expected NAME=URI (a directory or models:/name@alias)")
        if name in out:
            raise ServingError(f"--adapter {name}: given twice")
        out[name] = uri
    return out


class _Stacks:
    """What :func:`gather_lora` shares between the layers of one model: adapter → index (0: the base) and
    the per-row index tensors already built for a batch's adapter names."""

    def __init__(self, names: list[str]) -> None:
        self.index = {BASE_ADAPTER: 0, **{name: i + 1 for i, name in enumerate(names)}}
        self.rows: dict[tuple[str, ...], Any] = {}

    def row_index(self, adapter_names: list[str], device: Any) -> Any:
        import torch

        key = tuple(adapter_names)
        rows = self.rows.get(key)
        if rows is None:
            if len(self.rows) > 1024:  # batches change as requests come and go: keep the cache bounded
                self.rows.clear()
            rows = self.rows[key] = torch.tensor([self.index[n] for n in key], device=device)
        return rows


#: peft's name for "no adapter" in a mixed batch (as in :mod:`kubellm.serve.engine`).
BASE_ADAPTER = "__base__"


def gather_lora(model: Any, names: list[str]) -> int:
    """Route peft's mixed-batch forward of every LoRA ``Linear`` of ``model`` through one gathered product.

    peft computes a mixed batch adapter by adapter: for each adapter, select its rows, two small products,
    add them back (three adapters: three times the work and the kernel launches of one). Here each layer
    stacks every adapter's ``A`` and ``B`` once (ranks padded with zeros, the scaling folded into ``B``,
    index 0 all zeros for the base), and a forward pass gathers each row's pair and runs two batched
    products, whatever the number of adapters (the punica / S-LoRA idea). Called again after every load or
    unload (between decode steps). A layer with a LoRA variant (DoRA …) keeps peft's own path. Returns
    the number of layers routed.
    """
    import types

    import torch
    from peft.tuners.lora.layer import Linear

    stacks = _Stacks(names)
    routed = 0
    for module in model.modules():
        if not isinstance(module, Linear):
            continue
        present = [n for n in names if n in module.lora_A]
        if any(n in getattr(module, "lora_variant", {}) for n in present):
            module.__dict__.pop("_mixed_batch_forward", None)
            continue
        weight = module.get_base_layer().weight
        rank = max((module.lora_A[n].weight.shape[0] for n in present), default=1)
        a = torch.zeros(len(names) + 1, rank, module.in_features, device=weight.device)
        b = torch.zeros(len(names) + 1, module.out_features, rank, device=weight.device)
        with torch.no_grad():
            for n in present:
                lora_a, lora_b = module.lora_A[n].weight, module.lora_B[n].weight
                a[stacks.index[n], : lora_a.shape[0]] = lora_a.float()
                b[stacks.index[n], :, : lora_b.shape[1]] = lora_b.float() * module.scaling[n]
        module._kubellm_lora = (stacks, a, b)
        module._mixed_batch_forward = types.MethodType(_gathered_forward, module)
        routed += 1
    return routed


def _gathered_forward(self: Any, x: Any, *args: Any, adapter_names: list[str], **kwargs: Any) -> Any:
    import torch
    from peft.tuners.lora.layer import Linear

    for key in [k for k, v in kwargs.items() if v is None]:  # peft's variant arguments, unused here
        kwargs.pop(key)
    stacks, a, b = self._kubellm_lora
    if x.dim() != 3:  # not a (rows, tokens, features) activation: peft's own path
        return Linear._mixed_batch_forward(self, x, *args, adapter_names=adapter_names, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    rows = stacks.row_index(adapter_names, a.device)
    down = torch.bmm(x.to(a.dtype), a.index_select(0, rows).transpose(1, 2))
    return result + torch.bmm(down, b.index_select(0, rows).transpose(1, 2)).to(result.dtype)
