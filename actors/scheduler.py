"""The retraining scheduler: a named, detached Ray actor that keeps every specialist fresh.

Per specialist it starts a retraining job when the schedule comes due (an interval or a cron
expression from the config) or when ingest says enough new documents have arrived
(`data_ready`), or when asked (`trigger`). At most one job per specialist runs at a time and at
most `scheduler.max_concurrent_jobs` overall; a failed job is retried with backoff. Each job is
`train_and_register`: Ray Train fits the model, the registry records the version and its gate
decides. When the version is promoted, the scheduler calls the serving side's swap hook so only
that specialist's replicas move to it, then (in the background) the router hook, which retrains
the routing model on the data as it now is; a rejected version changes nothing.

How training leaves serving its share: Serve replicas reserve their CPUs / GPU fractions when
they are deployed, and Ray never takes reserved resources away; a job's Ray Train workers ask
only for `training.cpus_per_worker` (and a GPU when `training.use_gpu`) and the job itself for
none, so with `max_concurrent_jobs` the scheduler bounds what training can ever hold.

Every run is recorded in `{storage_root}/scheduler/runs.json` (written atomically): trigger,
start, end, the data snapshot it trained on, the outcome and version. A run is written as
'running' before its job starts, and its outcome once, when it ends.

A restarted scheduler (Ray restarts the actor) reads the file back, resumes its schedule at once
and settles each run left 'running'. Its job died with the old process (Ray kills the tasks a dead
process submitted), so the registry, asked by the run's id (the job registers its version under
it), says how far it got: a version registered but not gated is gated now; a gated version gives
the run its outcome, and a promoted one is handed to the swap hook again (a swap is idempotent, and
the serving table lets the same run take over the guard of a swap it was in the middle of); no
version means the job died before registering: the run is 'interrupted' and the same trigger runs
again (the new run names it in `retry_of`). So an outcome is recorded once, and never lost. Left
open: a trigger queued behind a running job (in memory only) is lost with the process, and a
registry call sent by the dying job could in principle land after the restarted scheduler looked.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import time

import ray

from senmon.config import SenmonConfig, parse_config
from senmon.metrics import record_training_run
from senmon.storage import filesystem, new_run_id, read_bytes, write_atomic

SCHEDULER_ACTOR = "senmon-scheduler"
log = logging.getLogger(__name__)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def next_due(schedule, after: float) -> float | None:
    """The next time (epoch seconds) `schedule` comes due after `after`; None without a schedule."""
    times = []
    if schedule.interval_seconds:
        times.append(after + schedule.interval_seconds)
    if schedule.cron:
        from croniter import croniter

        times.append(croniter(schedule.cron, after).get_next(float))
    return min(times) if times else None


def call_hook(path: str | None, *args):
    """Call `module:function` (the serving swap hook, the ingest reset hook) if one is configured."""
    if not path:
        return None
    module, _, function = path.partition(":")
    return getattr(importlib.import_module(module), function)(*args)


@ray.remote(num_cpus=0, max_retries=0)
def retrain_job(config_data: dict, name: str, registry_name: str, namespace: str | None, init: str | None,
                run_id: str | None, new_shards: list[str] | None = None, progress_board=None) -> dict:
    """One job: train, register, gate. Uses no CPU itself; its training task or workers reserve theirs.
    `new_shards` (the documents that triggered it) lets a continued version take the fast path;
    `progress_board` (senmon/progress.py) shows the training's progress bar in the driver's terminal."""
    from senmon.train.job import train_and_register

    config = parse_config(config_data, source="scheduler")
    registry = ray.get_actor(registry_name, namespace=namespace)
    return train_and_register(config, name, registry, init=init, run_id=run_id, new_shards=new_shards,
                              progress_board=progress_board)


@ray.remote(num_cpus=0, max_retries=0)
def run_hook(path: str, *args):
    return call_hook(path, *args)


class Scheduler:
    """Async actor: a loop checks schedules; jobs run as Ray tasks; every run is recorded."""

    async def __init__(self, config_data: dict, registry_name: str, namespace: str | None = None,
                       swap_hook: str | None = None, data_reset_hook: str | None = None,
                       router_hook: str | None = None):  # async: a restarted actor resumes with no call to wake it
        self.config: SenmonConfig = parse_config(config_data, source="scheduler")
        self.config_data = config_data
        self.registry_name, self.namespace = registry_name, namespace
        self.swap_hook, self.data_reset_hook, self.router_hook = swap_hook, data_reset_hook, router_hook
        if swap_hook:  # import the swap path now, not while a promoted version waits for it
            importlib.import_module(swap_hook.partition(":")[0])
            importlib.import_module("senmon.serve.swap")
        self.background: list = []  # routing-model retrains started after promotions (not awaited)
        self.fs, base = filesystem(self.config.storage_root)
        self.path = f"{base}/scheduler/runs.json"
        raw = read_bytes(self.fs, self.path)
        self.runs: list[dict] = json.loads(raw)["runs"] if raw else []
        unsettled = [run for run in self.runs if run["outcome"] == "running"]  # the scheduler died under them
        self.names = [s.name for s in self.config.specialists] + [self.config.generalist.name]
        self.schedules = {s.name: s.schedule for s in self.config.specialists}
        self.jobs: dict[str, asyncio.Task] = {}
        self.waiting: dict[str, dict] = {}  # specialist -> trigger that came while its job ran
        self.slots: asyncio.Semaphore | None = None
        self.due: dict[str, float | None] = {}
        self.loop: asyncio.Task | None = None
        self.progress_board = None  # a driver's progress relay (senmon/progress.py): its jobs draw bars there
        self._save()
        await self.start()
        self.recovery: asyncio.Task | None = (
            asyncio.get_running_loop().create_task(self._recover(unsettled)) if unsettled else None)

    # ----------------------------------------------------------------- control

    async def start(self) -> bool:
        """Start the schedule loop (idempotent)."""
        if self.loop is None or self.loop.done():
            self.slots = self.slots or asyncio.Semaphore(self.config.scheduler.max_concurrent_jobs)
            now = time.time()
            for name, schedule in self.schedules.items():
                last = max((r["started_ts"] for r in self.runs if r["specialist"] == name), default=now)
                self.due[name] = next_due(schedule, last)
            self.loop = asyncio.get_running_loop().create_task(self._check_schedules())
        return True

    async def show_progress(self, board) -> bool:
        """Draw the training bars of the jobs started from now on on `board`, a driver's `Relay` board (None: no
        bars). Not kept across a restart of this actor: a restarted scheduler's jobs run without bars."""
        self.progress_board = board
        return True

    async def data_ready(self, specialist: str, info: dict) -> str:
        """Ingest's signal: `specialist` has gathered enough new documents since its serving version."""
        return await self.trigger(specialist, "new data", info)

    async def trigger(self, specialist: str, reason: str = "manual", info: dict | None = None,
                      retry_of: str | None = None) -> str:
        """Start a job now, or once the running one ends (never two at once). Returns what happened.
        `retry_of`: the run id of an interrupted run this one does again (see `_recover`)."""
        if specialist not in self.names:
            raise ValueError(f"no specialist named {specialist!r}")
        await self.start()
        if specialist in self.jobs and not self.jobs[specialist].done():
            self.waiting[specialist] = {"trigger": reason, "info": info or {}, "retry_of": retry_of}
            return "queued behind the running job"
        self.jobs[specialist] = asyncio.get_running_loop().create_task(
            self._run(specialist, reason, info or {}, retry_of))
        return "started"

    async def wait_idle(self, timeout_s: float = 600) -> bool:
        """Wait until no job runs or waits (for tests and the demo)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.waiting and all(job.done() for job in self.jobs.values()) and \
                    (self.recovery is None or self.recovery.done()):
                return True
            await asyncio.sleep(0.2)
        return False

    # ----------------------------------------------------------------- reading

    async def history(self, specialist: str | None = None) -> list[dict]:
        return [r for r in self.runs if specialist in (None, r["specialist"])]

    async def status(self) -> dict:
        await self.start()  # a restarted actor resumes its schedule on the first call
        out = {}
        for name in self.names:
            runs = [r for r in self.runs if r["specialist"] == name]
            due = self.due.get(name)
            out[name] = {
                "running": name in self.jobs and not self.jobs[name].done(),
                "waiting": name in self.waiting,
                "last_run": runs[-1] if runs else None,
                "next_due": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(due)) if due else None,
            }
        return out

    async def ping(self) -> bool:
        return await self.start()

    # ----------------------------------------------------------------- work

    async def _check_schedules(self) -> None:
        while True:
            now = time.time()
            for name, due in list(self.due.items()):
                if due is not None and due <= now:
                    self.due[name] = next_due(self.schedules[name], now)
                    await self.trigger(name, "schedule")
            await asyncio.sleep(self.config.scheduler.check_interval_s)

    async def _run(self, name: str, reason: str, info: dict, retry_of: str | None = None) -> None:
        settings = self.config.scheduler
        async with self.slots:
            for attempt in range(settings.max_retries + 1):
                run = {"run_id": new_run_id(name),
                       "specialist": name, "trigger": reason, "attempt": attempt + 1, "started_at": _now(),
                       "started_ts": time.time(), "ended_at": None, "outcome": "running", "version": None,
                       "reason": None, "data": info, "swap": None}
                if retry_of:
                    run["retry_of"] = retry_of
                self.runs.append(run)
                self._save()  # durable as 'running' before the job starts: a restarted scheduler settles it
                try:
                    if self.data_reset_hook:  # new documents from now on count toward the next job
                        await run_hook.remote(self.data_reset_hook, name)
                    init = await self._init_for(name)
                    record = await retrain_job.remote(self.config_data, name, self.registry_name, self.namespace,
                                                      init, run["run_id"], info.get("shards"),
                                                      progress_board=self.progress_board)
                    await self._finish(run, record, info)
                    self._save()
                    record_training_run(name, reason, run["outcome"], time.time() - run["started_ts"])
                    break
                except Exception as error:  # recorded, then retried; the serving version is untouched
                    if self._failed(run, error):  # trained and registered; serving refused it: no retrain
                        log.warning("%s v%s was not served: %s", name, run["version"], run["reason"])
                        break
                    log.warning("retraining %s failed (attempt %d): %s", name, attempt + 1, run["reason"])
                    if attempt < settings.max_retries:
                        await asyncio.sleep(settings.retry_backoff_s * 2 ** attempt)
        follow_up = self.waiting.pop(name, None)
        if follow_up is not None:  # a trigger arrived while this job ran: its data is not in this version
            self.jobs[name] = asyncio.get_running_loop().create_task(self._run(name, follow_up["trigger"],
                                                                               follow_up["info"],
                                                                               follow_up.get("retry_of")))

    async def _finish(self, run: dict, record: dict, info: dict) -> None:
        """The run's outcome from its version's registry record; a promoted version goes live (swap hook)."""
        name = run["specialist"]
        run.update(outcome=record["status"], version=record["version"], reason=record["reason"],
                   val_ppl=record["metrics"].get("val_ppl"),
                   data={**info, "shards": record["data"].get("shards"),
                         "tokens_seen": record["data"].get("tokens_seen")})
        if record["status"] == "serving" and self.swap_hook:
            started = time.monotonic()
            # in this actor's own (warm) process, on a thread: a fresh task spent ~11 s starting
            # and importing Serve before an in-place swap of ~1 s (bench/results/freshness.json)
            run["swap"] = await asyncio.get_running_loop().run_in_executor(
                None, call_hook, self.swap_hook, self.config_data, name, record, self.registry_name,
                self.namespace)
            run["swap_s"] = time.monotonic() - started
        if record["status"] == "serving" and self.router_hook:  # the data changed: so may routing
            self.background = [r for r in self.background if not ray.wait([r], timeout=0)[0]]
            self.background.append(run_hook.remote(self.router_hook, self.config_data))
        run.update(ended_at=_now(), ended_ts=time.time())

    def _failed(self, run: dict, error: Exception) -> bool:
        """Record a run that failed; True when it failed because serving refused its version."""
        cause = getattr(error, "cause", None) or error
        refused = type(cause).__name__ in ("SwapError", "CheckpointRefused")
        run.update(outcome="swap_refused" if refused else "failed", ended_at=_now(),
                   reason=f"{type(cause).__name__}: {cause}")
        self._save()
        record_training_run(run["specialist"], run["trigger"], run["outcome"], time.time() - run["started_ts"])
        return refused

    async def _recover(self, runs: list[dict]) -> None:
        """Settle the runs the previous process left 'running' (see the module's docstring)."""
        for run in runs:
            name = run["specialist"]
            try:
                registry = ray.get_actor(self.registry_name, namespace=self.namespace)
                versions = (await registry.snapshot.remote()).get(name, [])
                record = next((r for r in versions if r["run_id"] == run["run_id"]), None)
            except Exception as error:  # the registry is gone: nothing to settle the run with
                run.update(outcome="interrupted", ended_at=_now(), reason="the scheduler restarted during the run; "
                           f"the registry could not say how far its job got ({type(error).__name__}: {error})")
                self._save()
                continue
            if record is None:  # the job died before it registered a version: do it again
                run.update(outcome="interrupted", ended_at=_now(),
                           reason="the scheduler restarted during the run, before its job registered a version")
                self._save()
                record_training_run(name, run["trigger"], run["outcome"], time.time() - run["started_ts"])
                if name in self.names:
                    await self.trigger(name, run["trigger"], run.get("data") or {}, retry_of=run["run_id"])
                continue
            run["settled"] = "after a scheduler restart, from the registry"
            try:
                if record["status"] == "candidate":  # the job died between registering and the gate
                    record = await registry.promote.remote(name, record["version"],
                                                           self.config.training.promotion_margin)
                await self._finish(run, record, run.get("data") or {})
                self._save()
                record_training_run(name, run["trigger"], run["outcome"], time.time() - run["started_ts"])
            except Exception as error:
                self._failed(run, error)
                log.warning("settling %s's run %s after a restart failed: %s", name, run["run_id"], run["reason"])

    async def _init_for(self, name: str) -> str | None:
        if self.config.scheduler.retrain_from == "scratch":
            return None
        registry = ray.get_actor(self.registry_name, namespace=self.namespace)
        return "current" if await registry.current.remote(name) is not None else None

    def _save(self) -> None:
        write_atomic(self.fs, self.path, json.dumps({"format": 1, "runs": self.runs}, indent=1,
                                                    ensure_ascii=False, default=str).encode("utf-8"))


def get_or_create_scheduler(config: SenmonConfig, registry_name: str, namespace: str | None = None,
                            swap_hook: str | None = None, data_reset_hook: str | None = None,
                            router_hook: str | None = None, name: str = SCHEDULER_ACTOR):
    """The named, detached scheduler actor (restarted by Ray after a crash), with its loop started."""
    actor = ray.remote(Scheduler).options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True, max_restarts=-1, num_cpus=0,
        max_task_retries=-1, max_concurrency=64,
    ).remote(config.model_dump(mode="json"), registry_name, namespace, swap_hook, data_reset_hook, router_hook)
    ray.get(actor.start.remote())
    return actor
