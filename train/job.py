"""One retraining job: turn a specialist's data into a registered, evaluated, gated model version.

`train_model` is what `senmon train NAME` and the scheduler call. It makes sure the shared
tokenizer exists, packs the model's training split with Ray Data, decides where it starts (a
specialist branches from the seed by default, see train/branch.py; or from scratch, sized by the
Chinchilla rule; or from a version or any local Hugging Face causal LM), trains it
with a Ray Train `TorchTrainer` whose checkpoints live under the storage root, measures
validation perplexity on every domain, registers the version with everything it was made from,
and passes it through the registry's promotion gate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import ray
from tokenizers import Tokenizer
from ray.train import DataConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from senmon.config import SenmonConfig, SizeConfig
from senmon.ingest.store import DatasetStore
from senmon.storage import filesystem, new_run_id, read_bytes, write_atomic

from .branch import SEED_FLOOR, branch_schedule, plan_budget
from .data import token_blocks
from .loop import Schedule
from .merge import is_merge, merge_and_register, seed_record
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


@dataclass(frozen=True)
class Start:
    """Where a run starts: 'scratch' (a fresh model sized by the rule), 'seed' (branch from the
    generalist's serving version), 'current' (continue the serving version) or 'directory'."""

    kind: str
    checkpoint: str | None = None
    record: dict | None = None  # the registry record of the seed or of the version continued

    @property
    def plan(self) -> dict | None:
        """The budget split recorded with the seed (or inherited by the version continued)."""
        return (self.record or {}).get("data", {}).get("plan")


def _continued_sizing(start: Start, tokens: int, vocab_size: int, rule: str) -> dict:
    """The record of a run that keeps its initial checkpoint's shape: the shape, its parameters and FLOPs."""
    shape = _init_shape(start.checkpoint)
    record = {"rule": rule, "shape": shape, "training_tokens": tokens}
    if shape.get("model_type") == "llama":
        layers = Shape(shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"],
                       shape["intermediate_size"])
        total = layers.non_embedding_params() + layers.embedding_params(vocab_size)
        record.update(non_embedding_params=layers.non_embedding_params(),
                      embedding_params=layers.embedding_params(vocab_size), total_params=total,
                      train_flops=6.0 * total * tokens)
    if start.record is not None:
        record["init"] = {"model": start.record["specialist"], "version": start.record["version"],
                          "train_flops": start.record.get("sizing", {}).get("train_flops")}
    return record


def train_model(config: SenmonConfig, name: str, start: Start | None = None,
                size_override: SizeConfig | None = None, run_id: str | None = None,
                progress_board=None) -> TrainResult:
    """Train `name` (a specialist or the generalist); needs Ray initialised and data in the store.
    `progress_board`: a driver's `senmon.progress.Relay` board, where rank 0 shows its progress bar.

    How many steps, at what learning rate, and in what shape (see train/branch.py):
    - the generalist, when specialists branch from it, is the seed: `seed_fraction` of the budget;
    - a specialist branching from the seed (or continuing a branched version): one branch's steps
      from the seed's plan, at the branch's re-warmed, lower learning rate;
    - anything else (a specialist from scratch, the generalist alone): `epochs` over its own data.
    """
    start = start or Start("scratch")
    target = model_target(config, name)
    size = size_override or target.size
    training = config.training
    run_id = run_id or new_run_id(name)
    timings: dict[str, float] = {}
    store = DatasetStore(config.storage_root)

    t0 = time.monotonic()
    tok_json = _checkpoint_tokenizer(start.checkpoint) if start.checkpoint else None
    tokenizer_source = "from the initial checkpoint" if tok_json else "shared"
    tok_json = tok_json or tokenizer_json(config)
    timings["tokenizer_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    blocks = token_blocks(store, target.domains, "train", tok_json, training.seq_len,
                          training.tokenize_in_job_below_mb)
    n_blocks = blocks.count()
    unique_tokens = n_blocks * training.seq_len
    timings["data_s"] = time.monotonic() - t0
    global_batch = training.batch_size * training.num_workers
    if n_blocks < global_batch:
        raise ValueError(f"{name}: only {n_blocks} blocks of {training.seq_len} tokens; too little data to train")
    steps_per_epoch = n_blocks // global_batch  # an epoch drops the last partial batch
    tokens_per_step = global_batch * training.seq_len
    vocab_size = Tokenizer.from_str(tok_json).get_vocab_size(with_added_tokens=True)
    is_seed = name == config.generalist.name and training.specialists_from == "seed"
    plan = None

    if is_seed and start.kind in ("scratch", "current"):
        plan = plan_budget(n_blocks, training.epochs, global_batch, training.seq_len, training.seed_fraction,
                           len(config.specialists)).as_record()
        schedule = Schedule(plan["seed_steps"], training.learning_rate, floor=SEED_FLOOR[training.seed_schedule])
    elif start.kind in ("seed", "current") and start.plan is not None:
        plan = start.plan
        schedule = branch_schedule(plan["branch_steps"], training.learning_rate, training.branch.learning_rate_scale,
                                   training.branch.warmup_fraction)
    else:
        schedule = Schedule(steps_per_epoch * training.epochs, training.learning_rate)
    tokens_seen = schedule.steps * tokens_per_step  # what D means below

    if start.kind == "scratch":
        chosen = choose_size(plan["lifetime_tokens"] if is_seed else tokens_seen, vocab_size,
                             size.tokens_per_parameter, size.min_params, size.max_params, size.override)
        shape, sizing = chosen.shape, chosen.as_record()
        if is_seed:
            sizing["training_tokens"] = tokens_seen
            sizing["train_flops"] = 6.0 * sizing["total_params"] * tokens_seen
            sizing["rule"] += (f", for the seed and one branch together ({plan['lifetime_tokens']:,} tokens: "
                               f"seed {plan['seed_steps']} + branch {plan['branch_steps']} steps)")
    else:
        shape = None
        rule = {"seed": f"branched from the seed ({config.generalist.name} v{(start.record or {}).get('version')}); "
                        "its shape was chosen for the seed and its branches together",
                "current": f"continued from v{(start.record or {}).get('version')}",
                "directory": f"continued from {start.checkpoint}"}[start.kind]
        sizing = _continued_sizing(start, tokens_seen, vocab_size, rule)

    loop_config = {
        "name": name, "seed": training.seed, "seq_len": training.seq_len, "batch_size": training.batch_size,
        "schedule": asdict(schedule), "tokenizer_json": tok_json,
        "shape": shape.__dict__ if isinstance(shape, Shape) else None, "init_checkpoint": start.checkpoint,
        "progress_board": progress_board,
    }
    fs, base = filesystem(config.storage_root)
    # Ray Train's controller sees a run end at its next poll (every 2 s by default): at these sizes a run takes
    # seconds, so it polls 4 times a second (the variable is passed on to the controller; an operator's own wins)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    trainer = TorchTrainer(
        _loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=training.num_workers, use_gpu=training.use_gpu,
                                     resources_per_worker={"CPU": training.cpus_per_worker,
                                                           **({"GPU": 1} if training.use_gpu else {})}),
        datasets={"train": blocks},
        # one worker reads the whole materialized dataset: no split coordinator actor to start for it
        dataset_config=DataConfig(datasets_to_split=[] if training.num_workers == 1 else "all"),
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
        "steps": schedule.steps,
        "epochs": round(schedule.steps / steps_per_epoch, 3),  # passes over this model's own data
        "schedule": asdict(schedule),
        "seq_len": training.seq_len,
        "tokenizer": tokenizer_source,
        "start": start.kind,
        "init_checkpoint": start.checkpoint,
        "plan": plan,
    }
    return TrainResult(name, run_id, checkpoint_path, sizing, data, metrics, timings)


def _loop(cfg: dict) -> None:  # a module-level function Ray can pickle by reference
    from .loop import train_loop_per_worker

    train_loop_per_worker(cfg)


@contextlib.contextmanager
def saved_checkpoint(model, tokenizer, storage_root: str, run_id: str, timings: dict):
    """Save `model` and `tokenizer`, with the probe reference (train/reference.py), as `run_id`'s checkpoint under
    the storage root, outside Ray Train (the fast path, a merge); yields (a local copy of it, to evaluate, and its
    path in the root's own form). `timings['save_s']`: how long the save took."""
    from .reference import compute_reference, write_reference

    started = time.monotonic()
    fs, base = filesystem(storage_root)
    destination = f"{base}/checkpoints/{run_id}/checkpoint"
    with tempfile.TemporaryDirectory() as local:
        model.save_pretrained(local, safe_serialization=True)
        tokenizer.save_pretrained(local)
        write_reference(local, compute_reference(model, tokenizer))
        fs.create_dir(destination, recursive=True)
        pafs.copy_files(local, destination, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        timings["save_s"] = time.monotonic() - started
        yield local, _checkpoint_uri(storage_root, destination)


def _checkpoint_uri(storage_root: str, path: str) -> str:
    """Ray returns a path inside the storage filesystem; give it back in the root's own form."""
    if "://" in storage_root:
        return f"{storage_root.split('://', 1)[0]}://{path}"
    return path


# --------------------------------------------------------------------------- registry


def resolve_init(config: SenmonConfig, registry, name: str, init: str | None) -> Start:
    """Where `name` starts (see `Start`); `init=None` is the configured default: a specialist branches
    from the seed when `training.specialists_from` is 'seed', anything else starts from scratch."""
    seed_name = config.generalist.name
    if init is None:
        init = "seed" if name != seed_name and config.training.specialists_from == "seed" else "scratch"
    if init == "scratch":
        return Start("scratch")
    if init == "seed":
        if name == seed_name:
            raise ValueError(f"{name} is the seed the specialists branch from; train it from scratch or continue it "
                             "(--init current)")
        seed = seed_record(registry, config)  # the serving generalist, or the seed a serving merge was made beside
        if seed is None:
            raise ValueError(f"{name} branches from the seed, {seed_name}, which has no serving version yet; train it "
                             f"first (senmon train {seed_name}) or train {name} alone (--init scratch)")
        return Start("seed", seed["path"], seed)
    if init == "current":  # the generalist continues its seed, not the merged fallback (train/merge.py)
        current = seed_record(registry, config) if name == seed_name else ray.get(registry.current.remote(name))
        if current is None:
            raise ValueError(f"{name} has no serving version to continue from; train it first")
        return Start("current", current["path"], current)
    path = Path(init).expanduser().resolve()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{init} is not a Hugging Face model directory (no config.json)")
    return Start("directory", str(path))


def train_and_register(config: SenmonConfig, name: str, registry, init: str | None = None,
                       run_id: str | None = None, new_shards: list[str] | None = None, progress_board=None) -> dict:
    """Train `name`, register the version with its metadata, and pass it through the promotion gate.

    `new_shards` (a data-triggered retrain) with `init="current"` takes the fast path
    (train/fast.py) unless `scheduler.retrain_path` is 'full'. Returns the version's registry
    record: status 'serving' when the gate let it through, else 'rejected' with the reason (the
    serving version is then unchanged).
    """
    start = resolve_init(config, registry, name, init)
    if new_shards and start.kind == "current" and config.scheduler.retrain_path == "fast":
        from .fast import fast_retrain_task

        run_id = run_id or new_run_id(name)
        result = ray.get(fast_retrain_task.options(num_cpus=config.training.cpus_per_worker).remote(
            config.model_dump(mode="json"), name, start, list(new_shards), run_id, progress_board))
    else:
        result = train_model(config, name, start, run_id=run_id, progress_board=progress_board)
    record = ray.get(registry.register.remote(name, result.run_id, result.checkpoint_path, result.metrics,
                                              result.sizing, {**result.data, "timings": result.timings}))
    serving = ray.get(registry.current.remote(name)) if name == config.generalist.name else None
    if is_merge(serving):
        return promote_seed(config, registry, record, serving)
    return ray.get(registry.promote.remote(name, record["version"], config.training.promotion_margin))


def promote_seed(config: SenmonConfig, registry, record: dict, merge: dict) -> dict:
    """A retrained seed while a merge serves as the fallback (train/merge.py): the gate holds it to the seed it
    replaces (the merge's pooled validation perplexity is worse by design, so it would let a worse seed through);
    once it passes, the specialists are merged again beside it, so the fallback stays a merge and the new seed is
    the branch point. Returns the record that serves: the new merge, the seed where no merge can be made (a
    specialist of another shape), or the rejected seed (the merge serves on)."""
    name = config.generalist.name
    promoted = ray.get(registry.promote.remote(name, record["version"], config.training.promotion_margin,
                                               against=merge["data"]["seed"]["version"]))
    if promoted["status"] != "serving":
        return promoted
    try:
        merged = merge_and_register(config, registry)
    except Exception as error:  # the seed serves, as a fallback of its own, until a merge succeeds (the next start)
        log.warning("merging the specialists beside %s v%s failed; the seed serves as the fallback: %s", name,
                    promoted["version"], error)
        return {**promoted, "reason": f"{promoted['reason']}; merging the specialists beside it failed "
                                      f"({type(error).__name__}: {error}), so it serves as the fallback"}
    if merged is None:
        return promoted
    return {**merged, "reason": f"seed v{promoted['version']}: {promoted['reason']}; merged again beside it: "
                                f"{merged['reason']}"}
