"""Training end to end on real parts: Ray Data, Ray Train, the registry actor, the gate, the CLI.

vLLM serving a checkpoint exactly as Ray Train saved it is covered by tests/test_system.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

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
    data = dict(embedded_config_data, storage_root=str(storage), corpus_dir=str(REPO / "data" / "corpus"))
    data["training"] = dict(SMALL_TRAINING, **training)
    return data


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    """The law specialist trained once from scratch, registered and gated, shared by the tests below."""
    from senmon.actors.registry import get_or_create_registry
    from senmon.train.job import train_and_register

    embedded = yaml.safe_load((REPO / "configs" / "embedded.yaml").read_text(encoding="utf-8"))
    storage = tmp_path_factory.mktemp("train-storage")
    config = parse_config(small_config_data(embedded, storage), source="test", base_dir=REPO / "configs")
    DatasetStore(config.storage_root).seed_from_corpus(config.corpus_dir, config.domains)
    registry = get_or_create_registry(config.storage_root, name=f"registry-{uuid.uuid4().hex[:8]}")
    first = train_and_register(config, "law", registry)
    yield config, registry, first
    ray.kill(registry)


def test_first_version_is_served_with_its_record(trained):
    config, registry, first = trained
    assert first["status"] == "serving" and first["version"] == 1
    checkpoint = Path(first["path"])
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (checkpoint / name).exists(), name
    assert str(checkpoint).startswith(config.storage_root)  # Ray Train storage under the storage root
    sizing = first["sizing"]
    assert sizing["training_tokens"] == first["data"]["tokens_seen"]
    assert sizing["target_params"] == int(sizing["training_tokens"] / 20)
    assert first["data"]["shards"]["law"] == ["seed.parquet"]
    assert ray.get(registry.current.remote("law"))["version"] == 1


def test_specialisation_is_visible_in_validation_perplexity(trained):
    _, _, first = trained
    by_domain = first["metrics"]["val_ppl_by_domain"]
    assert set(by_domain) == {"law", "code", "dictionary", "literature", "japanese"}
    assert first["metrics"]["val_ppl"] == pytest.approx(by_domain["law"])
    assert all(by_domain["law"] < by_domain[d] for d in by_domain if d != "law"), by_domain
    assert first["metrics"]["loss_curve"][-1] < first["metrics"]["loss_curve"][0]


def test_continue_then_gate_rejects_then_force_and_rollback(trained):
    from senmon.train.job import train_and_register

    config, registry, first = trained
    strict = parse_config(small_config_data(config.model_dump(), Path(config.storage_root), promotion_margin=0.9),
                          source="test")
    second = train_and_register(strict, "law", registry, init="current")
    assert second["data"]["init_checkpoint"] == first["path"]
    assert second["status"] == "rejected"
    assert "does not beat" in second["reason"] and "v1" in second["reason"]
    assert ray.get(registry.current.remote("law"))["version"] == 1  # the serving version stays

    forced = ray.get(registry.promote.remote("law", second["version"], 0.9, force=True))
    assert forced["status"] == "serving"
    back = ray.get(registry.rollback.remote("law"))
    assert back["version"] == 1 and back["status"] == "serving"
    statuses = {r["version"]: r["status"] for r in ray.get(registry.history.remote("law"))}
    assert statuses == {1: "serving", 2: "rolled_back"}


def test_start_from_a_local_hugging_face_directory(trained, tmp_path):
    import torch  # noqa: F401
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    from senmon.train.job import tokenizer_json, train_and_register
    from senmon.train.sizing import Shape, llama_config
    from senmon.train.tokenizer import wrap

    config, registry, _ = trained
    tokenizer = wrap(Tokenizer.from_str(tokenizer_json(config)))
    shape = Shape(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=176)
    LlamaForCausalLM(llama_config(shape, len(tokenizer), 64, tokenizer.eos_token_id, tokenizer.pad_token_id)
                     ).save_pretrained(tmp_path / "mine")
    tokenizer.save_pretrained(tmp_path / "mine")

    record = train_and_register(config, "japanese", registry, init=str(tmp_path / "mine"))
    assert record["status"] == "serving"
    assert record["sizing"]["shape"]["hidden_size"] == 64 and record["sizing"]["rule"].startswith("continued")
    assert record["data"]["tokenizer"] == "from the initial checkpoint"


def test_cli_train_history_and_eval_on_unseen_file(tmp_path, embedded_config_data):
    """`senmon train`, `senmon history` and `senmon eval` as a user runs them (each starts its own Ray)."""
    config_path = tmp_path / "config.yaml"
    data = small_config_data(embedded_config_data, tmp_path / "storage")
    data["specialists"] = [s for s in data["specialists"] if s["name"] in ("law", "literature")]  # less to tokenize
    config_path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")

    def senmon(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "senmon.cli", "--config", str(config_path), *args],
                              capture_output=True, text=True, timeout=600, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))

    trained = senmon("train", "literature")
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

    table = senmon("eval", str(unseen))
    assert table.returncode == 0 and "literature" in table.stdout and "specialist ppl" in table.stdout

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "domain": "law"}\n{"domain": "law"}\n', encoding="utf-8")
    refused = senmon("eval", str(bad))
    assert refused.returncode == 2 and "bad.jsonl:2: needs a non-empty string 'text'" in refused.stderr
    assert "Traceback" not in refused.stderr
