"""senmon's one configuration file: a YAML document validated with pydantic.

It declares the specialists (what data feeds each, its size bounds, its GPU share, its
retraining schedule), the Kafka connection, the storage root, the Ray address and the HTTP
front door. Every other module receives a `SenmonConfig` and reads its part; nothing else
parses YAML or environment variables for settings.

Relative paths in the file are resolved against the directory holding the file, so a config
works the same from any working directory. Secrets (SASL password, API keys) may be given
by the name of an environment variable instead of inline.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "embedded.yaml"
NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
NO_DOMAIN = "none"  # the label of text of no specialist's domain (the routing model's class, the benchmarks' sources)


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and the bad keys."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- storage


def is_uri(path: str) -> bool:
    """True for `scheme://...` locations (s3://, gs://, abfs://...) that pyarrow/Ray resolve."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", path) is not None


# --------------------------------------------------------------------------- ray


class RayConfig(_Strict):
    address: str | None = Field(
        None, description="None starts a local Ray instance; 'auto' or 'ray://host:10001' joins a cluster."
    )
    num_cpus: int | None = Field(
        8, ge=1, description="Logical CPUs of a local instance (more than the cores, so Serve and Train both fit)."
    )
    namespace: str = "senmon"
    log_to_driver: bool = Field(
        False, description="Print every actor's and replica's log lines in the driver (they are always in "
                           "the Ray session's logs directory)."
    )


# --------------------------------------------------------------------------- kafka


class TopicsConfig(_Strict):
    documents: str = "senmon.documents"
    dead_letter: str = "senmon.dead-letter"
    partitions: int = Field(3, ge=1)
    replication_factor: int = Field(1, ge=1)


class KafkaConfig(_Strict):
    bootstrap_servers: list[str] = Field(default_factory=lambda: ["127.0.0.1:19092"], min_length=1)
    embedded: bool = Field(
        True, description="Start the embedded Kafka-protocol broker (Tansu) on loopback for local runs."
    )
    embedded_storage: Literal["durable", "memory"] = Field(
        "durable", description="The embedded broker's storage. durable: topics, messages and committed offsets "
                               "are files under {storage_root}/broker and survive a restart of the broker; "
                               "memory: gone when it stops (faster; for throwaway runs).")
    topics: TopicsConfig = TopicsConfig()
    client_id: str = "senmon"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    sasl_password_env: str | None = Field(None, description="Name of an environment variable holding the password.")
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port(cls, servers: list[str]) -> list[str]:
        for server in servers:
            if not re.match(r"^[^\s:]+:\d{1,5}$", server):
                raise ValueError(f"{server!r} is not host:port")
        return servers

    @model_validator(mode="after")
    def _embedded_is_loopback(self) -> "KafkaConfig":
        if self.embedded:
            hosts = {s.rsplit(":", 1)[0] for s in self.bootstrap_servers}
            if len(self.bootstrap_servers) != 1 or not hosts <= {"127.0.0.1", "localhost"}:
                raise ValueError("the embedded broker listens on one loopback address (127.0.0.1:PORT)")
            if self.security_protocol != "PLAINTEXT":
                raise ValueError("the embedded broker speaks PLAINTEXT only")
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism")
        return self

    def client_kwargs(self) -> dict:
        """Connection settings for any kafka-python client (producer, consumer, admin)."""
        kwargs: dict = {"bootstrap_servers": list(self.bootstrap_servers), "client_id": self.client_id,
                        "security_protocol": self.security_protocol}
        if self.sasl_mechanism:
            password = self.sasl_password
            if password is None and self.sasl_password_env:
                password = os.environ.get(self.sasl_password_env)
                if password is None:
                    raise ConfigError(f"kafka.sasl_password_env: environment variable {self.sasl_password_env} is not set")
            kwargs.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                          sasl_plain_password=password)
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, key):
                kwargs[key] = getattr(self, key)
        return kwargs

    @property
    def port(self) -> int:
        return int(self.bootstrap_servers[0].rsplit(":", 1)[1])


# --------------------------------------------------------------------------- ingest


class IngestConfig(_Strict):
    """The Kafka ingest bridge: how many actors read the documents topic, batch limits, retries."""

    actors: int = Field(1, ge=1, description="Ingest actors; the topic's partitions are spread over them.")
    group_id: str = Field("senmon-ingest", min_length=1,
                          description="Consumer group whose committed offsets record progress (no group join).")
    max_document_bytes: int = Field(1_000_000, ge=64, description="Larger messages go to the dead-letter topic.")
    max_poll_records: int = Field(2000, ge=1, description="Records taken from the consumer per poll.")
    batch_max_documents: int = Field(20_000, ge=1, description="A batch is written once it holds this many messages...")
    batch_max_bytes: int = Field(32 * 2**20, ge=1024, description="...or this many bytes of message values...")
    flush_interval_s: float = Field(2.0, gt=0, description="...or when its oldest message is this old.")
    retry_backoff_s: float = Field(0.5, gt=0, description="First wait after a Kafka or storage error; doubles each time.")
    retry_backoff_max_s: float = Field(10.0, gt=0)
    check_interval_s: float = Field(1.0, gt=0, description="How often the supervisor checks its actors and counts.")
    actor_num_cpus: float = Field(0.0, ge=0, description="Logical CPUs reserved per ingest actor.")


# --------------------------------------------------------------------------- http


class RateLimitConfig(_Strict):
    """Per-key rate limit on `/v1/*` (serve/ratelimit.py): a token bucket per API key, or per client
    host when no API key is configured. Kept by each router replica on its own: with N router
    replicas a caller may get up to N times this. `/admin/*` and `/health` are not limited."""

    requests_per_minute: int | None = Field(
        None, ge=1, description="Sustained requests per minute per key; None: no limit. Over it: 429 with Retry-After.")
    burst: int | None = Field(
        None, ge=1, description="Bucket size: requests a key may send at once after being idle; "
                                "None: requests_per_minute (a whole minute's worth).")

    @model_validator(mode="after")
    def _burst_needs_a_rate(self) -> "RateLimitConfig":
        if self.burst is not None and self.requests_per_minute is None:
            raise ValueError("burst has no effect without requests_per_minute: set both, or neither for no limit")
        return self


class HttpConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    api_keys_env: str | None = Field("SENMON_API_KEYS", description="Comma-separated keys from this variable are added.")
    admin_keys: list[str] = Field(default_factory=list)
    admin_keys_env: str | None = "SENMON_ADMIN_KEYS"
    max_request_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body the router reads; larger gets 413, decided from "
                                        "Content-Length before reading, or while reading a chunked body.")
    max_json_depth: int = Field(64, ge=4, le=1000, description="Deepest JSON nesting accepted; deeper gets 400.")
    rate_limit: RateLimitConfig = RateLimitConfig()

    def resolved_keys(self) -> tuple[list[str], list[str]]:
        """(api keys, admin keys), from the file and the environment."""

        def from_env(name: str | None) -> list[str]:
            raw = os.environ.get(name, "") if name else ""
            return [k.strip() for k in raw.split(",") if k.strip()]

        return self.api_keys + from_env(self.api_keys_env), self.admin_keys + from_env(self.admin_keys_env)


# --------------------------------------------------------------------------- models


class SizeConfig(_Strict):
    """Bounds for compute-optimal sizing (non-embedding parameters), and an optional fixed shape."""

    min_params: int = Field(20_000, ge=1_000)
    max_params: int = Field(50_000_000, ge=1_000)
    tokens_per_parameter: float = Field(20.0, gt=0, description="Chinchilla / Cerebras-GPT: about 20.")
    override: dict[str, int] | None = Field(
        None, description="Fixed Llama shape, e.g. {hidden_size: 128, num_hidden_layers: 2, num_attention_heads: 4}."
    )

    @model_validator(mode="after")
    def _ordered(self) -> "SizeConfig":
        if self.min_params > self.max_params:
            raise ValueError(f"min_params ({self.min_params}) is larger than max_params ({self.max_params})")
        return self


class ServingConfig(_Strict):
    num_gpus: float = Field(0.0, ge=0, le=8, description="GPU share per replica, e.g. 0.25 packs four on a GPU.")
    gpu_memory_utilization: float = Field(0.15, gt=0, le=0.95)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    max_model_len: int | None = Field(
        None, ge=16, description="Context served; None: training.seq_len, the context the models are trained for.")

    @model_validator(mode="after")
    def _fits(self) -> "ServingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas is larger than max_replicas")
        if 0 < self.num_gpus < 1 and self.gpu_memory_utilization > self.num_gpus:
            raise ValueError(
                f"gpu_memory_utilization ({self.gpu_memory_utilization}) exceeds the replica's GPU share ({self.num_gpus})"
            )
        return self


_DURATION = re.compile(r"^(\d+)([smhd])$")


class ScheduleConfig(_Strict):
    interval: str | None = Field(None, description="e.g. '30m', '6h', '1d'.")
    cron: str | None = Field(None, description="five-field cron expression, e.g. '0 3 * * *'.")
    min_new_documents: int = Field(200, ge=1, description="Ingested documents that trigger a retrain.")

    @field_validator("interval")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None and not _DURATION.match(value):
            raise ValueError(f"{value!r} is not a duration like '30m', '6h' or '1d'")
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        from croniter import croniter

        if value is not None and (len(value.split()) != 5 or not croniter.is_valid(value)):
            raise ValueError(f"{value!r} is not a five-field cron expression")
        return value

    @property
    def interval_seconds(self) -> int | None:
        if self.interval is None:
            return None
        number, unit = _DURATION.match(self.interval).groups()
        return int(number) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


class SpecialistConfig(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = Field(min_length=1)
    domains: list[str] = Field(min_length=1, description="Corpus domains whose documents train this specialist.")
    size: SizeConfig = SizeConfig()
    serving: ServingConfig = ServingConfig()
    schedule: ScheduleConfig = ScheduleConfig()


class GeneralistConfig(_Strict):
    name: str = Field("generalist", pattern=NAME_PATTERN)
    size: SizeConfig = SizeConfig()
    serving: ServingConfig = ServingConfig()
    fallback: Literal["merged", "seed"] = Field(
        "merged", description="What the generalist serves, the model `auto` falls back to: 'merged', the average of "
                              "the specialists' parameters (Branch-Train-Merge; made when senmon starts, see "
                              "train/merge.py), or 'seed', the model every specialist branched from. 'merged' "
                              "needs training.specialists_from: seed (specialists from scratch leave the seed "
                              "serving).")


class BranchConfig(_Strict):
    """How a specialist is trained after branching from the seed (see train/branch.py)."""

    learning_rate_scale: float = Field(1.0, gt=0, le=2, description="Branch peak learning rate / the seed's.")
    warmup_fraction: float = Field(0.0, ge=0, lt=1, description="Re-warm-up, as a share of the branch's steps "
                                                                 "(0: start at the peak, where a constant seed left off).")


class TrainingConfig(_Strict):
    vocab_size: int = Field(4096, ge=256)
    seq_len: int = Field(256, ge=16)
    batch_size: int = Field(16, ge=1)
    epochs: int = Field(1, ge=1, le=100, description=(
        "The training budget in passes over the data: the generalist (the seed) and its branches share epochs x the "
        "pooled unique tokens; a specialist trained from scratch sees epochs x its own."))
    learning_rate: float = Field(3e-3, gt=0)
    specialists_from: Literal["seed", "scratch"] = Field(
        "seed", description="'seed': each specialist branches from the generalist, trained first on every domain "
                            "(Branch-Train); 'scratch': each is trained alone on its own domain, sized by D/20.")
    seed_fraction: float = Field(
        0.75, gt=0, lt=1, description="Share of the budget (epochs over the pooled data) the seed takes; the "
                                      "specialists' branches share the rest.")
    seed_schedule: Literal["cosine", "constant"] = Field(
        "constant", description="The seed's learning rate after warmup: cosine decay, or constant (warmup-stable-decay: "
                              "each branch then does the decay on its own domain).")
    branch: BranchConfig = BranchConfig()
    seed: int = 0
    num_workers: int = Field(1, ge=1, description="Ray Train workers per job.")
    cpus_per_worker: int = Field(1, ge=1)
    use_gpu: bool = False
    startup_jobs: int = Field(
        2, ge=1, description="First versions trained at once when the system starts (nothing is served yet; each "
                             "job's worker uses cpus_per_worker threads). Later retraining: scheduler.max_concurrent_jobs.")
    promotion_margin: float = Field(0.01, ge=0, description="Relative validation-perplexity gain needed to promote.")
    tokenize_in_job_below_mb: float = Field(
        64.0, ge=0, description="A training split whose shards are smaller than this is tokenized inside the training "
                                "job and handed to Ray Train as a Ray dataset; a larger one by Ray Data across the "
                                "cluster (train/data.py). 0: always Ray Data.")


class ServeConfig(_Strict):
    """The query path: router behaviour, timeouts and engine settings shared by every specialist."""

    app_name: str = Field("senmon", pattern=NAME_PATTERN,
                          description="Serve application of the router; specialists run as '<app_name>-<model>-v<N>'.")
    confidence_threshold: float = Field(
        0.5, ge=0, le=1, description="With model 'auto', a best score below this goes to the generalist.")
    second_opinion: bool = Field(
        True, description="With model 'auto', when the routing model is less sure than `second_opinion_below`, "
                          "the serving models' own likelihood of the prompt decides (serve/likelihood.py): the "
                          "specialist that explains it best, if it beats the generalist by `likelihood_margin`.")
    second_opinion_below: float = Field(
        0.7, ge=0, le=1.01, description="Routing-model confidence below which the likelihood second opinion decides "
                                     "(chosen on validation text by bench/routing.py).")
    none_threshold: float = Field(
        0.3, ge=0, le=1.01, description="With model 'auto', a prompt the routing model gives at least this probability "
                                         "of belonging to no specialist's domain (its `none` class, trained on "
                                         "routing_dir's text of no domain) goes to the generalist; above 1: never "
                                         "(chosen on validation text by bench/routing.py).")
    likelihood_margin: float = Field(
        0.0, description="Nats per token by which the best specialist must explain a prompt better than the "
                         "generalist to answer it (chosen on validation text by bench/routing.py).")
    likelihood_tokens: int = Field(
        32, ge=8, le=4096, description="Prompt tokens the second opinion scores (its cost grows with them; "
                                       "bench/routing.py measures answer quality at 16-64).")
    likelihood_threads: int = Field(
        1, ge=1, le=64, description="Torch threads of the second opinion's forward pass in each router replica "
                                    "(a replica holds half a CPU; bench/routing.py measures latency at this and 2).")
    quality_aware: bool = Field(
        True, description="With model 'auto', send a request to a specialist only when its serving version's "
                          "validation perplexity on its own domains beats the generalist's serving version there.")
    request_timeout_s: float = Field(120.0, gt=0, description="Longest a request may wait for its engine.")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent with 503 when a model has no healthy replica.")
    default_max_tokens: int | None = Field(
        None, ge=1, description="max_tokens applied when a request sets none (None: up to the context length).")
    chat_template: str | None = Field(
        None, description="Jinja chat template for models whose tokenizer has none (None: messages joined by lines).")
    cpu_kv_cache_mib: int = Field(
        1024, ge=16, description="KV cache per engine on CPU hosts (vLLM's kv_cache_memory_bytes; a "
                                 "VLLM_CPU_KVCACHE_SPACE in the environment, in GiB, overrides it as vLLM does).")
    cpus_per_engine: float = Field(1.0, gt=0, description="Logical CPUs reserved per engine replica.")
    router_replicas: int = Field(1, ge=1)
    drain_timeout_s: float = Field(60.0, gt=0, description="Longest a swap waits for the old version's requests.")
    in_place_swap: bool = Field(
        True, description="Swap a same-architecture version by reloading weights inside the running engines "
                          "(verified); off: always start the new version beside the old (blue/green).")
    reference_tolerance: float = Field(
        0.02, gt=0, description="Largest difference in a probe prompt's log-probabilities between an engine and "
                                "the training job's reference for the weights to count as loaded (float32 here; "
                                "raise it for bf16/fp16 engines).")
    engine_poll_s: float = Field(
        1.0, gt=0, le=2.0, description="An engine replica long-polls the serving table for new weights: the table "
                                       "answers at once when there are some, else after this long, the replica's "
                                       "heartbeat (at most 2 s: the table takes a replica silent for 3 s for gone).")
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy", description="Ray Serve's HTTP front door. 'proxy': Serve's Python proxy actor. 'haproxy': Ray's "
                             "HAProxy ingress, which forwards to the router replica's own HTTP server (router over "
                             "HTTP 0.75-0.89x the engine's own tokens/s at concurrency 32 on a 2-core host, against "
                             "0.52-0.60; docs/serving.md). Ray reads it when it starts, so on clusters only: the "
                             "nodes' `ray start` runs in the environment `senmon ray-env` prints (cluster.yaml's "
                             "commands do). HAProxy serves its stats and metrics pages on the two ports below, on "
                             "every interface.")
    haproxy_stats_port: int = Field(8404, ge=1, le=65535, description="HAProxy's stats page (ingress: haproxy).")
    haproxy_metrics_port: int = Field(9101, ge=1, le=65535, description="HAProxy's metrics (ingress: haproxy).")
    haproxy_drain_s: float = Field(
        5.0, ge=0, description="With ingress: haproxy, how long a stopping router replica keeps taking requests "
                               "before it drains (Ray's RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S, 30 s by "
                               "default, a window for load balancers that target replicas; here HAProxy on the node "
                               "is told within a second and retries a refused connection). It is the floor of every "
                               "Serve shutdown: 30 s made `senmon down` take about 35 s.")


class SchedulerConfig(_Strict):
    """Scheduled and data-triggered retraining: how many jobs at once, retries, how to start."""

    max_concurrent_jobs: int = Field(
        1, ge=1, description="Training jobs at once across all specialists; bounds what training takes from serving.")
    max_retries: int = Field(2, ge=0, description="Further attempts after a failed job.")
    retry_backoff_s: float = Field(30.0, ge=0, description="Wait before the first retry; doubles each time.")
    check_interval_s: float = Field(2.0, gt=0, description="How often due schedules are checked.")
    retrain_from: Literal["current", "scratch"] = Field(
        "current", description="'current' continues the serving version (same shape); 'scratch' re-sizes by D/20.")
    retrain_path: Literal["fast", "full"] = Field(
        "fast", description="A data-triggered retrain that continues the serving version: 'fast' runs in one Ray "
                            "task on the new documents plus a replay sample (train/fast.py); 'full' runs Ray Data "
                            "and Ray Train over all the specialist's data as a first training does.")
    replay_share: float = Field(
        0.5, ge=0, lt=1, description="Fast path: share of each batch drawn from the specialist's older documents.")


# --------------------------------------------------------------------------- root


ROUTER_REPLICA_CPUS = 0.5
TRAINING_DATA_CPUS = 2  # a job's Ray Data stage on a large split: a read task and a packing task at once


def logical_cpus_needed(config: "SenmonConfig") -> dict[str, float]:
    """Logical CPUs reserved at the busiest moment while serving: every model's engines, one more
    engine during a blue/green swap, the router, the ingest actors and the concurrent retraining jobs."""
    models = [config.generalist.serving] + [s.serving for s in config.specialists]
    per_engine = [1.0 if m.num_gpus > 0 else config.serve.cpus_per_engine for m in models]  # as their bundles
    per_job = max(TRAINING_DATA_CPUS, config.training.num_workers * config.training.cpus_per_worker)
    needed = {
        "engines": sum(max(1, m.min_replicas) * cpus for m, cpus in zip(models, per_engine)),
        "swap": max(per_engine),
        "router": config.serve.router_replicas * ROUTER_REPLICA_CPUS,
        "ingest": config.ingest.actors * config.ingest.actor_num_cpus,
        "training": config.scheduler.max_concurrent_jobs * per_job,
    }
    needed["total"] = sum(needed.values())
    return needed


class SenmonConfig(_Strict):
    name: str = "senmon"
    storage_root: str = Field(description="Local directory or object-store URI (s3://...) for datasets and models.")
    corpus_dir: str = Field(description="The prepared JSONL corpus (train/validation/test per domain).")
    routing_dir: str | None = Field(
        None, description="More text per domain from sources the corpus does not use (data/routing, written by "
                          "`python -m senmon.ingest.routing_texts`): the routing model trains on it beside the "
                          "dataset store, so it learns domains rather than one source's layout. None: the store only.")
    ray: RayConfig = RayConfig()
    kafka: KafkaConfig = KafkaConfig()
    ingest: IngestConfig = IngestConfig()
    http: HttpConfig = HttpConfig()
    serve: ServeConfig = ServeConfig()
    training: TrainingConfig = TrainingConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    generalist: GeneralistConfig = GeneralistConfig()
    specialists: list[SpecialistConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> "SenmonConfig":
        names = [s.name for s in self.specialists]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"specialist names must be unique; repeated: {', '.join(duplicates)}")
        if self.generalist.name in names:
            raise ValueError(f"the generalist's name {self.generalist.name!r} is also a specialist's")
        if NO_DOMAIN in names + [self.generalist.name]:
            raise ValueError(f"{NO_DOMAIN!r} is the routing model's label for text of no specialist's domain; "
                             "name the model otherwise")
        return self

    @model_validator(mode="after")
    def _durable_broker_is_local(self) -> "SenmonConfig":
        if self.kafka.embedded and self.kafka.embedded_storage == "durable" and is_uri(self.storage_root) \
                and not self.storage_root.startswith("file://"):
            raise ValueError("kafka.embedded_storage: durable keeps the embedded broker's files under a local "
                             f"storage_root; {self.storage_root} is not one (set embedded_storage: memory, or "
                             "embedded: false with a Kafka cluster)")
        return self

    @model_validator(mode="after")
    def _haproxy_on_clusters_only(self) -> "SenmonConfig":
        if self.serve.ingress == "haproxy" and self.ray.address is None:
            raise ValueError("serve.ingress: haproxy is for a Ray cluster (ray.address set) whose nodes ran `ray start` "
                             "in the environment `senmon ray-env` prints; the local Ray senmon starts keeps Serve's "
                             "proxy (HAProxy would also open its stats and metrics ports on every interface)")
        return self

    @property
    def broker_dir(self) -> Path | None:
        """Where the embedded broker keeps its data (durable storage), else None."""
        if not self.kafka.embedded or self.kafka.embedded_storage != "durable":
            return None
        return Path(self.storage_root.removeprefix("file://")) / "broker"

    @model_validator(mode="after")
    def _local_ray_has_the_cpus(self) -> "SenmonConfig":
        if self.ray.address is None and self.ray.num_cpus is not None:
            needed = logical_cpus_needed(self)
            if needed["total"] > self.ray.num_cpus:
                parts = ", ".join(f"{k} {v:g}" for k, v in needed.items() if k != "total")
                raise ValueError(
                    f"ray.num_cpus: {self.ray.num_cpus} logical CPUs cannot hold what this config runs at once "
                    f"({parts}; {needed['total']:g} in all), so a retraining job would wait forever for a CPU. "
                    f"Raise ray.num_cpus (logical CPUs may exceed the cores) or lower serve.cpus_per_engine")
        return self

    def context_length(self, model: str) -> int:
        """The context served for `model` (a specialist or the generalist): its max_model_len or seq_len."""
        serving = self.generalist.serving if model == self.generalist.name else self.specialist(model).serving
        return serving.max_model_len or self.training.seq_len

    def specialist(self, name: str) -> SpecialistConfig:
        for spec in self.specialists:
            if spec.name == name:
                return spec
        known = ", ".join(s.name for s in self.specialists)
        raise KeyError(f"no specialist named {name!r} (configured: {known})")

    @property
    def domains(self) -> list[str]:
        seen: dict[str, None] = {}
        for spec in self.specialists:
            seen.update(dict.fromkeys(spec.domains))
        return list(seen)


def _format_errors(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (not a setting senmon knows)")
        elif item["type"] == "missing":
            lines.append(f"  {where}: required key is missing")
        else:
            got = item["input"]
            shown = f" (got {got!r})" if isinstance(got, (str, int, float, bool)) or got is None else ""
            lines.append(f"  {where}: {item['msg']}{shown}")
    return "\n".join(lines)


def _resolve_paths(data: dict, base: Path) -> dict:
    for key in ("storage_root", "corpus_dir", "routing_dir"):
        value = data.get(key)
        if isinstance(value, str) and not is_uri(value) and not os.path.isabs(value):
            data[key] = str((base / value).resolve())
    return data


def parse_config(data: dict, source: str = "<config>", base_dir: Path | None = None) -> SenmonConfig:
    """Validate a mapping; `ConfigError` names `source` and every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings, not {type(data).__name__}")
    data = _resolve_paths(dict(data), base_dir or Path.cwd())
    try:
        return SenmonConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{source}: invalid configuration\n{_format_errors(error)}") from None


def load_config(path: str | os.PathLike | None = None) -> SenmonConfig:
    """Load the file at `path`, else $SENMON_CONFIG, else the shipped embedded config."""
    path = Path(path or os.environ.get("SENMON_CONFIG") or DEFAULT_CONFIG)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the configuration ({error.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    return parse_config(data, source=str(path), base_dir=path.resolve().parent)
