"""train/merge.py's averaging on real checkpoints (tiny Llamas saved with `save_pretrained`); the merge as senmon
makes it (registry, gate, branch point) is tests/test_train.py's, and the demo's is tests/test_system.py's."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from senmon.train.merge import merge_weights


def tiny(path, hidden: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    model.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_merge_is_the_average_of_the_parameters(tmp_path):
    a, b, c = (tiny(tmp_path / name, seed=i) for i, name in enumerate("abc"))
    merged = merge_weights([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")]).state_dict()
    assert set(merged) == set(a)
    for key in a:
        assert torch.allclose(merged[key], (a[key] + b[key] + c[key]) / 3, atol=1e-6), key
    weighted = merge_weights([str(tmp_path / "a"), str(tmp_path / "b")], [0.25, 0.75]).state_dict()
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(weighted[key], 0.25 * a[key] + 0.75 * b[key], atol=1e-6)
    assert not torch.allclose(a[key], b[key])  # the models differ, so the average is a new model


def test_models_of_different_shapes_are_refused(tmp_path):
    tiny(tmp_path / "small", hidden=16)
    tiny(tmp_path / "large", hidden=32)
    with pytest.raises(ValueError, match="one shape"):
        merge_weights([str(tmp_path / "small"), str(tmp_path / "large")])
