"""One retraining job: turn a specialist's data into a registered, evaluated, gated model version.

`train_model` is what `senmon train NAME` and the scheduler call. It makes sure the shared
tokenizer exists, packs the specialist's training split with Ray Data, sizes the model by the
Chinchilla rule (or continues from a version or any local Hugging Face causal LM), trains it
with a Ray Train `TorchTrainer` whose checkpoints live under the storage root, measures
validation perplexity on every domain, registers the version with everything it was made from,
and passes it through the registry's promotion gate.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import ray
from tokenizers import Tokenizer
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from senmon.config import SenmonConfig, SizeConfig
from senmon.ingest.store import DatasetStore
from senmon.storage import filesystem, read_bytes, write_atomic

from .data import token_blocks
from .sizing import Shape, choose_size
from .tokenizer import train_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelTarget:
    """What to train: a specialist, or the generalist over every domain."""

    name: str
    domains: list[str]
    size: SizeConfig
    gpu_fraction: float = 0.0


def model_target(config: SenmonConfig, name: str) -> ModelTarget:
    if name == config.generalist.name:
        return ModelTarget(name, config.domains, config.generalist.size, config.generalist.serving.num_gpus)
    spec = config.specialist(name)
    return ModelTarget(spec.name, spec.domains, spec.size, spec.serving.num_gpus)


# --------------------------------------------------------------------------- tokenizer


def tokenizer_json(config: SenmonConfig, retrain: bool = False) -> str:
    """The shared tokenizer (its tokenizer.json), trained on every domain's training split once."""
    fs, base = filesystem(config.storage_root)
    path = f"{base}/tokenizer/tokenizer.json"
    existing = None if retrain else read_bytes(fs, path)
    if existing is not None:
        return existing.decode("utf-8")
    store = DatasetStore(config.storage_root)
    texts = [t for domain in config.domains for t in store.texts(domain, "train")]
    if not texts:
        raise FileNotFoundError(f"no training documents in {config.storage_root}; load data first (senmon data)")
    started = time.monotonic()
    tokenizer = train_tokenizer(texts, config.training.vocab_size)
    serialized = tokenizer.backend_tokenizer.to_str()
    write_atomic(fs, path, serialized.encode("utf-8"))
    log.info("tokenizer: %d tokens from %d documents in %.1f s", len(tokenizer), len(texts), time.monotonic() - started)
    return serialized


# --------------------------------------------------------------------------- evaluation


@ray.remote(num_cpus=1)
def evaluate_checkpoint(checkpoint_path: str, storage_root: str, domains: list[str], split: str,
                        seq_len: int) -> dict[str, dict]:
    """Perplexity of a checkpoint on each domain's `split`, as a Ray task next to the data."""
    from .evaluate import evaluate_directory

    store = DatasetStore(storage_root)
    texts = {d: store.texts(d, split) for d in domains}
    with ray.train.Checkpoint(checkpoint_path).as_directory() as directory:
        results = evaluate_directory(directory, texts, seq_len)
    return {d: {"perplexity": r.perplexity, "tokens": r.tokens, "documents": r.documents} for d, r in results.items()}


def pooled_perplexity(by_domain: dict[str, dict], domains: list[str]) -> float:
    """Token-weighted perplexity over `domains` (the specialist's own validation data)."""
    nll = sum(math.log(by_domain[d]["perplexity"]) * by_domain[d]["tokens"] for d in domains if d in by_domain)
    tokens = sum(by_domain[d]["tokens"] for d in domains if d in by_domain)
    return math.exp(nll / tokens)


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    name: str
    run_id: str
    checkpoint_path: str
    sizing: dict
    data: dict
    metrics: dict
    timings: dict = field(default_factory=dict)


def _checkpoint_tokenizer(init_checkpoint: str) -> str | None:
    """A model brought from elsewhere keeps its own tokenizer (its vocabulary matches its weights)."""
    with ray.train.Checkpoint(init_checkpoint).as_directory() as directory:
        path = Path(directory) / "tokenizer.json"
        return path.read_text(encoding="utf-8") if path.exists() else None


def _init_shape(init_checkpoint: str) -> dict:
    with ray.train.Checkpoint(init_checkpoint).as_directory() as directory:
        config = json.loads((Path(directory) / "config.json").read_text())
    return {key: config.get(key) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "intermediate_size", "model_type")}


def train_model(config: SenmonConfig, name: str, init_checkpoint: str | None = None,
                size_override: SizeConfig | None = None, run_id: str | None = None) -> TrainResult:
    """Train `name` (a specialist or the generalist); needs Ray initialised and data in the store."""
    target = model_target(config, name)
    size = size_override or target.size
    training = config.training
    run_id = run_id or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    timings: dict[str, float] = {}
    store = DatasetStore(config.storage_root)

    t0 = time.monotonic()
    tok_json = _checkpoint_tokenizer(init_checkpoint) if init_checkpoint else None
    tokenizer_source = "from the initial checkpoint" if tok_json else "shared"
    tok_json = tok_json or tokenizer_json(config)
    timings["tokenizer_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    blocks = token_blocks(store, target.domains, "train", tok_json, training.seq_len)
    n_blocks = blocks.count()
    unique_tokens = n_blocks * training.seq_len
    timings["data_s"] = time.monotonic() - t0
    global_batch = training.batch_size * training.num_workers
    if n_blocks < global_batch:
        raise ValueError(f"{name}: only {n_blocks} blocks of {training.seq_len} tokens; too little data to train")
    steps_per_epoch = n_blocks // global_batch  # the loop drops the last partial batch of each epoch
    tokens_seen = steps_per_epoch * global_batch * training.seq_len * training.epochs  # what D means below

    vocab_size = Tokenizer.from_str(tok_json).get_vocab_size(with_added_tokens=True)
    if init_checkpoint:
        shape = _init_shape(init_checkpoint)
        sizing = {"rule": f"continued from {init_checkpoint}", "shape": shape, "training_tokens": tokens_seen}
    else:
        chosen = choose_size(tokens_seen, vocab_size, size.tokens_per_parameter, size.min_params, size.max_params,
                             size.override)
        shape, sizing = chosen.shape, chosen.as_record()

    loop_config = {
        "name": name, "seed": training.seed, "seq_len": training.seq_len, "batch_size": training.batch_size,
        "epochs": training.epochs, "learning_rate": training.learning_rate,
        "total_steps": steps_per_epoch * training.epochs, "tokenizer_json": tok_json,
        "shape": shape.__dict__ if isinstance(shape, Shape) else None, "init_checkpoint": init_checkpoint,
    }
    fs, base = filesystem(config.storage_root)
    trainer = TorchTrainer(
        _loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=training.num_workers, use_gpu=training.use_gpu,
                                     resources_per_worker={"CPU": training.cpus_per_worker,
                                                           **({"GPU": 1} if training.use_gpu else {})}),
        datasets={"train": blocks},
        run_config=RunConfig(name=run_id, storage_path=f"{base}/checkpoints", storage_filesystem=fs),
    )
    t0 = time.monotonic()
    result = trainer.fit()
    timings["train_s"] = time.monotonic() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint ({result.error})")
    checkpoint_path = _checkpoint_uri(config.storage_root, result.checkpoint.path)

    t0 = time.monotonic()
    by_domain = ray.get(evaluate_checkpoint.remote(checkpoint_path, config.storage_root, config.domains, "validation",
                                                   training.seq_len))
    timings["eval_s"] = time.monotonic() - t0

    final = result.metrics or {}
    metrics = {
        "val_ppl": pooled_perplexity(by_domain, target.domains),
        "val_ppl_by_domain": {d: r["perplexity"] for d, r in by_domain.items()},
        "val_tokens_by_domain": {d: r["tokens"] for d, r in by_domain.items()},
        "train_loss": final.get("loss"),
        "train_tokens_per_s": final.get("tokens_per_s"),
        "train_s": final.get("train_s"),
        "data_wait_s": final.get("data_wait_s"),
        "loss_curve": final.get("loss_curve"),
    }
    data = {
        "domains": target.domains,
        "shards": {d: [p.rsplit("/", 1)[-1] for p in store.shard_paths(d, "train")] for d in target.domains},
        "unique_tokens": unique_tokens,
        "tokens_seen": final.get("tokens_seen", tokens_seen),
        "epochs": training.epochs,
        "seq_len": training.seq_len,
        "tokenizer": tokenizer_source,
        "init_checkpoint": init_checkpoint,
    }
    return TrainResult(name, run_id, checkpoint_path, sizing, data, metrics, timings)


def _loop(cfg: dict) -> None:  # a module-level function Ray can pickle by reference
    from .loop import train_loop_per_worker

    train_loop_per_worker(cfg)


def _checkpoint_uri(storage_root: str, path: str) -> str:
    """Ray returns a path inside the storage filesystem; give it back in the root's own form."""
    if "://" in storage_root:
        return f"{storage_root.split('://', 1)[0]}://{path}"
    return path


# --------------------------------------------------------------------------- registry


def resolve_init(registry, name: str, init: str | None) -> str | None:
    """`None`/'scratch' -> a fresh model; 'current' -> the serving version; else a local HF directory."""
    if init in (None, "scratch"):
        return None
    if init == "current":
        current = ray.get(registry.current.remote(name))
        if current is None:
            raise ValueError(f"{name} has no serving version to continue from; train it from scratch first")
        return current["path"]
    path = Path(init).expanduser().resolve()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{init} is not a Hugging Face model directory (no config.json)")
    return str(path)


def train_and_register(config: SenmonConfig, name: str, registry, init: str | None = None,
                       run_id: str | None = None) -> dict:
    """Train `name`, register the version with its metadata, and pass it through the promotion gate.

    Returns the version's registry record: status 'serving' when the gate let it through, else
    'rejected' with the reason (the serving version is then unchanged).
    """
    result = train_model(config, name, init_checkpoint=resolve_init(registry, name, init), run_id=run_id)
    record = ray.get(registry.register.remote(name, result.run_id, result.checkpoint_path, result.metrics,
                                              result.sizing, {**result.data, "timings": result.timings}))
    return ray.get(registry.promote.remote(name, record["version"], config.training.promotion_margin))
