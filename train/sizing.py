"""Compute-optimal sizing: choose a Llama shape for a specialist from its training tokens.

The Chinchilla result, which Cerebras-GPT follows, is that for a fixed compute budget a model
should see about 20 training tokens per parameter. Given D training tokens we aim at
N = D / 20 non-embedding parameters, clamp that to the configured bounds, and pick the Llama
shape (hidden size, layers, heads, MLP width) whose non-embedding count is nearest to it in log
space, with a sane depth-to-width ratio. A configured override fixes the shape instead. The
numbers behind the choice are returned so the registry can record them with the version.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from transformers import LlamaConfig

HIDDEN_SIZES = [32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096]
MAX_LAYERS = 48
WIDTH_PER_LAYER = (8, 128)  # hidden / layers kept in this range (1-layer models excepted)
# Head sizes vLLM's attention kernels take on CPU (and on GPU); a shape outside them cannot be served.
SERVABLE_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def head_dim_for(hidden: int) -> int:
    return 32 if hidden <= 256 else 64


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int

    def non_embedding_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        per_layer = 4 * h * h + 3 * h * i + 2 * h  # q k v o, gate up down, two RMSNorms
        return self.num_hidden_layers * per_layer + h  # + final norm

    def embedding_params(self, vocab_size: int) -> int:
        return vocab_size * self.hidden_size  # tied input / output embedding


def shape_for_hidden(hidden: int, layers: int) -> Shape:
    heads = max(1, hidden // head_dim_for(hidden))
    intermediate = max(16, int(round(hidden * 8 / 3 / 16)) * 16)  # Llama's 8/3 ratio, multiple of 16
    return Shape(hidden, layers, heads, intermediate)


def candidate_shapes() -> list[Shape]:
    shapes = []
    for hidden in HIDDEN_SIZES:
        for layers in range(1, MAX_LAYERS + 1):
            ratio = hidden / layers
            if layers == 1 or WIDTH_PER_LAYER[0] <= ratio <= WIDTH_PER_LAYER[1]:
                shapes.append(shape_for_hidden(hidden, layers))
    return shapes


@dataclass(frozen=True)
class Sizing:
    training_tokens: int
    tokens_per_parameter: float
    target_params: int
    bounded_target: int
    shape: Shape
    non_embedding_params: int
    embedding_params: int
    total_params: int
    train_flops: float
    rule: str

    def as_record(self) -> dict:
        record = asdict(self)
        record["shape"] = asdict(self.shape)
        return record


def choose_size(training_tokens: int, vocab_size: int, tokens_per_parameter: float = 20.0,
                min_params: int = 20_000, max_params: int = 50_000_000,
                override: dict[str, int] | None = None) -> Sizing:
    """The shape for `training_tokens` (see module docstring); FLOPs are 6 · params · tokens."""
    target = int(training_tokens / tokens_per_parameter)
    bounded = min(max(target, min_params), max_params)
    if override:
        shape = Shape(**{**asdict(shape_for_hidden(override["hidden_size"], override.get("num_hidden_layers", 2))),
                         **override})
        head_dim, remainder = divmod(shape.hidden_size, shape.num_attention_heads)
        if remainder or head_dim not in SERVABLE_HEAD_DIMS:
            raise ValueError(f"override: hidden_size {shape.hidden_size} / {shape.num_attention_heads} heads gives head "
                             f"size {shape.hidden_size / shape.num_attention_heads:g}; vLLM serves {SERVABLE_HEAD_DIMS}")
        rule = "override from the configuration"
    else:
        shape = min(candidate_shapes(),
                    key=lambda s: (abs(math.log(s.non_embedding_params() / bounded)), s.num_hidden_layers))
        rule = f"non-embedding params nearest {bounded:,} = tokens / {tokens_per_parameter:g}"
        if bounded != target:
            rule += f" (clamped from {target:,} to the bounds [{min_params:,}, {max_params:,}])"
    non_embedding = shape.non_embedding_params()
    embedding = shape.embedding_params(vocab_size)
    return Sizing(
        training_tokens=training_tokens,
        tokens_per_parameter=tokens_per_parameter,
        target_params=target,
        bounded_target=bounded,
        shape=shape,
        non_embedding_params=non_embedding,
        embedding_params=embedding,
        total_params=non_embedding + embedding,
        train_flops=6.0 * (non_embedding + embedding) * training_tokens,
        rule=rule,
    )


def llama_config(shape: Shape | dict, vocab_size: int, max_position_embeddings: int, eos_token_id: int,
                 pad_token_id: int) -> LlamaConfig:
    """The transformers config for a shape; the same object vLLM reads from config.json."""
    shape = shape if isinstance(shape, Shape) else Shape(**shape)
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        torch_dtype="float32",
    )
