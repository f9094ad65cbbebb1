"""The `senmon` command line: a thin layer that parses arguments and calls the modules.

Every command takes `--config FILE` (default: $SENMON_CONFIG, else configs/embedded.yaml).
Errors a user can fix print one line and exit with status 2; there are no tracebacks for them.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from senmon.config import ConfigError, SenmonConfig, load_config


class CommandError(RuntimeError):
    """A failure with a message meant for the user (printed as one line)."""


def _print_table(headers: list[str], rows: list[list], out=sys.stdout) -> None:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        out.write("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) + "\n")
        if index == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def print_data_summary(config: SenmonConfig) -> None:
    from senmon.ingest.store import DatasetStore

    store = DatasetStore(config.storage_root)
    rows = []
    for item in store.summary(config.domains):
        d, c = item.documents, item.characters
        rows.append([item.domain, d["train"], d["validation"], d["test"], f"{sum(c.values()):,}",
                     f"{sum(c.values()) / max(1, sum(d.values())):.0f}"])
    _print_table(["domain", "train", "validation", "test", "characters", "chars/doc"], rows)


# --------------------------------------------------------------------------- commands


def cmd_config(args, config: SenmonConfig) -> int:
    print(f"{args.config or 'default config'}: valid")
    print(f"  storage root: {config.storage_root}")
    print(f"  kafka: {'embedded broker on ' if config.kafka.embedded else ''}{', '.join(config.kafka.bootstrap_servers)}")
    print(f"  ray: {config.ray.address or 'local instance'}")
    print(f"  specialists: {', '.join(s.name for s in config.specialists)} (+ {config.generalist.name})")
    return 0


def cmd_data(args, config: SenmonConfig) -> int:
    from senmon.ingest.store import DatasetStore

    seeded = DatasetStore(config.storage_root).seed_from_corpus(config.corpus_dir, config.domains)
    print(f"dataset store {config.storage_root}: {sum(seeded.values()):,} seed documents in {len(seeded)} domains")
    print_data_summary(config)
    return 0


def _with_registry(config: SenmonConfig):
    """Ray (no Kafka) plus the registry actor, for commands that read or change versions."""
    from senmon.actors.registry import get_or_create_registry
    from senmon.stack import start_stack

    stack = start_stack(config, kafka=False)
    return stack, get_or_create_registry(config.storage_root)


def _version_line(record: dict) -> str:
    ppl = (record.get("metrics") or {}).get("val_ppl")
    shown = f"val ppl {ppl:.2f}" if isinstance(ppl, (int, float)) else "no metrics"
    return f"{record['specialist']} v{record['version']}: {record['status']} ({shown}) - {record.get('reason', '')}"


def cmd_train(args, config: SenmonConfig) -> int:
    names = [s.name for s in config.specialists] + [config.generalist.name]
    if args.name not in names:  # before the imports below (Ray Train, torch, transformers: 15 s here)
        raise CommandError(f"no specialist named {args.name!r} (configured: {', '.join(names)})")
    import ray

    from senmon.ingest.store import DatasetStore
    from senmon.progress import Relay
    from senmon.train.job import train_and_register

    stack, registry = _with_registry(config)
    with stack:
        DatasetStore(config.storage_root).seed_from_corpus(config.corpus_dir, config.domains)
        start = args.init or ("seed" if args.name != config.generalist.name and config.training.specialists_from == "seed"
                              else "scratch")
        where = {"seed": f"branched from the seed, {config.generalist.name}", "scratch": "from scratch",
                 "current": "continuing the serving version"}.get(start, f"from {start}")
        print(f"==> training {args.name} ({where}) on Ray Train")
        with Relay() as relay:  # a progress bar, when stderr is a terminal
            record = train_and_register(config, args.name, registry, init=args.init, progress_board=relay.board)
        sizing, metrics = record["sizing"], record["metrics"]
        shape = sizing.get("shape", {})
        print(f"    shape: hidden {shape.get('hidden_size')}, layers {shape.get('num_hidden_layers')}, "
              f"{sizing.get('non_embedding_params', 0):,} non-embedding params; {sizing.get('rule')}")
        print(f"    trained on {record['data']['tokens_seen']:,} tokens at {metrics['train_tokens_per_s']:,.0f} tokens/s; "
              f"validation perplexity by domain: "
              + ", ".join(f"{d} {p:.1f}" for d, p in sorted(metrics["val_ppl_by_domain"].items())))
        print(_version_line(record))
        print(f"    checkpoint: {record['path']}")
        ray.shutdown()
    return 0 if record["status"] in ("serving", "rejected") else 1


def cmd_versions(args, config: SenmonConfig) -> int:
    import ray

    stack, registry = _with_registry(config)
    with stack:
        if args.command == "promote":
            record = ray.get(registry.promote.remote(args.name, args.version, config.training.promotion_margin,
                                                     force=args.force))
            print(_version_line(record))
        elif args.command == "rollback":
            print(_version_line(ray.get(registry.rollback.remote(args.name, args.version))))
        else:
            history = ray.get(registry.history.remote(args.name))
            if args.json:
                import json

                print(json.dumps(history, indent=2, ensure_ascii=False))
            for record in [] if args.json else history:
                print(_version_line(record))
    return 0


def cmd_eval(args, config: SenmonConfig) -> int:
    import json

    from senmon.actors.registry import serving_records_from_file
    from senmon.system import model_names
    from senmon.train.eval_input import read_eval_file

    by_domain = read_eval_file(args.file)  # a bad file is refused before torch loads
    from senmon.train.evaluate import compare_on_file

    # read-only: the registry's durable file says what serves; no Ray needed to evaluate on this machine
    serving = serving_records_from_file(config.storage_root, model_names(config))

    def model(name: str) -> tuple[str, int, str] | None:
        return (name, serving[name]["version"], serving[name]["path"]) if name in serving else None

    specialist_for = {domain: model(spec.name) for spec in config.specialists for domain in spec.domains
                      if spec.name in serving}
    generalist = model(config.generalist.name)
    if not specialist_for and generalist is None:
        raise CommandError("no version is serving yet; train one with 'senmon train NAME'")
    rows = compare_on_file(by_domain, specialist_for, generalist, config.training.seq_len)
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0

    def fmt(value, version):
        return "-" if value is None else f"{value:.2f} (v{version})"

    _print_table(["domain", "docs", "specialist", "specialist ppl", "generalist ppl", "ratio"],
                 [[r["domain"], r["documents"], r["specialist"] or "-", fmt(r["specialist_ppl"], r["specialist_version"]),
                   fmt(r["generalist_ppl"], r["generalist_version"]),
                   "-" if r["specialist_vs_generalist"] is None else f"{r['specialist_vs_generalist']:.2f}"]
                  for r in rows])
    return 0


def cmd_demo(args, config: SenmonConfig) -> int:
    import shutil
    from pathlib import Path

    from senmon import demo
    from senmon.storage import filesystem, is_local

    fs, _ = filesystem(config.storage_root)
    if is_local(fs):  # the demo works in its own, fresh storage root beside the configured one
        root = Path(config.storage_root).parent / "demo"
        shutil.rmtree(root, ignore_errors=True)
        config = config.model_copy(update={"storage_root": str(root)})
    report = demo.run(config)
    return 0 if report["background_failed"] == report["swapped_failed"] == 0 and report["answered_by_after"] else 1


# --------------------------------------------------------------------------- the running system


def _state_path(config: SenmonConfig):
    from pathlib import Path

    return Path.home() / ".senmon" / f"up-{config.name}.json"


def _running(config: SenmonConfig) -> dict | None:
    """What `senmon up` wrote about the system it runs, if that process is still alive."""
    import json
    import os

    try:  # read, not exists() then read: `senmon up` removes the record as it stops, while `down` polls it
        state = json.loads(_state_path(config).read_text())
    except FileNotFoundError:
        return None
    try:
        os.kill(state["pid"], 0)
    except OSError:
        return None
    return state


def cmd_up(args, config: SenmonConfig) -> int:
    if args.cluster and not config.ray.address:
        raise CommandError("--cluster needs ray.address in the config (e.g. 'auto' on a cluster node)")
    if _running(config):
        raise CommandError(f"senmon is already up (see {_state_path(config)}); 'senmon down' stops it")
    _stop_leftovers(config)
    return run_up(config)


def _stop_leftovers(config: SenmonConfig) -> dict:
    """Stop what a killed `senmon up` (or any killed senmon stack of this config) left running."""
    from senmon.stack import stop_leftovers

    left = stop_leftovers(config.name)
    if left["processes"]:
        print(f"stopped {len(left['processes'])} processes left by a senmon that was killed "
              f"(broker, Ray, engines) in {left['seconds']:.1f} s")
    return left


def _write_state(config: SenmonConfig, url: str | None) -> list:
    """Record the running system for the other commands (`senmon status`, `ask`, `down`, from any
    terminal of this user); returns the files to remove when it stops.

    The record says how to authenticate to its Ray (token authentication is on by default): a
    process that connects to the recorded address finds no token by itself.
    """
    import json
    import os

    import ray

    from senmon.stack import ray_auth_for_others, write_private

    path = _state_path(config)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    auth, written = ray_auth_for_others(path.parent / f"ray-auth-token-{config.name}")
    state = {"pid": os.getpid(), "url": url, "ray_address": ray.get_runtime_context().gcs_address, "ray_auth": auth,
             "namespace": config.ray.namespace, "kafka": config.kafka.bootstrap_servers,
             "storage_root": config.storage_root, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_private(path, json.dumps(state, indent=1))
    return [path, *written]


def run_up(config: SenmonConfig, **parts) -> int:
    """`senmon up` after its checks: start the system (`parts`: `start_system`'s switches, all on by
    default), record it for the other commands and keep it running until SIGINT or SIGTERM."""
    import signal
    import threading

    from senmon.system import start_system

    stop = threading.Event()

    def stop_on_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())

    stop_on_signals()
    print(f"==> starting senmon ({'cluster at ' + config.ray.address if config.ray.address else 'embedded stack'})")
    written: list = []
    try:
        with start_system(config, say=lambda m: print("    " + m, flush=True), **parts) as system:
            stop_on_signals()  # ray.init() made SIGTERM sys.exit(15): 'senmon down' would skip the orderly stop below
            written = _write_state(config, system.url)
            if config.ray.address:  # a cluster's Ray, started by someone else: say which front door it runs
                from senmon.cluster import front_door_line

                print("    " + front_door_line(config), flush=True)
            print(f"==> senmon is up: {system.url} (OpenAI API at /v1), Kafka "
                  f"{', '.join(config.kafka.bootstrap_servers)}; 'senmon status', 'senmon ask', 'senmon ingest FILE', "
                  f"'senmon down' from another terminal", flush=True)
            try:
                while not stop.wait(1.0):
                    pass
            finally:
                print("==> stopping senmon", flush=True)
    finally:  # the record goes once everything has stopped, so `senmon down` returns when the stop is done
        for path in written:
            path.unlink(missing_ok=True)
    print("==> stopped")
    return 0


def cmd_down(args, config: SenmonConfig) -> int:
    import contextlib
    import os
    import signal

    from senmon.stack import wait_gone

    state = _running(config)
    if state is None:
        if not _stop_leftovers(config)["processes"]:
            print("senmon is not up")
        _state_path(config).unlink(missing_ok=True)  # the record of a `senmon up` that was killed
        return 0

    def kill() -> None:
        with contextlib.suppress(ProcessLookupError):  # it may exit meanwhile
            os.kill(state["pid"], signal.SIGKILL)
        wait_gone(state["pid"], 30)

    os.kill(state["pid"], signal.SIGTERM)
    print(f"stopping senmon (pid {state['pid']}); it stops its parts in order (with HAProxy, Serve waits "
          "serve.haproxy_drain_s for the router replicas)", flush=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and _running(config):
        time.sleep(0.5)
    if _running(config):  # stuck: kill it, then stop what it started as for a `senmon up` that was killed
        print(f"senmon (pid {state['pid']}) did not stop within {args.timeout:.0f} s; killing it", file=sys.stderr)
        kill()
        _stop_leftovers(config)
        _state_path(config).unlink(missing_ok=True)
        return 1
    # the record goes once every part has stopped; the process exits just after, but its interpreter's own shutdown
    # (Ray's driver, threads, atexit) took over 5 s under load once (the `ray up` test, 27 Nov): wait for that too
    if not wait_gone(state["pid"], max(10.0, deadline - time.monotonic())):
        print(f"senmon (pid {state['pid']}) stopped its parts but did not exit; killing it", file=sys.stderr)
        kill()
    _stop_leftovers(config)  # its stop sweeps its processes; this catches it being killed while it stopped
    _state_path(config).unlink(missing_ok=True)
    print(f"senmon (pid {state['pid']}) stopped")
    return 0


def _connect(state: dict) -> None:
    import logging

    import ray

    from contextlib import nullcontext

    from senmon.stack import loopback_node, use_ray_auth

    use_ray_auth(state.get("ray_auth"))  # the recorded address alone gets no token from Ray
    # an embedded stack's Ray listens on loopback only; Ray would take 127.0.0.1 for this machine's address
    loopback = state["ray_address"].startswith(("127.", "localhost", "[::1]"))
    with loopback_node() if loopback else nullcontext():
        ray.init(address=state["ray_address"], namespace=state["namespace"], logging_level=logging.WARNING,
                 log_to_driver=False)


def cmd_status(args, config: SenmonConfig) -> int:
    import asyncio

    from senmon.status import TABLE_HEADERS, accuracy_line, collect_status, find_actor, table_rows
    from senmon.system import INGEST, REGISTRY, SCHEDULER

    state = _running(config)
    registry = scheduler = ingest = None
    if state is None:
        print(f"senmon is not up (storage root {config.storage_root}); versions from the registry file:")
    else:
        from senmon.cluster import front_door_line

        _connect(state)
        print(f"senmon is up since {state['started_at']}: {state['url']}, Ray {state['ray_address']}")
        print(front_door_line(config))
        registry, scheduler, ingest = (find_actor(name, None) for name in (REGISTRY, SCHEDULER, INGEST))
    status = asyncio.run(collect_status(config, registry, scheduler, ingest))  # the same data as GET /status/data
    _print_table(TABLE_HEADERS, table_rows(status))
    if (line := accuracy_line(status)) is not None:
        print(line)
    if status["ingest"]:
        from senmon.ingest.metrics import format_ingest_status

        print(format_ingest_status(status["ingest"]))
    for part, why in status["unavailable"].items():
        if why != "not running":
            print(f"senmon status: {part}: {why}", file=sys.stderr)
    return 0


def cmd_ask(args, config: SenmonConfig) -> int:
    import httpx

    from senmon.demo import ask

    state = _running(config)
    url = state["url"] if state else f"http://{config.http.host}:{config.http.port}"
    api_key = args.api_key or (config.http.resolved_keys()[0] or [None])[0]
    try:
        answer = ask(url, args.prompt, model=args.model, max_tokens=args.max_tokens, api_key=api_key)
    except (OSError, httpx.HTTPError) as error:
        raise CommandError(f"no senmon server answers at {url} ({error}); start one with 'senmon up'") from None
    except RuntimeError as error:
        raise CommandError(str(error)) from None
    print(answer["text"].strip())
    print(f"-- answered by {answer['specialist']} v{answer['version']} (router confidence {answer['confidence']:.2f}, "
          f"routing {answer['routing_ms']:.1f} ms)", file=sys.stderr)
    return 0


def cmd_serve_config(args, config: SenmonConfig) -> int:
    import yaml

    from senmon.serve.app import build_serve_config

    from pathlib import Path

    path = str(Path(args.config).resolve()) if args.config else None  # replicas run in another directory
    print(yaml.safe_dump(build_serve_config(config, path), sort_keys=False, allow_unicode=True), end="")
    return 0


def cmd_ray_env(args, config: SenmonConfig) -> int:
    from senmon.cluster import export_lines, ray_start_environment

    print(export_lines(ray_start_environment(config)), end="")
    return 0


def cmd_ingest(args, config: SenmonConfig) -> int:
    from kafka.errors import KafkaError

    from senmon.ingest.producer import produce_file

    def progress(result) -> None:
        print(f"\r    {result.sent:,} documents sent ({result.bytes / 1e6:,.1f} MB)", end="", file=sys.stderr, flush=True)

    try:
        result = produce_file(config, args.file, progress=progress if sys.stderr.isatty() else None)
    except KafkaError as error:
        raise CommandError(f"Kafka at {', '.join(config.kafka.bootstrap_servers)} did not answer: {error}") from None
    if sys.stderr.isatty() and result.seconds >= 1.0:
        print(file=sys.stderr)
    unkeyed = f"; {result.unkeyed:,} without an id (the dead-letter topic gets them)" if result.unkeyed else ""
    failed = f"; {result.failed:,} failed: {result.first_error}" if result.failed else ""
    print(f"{args.file}: {result.sent - result.failed:,} of {result.sent:,} documents ({result.bytes / 1e6:,.2f} MB) "
          f"produced to {config.kafka.topics.documents} in {result.seconds:.1f} s{unkeyed}{failed}")
    return 1 if result.failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="senmon", description="senmon: one language model made of many small specialists, on Ray and Kafka.")
    parser.add_argument("--config", help="configuration file (default: $SENMON_CONFIG or configs/embedded.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("config", help="validate the configuration and print what it sets").set_defaults(func=cmd_config)
    commands.add_parser("data", help="load the shipped corpus into the dataset store and summarise it").set_defaults(func=cmd_data)
    commands.add_parser("demo", help="the main job on the embedded stack").set_defaults(func=cmd_demo)
    up = commands.add_parser("up", help="start everything (Ray, broker, ingest, scheduler, serve) and keep it running")
    up.add_argument("--cluster", action="store_true", help="join the Ray cluster in ray.address instead")
    up.set_defaults(func=cmd_up)
    down = commands.add_parser("down", help="stop what 'senmon up' started")
    down.add_argument("--timeout", type=float, default=120.0)
    down.set_defaults(func=cmd_down)
    commands.add_parser("status", help="versions, training runs, ingest lag, router accuracy").set_defaults(func=cmd_status)
    ask = commands.add_parser("ask", help="ask a question; prints the answer and who answered")
    ask.add_argument("prompt")
    ask.add_argument("--model", default="auto", help="'auto' (the router decides) or a specialist's name")
    ask.add_argument("--max-tokens", type=int, default=48)
    ask.add_argument("--api-key", default=None, help="default: the first configured API key")
    ask.set_defaults(func=cmd_ask)
    commands.add_parser("serve-config", help="print the Serve config (for 'serve deploy') the code builds"
                        ).set_defaults(func=cmd_serve_config)
    commands.add_parser("ray-env", help="print the environment a node's 'ray start' needs (export lines, for eval)"
                        ).set_defaults(func=cmd_ray_env)
    ingest = commands.add_parser("ingest", help="produce a JSONL file's documents onto the Kafka documents topic")
    ingest.add_argument("file", help="JSONL: one {\"id\", \"text\", \"domain\"?, \"source\"?} object per line")
    ingest.set_defaults(func=cmd_ingest)

    train = commands.add_parser("train", help="train one specialist (or the generalist), register it, apply the gate")
    train.add_argument("name")
    train.add_argument("--init", default=None,
                       help="'seed' (a specialist's default: branch from the generalist's serving version), 'scratch' "
                            "(the generalist's default), 'current' (continue the serving version) or a local HF model "
                            "directory")
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="perplexity of each domain's specialist and of the generalist on a file")
    evaluate.add_argument("file", help="JSONL documents with 'text' and 'domain'")
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.set_defaults(func=cmd_eval)

    promote = commands.add_parser("promote", help="promote a version through the gate (--force skips the gate)")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.add_argument("--force", action="store_true")
    promote.set_defaults(func=cmd_versions)
    rollback = commands.add_parser("rollback", help="serve an earlier version again (default: the previous one)")
    rollback.add_argument("name")
    rollback.add_argument("version", type=int, nargs="?")
    rollback.set_defaults(func=cmd_versions)
    history = commands.add_parser("history", help="every version of a specialist with its status and metrics")
    history.add_argument("name")
    history.add_argument("--json", action="store_true")
    history.set_defaults(func=cmd_versions)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from senmon.ingest.broker import BrokerError
    from senmon.system import StartError

    from ray.exceptions import RayTaskError

    user_errors = (ConfigError, CommandError, BrokerError, StartError, OSError, ValueError, KeyError)
    started = time.monotonic()
    try:
        config = load_config(args.config)
        return args.func(args, config)
    except RayTaskError as error:  # an error raised inside an actor or task: show its message, not the remote stack
        cause = error.cause if isinstance(error.cause, user_errors) else error
        if cause is error:
            raise
        print(f"senmon {args.command}: {cause}", file=sys.stderr)
        return 2
    except user_errors as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"senmon {args.command}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"senmon {args.command}: interrupted after {time.monotonic() - started:.0f} s", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
