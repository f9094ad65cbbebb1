"""Tiny random-initialised checkpoints that vLLM serves, for the serving tests and benchmarks, and their other
shared helpers (a small corpus, HTTP clients sending requests back to back).

Serving does not care whether weights were trained: a `save_pretrained` Llama with the shared
tokenizer beside it is exactly what a training run registers. These load in seconds, so tests
and benchmarks can bring engines up without running Ray Train first.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"  # the shipped corpus, beside this package


def tiny_checkpoint(directory: str | Path, tokenizer_json: str, *, hidden_size: int = 64, layers: int = 2,
                    max_len: int = 128, seed: int = 0, init_std: float = 0.2) -> str:
    """Write a random Llama (head size 32) plus the tokenizer and its reference log-probabilities
    (train/reference.py) to `directory`; return its path. `init_std` is larger than a training
    init so that two seeds answer the probe clearly differently (what the swap tests need)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    from senmon.train.reference import compute_reference, write_reference
    from senmon.train.sizing import shape_for_hidden, llama_config
    from senmon.train.tokenizer import wrap

    tokenizer = wrap(Tokenizer.from_str(tokenizer_json))
    torch.manual_seed(seed)
    config = llama_config(shape_for_hidden(hidden_size, layers), len(tokenizer), max_len,
                          tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.endswith("norm.weight"):
                parameter.normal_(0.0, init_std)
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    write_reference(directory, compute_reference(model, tokenizer))
    return str(directory)


def small_corpus(target: str | Path, per_split: dict[str, int], corpus_dir: str | Path = CORPUS) -> Path:
    """The first documents of each domain and split of the shipped corpus, written under `target`: enough to
    route, quick to train on (the serving and CLI tests, the soak benchmark)."""
    target = Path(target)
    for split, count in per_split.items():
        (target / split).mkdir(parents=True, exist_ok=True)
        for source in (Path(corpus_dir) / split).glob("*.jsonl"):
            lines = source.read_text(encoding="utf-8").splitlines()[:count]
            (target / split / source.name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def tiny_serving_data(data: dict, root: str | Path, max_len: int, api_key: str, admin_key: str,
                      test_docs: int = 5) -> dict:
    """A copy of config data `data` for serving tiny checkpoints under `root`: its storage root and a small corpus
    there, a 1,024-token vocabulary, every model served at `max_len`, and HTTP on a free loopback port with these
    keys only (none from the environment)."""
    import copy

    from senmon.ingest.broker import free_port

    root = Path(root)
    data = copy.deepcopy(data)
    data.update(storage_root=str(root / "storage"),
                corpus_dir=str(small_corpus(root / "corpus", {"train": 120, "validation": 5, "test": test_docs})))
    data["training"] = dict(data["training"], vocab_size=1024, seq_len=max_len)
    for spec in data["specialists"]:
        spec["serving"] = {"max_model_len": max_len}
    data["generalist"]["serving"] = {"max_model_len": max_len}
    data["http"] = {"host": "127.0.0.1", "port": free_port(), "api_keys": [api_key], "admin_keys": [admin_key],
                    "api_keys_env": None, "admin_keys_env": None}
    return data


class Traffic:
    """Clients sending requests back to back over HTTP, each its own (label, path, body), until `finish` (or the
    `with` block's end). Records for each request the label, when it was sent and answered, and its status
    ("stream-error" for a 200 stream that ended in an error event, an exception's name when no response came);
    `errors` holds each failure's label, status, Retry-After and body."""

    def __init__(self, url: str, clients: list[tuple[str, str, dict]], api_key: str, pause_s: float = 0.0,
                 join_s: float = 300.0):
        self.url, self.api_key, self.results, self.errors, self.stop = url, api_key, [], [], threading.Event()
        self.pause_s = pause_s  # between one answer and a client's next request (0: back to back)
        self.join_s = join_s  # the longest `finish` waits for each client's request in flight
        self.threads = [threading.Thread(target=self.run, args=spec, daemon=True) for spec in clients]

    def run(self, label: str, path: str, body: dict) -> None:
        import httpx

        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=300) as http:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    if body.get("stream"):
                        with http.stream("POST", path, json=body) as response:
                            text = response.read().decode()
                        status = response.status_code
                        if status == 200 and ('data: {"error"' in text or "data: [DONE]" not in text):
                            status = "stream-error"
                    else:
                        response = http.post(path, json=body)
                        status = response.status_code
                    if status != 200:
                        self.errors.append((label, status, response.headers.get("retry-after"),
                                            response.text[:300] if not body.get("stream") else text[-300:]))
                except httpx.HTTPError as error:
                    status = type(error).__name__
                self.results.append((label, sent, time.monotonic(), status))
                if self.pause_s:
                    self.stop.wait(self.pause_s)

    def start(self) -> "Traffic":
        for thread in self.threads:
            thread.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(self.join_s)

    def __enter__(self) -> "Traffic":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.finish()

    def wait_for(self, label: str | None, since: float, timeout_s: float) -> float | None:
        """When the first request (to `label`; None: any) sent after `since` was answered with a 200 (None: not
        within timeout_s)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = [d for lab, sent, d, status in list(self.results)
                    if label in (None, lab) and sent >= since and status == 200]
            if done:
                return min(done)
            time.sleep(0.1)
        return None
