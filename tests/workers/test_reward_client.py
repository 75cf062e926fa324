"""RemoteReward against a real uvicorn server on 127.0.0.1: order, batching, the concurrency
limit, retries that recover, a down or hung scorer failing within its time-out, bad replies."""

from __future__ import annotations

import asyncio
import threading
import time
from contextlib import contextmanager

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from rayrlhf.cluster.rendezvous import free_port
from rayrlhf.config import RemoteRewardConfig
from rayrlhf.workers.reward_client import RemoteReward, RemoteRewardError, parse_scores


class Scorer:
    """A scorer whose replies a test sets: `mode`, `fail_first` 503s, a delay per request."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.fail_first = 0
        self.delay_s = 0.0
        self.requests = 0
        self.in_flight = self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.app = FastAPI()
        self.app.post("/score")(self.score)

    async def score(self, request: Request):
        body = await request.json()
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.in_flight -= 1
        self.bodies.append(body)
        if self.requests <= self.fail_first:
            return PlainTextResponse("warming up", status_code=503)
        scores = [float(len(r)) for r in body["responses"]]
        replies = {
            "ok": {"scores": scores},
            "extras": {"scores": [{"score": s, "accuracy": 1.0} for s in scores]},
            "short": {"scores": scores[:-1]},
            "string": {"scores": ["high"] * len(scores)},
            "bad_extra": {"scores": [{"score": 1.0, "note": "x"}] * len(scores)},
            "no_key": {"results": scores},
        }
        if self.mode == "not_json":
            return PlainTextResponse("<html>oops</html>")
        if self.mode == "422":
            return JSONResponse({"detail": "prompts: field required"}, status_code=422)
        return replies[self.mode]


@contextmanager
def serving(app: FastAPI, port: int):
    """uvicorn in a thread until the block ends."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def scorer():
    scorer, port = Scorer(), free_port()
    with serving(scorer.app, port):
        scorer.url = f"http://127.0.0.1:{port}/score"
        yield scorer


def client(url: str, **kwargs) -> RemoteReward:
    return RemoteReward(RemoteRewardConfig(url=url, **kwargs))


def score(remote: RemoteReward, n: int, rows: list[dict] | None = None):
    responses = ["x" * i for i in range(n)]
    return asyncio.run(remote([f"p{i}" for i in range(n)], responses, rows))


def test_batches_keep_order_and_carry_rows(scorer):
    rows = [{"answer": str(i)} for i in range(7)]
    assert score(client(scorer.url, batch_size=3), 7, rows) == [float(i) for i in range(7)]
    assert scorer.requests == 3  # 3 + 3 + 1
    assert [len(b["prompts"]) for b in sorted(scorer.bodies, key=lambda b: b["prompts"][0])] == [
        3,
        3,
        1,
    ]
    assert sorted(r["answer"] for b in scorer.bodies for r in b["rows"]) == [
        str(i) for i in range(7)
    ]


def test_extras_pass_through(scorer):
    scorer.mode = "extras"
    assert score(client(scorer.url), 2) == [
        {"score": 0.0, "accuracy": 1.0},
        {"score": 1.0, "accuracy": 1.0},
    ]


def test_empty_batch_sends_nothing(scorer):
    assert score(client(scorer.url), 0) == []
    assert scorer.requests == 0


def test_concurrency_limit_is_respected(scorer):
    scorer.delay_s = 0.2
    out = score(client(scorer.url, batch_size=2, max_concurrency=3), 20)
    assert out == [float(i) for i in range(20)]
    assert scorer.requests == 10
    assert scorer.max_in_flight == 3  # never more, and the limit is actually used


def test_retries_recover_from_503(scorer):
    scorer.fail_first = 2
    assert score(client(scorer.url, retries=2, backoff_s=0.05), 3) == [0.0, 1.0, 2.0]
    assert scorer.requests == 3


def test_retries_recover_when_the_server_comes_back():
    scorer, port = Scorer(), free_port()
    url = f"http://127.0.0.1:{port}/score"
    remote = client(url, retries=4, backoff_s=0.3)  # attempts at ~0, 0.3, 0.9, 2.1, 4.5 s

    def late_start(done: threading.Event) -> None:
        time.sleep(0.5)
        with serving(scorer.app, port):
            done.wait(20)

    done = threading.Event()
    thread = threading.Thread(target=late_start, args=(done,))
    thread.start()
    try:
        assert score(remote, 2) == [0.0, 1.0]
    finally:
        done.set()
        thread.join()
    assert scorer.requests == 1  # the refused attempts never reached it


def test_a_down_server_fails_fast_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/score"
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="reward server " + url) as err:
        score(client(url, timeout_s=1.0, retries=2, backoff_s=0.1), 4)
    assert time.monotonic() - start < 1.0 * 3 + 0.3 + 1  # timeout * attempts + back-off + slack
    assert "3 attempts" in str(err.value) and "ConnectError" in str(err.value)


def test_a_hung_server_times_out_and_never_hangs(scorer):
    scorer.delay_s = 30
    start = time.monotonic()
    with pytest.raises(RemoteRewardError, match="no reply within timeout_s=0.3") as err:
        score(client(scorer.url, timeout_s=0.3, retries=1, backoff_s=0.1, batch_size=1), 12)
    took = time.monotonic() - start
    # 12 requests, 4 at a time: the first to fail for good cancels the rest.
    assert took < 0.3 * 2 + 0.1 + 1.0, took
    assert scorer.url in str(err.value)


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("short", "reply has 2 scores for 3 samples"),
        ("string", "score 0 is 'high'"),
        ("bad_extra", "score 0 is"),
        ("no_key", 'reply is not {"scores"'),
        ("not_json", "reply is not JSON"),
        ("422", "HTTP 422"),
    ],
)
def test_bad_replies_are_rejected_without_retry(scorer, mode, message):
    scorer.mode = mode
    with pytest.raises(RemoteRewardError, match="reward server http://127.0.0.1") as err:
        score(client(scorer.url, retries=3, backoff_s=0.01), 3)
    assert message in str(err.value)
    assert scorer.requests == 1  # a retry would get the same answer


def test_parse_scores_accepts_numbers_null_and_dicts():
    body = {"scores": [1, 0.5, None, {"score": None}, {"score": 2, "format_ok": 0, "acc": None}]}
    assert parse_scores(body, 5) == [
        1.0,
        0.5,
        None,
        {"score": None},
        {"score": 2.0, "format_ok": 0.0, "acc": None},
    ]
    for bad in (True, [1.0], {"accuracy": 1.0}, {"score": "1"}):
        with pytest.raises(ValueError, match="score 0 is"):
            parse_scores({"scores": [bad]}, 1)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 prompts, 1 responses"):
        asyncio.run(client("http://127.0.0.1:1/score")(["a", "b"], ["x"], None))
