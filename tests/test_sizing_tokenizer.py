"""Compute-optimal sizing (pure logic) and the shared byte-level BPE tokenizer on the real corpus."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from senmon.ingest.store import read_jsonl
from senmon.train.sizing import Shape, choose_size, llama_config
from senmon.train.tokenizer import encode_documents, load_tokenizer, save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_shape_parameter_count_matches_transformers():
    import torch  # noqa: F401  (transformers needs it to build the model)
    from transformers import LlamaForCausalLM

    shape = Shape(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=176)
    model = LlamaForCausalLM(llama_config(shape, vocab_size=1000, max_position_embeddings=128, eos_token_id=0,
                                          pad_token_id=1))
    total = sum(p.numel() for p in model.parameters())  # tied embeddings are counted once
    assert total == shape.non_embedding_params() + shape.embedding_params(1000)


@pytest.mark.parametrize("tokens", [2_000_000, 20_000_000, 200_000_000, 2_000_000_000])
def test_twenty_tokens_per_parameter(tokens):
    sizing = choose_size(tokens, vocab_size=32000, min_params=1_000, max_params=10**10)
    assert sizing.target_params == tokens // 20
    # the grid of shapes lands within a factor of 1.5 of D/20 in this range
    assert abs(math.log(sizing.non_embedding_params / sizing.target_params)) < math.log(1.5)
    assert sizing.train_flops == 6.0 * sizing.total_params * tokens
    assert 8 <= sizing.shape.hidden_size / sizing.shape.num_hidden_layers <= 128


def test_more_data_never_gives_a_smaller_model():
    sizes = [choose_size(t, 4096, min_params=1_000, max_params=10**10).non_embedding_params
             for t in (10**5, 10**6, 10**7, 10**8, 10**9)]
    assert sizes == sorted(sizes)


def test_bounds_clamp_and_say_so():
    low = choose_size(10_000, 4096, min_params=50_000, max_params=1_000_000)
    assert low.bounded_target == 50_000 and "clamped" in low.rule
    high = choose_size(10**10, 4096, min_params=50_000, max_params=1_000_000)
    assert high.bounded_target == 1_000_000 and high.non_embedding_params < 1_500_000


def test_override_fixes_the_shape():
    sizing = choose_size(10**6, 4096, override={"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4})
    assert sizing.shape.hidden_size == 128 and sizing.shape.num_hidden_layers == 2
    assert sizing.shape.num_attention_heads == 4 and sizing.rule.startswith("override")


def test_every_candidate_shape_is_servable_by_vllm():
    from senmon.train.sizing import SERVABLE_HEAD_DIMS, candidate_shapes

    for shape in candidate_shapes():
        assert shape.hidden_size % shape.num_attention_heads == 0
        assert shape.hidden_size // shape.num_attention_heads in SERVABLE_HEAD_DIMS


def test_override_with_an_unservable_head_size_is_refused():
    with pytest.raises(ValueError, match="head size 24"):
        choose_size(10**6, 4096, override={"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2})


def test_record_is_plain_data():
    record = choose_size(10**6, 4096).as_record()
    assert record["shape"]["hidden_size"] > 0 and record["training_tokens"] == 10**6


@pytest.fixture(scope="module")
def corpus_tokenizer(tmp_path_factory):
    texts = [doc["text"] for domain in ("law", "code", "dictionary", "literature", "japanese")
             for doc in read_jsonl(REPO / "data" / "corpus" / "train" / f"{domain}.jsonl")]
    tokenizer = train_tokenizer(texts, vocab_size=2048)
    directory = save_tokenizer(tokenizer, tmp_path_factory.mktemp("tokenizer"))
    return load_tokenizer(directory)


def test_tokenizer_round_trips_every_test_document_exactly(corpus_tokenizer):
    for domain in ("japanese", "code", "law"):
        for doc in read_jsonl(REPO / "data" / "corpus" / "test" / f"{domain}.jsonl"):
            ids = corpus_tokenizer(doc["text"], add_special_tokens=False)["input_ids"]
            assert corpus_tokenizer.decode(ids) == doc["text"]


def test_tokenizer_handles_text_it_never_saw(corpus_tokenizer):
    for text in ["未知の漢字：鬱彙、絵文字 🎌、半角ｶﾅ", "tabs\tand  double  spaces\n\n", "Ελληνικά и кириллица"]:
        assert corpus_tokenizer.decode(corpus_tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_compresses_japanese(corpus_tokenizer):
    docs = [d["text"] for d in read_jsonl(REPO / "data" / "corpus" / "validation" / "japanese.jsonl")]
    tokens = sum(len(corpus_tokenizer(t, add_special_tokens=False)["input_ids"]) for t in docs)
    utf8_bytes = sum(len(t.encode("utf-8")) for t in docs)
    assert tokens < utf8_bytes / 2  # merges learned across CJK bytes, not one token per byte


def test_document_stream_ends_each_document(corpus_tokenizer):
    stream = encode_documents(corpus_tokenizer, ["one", "two"])
    assert stream.count(corpus_tokenizer.eos_token_id) == 2 and stream[-1] == corpus_tokenizer.eos_token_id


def test_bare_tokenizer_packs_the_same_ids_as_the_wrapped_one(corpus_tokenizer):
    """Ray Data packs training tokens with `tokenizers` alone (train/data.py); the stream must be the one the
    wrapped tokenizer (evaluation, the fast retrain, vLLM) makes of the same documents, padding and all."""
    from senmon.train.data import pack_tokens
    from senmon.train.tokenizer import bare_tokenizer

    texts = [d["text"] for d in read_jsonl(REPO / "data" / "corpus" / "validation" / "japanese.jsonl")][:20]
    texts += ["<|endoftext|> in a text", "", "tabs\tand  double  spaces\n"]
    tokenizer_json = corpus_tokenizer.backend_tokenizer.to_str()
    wrapped = encode_documents(corpus_tokenizer, texts)
    assert encode_documents(bare_tokenizer(tokenizer_json), texts) == wrapped
    packed = pack_tokens({"text": texts}, tokenizer_json, seq_len=16)["tokens"]
    assert packed.shape == (len(wrapped) // 16, 16) and packed.ravel().tolist() == wrapped[:packed.size]
