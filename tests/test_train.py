"""Training end to end on real parts: Ray Data, Ray Train, the registry actor, the gate, the CLI.

vLLM serving a checkpoint exactly as Ray Train saved it is covered by tests/test_system.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import yaml

from senmon.config import parse_config
from senmon.ingest.store import DatasetStore

REPO = Path(__file__).resolve().parents[1]
SMALL_TRAINING = {"vocab_size": 1024, "seq_len": 64, "batch_size": 8, "epochs": 1, "learning_rate": 0.003,
                  "num_workers": 1, "cpus_per_worker": 1, "use_gpu": False, "promotion_margin": 0.01}
pytestmark = pytest.mark.slow


def small_config_data(embedded_config_data: dict, storage: Path, **training) -> dict:
    data = dict(embedded_config_data, storage_root=str(storage), corpus_dir=str(REPO / "data" / "corpus"),
                routing_dir=str(REPO / "data" / "routing"))
    data["training"] = dict(SMALL_TRAINING, **training)
    return data


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    """The seed (the generalist) trained from scratch, then the law specialist branched from it, both
    registered and gated, shared by the tests below."""
    from senmon.actors.registry import get_or_create_registry
    from senmon.train.job import train_and_register

    embedded = yaml.safe_load((REPO / "configs" / "embedded.yaml").read_text(encoding="utf-8"))
    storage = tmp_path_factory.mktemp("train-storage")
    data = small_config_data(embedded, storage)
    data["specialists"] = [s for s in data["specialists"] if s["name"] in ("law", "japanese")]  # a smaller seed
    config = parse_config(data, source="test", base_dir=REPO / "configs")
    DatasetStore(config.storage_root).seed_from_corpus(config.corpus_dir, config.domains)
    registry = get_or_create_registry(config.storage_root, name=f"registry-{uuid.uuid4().hex[:8]}")
    seed = train_and_register(config, "generalist", registry)
    first = train_and_register(config, "law", registry)
    yield config, registry, first, seed
    ray.kill(registry)


def test_the_seed_takes_its_share_of_the_budget_and_is_sized_for_itself_and_a_branch(trained):
    config, _, _, seed = trained
    plan, sizing = seed["data"]["plan"], seed["sizing"]
    assert seed["status"] == "serving" and seed["data"]["start"] == "scratch"
    assert plan["total_steps"] == (seed["data"]["unique_tokens"] // config.training.seq_len // 8) * config.training.epochs
    assert seed["data"]["steps"] == plan["seed_steps"] == round(plan["total_steps"] * config.training.seed_fraction)
    assert plan["branch_steps"] == round((plan["total_steps"] - plan["seed_steps"]) / len(config.specialists))
    assert sizing["training_tokens"] == seed["data"]["tokens_seen"] == plan["seed_steps"] * 8 * config.training.seq_len
    assert sizing["target_params"] == int(plan["lifetime_tokens"] / 20)  # the rule, for the seed and one branch
    assert sizing["train_flops"] == pytest.approx(6 * sizing["total_params"] * sizing["training_tokens"])


def test_small_splits_pack_in_the_job_as_ray_data_packs_them(trained):
    """The training jobs above packed their tokens in-job (the shipped corpus is under
    `tokenize_in_job_below_mb`); Ray Data, the path for large splits, packs the same documents the same way,
    up to where its batches of documents end (each batch drops its last partial block)."""
    from senmon.train.data import split_bytes, token_blocks
    from senmon.train.job import tokenizer_json

    config = trained[0]
    store, tok = DatasetStore(config.storage_root), tokenizer_json(config)
    domains, seq_len = ["law", "japanese"], config.training.seq_len
    assert 0 < split_bytes(store, domains, "train") < config.training.tokenize_in_job_below_mb * 2**20
    in_job = token_blocks(store, domains, "train", tok, seq_len, in_job_below_mb=config.training.tokenize_in_job_below_mb)
    by_ray_data = token_blocks(store, domains, "train", tok, seq_len, in_job_below_mb=0)
    assert in_job.schema().names == by_ray_data.schema().names == ["tokens"]
    blocks = {name: np.concatenate([b["tokens"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")])
              for name, ds in (("in job", in_job), ("ray data", by_ray_data))}
    assert blocks["in job"].shape[1] == blocks["ray data"].shape[1] == seq_len
    n_in_job, n_ray = len(blocks["in job"]), len(blocks["ray data"])
    assert n_in_job == in_job.count() > 100 and abs(n_in_job - n_ray) <= 0.02 * n_in_job, (n_in_job, n_ray)
    counts = [np.bincount(b.ravel(), minlength=2048)[:2048] for b in blocks.values()]
    assert np.abs(counts[0] - counts[1]).sum() <= 0.02 * counts[0].sum()  # the same tokens, but for the cut ends


def test_a_specialist_branches_from_the_seed_and_beats_it_on_its_own_domain(trained):
    config, registry, first, seed = trained
    assert first["status"] == "serving" and first["version"] == 1
    checkpoint = Path(first["path"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "senmon_reference.json"):
        assert (checkpoint / name).exists(), name
    assert str(checkpoint).startswith(config.storage_root)  # Ray Train storage under the storage root
    assert first["data"]["start"] == "seed" and first["data"]["init_checkpoint"] == seed["path"]
    assert first["data"]["shards"]["law"] == ["seed.parquet"]
    sizing = first["sizing"]
    assert sizing["shape"] == {**seed["sizing"]["shape"], "model_type": "llama"}  # the seed's shape
    assert sizing["init"] == {"model": "generalist", "version": 1, "train_flops": seed["sizing"]["train_flops"]}
    assert first["data"]["steps"] == seed["data"]["plan"]["branch_steps"]
    assert first["data"]["schedule"]["peak_lr"] == config.training.learning_rate * config.training.branch.learning_rate_scale
    assert sizing["train_flops"] == pytest.approx(6 * sizing["total_params"] * first["data"]["tokens_seen"])
    assert first["metrics"]["val_ppl"] < seed["metrics"]["val_ppl_by_domain"]["law"]  # better than the fallback
    assert ray.get(registry.current.remote("law"))["version"] == 1


def test_specialisation_is_visible_in_validation_perplexity(trained):
    _, _, first, seed = trained
    by_domain = first["metrics"]["val_ppl_by_domain"]
    assert set(by_domain) == {"law", "japanese"}
    assert first["metrics"]["val_ppl"] == pytest.approx(by_domain["law"])
    # the branch gained on its own domain and lost on the others, relative to where it started
    gains = {d: by_domain[d] / seed["metrics"]["val_ppl_by_domain"][d] for d in by_domain}
    assert all(gains["law"] < gains[d] for d in by_domain if d != "law"), gains
    assert first["metrics"]["loss_curve"][-1] < first["metrics"]["loss_curve"][0]


def test_a_specialist_cannot_branch_before_the_seed_serves(trained, tmp_path):
    from senmon.actors.registry import get_or_create_registry
    from senmon.train.job import resolve_init

    config, _, _, _ = trained
    empty = get_or_create_registry(str(tmp_path / "empty"), name=f"registry-{uuid.uuid4().hex[:8]}")
    try:
        with pytest.raises(ValueError, match="branches from the seed, generalist, which has no serving version"):
            resolve_init(config, empty, "law", None)
        assert resolve_init(config, empty, "law", "scratch").kind == "scratch"
        assert resolve_init(config, empty, "generalist", None).kind == "scratch"
        with pytest.raises(ValueError, match="is the seed"):
            resolve_init(config, empty, "generalist", "seed")
    finally:
        ray.kill(empty)


def test_a_local_hugging_face_directory_continues_then_the_gate_rejects_then_force_and_rollback(trained, tmp_path):
    """`--init PATH`: a run continues any local Hugging Face directory in that directory's shape and with its
    tokenizer; under a strict margin the gate rejects it and the serving version stays; force, then rollback.
    (One training run for both: each costs about 30 s of Ray Train start-up here.)"""
    import torch  # noqa: F401
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    from senmon.train.job import tokenizer_json, train_and_register
    from senmon.train.sizing import Shape, llama_config
    from senmon.train.tokenizer import wrap

    config, registry, first, _ = trained
    tokenizer = wrap(Tokenizer.from_str(tokenizer_json(config)))
    shape = Shape(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=176)
    assert shape.hidden_size != first["sizing"]["shape"]["hidden_size"]  # the directory's shape, not law's
    mine = (tmp_path / "mine").resolve()
    LlamaForCausalLM(llama_config(shape, len(tokenizer), 64, tokenizer.eos_token_id, tokenizer.pad_token_id)
                     ).save_pretrained(mine)
    tokenizer.save_pretrained(mine)

    strict = parse_config(small_config_data(config.model_dump(), Path(config.storage_root), promotion_margin=0.9),
                          source="test")
    second = train_and_register(strict, "law", registry, init=str(mine))
    assert second["data"]["start"] == "directory" and second["data"]["init_checkpoint"] == str(mine)
    assert second["sizing"]["shape"]["hidden_size"] == 64 and second["sizing"]["rule"] == f"continued from {mine}"
    assert second["data"]["tokenizer"] == "from the initial checkpoint"
    assert second["status"] == "rejected"
    assert "does not beat" in second["reason"] and "v1" in second["reason"]
    assert ray.get(registry.current.remote("law"))["version"] == 1  # the serving version stays

    forced = ray.get(registry.promote.remote("law", second["version"], 0.9, force=True))
    assert forced["status"] == "serving"
    back = ray.get(registry.rollback.remote("law"))
    assert back["version"] == 1 and back["status"] == "serving"
    statuses = {r["version"]: r["status"] for r in ray.get(registry.history.remote("law"))}
    assert statuses == {1: "serving", 2: "rolled_back"}


def test_fast_path_continues_on_new_documents_with_replay(trained):
    """A data-triggered retrain (new shards named) continues the serving version in one task: the same
    shape and steps as the full path, new documents plus replay, its reference written, evaluated."""
    from senmon.train.job import train_and_register
    from senmon.train.reference import check_checkpoint, load_reference

    config, registry, _, seed = trained
    serving = ray.get(registry.current.remote("law"))
    store = DatasetStore(config.storage_root)
    base = [json.loads(line) for line in (REPO / "data" / "corpus" / "train" / "law.jsonl").read_text(
        encoding="utf-8").splitlines()[:60]]
    rows = [dict(doc, id=f"fast-{i}-{doc['id']}") for i, doc in enumerate(base)]
    shards = [p for p in store.write_shard(rows) if "/law/train/" in p]
    assert shards

    record = train_and_register(config, "law", registry, init="current", new_shards=shards)
    data = record["data"]
    assert data["path"] == "fast" and data["start"] == "current" and data["init_checkpoint"] == serving["path"]
    assert data["new_shards"] == [p.rsplit("/", 1)[-1] for p in shards] and data["new_blocks"] > 0
    assert data["replay_blocks"] > 0 and data["replay_share"] == config.scheduler.replay_share
    assert data["steps"] == seed["data"]["plan"]["branch_steps"]  # what the full path would have run
    assert record["sizing"]["shape"] == serving["sizing"]["shape"]  # same shape: the swap can happen in place
    assert set(record["metrics"]["val_ppl_by_domain"]) == {"law"}
    assert record["metrics"]["val_ppl"] < seed["metrics"]["val_ppl_by_domain"]["law"]  # still beats the fallback
    assert check_checkpoint(record["path"], load_reference(record["path"]), 1e-4) is None
    assert record["status"] in ("serving", "rejected")


def test_the_fallback_becomes_the_merge_of_the_serving_branches_and_the_seed_stays_their_branch_point(trained,
                                                                                                    monkeypatch):
    """`generalist.fallback: merged` (train/merge.py): the serving specialists' average is registered as the
    generalist's next version, with its own probe reference and validation perplexity on every domain, and passes
    the gate; branches and a continued generalist still start from the seed; no second merge of the same versions; a
    retrained seed is held to the seed and, once it passes, merged beside again. Every merge here starts in the same
    second, as two did once (the registry then took the second merge for a retry of the first: seed v1, not v5)."""
    from senmon.train.job import promote_seed, resolve_init
    from senmon.train.merge import merge_and_register, seed_record, wanted_merge
    from senmon.train.reference import check_checkpoint, load_reference

    monkeypatch.setattr("senmon.storage.time", SimpleNamespace(strftime=lambda *_: "20261128-063500"))
    config, registry, _, seed = trained
    assert config.generalist.fallback == "merged"  # the default
    # japanese serves the seed's own weights (a stand-in for a branch, which costs a training run under the suite's
    # load; tests/test_system.py merges real branches), whatever it served before
    branch = ray.get(registry.register.remote("japanese", "seed-copy", seed["path"], seed["metrics"], seed["sizing"],
                                              {"domains": ["japanese"], "start": "seed"}))
    ray.get(registry.promote.remote("japanese", branch["version"], 0.0, force=True))
    law = ray.get(registry.current.remote("law"))
    try:
        assert wanted_merge(config, registry) == {"law": law["version"], "japanese": branch["version"]}
        merged = merge_and_register(config, registry)
        assert merged["status"] == "serving" and merged["version"] > seed["version"]  # the configured fallback
        assert "generalist.fallback: merged" in merged["reason"] and f"{merged['metrics']['val_ppl']:.1f}" in merged["reason"]
        assert set(merged["metrics"]["val_ppl_by_domain"]) == {"law", "japanese"}
        assert merged["data"]["merged_from"] == {"law": law["version"], "japanese": branch["version"]}
        assert merged["data"]["seed"]["version"] == seed["version"] and merged["sizing"]["shape"] == seed["sizing"]["shape"]
        assert check_checkpoint(merged["path"], load_reference(merged["path"]), 1e-4) is None
        # each specialist still predicts its own domain better than the fallback does
        assert law["metrics"]["val_ppl"] < merged["metrics"]["val_ppl_by_domain"]["law"]

        assert seed_record(registry, config)["version"] == seed["version"]
        assert resolve_init(config, registry, "law", "seed").record["version"] == seed["version"]
        assert resolve_init(config, registry, "generalist", "current").record["version"] == seed["version"]
        assert wanted_merge(config, registry) is None and merge_and_register(config, registry) is None
        as_seed = parse_config(dict(config.model_dump(), generalist=dict(config.generalist.model_dump(), fallback="seed")),
                               source="test")
        assert wanted_merge(as_seed, registry) is None

        # a retrained seed while the merge serves (train_and_register's last step; stand-ins for the retrains): held to
        # the seed, not to the merge, and once it passes the specialists are merged again beside it
        def retrained_seed(val_ppl: float) -> dict:
            return ray.get(registry.register.remote("generalist", f"seed-retrain-{val_ppl:.1f}", seed["path"],
                                                    {**seed["metrics"], "val_ppl": val_ppl}, seed["sizing"],
                                                    {**seed["data"], "start": "current"}))

        worse = promote_seed(config, registry, retrained_seed(seed["metrics"]["val_ppl"] * 1.005), merged)
        assert worse["status"] == "rejected" and "the version it is held to" in worse["reason"]
        assert f"v{seed['version']} ({seed['metrics']['val_ppl']:.2f}" in worse["reason"]
        assert ray.get(registry.current.remote("generalist"))["version"] == merged["version"]  # the merge serves on
        # a merge that fails beside a seed that passed: the seed serves as the fallback (the next start merges again)
        def failing_merge(*_):
            raise OSError("a checkpoint could not be read")

        with pytest.MonkeyPatch.context() as patched:
            patched.setattr("senmon.train.job.merge_and_register", failing_merge)
            alone = promote_seed(config, registry, retrained_seed(seed["metrics"]["val_ppl"] * 0.95), merged)
        assert alone["status"] == "serving" and "OSError: a checkpoint could not be read" in alone["reason"]
        assert ray.get(registry.current.remote("generalist"))["version"] == alone["version"]
        better = retrained_seed(seed["metrics"]["val_ppl"] * 0.9)
        remerged = promote_seed(config, registry, better, merged)
        assert remerged["status"] == "serving" and remerged["data"]["merged_from"] == merged["data"]["merged_from"]
        assert remerged["data"]["seed"]["version"] == better["version"] and remerged["version"] > better["version"]
        assert remerged["reason"].startswith(f"seed v{better['version']}: val_ppl") and "merged again" in remerged["reason"]
        assert ray.get(registry.current.remote("generalist"))["version"] == remerged["version"]
        assert ray.get(registry.get.remote("generalist", better["version"]))["status"] == "retired"
        assert seed_record(registry, config)["version"] == better["version"]  # the new branch point
        assert resolve_init(config, registry, "law", "seed").record["version"] == better["version"]
    finally:
        ray.get(registry.rollback.remote("generalist", seed["version"]))  # the seed serves again
    assert ray.get(registry.current.remote("generalist"))["version"] == seed["version"]
    assert wanted_merge(config, registry) is None  # an operator's rollback stands until a specialist changes


def test_cli_train_and_eval_on_unseen_file(tmp_path, embedded_config_data, capsys):
    """`senmon train` and `senmon eval` as a user runs them (train starts its own Ray; eval needs none)."""
    from senmon.cli import main
    from senmon.serve.testing import small_corpus

    config_path = tmp_path / "config.yaml"
    data = small_config_data(embedded_config_data, tmp_path / "storage")
    data["specialists"] = [s for s in data["specialists"] if s["name"] in ("law", "literature")]  # less to tokenize
    # the commands, not the model: the first documents of each file, so the training from scratch is short
    data["corpus_dir"] = str(small_corpus(tmp_path / "corpus", {"train": 80, "validation": 5, "test": 5}))
    config_path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")

    def senmon(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "senmon.cli", "--config", str(config_path), *args],
                              capture_output=True, text=True, timeout=600, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))

    trained = senmon("train", "literature", "--init", "scratch")  # alone: no seed in this storage root
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-4000:]
    assert "literature v1: serving" in trained.stdout

    unseen = tmp_path / "unseen.jsonl"
    unseen.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in [
        {"text": "Fortune favours the bold, said the old sailor, and laughed at the storm.", "domain": "literature"},
        {"text": "A man walks into a bar and orders a glass of water; the barman smiles.", "domain": "literature"},
        {"text": "Subject to the terms of this License, each Contributor grants you a licence.", "domain": "law"},
    ]) + "\n", encoding="utf-8")
    evaluated = senmon("eval", str(unseen), "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    rows = {r["domain"]: r for r in json.loads(evaluated.stdout)}
    assert rows["literature"]["specialist"] == "literature" and rows["literature"]["specialist_ppl"] > 1
    assert rows["literature"]["documents"] == 2
    assert rows["law"]["specialist"] is None  # no law version and no generalist in this storage root

    capsys.readouterr()
    # the table through the same entry point in this process (a third process would load torch again: 10-30 s)
    assert main(["--config", str(config_path), "eval", str(unseen)]) == 0
    table = capsys.readouterr().out
    assert "literature" in table and "specialist ppl" in table

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "domain": "law"}\n{"domain": "law"}\n', encoding="utf-8")
    refused = senmon("eval", str(bad))
    assert refused.returncode == 2 and "bad.jsonl:2: needs a non-empty string 'text'" in refused.stderr
    assert "Traceback" not in refused.stderr
