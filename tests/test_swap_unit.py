"""Pure logic of in-place swaps: reference comparison, version tags, the table's engine reports,
and which versions may swap in place. The swaps themselves run on real engines in test_serve.py."""

from __future__ import annotations

import json
import time

import pytest

from senmon.serve.engine import tag_version
from senmon.serve.router import engine_version
from senmon.serve.swap import in_place_blocker
from senmon.serve.table import LIVE_S, ServingTable
from senmon.train.reference import compare

REFERENCE = {"prompt_token_ids": [1, 2, 3, 4], "logprobs": [-1.0, -2.0, -3.0]}


def test_compare_accepts_within_tolerance_and_names_the_worst_token():
    assert compare(REFERENCE, [-1.001, -2.0, -2.999], 0.01) is None
    error = compare(REFERENCE, [-1.0, -2.5, -3.0], 0.01)
    assert "0.5000" in error and "token 2" in error
    assert "2 log-probabilities for a 4-token probe" == compare(REFERENCE, [-1.0, -2.0], 0.01)
    assert compare(REFERENCE, [-1.0, float("nan"), -3.0], 0.01) is not None  # NaN never matches


def test_version_tags_round_trip_objects_and_sse_packets():
    class Response:  # stands in for vLLM's response models (extra fields allowed)
        pass

    tagged = tag_version(Response(), 7)
    assert engine_version(tagged) == 7
    packets = tag_version(['data: {"id": "x", "choices": []}\n\n', 'data: {"id": "y"}\n\n'], 3)
    assert json.loads(packets[0][len("data: "):])["senmon_version"] == 3 and "senmon_version" not in packets[1]
    assert engine_version(packets[0]) == 3
    assert tag_version("data: [DONE]\n\n", 3) == "data: [DONE]\n\n" and engine_version("data: [DONE]") is None


def test_table_tells_each_engine_its_applications_weights_and_collects_reports():
    table = ServingTable()
    table.set("law", {"app": "s-law-v1", "version": 1, "path": "/m/1"})
    assert table.engine_poll("r1", "s-law-v1", {"version": 1, "refused": {}})["version"] == 1
    assert table.engine_poll("r9", "s-law-v7", {"version": 7, "refused": {}}) is None  # no model points there
    table.set("law", {"app": "s-law-v1", "version": 2, "path": "/m/2"})  # an in-place swap: same app
    assert table.engine_poll("r1", "s-law-v1", {"version": 1, "refused": {}})["path"] == "/m/2"
    table.engine_poll("r2", "s-law-v1", {"version": 2, "refused": {}})
    assert sorted(r["replica"] for r in table.engine_reports("s-law-v1")) == ["r1", "r2"]
    table.engines["r1"]["seen"] -= LIVE_S + 1  # a replica that stopped polling is not waited for
    assert [r["replica"] for r in table.engine_reports("s-law-v1")] == ["r2"]


def test_engine_wait_answers_at_once_with_news_and_otherwise_when_the_table_changes():
    """The engines' long poll: new weights (not loaded, not refused) are answered at once; otherwise the call
    waits until any change of the table or its timeout, and counts as a heartbeat either way."""
    import threading

    table = ServingTable()
    table.set("law", {"app": "s-law-v1", "version": 2, "path": "/m/2"})
    started = time.monotonic()
    assert table.engine_wait("r1", "s-law-v1", {"version": 1, "refused": {}}, 30)["version"] == 2  # news: at once
    assert time.monotonic() - started < 1

    timer = threading.Timer(0.3, table.set, ("law", {"app": "s-law-v1", "version": 3, "path": "/m/3"}))
    timer.start()
    started = time.monotonic()
    answer = table.engine_wait("r1", "s-law-v1", {"version": 2, "refused": {}}, 30)  # serves v2: nothing new yet
    waited = time.monotonic() - started
    timer.join()
    assert answer["version"] == 3 and 0.25 <= waited < 20, (answer, waited)  # woken by the change, not the 30 s

    started = time.monotonic()  # a version it refused is no news: wait out the timeout, then the entry as it is
    assert table.engine_wait("r1", "s-law-v1", {"version": 2, "refused": {"3": "probe mismatch"}}, 0.3)["version"] == 3
    assert 0.25 <= time.monotonic() - started < 20
    assert table.engine_wait("r9", "s-law-v7", {"version": 7, "refused": {}}, 0.05) is None  # no model points there
    assert sorted(r["replica"] for r in table.engine_reports("s-law-v1")) == ["r1"]  # each wait was a heartbeat


def _checkpoint(directory, hidden: int, tokenizer: str = "tok"):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"hidden_size": hidden, "_name_or_path": str(directory),
                                                       "transformers_version": "x"}))
    (directory / "tokenizer.json").write_text(tokenizer)
    return {"version": 1, "path": str(directory), "app": "a"}


def test_in_place_needs_same_shape_and_tokenizer(tmp_path):
    old = _checkpoint(tmp_path / "v1", 64)
    assert in_place_blocker(old, _checkpoint(tmp_path / "v2", 64)) is None  # only paths and versions differ
    assert in_place_blocker(old, _checkpoint(tmp_path / "v3", 96)) == "another architecture or size"
    assert in_place_blocker(old, _checkpoint(tmp_path / "v4", 64, "other")) == "another tokenizer"
    assert in_place_blocker(old, {"version": 5, "path": str(tmp_path / "missing")}) == "not a local checkpoint"


def test_fast_path_batches_mix_replay_and_see_every_new_block_before_repeating():
    import numpy as np

    from senmon.train.fast import mixed_batches

    new = np.arange(10 * 4).reshape(10, 4)          # block i starts with 4 * i
    old = 1000 + np.arange(20 * 4).reshape(20, 4)
    batches = mixed_batches(new, old, batch_size=4, replay_share=0.5, seed=0)
    first = [next(batches) for _ in range(5)]      # 10 new blocks, 2 per batch
    assert all(b.shape == (4, 4) for b in first)
    assert all(int((b[:, 0] >= 1000).sum()) == 2 for b in first)  # half of every batch is replay
    seen = sorted(int(v) // 4 for b in first for v in b[:, 0] if v < 1000)
    assert seen == list(range(10))                  # each new block once before any repeats
    only_new = next(mixed_batches(new, old[:0], batch_size=4, replay_share=0.5, seed=0))
    assert int((only_new[:, 0] >= 1000).sum()) == 0  # nothing to replay: all new


def test_a_weights_file_changed_after_training_is_named(tmp_path):
    from senmon.train.reference import check_checkpoint, load_reference, write_reference

    (tmp_path / "model.safetensors").write_bytes(b"weights v1")
    write_reference(tmp_path, REFERENCE)
    reference = load_reference(tmp_path)
    assert check_checkpoint(tmp_path, reference, 0.01) is None
    (tmp_path / "model.safetensors").write_bytes(b"weights v1, one tensor changed")
    assert check_checkpoint(tmp_path, reference, 0.01) == \
        "model.safetensors changed since training (sha256 differs from the reference's)"
