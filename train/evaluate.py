"""Held-out perplexity of a saved model on documents, per domain.

Perplexity = exp(mean negative log-likelihood per predicted token), over the documents joined
with end-of-text tokens and cut into windows of the model's training length. Every model in
senmon shares one tokenizer, so perplexities of different models on the same text compare
directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from .tokenizer import encode_documents, load_tokenizer


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    tokens: int
    documents: int


def load_model(directory: str | Path, device: str = "cpu") -> LlamaForCausalLM:
    model = LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    return model.to(device).eval()


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], seq_len: int, batch_size: int = 16, device: str = "cpu") -> Perplexity:
    """Perplexity of `model` on `texts` (see module docstring)."""
    if not texts:
        raise ValueError("no documents to evaluate")
    stream = torch.tensor(encode_documents(tokenizer, texts), dtype=torch.long)
    windows = list(torch.split(stream, seq_len))
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(windows), batch_size):
        group = [w for w in windows[start:start + batch_size] if len(w) > 1]
        if not group:
            continue
        lengths = torch.tensor([len(w) for w in group])
        batch = torch.nn.utils.rnn.pad_sequence(group, batch_first=True).to(device)
        mask = (torch.arange(batch.shape[1])[None, :] < lengths[:, None]).to(device)
        logits = model(input_ids=batch, attention_mask=mask.long()).logits[:, :-1]
        targets = batch[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                                reduction="none").view(targets.shape)
        valid = mask[:, 1:]
        total_nll += float(nll[valid].sum())
        total_tokens += int(valid.sum())
    return Perplexity(math.exp(total_nll / total_tokens), total_tokens, len(texts))


def evaluate_directory(model_dir: str | Path, texts_by_domain: dict[str, list[str]], seq_len: int,
                       device: str = "cpu") -> dict[str, Perplexity]:
    """Perplexity of the model saved in `model_dir` on each domain's texts."""
    model = load_model(model_dir, device)
    tokenizer = load_tokenizer(model_dir)
    return {domain: perplexity(model, tokenizer, texts, seq_len, device=device)
            for domain, texts in texts_by_domain.items() if texts}


# --------------------------------------------------------------------------- senmon eval FILE.jsonl (read by eval_input.py)


def compare_on_file(by_domain: dict[str, list[str]], specialist_for: dict[str, tuple[str, int, str]],
                    generalist: tuple[str, int, str] | None, seq_len: int) -> list[dict]:
    """Per domain: perplexity of its specialist and of the generalist (each `(name, version, path)`)."""
    import ray.train

    loaded: dict[str, tuple] = {}

    def score(model: tuple[str, int, str] | None, texts: list[str]) -> float | None:
        if model is None:
            return None
        path = model[2]
        if path not in loaded:
            with ray.train.Checkpoint(path).as_directory() as directory:
                loaded[path] = (load_model(directory), load_tokenizer(directory))
        net, tokenizer = loaded[path]
        return perplexity(net, tokenizer, texts, seq_len).perplexity

    rows = []
    for domain, texts in sorted(by_domain.items()):
        specialist = specialist_for.get(domain)
        special, general = score(specialist, texts), score(generalist, texts)
        rows.append({
            "domain": domain,
            "documents": len(texts),
            "specialist": specialist[0] if specialist else None,
            "specialist_version": specialist[1] if specialist else None,
            "specialist_ppl": special,
            "generalist": generalist[0] if generalist else None,
            "generalist_version": generalist[1] if generalist else None,
            "generalist_ppl": general,
            "specialist_vs_generalist": (special / general) if special and general else None,
        })
    return rows
