"""Configuration: the shipped files validate; bad keys and bad types give messages naming them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from senmon.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data) -> Path:
    path = tmp_path / "senmon.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def test_shipped_embedded_config_is_valid():
    config = load_config(REPO / "configs" / "embedded.yaml")
    assert config.kafka.embedded and config.kafka.bootstrap_servers == ["127.0.0.1:19092"]
    assert {s.name for s in config.specialists} >= {"law", "code", "dictionary", "literature", "japanese"}
    # relative paths are resolved against the file, not the working directory
    assert Path(config.corpus_dir) == REPO / "data" / "corpus"
    assert Path(config.routing_dir) == REPO / "data" / "routing"
    assert Path(config.storage_root) == REPO / "var" / "storage"


def test_production_example_is_valid(monkeypatch):
    config = load_config(REPO / "configs" / "production.example.yaml")
    assert config.storage_root.startswith("s3://")  # URIs are kept as they are
    assert (config.http.rate_limit.requests_per_minute, config.http.rate_limit.burst) == (600, 60)
    monkeypatch.setenv("SENMON_KAFKA_PASSWORD", "s3cret")
    kwargs = config.kafka.client_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_plain_password"] == "s3cret"
    assert kwargs["ssl_cafile"] == "/etc/ssl/certs/kafka-ca.pem"


def test_missing_password_variable_is_named(monkeypatch):
    config = load_config(REPO / "configs" / "production.example.yaml")
    monkeypatch.delenv("SENMON_KAFKA_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="SENMON_KAFKA_PASSWORD"):
        config.kafka.client_kwargs()


def test_unknown_key_is_named_with_its_path(tmp_path, embedded_config_data):
    data = dict(embedded_config_data)
    data["specialists"] = [dict(data["specialists"][0], gpu_fraction=0.5)]
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, data))
    message = str(caught.value)
    assert "specialists.0.gpu_fraction" in message
    assert "unknown key" in message
    assert str(tmp_path / "senmon.yaml") in message


def test_unknown_top_level_key_is_named(tmp_path, embedded_config_data):
    with pytest.raises(ConfigError, match=r"(?m)^  kafak: unknown key"):
        load_config(write(tmp_path, dict(embedded_config_data, kafak={"embedded": True})))


def test_bad_type_is_named_with_the_value(tmp_path, embedded_config_data):
    data = dict(embedded_config_data, http={"port": "eighty"})
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, data))
    assert "http.port" in str(caught.value)
    assert "'eighty'" in str(caught.value)


def test_several_errors_are_all_reported(tmp_path, embedded_config_data):
    data = dict(embedded_config_data, training={"batch_size": 0, "vocab_size": "big"})
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, data))
    assert "training.batch_size" in str(caught.value) and "training.vocab_size" in str(caught.value)


@pytest.mark.parametrize(
    "patch, fragment",
    [
        ({"kafka": {"embedded": True, "bootstrap_servers": ["10.0.0.5:9092"]}}, "loopback"),
        ({"kafka": {"embedded": False, "bootstrap_servers": ["kafka:9092"], "security_protocol": "SASL_SSL"}},
         "sasl_mechanism"),
        ({"kafka": {"bootstrap_servers": ["no-port"]}}, "kafka.bootstrap_servers"),
    ],
)
def test_kafka_rules(tmp_path, embedded_config_data, patch, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(write(tmp_path, dict(embedded_config_data, **patch)))


def test_specialist_rules(make_config, embedded_config_data):
    base = embedded_config_data["specialists"][0]
    with pytest.raises(ConfigError, match="repeated: law"):
        make_config(specialists=[base, base])
    with pytest.raises(ConfigError, match="specialists.0.name"):
        make_config(specialists=[dict(base, name="Bad Name")])
    with pytest.raises(ConfigError, match="'none' is the routing model's label for text of no specialist's domain"):
        make_config(specialists=[dict(base, name="none")])
    with pytest.raises(ConfigError, match="exceeds the replica's GPU share"):
        make_config(specialists=[dict(base, serving={"num_gpus": 0.25, "gpu_memory_utilization": 0.5})])
    with pytest.raises(ConfigError, match="specialists.0.schedule.interval"):
        make_config(specialists=[dict(base, schedule={"interval": "often"})])
    with pytest.raises(ConfigError, match="min_params"):
        make_config(specialists=[dict(base, size={"min_params": 10_000_000, "max_params": 20_000})])


def test_schedule_interval_in_seconds(make_config, embedded_config_data):
    base = embedded_config_data["specialists"][0]
    config = make_config(specialists=[dict(base, schedule={"interval": "90m"})])
    assert config.specialists[0].schedule.interval_seconds == 5400


def test_unreadable_and_non_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("specialists: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config(["a", "list"])


def test_api_keys_from_environment(make_config, monkeypatch):
    monkeypatch.setenv("SENMON_API_KEYS", "k1, k2")
    config = make_config(http={"api_keys": ["k0"]})
    api, admin = config.http.resolved_keys()
    assert api == ["k0", "k1", "k2"]


def test_served_context_defaults_to_the_trained_sequence_length(make_config, embedded_config_data):
    config = make_config()
    assert config.context_length("law") == config.context_length("generalist") == config.training.seq_len
    specialists = [dict(s) for s in embedded_config_data["specialists"]]
    specialists[0]["serving"] = {"max_model_len": 128}
    assert make_config(specialists=specialists).context_length(specialists[0]["name"]) == 128


def test_a_local_ray_too_small_for_its_engines_and_a_retraining_job_is_refused(tmp_path):
    """Six engines at one logical CPU each, one more in a swap, the router and a job's data stage do
    not fit in 8: the check says so at load time, not as a retraining job that never starts."""
    from senmon.config import logical_cpus_needed

    data = yaml.safe_load((REPO / "configs" / "embedded.yaml").read_text(encoding="utf-8"))
    shipped = logical_cpus_needed(load_config(REPO / "configs" / "embedded.yaml"))
    assert shipped["total"] <= data["ray"]["num_cpus"] and shipped["swap"] > 0 and shipped["training"] >= 2
    data["serve"]["cpus_per_engine"] = 1
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, dict(data, storage_root=str(tmp_path), corpus_dir=str(tmp_path))))
    assert "ray.num_cpus: 8 logical CPUs" in str(error.value) and "9.5 in all" in str(error.value)
    data["ray"]["num_cpus"] = 10  # enough once raised; and a cluster (address set) is not checked
    load_config(write(tmp_path, dict(data, storage_root=str(tmp_path), corpus_dir=str(tmp_path))))
    data["ray"].update(num_cpus=2, address="auto")
    load_config(write(tmp_path, dict(data, storage_root=str(tmp_path), corpus_dir=str(tmp_path))))


def test_rate_limit_section(make_config):
    assert make_config().http.rate_limit.requests_per_minute is None  # off in the embedded config
    limit = make_config(http={"rate_limit": {"requests_per_minute": 600, "burst": 50}}).http.rate_limit
    assert (limit.requests_per_minute, limit.burst) == (600, 50)
    assert make_config(http={"rate_limit": {"requests_per_minute": 30}}).http.rate_limit.burst is None
    for bad, where in (({"requests_per_minute": 0}, "http.rate_limit.requests_per_minute"),
                       ({"requests_per_minute": "lots"}, "http.rate_limit.requests_per_minute"),
                       ({"requests_per_minute": 60, "burst": 0}, "http.rate_limit.burst"),
                       ({"requests_per_minute": 60, "per_hour": 5}, "http.rate_limit.per_hour"),
                       ({"burst": 10}, "burst has no effect without requests_per_minute")):
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            make_config(http={"rate_limit": bad})


def test_haproxy_ingress_is_for_clusters_and_sets_what_ray_start_reads(make_config, embedded_config_data):
    """serve.ingress: haproxy is refused for the local Ray senmon starts itself (HAProxy opens its stats and
    metrics ports on every interface, and Ray reads the setting only when it starts); on a cluster it becomes
    the environment `senmon ray-env` prints for the nodes' `ray start`, with the config's ports and files
    in a directory of the node user's own."""
    from senmon.cluster import export_lines, ray_start_environment

    with pytest.raises(ConfigError, match="serve.ingress: haproxy is for a Ray cluster"):
        make_config(serve=dict(embedded_config_data["serve"], ingress="haproxy"))
    assert ray_start_environment(make_config()) == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}  # Serve's proxy, said so
    cluster = make_config(ray=dict(embedded_config_data["ray"], address="auto"),
                          serve=dict(embedded_config_data["serve"], ingress="haproxy", haproxy_stats_port=18404,
                                     haproxy_metrics_port=19101))
    env = ray_start_environment(cluster, uid=12345)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404" and env["RAY_SERVE_HAPROXY_METRICS_PORT"] == "19101"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "5"  # not Ray's 30 s: every shutdown waits it
    paths = [v for k, v in env.items() if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
    assert len(paths) == 5 and all(p.startswith("/tmp/senmon-haproxy-12345") for p in paths), env
    assert max(len(p) for p in paths) + 1 + 56 <= 97  # with Ray's node id inside: HAProxy's longest socket path
    assert export_lines({"A": "1", "B": "x y"}) == "export A=1\nexport B='x y'\n"
