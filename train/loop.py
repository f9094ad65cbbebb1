"""The training loop that runs on each Ray Train worker (readable in one sitting, like nanoGPT).

It builds the model (a fresh Llama of the chosen shape, or any causal LM loaded from a
checkpoint), streams token blocks from its Ray Data shard, trains with AdamW under a warmup +
cosine schedule, prints the loss as it goes (to the worker log, which Ray forwards to the
driver), and ends by saving the model with
`save_pretrained` (safetensors) plus the tokenizer into a Ray Train checkpoint, the directory
vLLM serves unchanged.
"""

from __future__ import annotations

import math
import tempfile
import time

import ray.train
import ray.train.torch
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from .sizing import llama_config
from .tokenizer import wrap


def learning_rate(step: int, total: int, peak: float, warmup_fraction: float = 0.05, floor: float = 0.1) -> float:
    warmup = max(1, int(total * warmup_fraction))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_model(cfg: dict, tokenizer) -> torch.nn.Module:
    if cfg.get("init_checkpoint"):
        with ray.train.Checkpoint(cfg["init_checkpoint"]).as_directory() as directory:
            return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    config = llama_config(cfg["shape"], vocab_size=len(tokenizer), max_position_embeddings=cfg["seq_len"],
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def train_loop_per_worker(cfg: dict) -> None:
    from tokenizers import Tokenizer

    torch.manual_seed(cfg["seed"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    tokenizer = wrap(Tokenizer.from_str(cfg["tokenizer_json"]))
    model = ray.train.torch.prepare_model(build_model(cfg, tokenizer))
    device = ray.train.torch.get_device()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg["learning_rate"], betas=(0.9, 0.95), fused=False)

    shard = ray.train.get_dataset_shard("train")
    total_steps, step, tokens, losses = cfg["total_steps"], 0, 0, []
    log_every = max(1, total_steps // 20)
    waited = 0.0  # seconds spent waiting for data
    started = time.monotonic()
    model.train()
    for epoch in range(cfg["epochs"]):
        batches = shard.iter_torch_batches(batch_size=cfg["batch_size"], drop_last=True, device=device,
                                           local_shuffle_buffer_size=4 * cfg["batch_size"],
                                           local_shuffle_seed=cfg["seed"] + epoch)
        fetch_started = time.monotonic()
        for batch in batches:
            waited += time.monotonic() - fetch_started
            if step >= total_steps:
                break
            input_ids = batch["tokens"]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total_steps, cfg["learning_rate"])
            loss = model(input_ids=input_ids, labels=input_ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            tokens += input_ids.numel()
            losses.append(float(loss))
            if step % log_every == 0 or step == total_steps:
                rate = tokens / (time.monotonic() - started)
                if rank == 0:  # progress goes to the log; ray.train.report is a ~1 s barrier, so once at the end
                    print(f"[{cfg['name']}] step {step}/{total_steps} loss {losses[-1]:.3f} "
                          f"({rate:,.0f} tokens/s per worker)", flush=True)
            fetch_started = time.monotonic()

    train_s = time.monotonic() - started
    final = {
        "step": step,
        "loss": sum(losses[-log_every:]) / max(1, len(losses[-log_every:])),
        "train_s": train_s,
        "tokens_per_s": tokens * context.get_world_size() / max(train_s, 1e-9),
        "tokens_seen": tokens * context.get_world_size(),
        "data_wait_s": waited,
        "loss_curve": losses[:: max(1, len(losses) // 50)],
    }
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            unwrapped = model.module if hasattr(model, "module") else model
            unwrapped.save_pretrained(directory, safe_serialization=True)
            tokenizer.save_pretrained(directory)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(final, checkpoint=checkpoint)
