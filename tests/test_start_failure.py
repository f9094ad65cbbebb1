"""A start that fails: says why in one line, stops what it started, retries what is worth retrying.

`senmon up` once failed because Ray killed Serve's HTTP proxy actor before it ran, under load
(`ActorDiedError` out of `serve.start`). `serve/app.py`'s `start_serve` retries that kind of failure
and nothing else; `senmon/system.py`'s `start_system` turns any failure into a one-line `StartError`
after stopping what it had started, and the CLI prints that line. `senmon/stack.py`'s `init_local_ray` (used by
`start_ray` and the suite's own Ray) starts a local Ray again when its node timed out registering (two
fresh-clone `make test` runs hit that). These are the decisions, without
Ray: the errors are Ray's own exception types, the parts that would start processes are stand-ins.
"""

from __future__ import annotations

import ray.exceptions
import pytest

from senmon.serve.app import SERVE_START_ATTEMPTS, start_serve, worth_retrying
from senmon.system import StartError, one_line


def _killed() -> ray.exceptions.ActorDiedError:
    """What Ray raises for an actor killed before it ran (no error of its own constructor)."""
    return ray.exceptions.ActorDiedError()


def _constructor_failed() -> ray.exceptions.ActorDiedError:
    task = ray.exceptions.RayTaskError("__init__", "Traceback ...\nOSError: [Errno 98] Address already in use",
                                       OSError(98, "Address already in use"))
    return ray.exceptions.ActorDiedError(task)


def test_which_serve_start_failures_are_worth_retrying():
    assert worth_retrying(_killed())
    assert worth_retrying(ray.exceptions.ActorUnavailableError("the proxy is restarting", None))
    assert worth_retrying(TimeoutError("HTTP proxies not available after 60s."))
    assert not worth_retrying(_constructor_failed())  # its port is taken: the next try fails the same way
    assert not worth_retrying(ValueError("bad http_options"))
    assert not worth_retrying(KeyboardInterrupt())


class _Serve:
    """serve.start / serve.shutdown stand-ins: start raises the queued errors, then succeeds."""

    def __init__(self, *errors: BaseException):
        self.errors, self.calls, self.pauses = list(errors), [], []

    def start(self):
        self.calls.append("start")
        if self.errors:
            raise self.errors.pop(0)

    def stop(self):
        self.calls.append("stop")

    def sleep(self, seconds: float):
        self.pauses.append(seconds)


def test_start_serve_retries_a_killed_proxy_and_cleans_up_before_each_try():
    serve = _Serve(_killed(), _killed())
    start_serve({}, start=serve.start, stop=serve.stop, sleep=serve.sleep, pause_s=1.0)
    assert serve.calls == ["start", "stop", "start", "stop", "start"]
    assert serve.pauses == [1.0, 2.0]


def test_start_serve_gives_up_after_its_attempts_with_the_last_error():
    serve = _Serve(*[_killed() for _ in range(SERVE_START_ATTEMPTS)])
    with pytest.raises(ray.exceptions.ActorDiedError):
        start_serve({}, start=serve.start, stop=serve.stop, sleep=serve.sleep)
    assert serve.calls.count("start") == SERVE_START_ATTEMPTS and serve.calls[-1] == "start"


def test_start_serve_does_not_retry_what_fails_the_same_way_each_time():
    serve = _Serve(_constructor_failed())
    with pytest.raises(ray.exceptions.ActorDiedError):
        start_serve({}, start=serve.start, stop=serve.stop, sleep=serve.sleep)
    assert serve.calls == ["start"] and serve.pauses == []


def test_one_line_of_an_error():
    died = ray.exceptions.ActorDiedError()
    assert one_line(died) == "ActorDiedError: The actor died unexpectedly before finishing this task."
    wrapped = ray.exceptions.RayTaskError("f", "Traceback ...", ValueError("no such\n  domain"))
    assert one_line(wrapped) == "no such domain"  # the task's own error, not Ray's wrapper with its traceback
    assert "\n" not in one_line(_constructor_failed()) and len(one_line(RuntimeError("x" * 1000))) == 400


def test_failed_start_stops_what_it_started_and_says_why_in_one_line(monkeypatch, make_config, tmp_path, capsys):
    """The registry dies under load after Ray came up: the stack that was started is stopped, the
    error is one line naming the step, and `senmon up` prints that line (exit status 2, no traceback)."""
    import senmon.actors.registry
    import senmon.stack
    from senmon import cli
    from senmon.system import start_system

    stopped = []

    class Stack:
        def stop(self):
            stopped.append("stack")

    def registry_killed(*args, **kwargs):
        raise _killed()

    monkeypatch.setattr(senmon.stack, "start_stack", lambda config, kafka=True: Stack())
    monkeypatch.setattr(senmon.actors.registry, "get_or_create_registry", registry_killed)
    config = make_config()
    with pytest.raises(StartError) as failed:
        start_system(config, train=False, serve=False, ingest=False, schedule=False, seed=False, say=lambda m: None)
    message = str(failed.value)
    assert message == ("did not start: starting the model registry failed: ActorDiedError: The actor died "
                       "unexpectedly before finishing this task. (what it had started is stopped)")
    assert isinstance(failed.value.__cause__, ray.exceptions.ActorDiedError)
    assert stopped == ["stack"]

    monkeypatch.setenv("HOME", str(tmp_path))  # `senmon up` looks for earlier stacks of this user
    monkeypatch.setattr(cli, "run_up", lambda config: start_system(
        config, train=False, serve=False, ingest=False, schedule=False, seed=False, say=lambda m: None))
    assert cli.main(["up"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"senmon up: {message}"] and "Traceback" not in err
    assert stopped == ["stack", "stack"]


def test_a_local_ray_that_timed_out_registering_is_started_again_without_its_processes(monkeypatch, make_config):
    """Ray gives a new node a fixed 30 s to register; under load that passed in `make test` (the clean-up test's
    `senmon up`, and the suite's own Ray, each starting beside the `ray up` test's Ray). `start_ray` then stops
    that try's processes and starts Ray again, up to RAY_START_ATTEMPTS tries; any other error is raised at once."""
    from senmon import stack

    calls, stops = [], []
    timeout = Exception("The current node timed out during startup. This could happen because ...")

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise timeout

    monkeypatch.setattr(stack.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(stack.ray, "init", init)
    monkeypatch.setattr(stack, "stop_ray_children", lambda: stops.append(len(calls)) or {})
    assert stack.start_ray(make_config()) is True
    assert len(calls) == 2 and stops == [1]

    calls.clear()
    monkeypatch.setattr(stack.ray, "init", lambda **kwargs: calls.append(kwargs) or (_ for _ in ()).throw(timeout))
    with pytest.raises(Exception, match="timed out during startup"):
        stack.start_ray(make_config())
    assert len(calls) == stack.RAY_START_ATTEMPTS

    calls.clear()
    monkeypatch.setattr(stack.ray, "init", lambda **kwargs: calls.append(kwargs) or (_ for _ in ()).throw(
        ValueError("bad num_cpus")))
    with pytest.raises(ValueError):
        stack.start_ray(make_config())
    assert len(calls) == 1


def test_stop_ray_children_stops_only_this_process_s_ray_processes():
    """Real processes, in a fresh interpreter (this test process may have the suite's Ray as children): a child
    whose command line runs through a ray package path is stopped; another child (as the embedded broker would be)
    is left running."""
    import json
    import subprocess
    import sys

    script = """
import json, subprocess, sys
from senmon.stack import stop_ray_children
sleeper = "import time; time.sleep(120)"
like_ray = subprocess.Popen([sys.executable, "-c", sleeper, "/venv/site-packages/ray/core/src/ray/raylet/raylet"])
other = subprocess.Popen([sys.executable, "-c", sleeper, "tansu"])
stopped = stop_ray_children(grace_s=5)
print(json.dumps({"stopped": sorted(stopped), "like_ray": like_ray.pid, "other": other.pid,
                  "like_ray_exit": like_ray.wait(timeout=10), "other_alive": other.poll() is None}))
other.kill()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["stopped"] == [seen["like_ray"]]
    assert seen["like_ray_exit"] is not None and seen["other_alive"]
