"""The router's pure logic without Ray or engines: keys, error bodies, routing text, the drain rule."""

from __future__ import annotations

import pickle
import time

import pytest
from pydantic import BaseModel, ValidationError

from senmon.serve.auth import Keys
from senmon.serve.errors import ApiError, from_validation
from senmon.serve.router import prompt_text
from senmon.serve.table import LIVE_S, ServingTable


def test_keys_bearer_api_and_admin():
    keys = Keys(["user"], ["boss"])
    keys.check_api("Bearer user")
    keys.check_api("bearer boss")  # an admin key also works on /v1
    for header, status in ((None, 401), ("Bearer nope", 401), ("Basic user", 401)):
        with pytest.raises(ApiError) as caught:
            keys.check_api(header)
        assert caught.value.status == status
    keys.check_admin("Bearer boss")
    with pytest.raises(ApiError) as caught:
        keys.check_admin("Bearer user")
    assert caught.value.status == 403
    with pytest.raises(ApiError) as caught:  # API keys but no admin key: admin is off
        Keys(["user"], []).check_admin("Bearer user")
    assert caught.value.status == 403 and "no admin key" in caught.value.message


def test_errors_are_openai_shaped_and_survive_pickling():
    class Body(BaseModel):
        max_tokens: int

    with pytest.raises(ValidationError) as caught:
        Body.model_validate({"max_tokens": "many"})
    error = from_validation(caught.value)
    assert error.status == 400 and error.param == "max_tokens" and "'max_tokens'" in error.message
    again = pickle.loads(pickle.dumps(ApiError(503, "busy", code="x", headers={"Retry-After": "5"})))
    assert again.body() == {"error": {"message": "busy", "type": "service_unavailable", "param": None, "code": "x"}}
    assert again.headers == {"Retry-After": "5"}


def test_routing_reads_the_users_words():
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "法律"},
                         {"role": "user", "content": [{"type": "text", "text": "GPL"}]}]}
    assert prompt_text("chat", chat) == "法律\nGPL"
    assert prompt_text("completions", {"prompt": ["first", "second"]}) == "first"
    assert prompt_text("completions", {"prompt": [1, 2, 3]}) == ""


def test_drain_waits_for_every_live_router_and_its_requests():
    table = ServingTable()
    epoch = table.set("law", {"app": "s-law-v2", "version": 2, "path": "/x"})
    table.poll("a", epoch - 1, {"s-law-v1": 2})
    table.poll("b", epoch, {})
    assert table.drained(epoch, "s-law-v1") == {"done": False, "routers": 2, "behind": 1, "inflight": 2}
    table.poll("a", epoch, {"s-law-v1": 1})  # on the new table, one old request still running
    assert not table.drained(epoch, "s-law-v1")["done"]
    table.poll("a", epoch, {"s-law-v1": 0})
    assert table.drained(epoch, "s-law-v1")["done"]
    table.routers["b"]["seen"] = time.monotonic() - LIVE_S - 1  # a replica gone silent does not block
    table.routers["b"]["epoch"] = 0
    assert table.drained(epoch, "s-law-v1")["done"]
    assert table.begin_swap("law") and not table.begin_swap("law")
    table.end_swap("law")
    assert table.begin_swap("law")
