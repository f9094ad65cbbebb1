"""Tiny random-initialised checkpoints that vLLM serves, for the serving tests and benchmarks.

Serving does not care whether weights were trained: a `save_pretrained` Llama with the shared
tokenizer beside it is exactly what a training run registers. These load in seconds, so tests
and benchmarks can bring engines up without running Ray Train first.
"""

from __future__ import annotations

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
