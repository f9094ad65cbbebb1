"""Progress bars (senmon/progress.py): when they are drawn, what a training bar says, and the real
training loop drawing one (or nothing) on a captured stream."""

from __future__ import annotations

import io

import pytest

from senmon.progress import ENV, Display, Relay, TrainingProgress, enabled, training_postfix, training_progress


class _Stream(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def test_bars_are_drawn_on_a_terminal_unless_forced_either_way():
    terminal, log = _Stream(True), _Stream(False)
    assert enabled(terminal, environ={"TERM": "xterm"})
    assert not enabled(log, environ={"TERM": "xterm"})
    assert not enabled(terminal, environ={"TERM": "dumb"})
    assert not enabled(object(), environ={})  # no isatty at all
    assert enabled(log, environ={ENV: "1"}) and enabled(log, environ={ENV: "on"})
    assert not enabled(terminal, environ={ENV: "0", "TERM": "xterm"})
    assert enabled(terminal, environ={ENV: "", "TERM": "xterm"})  # empty: not set


def test_a_training_bar_shows_loss_tokens_seen_and_tokens_per_second():
    assert training_postfix(512, 3.14159, 250.0) == "loss 3.142, 512 tokens, 250 tokens/s"
    assert training_postfix(1_234_567, 0.5, 45_678.9) == "loss 0.500, 1.23M tokens, 45.7k tokens/s"
    assert training_postfix(0, float("nan"), 0.0) == "loss nan, 0 tokens, 0 tokens/s"


def test_training_progress_keeps_its_pace_and_sends_the_last_state_on_close():
    sent = []
    progress = TrainingProgress(lambda key, state: sent.append((key, state)), "law", 100, workers=2,
                                interval_s=3600)
    for step in range(1, 101):
        progress.update(step, step * 64, 5.0 - step / 100, 1000.0)
    progress.close()
    progress.close()  # once only
    assert [s["step"] for _, s in sent] == [1, 100]  # the first step, then nothing until the close
    assert {k for k, _ in sent} == {progress.key} and progress.key.startswith("law-")
    assert sent[-1][1] == {"desc": "law", "total": 100, "step": 100, "closed": True,
                           "postfix": training_postfix(100 * 64 * 2, 4.0, 2000.0)}


def _tiny_training(progress, steps: int = 6) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from senmon.train.loop import Schedule, train_steps

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))
    batches = iter([torch.randint(0, 64, (2, 16)) for _ in range(steps)])
    return train_steps(model, batches, Schedule(steps, 1e-3), progress=progress)


def test_the_training_loop_draws_its_bar_when_on_and_nothing_when_off(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "1")  # forced on, although the stream is no terminal
    stream = io.StringIO()
    assert Relay(file=stream).on
    display = Display(stream)  # what the driver's relay draws with, here without the actor between
    final = _tiny_training(TrainingProgress(display.show, "tiny", 6, interval_s=0))
    text = stream.getvalue()
    losses = final["loss_curve"]  # every step's loss at 6 steps
    assert "tiny:" in text and "1/6 [" in text and "6/6 [" in text
    assert f"loss {losses[0]:.3f}," in text and f"loss {losses[-1]:.3f}," in text
    assert f"{final['tokens_seen']} tokens," in text and "tokens/s]" in text and "[00:0" in text  # elapsed<ETA
    assert not display.bars  # the closed bar is gone, its last line stays

    monkeypatch.setenv(ENV, "0")
    stream = io.StringIO()
    with Relay(file=stream) as relay:  # bars off: no board, so the job's worker gets no bar
        assert not relay.on and relay.board is None
        assert relay.wrap(print) is print
        final = _tiny_training(training_progress(relay.board, "tiny", 6))
    assert final["step"] == 6
    assert stream.getvalue() == ""
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.slow
def test_the_relay_draws_a_bar_posted_from_a_ray_worker(ray_local):
    stream = io.StringIO()

    @ray_local.remote(num_cpus=0)
    def work(board) -> None:
        progress = training_progress(board, "remote", 3, workers=2)
        for step in (1, 2, 3):
            progress.update(step, step * 100, 2.0, 50.0)
        progress.close()

    with Relay(file=stream, on=True, interval_s=0.1) as relay:
        ray_local.get(work.remote(relay.board))
    text = stream.getvalue()
    assert "remote:" in text and "3/3" in text and "loss 2.000, 600 tokens, 100 tokens/s" in text
