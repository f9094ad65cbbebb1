"""Likelihood routing: which serving model explains a prompt best, by each model's own log-likelihood of it.

The routing classifier (train/routing.py) learns what its training sources look like; on a source it has never
seen it can be confidently wrong. Every specialist is itself a model of its domain's text, so it can say how
likely a prompt is under it (Branch-Train-Merge, c-BTM: p(domain | x) is proportional to p(x | specialist) times a
prior). The generalist says the same for text in general, which makes it the yardstick for text of no domain: a
specialist answers only where it explains the prompt better than the generalist by `margin` nats per token.

`LikelihoodScorer` keeps a CPU copy of every serving model (the same checkpoints the engines load, small for
senmon's specialists) and scores the first `max_tokens` tokens of a prompt with each: one forward pass per model,
no generation. `decide` turns the per-token negative log-likelihoods into a decision. The router asks for this
second opinion only when the classifier is unsure (`serve.second_opinion_below`), so most requests never pay it.
bench/routing.py measures both, alone and together, on sources neither has seen.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

EOT_ID = 0  # the end-of-text token every senmon tokenizer puts first (train/tokenizer.py); documents follow it


@dataclass(frozen=True)
class LikelihoodDecision:
    chosen: str | None  # the specialist, or None: no specialist beats the generalist by the margin
    best: str  # the specialist with the lowest negative log-likelihood
    gain: float  # nats per token the best specialist saves over the generalist (negative: it does worse)
    reason: str


def decide(nll: dict[str, float], generalist: str, margin: float) -> LikelihoodDecision:
    """The specialist with the lowest mean negative log-likelihood per token, if it beats the generalist's by
    `margin` nats per token; otherwise None (the generalist answers). Without the generalist's score, the best
    specialist is chosen."""
    specialists = {name: value for name, value in nll.items() if name != generalist}
    if not specialists:
        raise ValueError("no specialist scored the prompt")
    best = min(specialists, key=specialists.get)
    if generalist not in nll:
        return LikelihoodDecision(best, best, 0.0, f"{best} explains the prompt best ({specialists[best]:.2f} nats/token)")
    gain = nll[generalist] - specialists[best]
    if gain < margin:
        return LikelihoodDecision(None, best, gain, f"likelihood: the best specialist, {best}, saves {gain:.3f} nats/token "
                                                    f"over {generalist}, under the margin {margin:.3f}")
    return LikelihoodDecision(best, best, gain, f"likelihood: {best} saves {gain:.3f} nats/token over {generalist} "
                                                f"(margin {margin:.3f})")


class StackedLlama:
    """Several Llama models of one shape (a seed and its branches) run as one: every weight stacked along a new
    first axis, one batched matmul per projection. The same arithmetic as transformers' LlamaForCausalLM
    (RMSNorm, rotary position embeddings, grouped-query causal attention, SwiGLU), without its per-call
    overhead, which for senmon's small models is most of a forward pass (tests/test_router_unit.py checks the
    log-probabilities against transformers')."""

    def __init__(self, models: list[torch.nn.Module]):
        config = models[0].config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 10000.0)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

        def stack(get) -> torch.Tensor:
            return torch.stack([get(m).detach().float() for m in models])

        self.embed = stack(lambda m: m.model.embed_tokens.weight)  # [M, V, h]
        self.head = stack(lambda m: m.lm_head.weight).contiguous()  # [M, V, h]
        self.final_norm = stack(lambda m: m.model.norm.weight)[:, None, :]
        self.layers = []
        for i in range(config.num_hidden_layers):
            def w(name, i=i):  # [M, in, out]: x @ w
                return stack(lambda m: m.model.layers[i].get_submodule(name).weight).transpose(1, 2).contiguous()
            self.layers.append({
                "in_norm": stack(lambda m, i=i: m.model.layers[i].input_layernorm.weight)[:, None, :],
                "post_norm": stack(lambda m, i=i: m.model.layers[i].post_attention_layernorm.weight)[:, None, :],
                "q": w("self_attn.q_proj"), "k": w("self_attn.k_proj"), "v": w("self_attn.v_proj"),
                "o": w("self_attn.o_proj"), "gate": w("mlp.gate_proj"), "up": w("mlp.up_proj"),
                "down": w("mlp.down_proj")})

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def token_nll(self, ids: torch.Tensor) -> torch.Tensor:
        """[M, B, T-1] negative log-likelihood of each next token of `ids` [B, T] under each model (right
        padding is harmless: causal attention never looks ahead)."""
        models, (batch, length) = self.embed.shape[0], ids.shape
        x = self.embed[:, ids.reshape(-1)]  # [M, B*T, h]
        angles = torch.outer(torch.arange(length, dtype=torch.float32), self.inv_freq)
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

        def heads(t: torch.Tensor, count: int) -> torch.Tensor:  # [M, B*T, count*d] -> [M*B, count, T, d]
            t = t.view(models, batch, length, count, self.head_dim).transpose(2, 3)
            half = self.head_dim // 2
            rotated = torch.cat([-t[..., half:], t[..., :half]], -1)
            return (t * cos + rotated * sin).reshape(models * batch, count, length, self.head_dim)

        for layer in self.layers:
            h = self._norm(x, layer["in_norm"])
            q, k = heads(torch.bmm(h, layer["q"]), self.heads), heads(torch.bmm(h, layer["k"]), self.kv_heads)
            v = torch.bmm(h, layer["v"]).view(models, batch, length, self.kv_heads, self.head_dim).transpose(2, 3) \
                .reshape(models * batch, self.kv_heads, length, self.head_dim)
            if self.kv_heads != self.heads:
                k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
                v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
            attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            attended = attended.view(models, batch, self.heads, length, self.head_dim).transpose(2, 3) \
                .reshape(models, batch * length, self.heads * self.head_dim)
            x = x + torch.bmm(attended, layer["o"])
            h = self._norm(x, layer["post_norm"])
            x = x + torch.bmm(torch.nn.functional.silu(torch.bmm(h, layer["gate"])) * torch.bmm(h, layer["up"]),
                              layer["down"])
        # the last position predicts nothing here: leave it out of the head, the largest matmul (vocabulary-wide)
        x = x.view(models, batch, length, -1)[:, :, :-1].reshape(models, batch * (length - 1), -1)
        # logits as [M, V, positions]: the vocabulary-wide matmul is 1.5x faster this way round on CPU (a few dozen
        # positions against thousands of rows), and the log-sum-exp then runs along V over contiguous positions,
        # in place; cross_entropy over [M*positions, V] was 1.3x slower in all (1 thread, 6 models, 32 tokens)
        logits = torch.bmm(self.head, self._norm(x, self.final_norm).transpose(1, 2))
        targets = ids[:, 1:].reshape(1, 1, -1).expand(models, 1, -1)
        picked = logits.gather(1, targets)[:, 0]  # [M, positions]
        peak = logits.amax(dim=1, keepdim=True)
        log_normaliser = logits.sub_(peak).exp_().sum(dim=1).log_() + peak[:, 0]
        return (log_normaliser - picked).view(models, batch, length - 1)


def stackable(model: torch.nn.Module) -> tuple | None:
    """The shape that decides whether models can be stacked, or None for a model StackedLlama cannot run."""
    config = model.config
    if getattr(config, "model_type", None) != "llama" or getattr(config, "hidden_act", "silu") != "silu" \
            or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return None
    return (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
            config.num_attention_heads, config.num_key_value_heads, getattr(config, "head_dim", None),
            config.rms_norm_eps, rope.get("rope_theta") or getattr(config, "rope_theta", None))


class LikelihoodScorer:
    """CPU copies of the serving models, kept in step with the serving table, scoring prompts' log-likelihood."""

    def __init__(self, max_tokens: int = 96, threads: int | None = None):
        self.max_tokens = max_tokens
        self.models: dict[str, tuple[int | None, str, torch.nn.Module]] = {}  # name -> (version, path, model)
        self.tokenizer = None
        self._tokenizer_path: str | None = None
        self._lock = threading.Lock()
        self._stacked_key: tuple | None = None
        self._stacked: list[tuple[list[str], StackedLlama | None]] = []
        if threads:
            torch.set_num_threads(threads)

    # ------------------------------------------------------------------ keeping in step with what serves

    def wanted(self, entries: dict[str, dict]) -> dict[str, tuple[int | None, str]]:
        """(version, path) of every entry whose weights this scorer does not hold yet."""
        return {name: (entry.get("version"), entry["path"]) for name, entry in entries.items()
                if entry.get("path") and self.models.get(name, (None, None))[:2] != (entry.get("version"), entry["path"])}

    def sync(self, entries: dict[str, dict]) -> list[str]:
        """Load the weights of every entry that changed, drop models no longer served; returns what was loaded.
        Blocking (a second or so per small model): call it off the event loop."""
        from transformers.utils import logging as transformers_logging

        from senmon.train.evaluate import load_model

        transformers_logging.disable_progress_bar()  # no "Loading weights" bars in the router's log
        loaded = []
        for name, (version, path) in self.wanted(entries).items():
            if not Path(path).exists():  # not a local path (an object-store URI): likelihood routing needs a copy
                continue
            model = load_model(path)
            if self._tokenizer_path is None:
                self._load_tokenizer(path)
            with self._lock:
                self.models[name] = (version, path, model)
            loaded.append(name)
        with self._lock:
            for name in [n for n in self.models if n not in entries]:
                del self.models[name]
        return loaded

    def _load_tokenizer(self, directory: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
        self._tokenizer_path = directory

    def add(self, name: str, model: torch.nn.Module, tokenizer_dir: str, version: int | None = None) -> None:
        """Score with an already loaded model (the benchmark's)."""
        if self._tokenizer_path is None:
            self._load_tokenizer(tokenizer_dir)
        self.models[name] = (version, tokenizer_dir, model.eval())

    @property
    def ready(self) -> bool:
        return self.tokenizer is not None and bool(self.models)

    # ------------------------------------------------------------------ scoring

    def ids(self, text: str, limit: int | None = None) -> list[int]:
        limit = limit or self.max_tokens
        return [EOT_ID] + self.tokenizer.encode(self.head(text, limit), add_special_tokens=False).ids[:limit]

    def head(self, text: str, tokens: int) -> str:
        """A start of `text` whose tokens begin with the whole text's first `tokens`: whole pre-tokens (BPE works
        within each, and each gives at least one token), at least `tokens` of them, ending on a pre-token that does
        not end in whitespace (a whitespace run splits by what follows it). Looked for in the first 16 characters
        per token, then in the whole text. Encoding whole held-out prompts (up to 2,000 characters) for 32 tokens
        cost 0.5-1.6 ms at p50 and up to 4 ms at p99 (a long unspaced Japanese pre-token is BPE's worst case). A tokenizer with a normalizer
        (offsets into another string) gets the whole text."""
        if self.tokenizer.normalizer is not None or self.tokenizer.pre_tokenizer is None:
            return text
        for window in (text[:16 * tokens], text):
            pieces = self.tokenizer.pre_tokenizer.pre_tokenize_str(window)
            for _, (_, end) in pieces[tokens - 1:-1]:  # never the last: the window may have cut it short
                if not window[end - 1].isspace():
                    return text[:end]
            if len(window) == len(text):
                break
        return text

    def _stacks(self, models: dict[str, torch.nn.Module]) -> list[tuple[list[str], StackedLlama | None]]:
        """Groups of models that run as one StackedLlama (cached until the models change); a model that cannot
        be stacked is a group of its own, run by transformers."""
        key = tuple(sorted((n, id(m)) for n, m in models.items()))
        if self._stacked_key != key:
            groups: dict[tuple, list[str]] = {}
            for name, model in sorted(models.items()):
                groups.setdefault(stackable(model) or ("alone", name), []).append(name)
            self._stacked = [(names, StackedLlama([models[n] for n in names]) if shape[0] != "alone" else None)
                             for shape, names in groups.items()]
            self._stacked_key = key
        return self._stacked

    @torch.inference_mode()
    def nll(self, texts: list[str], names: list[str] | None = None) -> list[dict[str, float]]:
        """Mean negative log-likelihood per token of each text (its first `max_tokens` tokens) under each model."""
        with self._lock:
            models = {n: m for n, (_, _, m) in self.models.items() if names is None or n in names}
            stacks = self._stacks(models)
        # no more tokens than the shortest context among them holds (the end-of-text token first)
        limit = min([self.max_tokens] + [getattr(m.config, "max_position_embeddings", 1 << 30) - 1
                                         for m in models.values()])
        encoded = [torch.tensor(self.ids(t, limit)) for t in texts]
        lengths = torch.tensor([len(e) for e in encoded])
        batch = torch.nn.utils.rnn.pad_sequence(encoded, batch_first=True, padding_value=EOT_ID)
        mask = torch.arange(batch.shape[1])[None, :] < lengths[:, None]
        valid = mask[:, 1:]
        counts = valid.sum(dim=1).clamp(min=1)
        result = [dict() for _ in texts]
        for group, stacked in stacks:
            if stacked is not None:
                per_model = stacked.token_nll(batch)  # [M, B, T-1]
            else:
                logits = models[group[0]](input_ids=batch, attention_mask=mask.long()).logits[:, :-1].float()
                per_model = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:],
                                                              reduction="none")[None]
            means = (per_model * valid).sum(dim=2) / counts  # [M, B]
            for name, row_values in zip(group, means.tolist()):
                for row, value in zip(result, row_values):
                    row[name] = value
        return result

    def timed_nll(self, text: str, names: list[str] | None = None) -> tuple[dict[str, float], float]:
        started = time.perf_counter()
        scores = self.nll([text], names)[0]
        return scores, (time.perf_counter() - started) * 1000
