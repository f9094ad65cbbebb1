"""Reference log-probabilities: what a checkpoint must answer on a fixed probe prompt.

The training job writes `senmon_reference.json` into every checkpoint it saves: the probe
prompt's token ids and, for each token after the first, its log-probability under the model
(computed by transformers, float32, from the same weights), plus the sha256 of the weights files. An engine that loads the checkpoint,
fresh or in place (serve/engine.py), computes the same numbers through vLLM and compares; the
weights count as loaded only when every value is within `serve.reference_tolerance`. The swap
driver also checks the files' digests before it touches a replica, so a checkpoint changed on
disk after training is refused without ever being served.

    reference = compute_reference(model, tokenizer)      # in the training loop, after saving
    write_reference(directory, reference)
    reference = load_reference(path)                     # file, or computed once for old versions
    error = compare(reference, logprobs, tolerance)      # None when they match
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FILE = "senmon_reference.json"
# Every domain's script and shape in one line, so no specialist's probe is all unknown tokens.
PROBE_TEXT = ("Section 2. The licensee shall not be liable for damages. def parse(line): return line.split(',') "
              "serendipity (n.) a happy accident. It was a dark and stormy night; 吾輩は猫である。名前はまだ無い。")
MAX_TOKENS = 48


def compute_reference(model, tokenizer, max_tokens: int = MAX_TOKENS) -> dict:
    """The probe's token ids and per-token log-probabilities under `model` (a causal LM)."""
    import torch

    ids = tokenizer(PROBE_TEXT)["input_ids"][:max_tokens]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).logits[0].float()
    if was_training:
        model.train()
    logprobs = torch.log_softmax(logits, dim=-1)
    values = [float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    return {"prompt_token_ids": list(map(int, ids)), "logprobs": values, "text": PROBE_TEXT}


def weight_digests(directory: str | Path) -> dict[str, str]:
    """sha256 of each weights file in a checkpoint directory."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).glob("*.safetensors"))}


def write_reference(directory: str | Path, reference: dict) -> Path:
    """Store `reference` in the checkpoint, with the digests of the weights files it was computed from."""
    path = Path(directory) / FILE
    path.write_text(json.dumps({**reference, "files": weight_digests(directory)}), encoding="utf-8")
    return path


def reference_from_checkpoint(path: str | Path) -> dict:
    """Recompute the reference from the checkpoint's own files (transformers, CPU, float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype="float32")
    return compute_reference(model, AutoTokenizer.from_pretrained(str(path)))


def load_reference(path: str | Path) -> dict:
    """The checkpoint's stored reference; versions trained before references existed get one computed
    (and stored beside them when the directory is writable)."""
    file = Path(path) / FILE
    if file.exists():
        return json.loads(file.read_text(encoding="utf-8"))
    reference = reference_from_checkpoint(path)
    try:
        write_reference(path, reference)
    except OSError:
        pass
    return reference


def compare(reference: dict, logprobs: list[float], tolerance: float) -> str | None:
    """None when `logprobs` match the reference within `tolerance`, else why not (one line)."""
    expected = reference["logprobs"]
    if len(logprobs) != len(expected):
        return f"{len(logprobs)} log-probabilities for a {len(expected) + 1}-token probe"
    if any(value != value for value in logprobs):  # NaN never matches
        return "the engine gave no number (NaN) for a probe token"
    worst = max((abs(a - b), i) for i, (a, b) in enumerate(zip(logprobs, expected))) if expected else (0.0, 0)
    if worst[0] > tolerance:
        return (f"probe log-probabilities differ from the reference by up to {worst[0]:.4f} "
                f"(token {worst[1] + 1}; tolerance {tolerance})")
    return None


def check_checkpoint(path: str | Path, reference: dict, tolerance: float) -> str | None:
    """Whether the files at `path` are still the ones the reference was computed from (None) or why
    not: their digests when the reference has them (milliseconds), else the log-probabilities
    recomputed with transformers."""
    if reference.get("files"):
        try:
            digests = weight_digests(path)
        except OSError as error:
            return f"checkpoint could not be read: {error}"
        changed = sorted(n for n in set(digests) | set(reference["files"]) if digests.get(n) != reference["files"].get(n))
        return f"{', '.join(changed)} changed since training (sha256 differs from the reference's)" if changed else None
    try:
        fresh = reference_from_checkpoint(path)
    except Exception as error:  # unreadable or truncated files
        return f"checkpoint could not be loaded: {type(error).__name__}: {error}"
    if fresh["prompt_token_ids"] != reference["prompt_token_ids"]:
        return "the checkpoint's tokenizer does not give the reference's probe tokens"
    return compare(reference, fresh["logprobs"], tolerance)
