"""The local deployment's health check: load the model as the predictor does and answer once.

Without Kubernetes, "healthy" means: the registered version loads and generates. On a cluster the
rollout's smoke test asks the InferenceService itself (:func:`kubellm.k8s.rollout.http_smoke`).
"""

from __future__ import annotations

from pathlib import Path


def smoke_generate(model_dir: str | Path, prompt: str, max_new_tokens: int) -> str:
    """Greedy answer of the model in ``model_dir`` to ``prompt`` (chat template applied when it has one)."""
    import torch

    from kubellm.train.model import load_causal_lm

    lm = load_causal_lm(model_dir, device="cpu")
    tok = lm.tokenizer
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = prompt
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tok.pad_token_id or tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
