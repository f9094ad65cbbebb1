"""The living system: every long-lived part of senmon started and stopped as one.

`start_system(config)` brings up, in order: Ray and the Kafka connection (senmon/stack.py), the
dataset store (seeded from the shipped corpus when empty), the model registry, a first version
of every model that has none (the shared tokenizer, the generalist, each specialist), the Serve
applications (router plus one vLLM application per model), the retraining scheduler and the
Kafka ingest supervisor whose new-data signal goes to the scheduler. `System.stop()` takes down
what this call started, in reverse order, and leaves the durable state (datasets, checkpoints,
registry, run records) in the storage root. A start that fails stops what it had started and
raises `StartError`, whose message is one line: the step that failed and why (the CLI prints it
as it is, with no traceback). `senmon up`, `senmon demo` and the end-to-end test
all go through here.

The scheduler reaches the other parts through two hooks, both plain functions below, so that
each part can be used and tested on its own: `swap_on_promotion` (a promoted version goes live
through serve/swap.py) and `reset_new_data` (new documents count toward the next job).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from senmon.config import SenmonConfig

REGISTRY = "senmon-registry"
SCHEDULER = "senmon-scheduler"
INGEST = "senmon-ingest"
SWAP_HOOK = "senmon.system:swap_on_promotion"
ROUTER_HOOK = "senmon.system:retrain_router"
RESET_HOOK = "senmon.system:reset_new_data"

log = logging.getLogger(__name__)


class StartError(RuntimeError):
    """`start_system` failed; the message is one line (the step and why), the cause is chained."""


def one_line(error: BaseException, limit: int = 400) -> str:
    """An error as one line: an actor's or task's own error rather than Ray's wrapper, lines joined."""
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ray.exceptions.RayError) or not str(error).strip():
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def swap_on_promotion(config_data: dict, name: str, record: dict, registry_name: str = REGISTRY,
                      namespace: str | None = None) -> dict:
    """Scheduler hook: serve the newly promoted `record` of `name` (in place or blue/green, no failed request);
    a refused swap leaves the registry on the version that serves."""
    from senmon.actors.registry import get_registry
    from senmon.serve.router import as_config
    from senmon.serve.swap import swap_or_restore

    config = as_config(config_data)
    holder = f"run:{record['run_id']}"  # a restarted scheduler resumes this swap under the same guard
    return swap_or_restore(config, name, record, None, get_registry(registry_name, namespace), holder=holder)


def retrain_router(config_data: dict) -> dict:
    """Scheduler hook after a promotion: retrain the routing model on the data as it is now and
    have every router replica load it (the swap itself never waits for this)."""
    from senmon.ingest.store import DatasetStore
    from senmon.serve.router import as_config
    from senmon.serve.table import get_table
    from senmon.train.routing import train_router

    config = as_config(config_data)
    model = train_router(config, DatasetStore(config.storage_root))
    try:
        ray.get(get_table(config.serve.app_name, config.ray.namespace).bump_routing.remote(), timeout=30)
    except ValueError:  # nothing is serving: the next deploy loads the new model
        pass
    return {k: model.meta.get(k) for k in ("test_accuracy_documents", "test_accuracy_snippets_100")}


def reset_new_data(name: str) -> None:
    """Scheduler hook: a job for `name` starts; documents ingested from now on count toward the next."""
    from senmon.ingest.supervisor import get_ingest_supervisor

    supervisor = get_ingest_supervisor(INGEST)
    if supervisor is not None:
        ray.get(supervisor.reset_new_data.remote(name), timeout=30)


def model_names(config: SenmonConfig) -> list[str]:
    return [config.generalist.name] + [s.name for s in config.specialists]


def train_missing(config: SenmonConfig, registry, say: Callable[[str], None] = print,
                  registry_name: str = REGISTRY) -> dict[str, dict]:
    """Train and register a first version of every model that has none serving; returns the records.

    The jobs are the scheduler's own (`retrain_job`, one Ray task each), `training.startup_jobs` at a
    time: Ray Train pins each worker to `cpus_per_worker` threads, so one job alone leaves cores idle.
    In a terminal each job's training shows a progress bar here (senmon/progress.py).
    """
    from senmon.actors.scheduler import retrain_job
    from senmon.progress import Relay
    from senmon.train.job import tokenizer_json

    records = {name: ray.get(registry.current.remote(name)) for name in model_names(config)}
    missing = [name for name, record in records.items() if record is None]
    if not missing:
        merge_fallback(config, registry, records, say)
        return records
    tokenizer_json(config)  # shared by every job; trained once here rather than raced by each
    namespace = ray.get_runtime_context().namespace
    config_data = config.model_dump(mode="json")
    seed = config.generalist.name if config.training.specialists_from == "seed" else None
    queue, running, started = sorted(missing, key=lambda n: n != seed), {}, {}  # the seed first
    say(f"training {len(missing)} models on Ray Train, {min(len(missing), config.training.startup_jobs)} at a time: "
        + ", ".join(queue) + (f" (every specialist branches from {seed}, so it trains first, alone)"
                              if seed in missing else ""))
    with Relay() as relay:  # progress bars, when this process's stderr is a terminal
        say = relay.wrap(say)
        while queue or running:
            while queue and len(running) < config.training.startup_jobs and seed not in running.values():
                name = queue.pop(0)
                started[name] = time.monotonic()
                running[retrain_job.remote(config_data, name, registry_name, namespace, None, None,
                                          progress_board=relay.board)] = name
            [done], _ = ray.wait(list(running), num_returns=1)
            name = running.pop(done)
            try:
                record = ray.get(done)
            except ray.exceptions.RayError as error:
                for ref in running:
                    ray.cancel(ref, force=True)
                cause = error.cause if isinstance(error, ray.exceptions.RayTaskError) else error
                raise RuntimeError(f"training the first version of {name} failed: {cause}") from None
            metrics, sizing = record["metrics"], record["sizing"]
            say(f"  {name} v{record['version']}: {sizing.get('non_embedding_params', 0):,} non-embedding params, "
                f"{record['data']['tokens_seen']:,} tokens, val ppl {metrics['val_ppl']:.1f}, "
                f"{time.monotonic() - started[name]:.0f} s ({record['status']})")
            records[name] = record
    merge_fallback(config, registry, records, say)
    return records


def merge_fallback(config: SenmonConfig, registry, records: dict[str, dict], say: Callable[[str], None] = print) -> None:
    """With `generalist.fallback: merged`: make the generalist a merge of the serving specialists when one is due
    (train/merge.py `wanted_merge`), and put its record in `records` once it serves."""
    from senmon.train.merge import merge_and_register

    started = time.monotonic()
    record = merge_and_register(config, registry)
    if record is None:
        return
    merged = ", ".join(f"{name} v{version}" for name, version in record["data"]["merged_from"].items())
    seed = record["data"]["seed"]["version"]
    say(f"  {record['specialist']} v{record['version']}: the average of {merged} (the fallback; the seed, v{seed}, "
        f"stays the branch point), val ppl {record['metrics']['val_ppl']:.1f}, {time.monotonic() - started:.0f} s "
        f"({record['status']}{': ' + record['reason'] if record['status'] != 'serving' and record.get('reason') else ''})")
    if record["status"] == "serving":
        records[config.generalist.name] = record


@dataclass
class System:
    """What `start_system` brought up; `stop()` undoes it in reverse order."""

    config: SenmonConfig
    stack: Any = None
    registry: Any = None
    scheduler: Any = None
    ingest: Any = None
    served: Any = None
    serve_started: bool = False  # deploy was called: a failed deploy may have left Serve's controller and apps
    relay: Any = None  # progress bars of the scheduler's retrains (senmon/progress.py), when in a terminal
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str | None:
        return self.served.url if self.served is not None else None

    def stop(self) -> None:
        try:
            if self.ingest is not None:
                from senmon.ingest.supervisor import stop_ingest

                try:
                    stop_ingest(INGEST)
                except Exception:  # stopping must go on; the actors are killed below with Ray anyway
                    pass
                self.ingest = None
            if self.scheduler is not None:
                ray.kill(self.scheduler, no_restart=True)
                self.scheduler = None
            if self.relay is not None:
                self.relay.__exit__(None, None, None)
                self.relay = None
            if self.served is not None or self.serve_started:
                from senmon.serve.app import shutdown

                shutdown(self.config)
                self.served, self.serve_started = None, False
            if self.registry is not None:
                ray.kill(self.registry, no_restart=True)  # its file stays; the next start reads it back
                self.registry = None
        finally:  # the broker and Ray stop (and the stack's processes with them) even when a step above failed
            if self.stack is not None:
                self.stack.stop()
                self.stack = None

    def __enter__(self) -> "System":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_system(config: SenmonConfig, *, train: bool = True, serve: bool = True, ingest: bool = True,
                 schedule: bool = True, seed: bool = True, say: Callable[[str], None] = print) -> System:
    """Start every part (see the module docstring); on failure, stop what was started and raise
    `StartError` (one line: the step and why) from the error (KeyboardInterrupt and the like as they are)."""
    from senmon.actors.registry import get_or_create_registry
    from senmon.actors.scheduler import get_or_create_scheduler
    from senmon.ingest.store import DatasetStore
    from senmon.progress import Relay
    from senmon.stack import start_stack

    system = System(config)
    step = "starting Ray" + (" and Kafka" if ingest else "")
    try:
        t0 = time.monotonic()
        system.stack = start_stack(config, kafka=ingest)
        system.timings["stack_s"] = time.monotonic() - t0
        if seed:
            step = "seeding the dataset store"
            store = DatasetStore(config.storage_root)
            if not store.domains():
                counts = store.seed_from_corpus(config.corpus_dir, config.domains)
                say(f"dataset store seeded from {config.corpus_dir}: {sum(counts.values()):,} documents")
        step = "starting the model registry"
        system.registry = get_or_create_registry(config.storage_root, name=REGISTRY)
        if train:
            step = "training the first versions"
            t0 = time.monotonic()
            train_missing(config, system.registry, say)
            system.timings["train_s"] = time.monotonic() - t0
        if serve:
            from senmon.serve.app import deploy

            step = "starting Ray Serve (router and engines)"
            t0 = time.monotonic()
            say("starting the router and one vLLM engine per model on Ray Serve ...")
            system.serve_started = True
            system.served = deploy(config, system.registry)
            system.timings["serve_s"] = time.monotonic() - t0
            say(f"  serving on {system.served.url}: "
                + ", ".join(f"{m} v{v}" for m, v in sorted(system.served.models.items()))
                + f" ({system.timings['serve_s']:.0f} s)")
        if schedule:
            step = "starting the retraining scheduler"
            system.scheduler = get_or_create_scheduler(
                config, REGISTRY, swap_hook=SWAP_HOOK if serve else None, data_reset_hook=RESET_HOOK if ingest else None,
                router_hook=ROUTER_HOOK if serve else None, name=SCHEDULER)
            system.relay = Relay().__enter__()  # the retrains' bars in this terminal, for as long as it runs
            if system.relay.board is not None:
                ray.get(system.scheduler.show_progress.remote(system.relay.board))
        if ingest:
            from senmon.ingest.supervisor import start_ingest

            step = "starting the Kafka ingest"
            system.ingest = start_ingest(config, listener=SCHEDULER if schedule else None, name=INGEST)
            ray.get(system.ingest.status.remote(), timeout=60)
        return system
    except BaseException as error:
        try:
            system.stop()
        except Exception:  # the start's own error is the one to report
            log.exception("stopping what the failed start had started failed")
        if isinstance(error, Exception) and not isinstance(error, StartError):
            raise StartError(f"did not start: {step} failed: {one_line(error)} "
                             "(what it had started is stopped)") from error
        raise
