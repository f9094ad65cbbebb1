"""The training loop (readable in one sitting, like nanoGPT), and its Ray Train worker.

`train_steps` is the loop itself and knows nothing of Ray: it takes a model, an iterator of
token batches and a `Schedule` (steps, peak learning rate, warmup, cosine floor), trains with
AdamW and returns what happened. `train_loop_per_worker` is what each Ray Train worker runs:
it builds the model (a fresh Llama of the chosen shape, or any causal LM loaded from a
checkpoint: the seed a specialist branches from, or the version it continues), streams token
blocks from its Ray Data shard into `train_steps`, and ends by saving the model with
`save_pretrained` (safetensors) plus the tokenizer into a Ray Train checkpoint, the directory
vLLM serves unchanged. The specialists benchmark calls `train_steps` directly, so what it
measures is this loop.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch

from senmon.train.reference import compute_reference, write_reference

if TYPE_CHECKING:
    from senmon.progress import TrainingProgress


@dataclass(frozen=True)
class Schedule:
    """How one run trains: `steps` optimizer steps, warmup to `peak_lr`, cosine down to `floor` x peak."""

    steps: int
    peak_lr: float
    warmup_fraction: float = 0.05
    floor: float = 0.1

    def lr(self, step: int) -> float:
        return learning_rate(step, self.steps, self.peak_lr, self.warmup_fraction, self.floor)


def learning_rate(step: int, total: int, peak: float, warmup_fraction: float = 0.05, floor: float = 0.1) -> float:
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def new_model(shape, tokenizer, seq_len: int):
    from transformers import LlamaForCausalLM

    from .sizing import llama_config

    config = llama_config(shape, vocab_size=len(tokenizer), max_position_embeddings=seq_len,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=False)


def train_steps(model: torch.nn.Module, batches: Iterator[torch.Tensor], schedule: Schedule,
                log: Callable[[int, float, float], None] | None = None,
                progress: TrainingProgress | None = None) -> dict:
    """Train `model` for `schedule.steps` steps on `batches` (token-id tensors [batch, seq]).

    Returns the final loss (mean of the last 5%), a thinned loss curve, tokens seen, wall time and
    the time spent waiting for data. `log(step, loss, tokens_per_s)` is called about 20 times.
    `progress` (a bar, see senmon/progress.py; none by default) is fed every step, keeps its own
    pace, and is closed when the loop is done.
    """
    optimizer = make_optimizer(model, schedule.peak_lr)
    log_every = max(1, schedule.steps // 20)
    step, tokens, losses, waited = 0, 0, [], 0.0
    started = time.monotonic()
    model.train()
    while step < schedule.steps:
        fetch_started = time.monotonic()
        input_ids = next(batches, None)
        waited += time.monotonic() - fetch_started
        if input_ids is None:
            raise ValueError(f"the data ran out after {step} of {schedule.steps} steps")
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(step)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        tokens += input_ids.numel()
        losses.append(loss.item())
        if log is not None and (step % log_every == 0 or step == schedule.steps):
            log(step, losses[-1], tokens / (time.monotonic() - started))
        if progress is not None:
            progress.update(step, tokens, losses[-1], tokens / (time.monotonic() - started))
    if progress is not None:
        progress.close()
    train_s = time.monotonic() - started
    tail = losses[-log_every:]
    return {"step": step, "loss": sum(tail) / max(1, len(tail)), "train_s": train_s, "tokens_seen": tokens,
            "tokens_per_s": tokens / max(train_s, 1e-9), "data_wait_s": waited,
            "loss_curve": losses[:: max(1, len(losses) // 50)]}


def repeat_epochs(make_epoch: Callable[[int], Iterable[torch.Tensor]]) -> Iterator[torch.Tensor]:
    """Batches of epoch 0, then epoch 1, ... for as long as the loop asks (a run's steps need not be
    a whole number of epochs)."""
    epoch = 0
    while True:
        empty = True
        for batch in make_epoch(epoch):
            empty = False
            yield batch
        if empty:
            return
        epoch += 1


# --------------------------------------------------------------------------- Ray Train worker


def build_model(cfg: dict, tokenizer) -> torch.nn.Module:
    if cfg.get("init_checkpoint"):
        import ray.train
        from transformers import AutoModelForCausalLM

        with ray.train.Checkpoint(cfg["init_checkpoint"]).as_directory() as directory:
            return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return new_model(cfg["shape"], tokenizer, cfg["seq_len"])


def train_loop_per_worker(cfg: dict) -> None:
    import ray.train
    import ray.train.torch
    from tokenizers import Tokenizer

    from senmon.progress import training_progress

    from .tokenizer import wrap

    torch.manual_seed(cfg["seed"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    tokenizer = wrap(Tokenizer.from_str(cfg["tokenizer_json"]))
    model = ray.train.torch.prepare_model(build_model(cfg, tokenizer))
    device = ray.train.torch.get_device()
    shard = ray.train.get_dataset_shard("train")
    schedule = Schedule(**cfg["schedule"])

    def epoch_batches(epoch: int):
        for batch in shard.iter_torch_batches(batch_size=cfg["batch_size"], drop_last=True, device=device,
                                              local_shuffle_buffer_size=4 * cfg["batch_size"],
                                              local_shuffle_seed=cfg["seed"] + epoch):
            yield batch["tokens"]

    def log(step: int, loss: float, rate: float) -> None:
        if rank == 0:  # progress goes to the log; ray.train.report is a ~1 s barrier, so once at the end
            print(f"[{cfg['name']}] step {step}/{schedule.steps} loss {loss:.3f} ({rate:,.0f} tokens/s per worker)",
                  flush=True)

    bar = training_progress(cfg.get("progress_board") if rank == 0 else None, cfg["name"], schedule.steps,
                            workers=context.get_world_size())  # drawn by the driver's relay, when it has one
    final = train_steps(model, repeat_epochs(epoch_batches), schedule, log, bar)
    final["tokens_seen"] *= context.get_world_size()
    final["tokens_per_s"] *= context.get_world_size()
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            unwrapped = model.module if hasattr(model, "module") else model
            unwrapped.save_pretrained(directory, safe_serialization=True)
            tokenizer.save_pretrained(directory)
            # what an engine must answer on the probe prompt with these weights (serve/engine.py checks it)
            write_reference(directory, compute_reference(unwrapped, tokenizer))
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(final, checkpoint=checkpoint)
