"""The likelihood second opinion (serve/likelihood.py) on real checkpoints: the stacked forward pass matches
transformers, the scorer follows the serving table, and the decision follows the numbers."""

from __future__ import annotations

import pytest
import torch

from senmon.serve.likelihood import LikelihoodScorer, StackedLlama, decide, stackable
from senmon.train.tokenizer import train_tokenizer

TEXTS = ["The licensee shall not be liable for damages arising from the use of the software.",
         "def parse(line):\n    return line.split(',')", "吾輩は猫である。名前はまだ無い。"]


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return train_tokenizer(TEXTS * 20, vocab_size=300).backend_tokenizer.to_str()


def _llama(seed: int, kv_heads: int = 2, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if not name.endswith("norm.weight"):
                parameter.normal_(0.0, 0.1)
            else:
                parameter.uniform_(0.5, 1.5)  # norms that are not all ones, so a missed norm shows
    return model


@pytest.mark.parametrize("kv_heads", [4, 2])  # plain and grouped-query attention
def test_stacked_models_give_transformers_log_probabilities(kv_heads):
    models = [_llama(seed, kv_heads) for seed in range(3)]
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = StackedLlama(models).token_nll(ids)
        for index, model in enumerate(models):
            logits = model(input_ids=ids).logits[:, :-1]
            reference = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            assert torch.allclose(ours[index], reference, atol=1e-4), (index, (ours[index] - reference).abs().max())


def test_scorer_follows_the_serving_table_and_groups_what_it_can_stack(tmp_path, tokenizer_json):
    from senmon.serve.testing import tiny_checkpoint

    paths = {name: tiny_checkpoint(tmp_path / name, tokenizer_json, max_len=64, seed=seed, init_std=0.05)
             for seed, name in enumerate(["law", "code", "generalist"])}
    wide = tiny_checkpoint(tmp_path / "wide", tokenizer_json, hidden_size=96, max_len=64, seed=5, init_std=0.05)
    scorer = LikelihoodScorer(max_tokens=16)
    entries = {name: {"version": 1, "path": path} for name, path in paths.items()}
    assert scorer.sync(entries) == ["law", "code", "generalist"] and scorer.ready
    assert scorer.sync(entries) == []  # nothing changed, nothing loaded again

    nll = scorer.nll(TEXTS)
    assert [set(row) for row in nll] == [set(paths)] * len(TEXTS)
    for name, path in paths.items():  # each model's own transformers forward agrees with the stacked one
        model = scorer.models[name][2]
        ids = torch.tensor([scorer.ids(TEXTS[0], 16)])
        logits = model(input_ids=ids).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:]).item()
        assert nll[0][name] == pytest.approx(expected, abs=1e-4)

    entries["code"] = {"version": 2, "path": wide}  # a new version of another shape: its own group
    entries.pop("law")  # no longer served: dropped
    assert scorer.sync(entries) == ["code"] and set(scorer.models) == {"code", "generalist"}
    row = scorer.nll(TEXTS[:1])[0]
    assert set(row) == {"code", "generalist"}
    assert sorted(len(group) for group, _ in scorer._stacks({n: m for n, (_, _, m) in scorer.models.items()})) == [1, 1]
    assert stackable(scorer.models["code"][2]) != stackable(scorer.models["generalist"][2])

    assert scorer.sync({"gone": {"version": 1, "path": str(tmp_path / "missing")}}) == []  # not a local path


def test_decision_follows_the_nats_per_token():
    assert decide({"law": 2.0, "code": 2.5, "g": 2.4}, "g", margin=0.0).chosen == "law"
    close = decide({"law": 2.35, "code": 2.5, "g": 2.4}, "g", margin=0.1)
    assert close.chosen is None and close.best == "law" and close.gain == pytest.approx(0.05)
    assert "under the margin" in close.reason


def test_the_policies_benchmark_routes_as_the_router_does_and_restricts_as_it_says():
    """bench/routing_policies.py's baseline must be the router's rule (serve/router.py: the classifier above `below`,
    else `decide` over every model), and its variants change only what they name."""
    import random

    from bench.routing_policies import router

    rng = random.Random(0)
    for _ in range(500):
        raw = {d: rng.random() ** 3 for d in ("law", "code", "dictionary", "literature", "japanese")}
        p = {d: v / sum(raw.values()) for d, v in raw.items()}
        nll = {**{d: rng.uniform(2, 4) for d in p}, "generalist": rng.uniform(2, 4)}
        best = max(p, key=p.get)
        expected = best if p[best] >= 0.7 else (decide(nll, "generalist", 0.05).chosen or "none")
        assert router(p, nll, 0.7, 0.05) == (expected, p[best] < 0.7)
        assert router(p, nll, 1.01, 0.05, w=0.0)[0] == (decide(nll, "generalist", 0.05).chosen or "none")
        top1 = router(p, nll, 1.01, 0.0, k=1)[0]  # only the classifier's pick against the fallback
        assert top1 == (best if nll["generalist"] >= nll[best] else "none")
    # a strong prior overrides a small likelihood edge
    p = {"law": 0.6, "code": 0.1, "dictionary": 0.1, "literature": 0.1, "japanese": 0.1}
    nll = {"law": 3.0, "code": 2.9, "dictionary": 4, "literature": 4, "japanese": 4, "generalist": 3.5}
    assert router(p, nll, 1.01, 0.0)[0] == "code" and router(p, nll, 1.01, 0.0, w=0.5)[0] == "law"


def test_the_routing_benchmark_names_why_each_text_went_to_the_fallback():
    """bench/routing.py: the `none` class sends a text to the fallback without a second opinion; under its threshold
    an unsure classifier asks the second opinion, which picks the fallback where it predicts the text best. The
    benchmark counts each cause apart, per group and form."""
    from bench.routing import combined, fallback_causes

    nll = {"law": 3.0, "code": 3.2, "generalist": 2.5}  # the fallback predicts this text best
    routed = (["law", "law", "law", "code"], [0.9, 0.5, 0.9, 0.6], [0.8, 0.1, 0.1, 0.2])  # best, confidence, none
    chosen, fired = combined(routed, [nll] * 4, below=0.7, margin=0.0, none_threshold=0.3)
    assert chosen == ["none", "none", "law", "none"] and fired == [False, True, False, True]
    evaluation = [{"group": "ood-test", "form": "whole"}, {"group": "heldout", "form": "whole"},
                  {"group": "heldout", "form": "whole"}, {"group": "heldout", "form": "snippet"}]
    causes = fallback_causes(evaluation, chosen, fired)
    assert causes["no_domain"]["whole"] == {"none_class": 1.0, "second_opinion": 0.0}
    assert causes["in_domain"]["whole"] == {"none_class": 0.0, "second_opinion": 0.5}
    assert causes["in_domain"]["snippet"] == {"none_class": 0.0, "second_opinion": 1.0}
    assert causes["no_domain"]["snippet"] == {"none_class": None, "second_opinion": None}  # no such texts


def test_the_prompt_head_holds_the_same_first_tokens_as_the_whole_prompt(tmp_path):
    """LikelihoodScorer.ids encodes only the start of a prompt that holds its first tokens; they must be the
    tokens the whole prompt's encoding begins with, at every limit, on every domain's corpus text (Japanese has
    sentence-long pre-tokens) and on whitespace runs, which split by what follows them."""
    import json
    from pathlib import Path

    from tokenizers import Tokenizer

    corpus = Path(__file__).resolve().parents[1] / "data" / "corpus" / "validation"
    texts = [json.loads(line)["text"] for path in sorted(corpus.glob("*.jsonl"))
             for line in path.read_text(encoding="utf-8").splitlines()[:40]]
    texts += ["word.\n\nNext", "a   b", "x  \n  y", "end.   ", "   ", "", "It's John's.\n\n\tTabbed", "日本語" * 400]
    scorer = LikelihoodScorer(max_tokens=32)
    scorer.tokenizer = Tokenizer.from_str(train_tokenizer(texts, vocab_size=400).backend_tokenizer.to_str())
    assert scorer.tokenizer.normalizer is None and scorer.tokenizer.pre_tokenizer is not None  # the path under test
    shorter = 0
    for text in texts:
        for limit in (1, 2, 8, 32, 64):
            whole = scorer.tokenizer.encode(text, add_special_tokens=False).ids[:limit]
            assert scorer.ids(text, limit) == [0] + whole, (text[:60], limit)
            shorter += len(scorer.head(text, limit)) < len(text)
    assert shorter > len(texts)  # the head is usually shorter: the point of it
