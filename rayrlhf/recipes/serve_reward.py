"""`rayrlhf serve-reward`: a reward function or a reward model behind HTTP, for `reward.remote`.

    POST /score  {"prompts": [str], "responses": [str], "rows": [{...}]}   (rows optional)
            200  {"scores": [float | null | {"score": float | null, "<extra>": float, ...}]}
    GET /health  200 {"status": "ok", "scorer": "..."}

One entry per sample, in order; null marks a sample the scorer could not score (a None, NaN or
inf from the function), which the trainer masks. A request that is not the schema gets 422, a
function that raises or breaks the contract 500 with its message (the client retries 5xx, then
stops the run naming the URL: rayrlhf.workers.reward_client).

`--rule module:function` is called through the reward contract (rayrlhf.workers.reward_fns:
legacy two-argument functions, async ones, dict results). A sync function runs in a worker
thread, so /health stays responsive during a slow batch. `--model PATH` loads a one-label
sequence-classification reward model (`load_frozen`: the CPU, one GPU, or split over several)
and scores the text re-encoded with the model's own tokenizer and chat template, exactly as the
reward actor does for a reward model whose tokenizer differs from the policy's; one batch at a
time, in micro-batches.

One process, one event loop (FastAPI on uvicorn), bound to 127.0.0.1 unless --host says
otherwise; there is no authentication, so bind a reachable address only on a trusted network.
To scale out, run several of these behind a load balancer, or mount `build_app` in Ray Serve
(a deployment per replica on the same cluster; `ray[serve]` is not in this project's pins).
SIGTERM or Ctrl-C finishes the requests in flight and exits 0.
"""

from __future__ import annotations

import asyncio
import math
import signal
import socket
import sys
import threading
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rayrlhf.config import ConfigError, Section, format_validation_error
from rayrlhf.types import pad_rows
from rayrlhf.workers.reward_fns import RewardFn, RewardFnError, TermScores, load_reward_fn


class ServeRewardConfig(Section):
    """What `rayrlhf serve-reward` serves, and where."""

    rule: str | None = None
    """A reward function 'module:function' (the reward contract: prompts, responses, rows)."""
    model: str | None = None
    """HF directory of a one-label sequence-classification reward model, with its tokenizer."""
    host: str = "127.0.0.1"
    """Address to listen on; the default is reachable from this machine only."""
    port: int = Field(8300, ge=0, le=65535)
    """TCP port; 0 picks a free one (the URL printed at start names it)."""
    micro_batch_size: int = Field(16, ge=1)
    """Sequences per reward-model forward pass (--model)."""

    @model_validator(mode="after")
    def _one_scorer(self) -> ServeRewardConfig:
        if (self.rule is None) == (self.model is None):
            raise ValueError("give exactly one of --rule module:function or --model PATH")
        return self


class ScoreRequest(BaseModel):
    """The body of POST /score: B samples."""

    model_config = ConfigDict(extra="forbid")
    prompts: list[str]
    responses: list[str]
    rows: list[dict] | None = None
    """Each sample's dataset row without its prompt column; absent means `{}` each."""

    @model_validator(mode="after")
    def _same_length(self) -> ScoreRequest:
        rows = len(self.prompts) if self.rows is None else len(self.rows)
        if not len(self.prompts) == len(self.responses) == rows:
            raise ValueError(
                f"{len(self.prompts)} prompts, {len(self.responses)} responses and {rows} rows: "
                "they must be the same length"
            )
        return self


def to_json(term: TermScores) -> list:
    """A function's normalised scores as the reply's entries: NaN (invalid) becomes null."""

    def value(x: float) -> float | None:
        return x if math.isfinite(x) else None

    scores = [value(s) for s in term.scores.tolist()]
    if not term.extras:
        return scores
    extras = {name: column.tolist() for name, column in term.extras.items()}
    return [
        {"score": s} | {name: value(column[i]) for name, column in extras.items()}
        for i, s in enumerate(scores)
    ]


class RuleScorer:
    """A reward function of the contract."""

    def __init__(self, spec: str) -> None:
        self.fn: RewardFn = load_reward_fn(spec)
        self.name = f"rule {spec}"

    async def __call__(self, prompts: list[str], responses: list[str], rows: list[dict]) -> list:
        # In a thread: a sync function would block the loop (an async one gets its own loop).
        return to_json(await asyncio.to_thread(self.fn, prompts, responses, rows))


class ModelScorer:
    """A sequence-classification reward model reading its own tokenizer's ids of the text."""

    def __init__(self, path: str, micro_batch_size: int) -> None:
        # Imported here: transformers' start-up is seconds a rule server need not wait.
        from transformers import AutoTokenizer

        from rayrlhf.models.forward import sequence_scores
        from rayrlhf.models.frozen import load_frozen
        from rayrlhf.workers.reward import RetokenizedRM

        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"--model {path}: no config.json there (an HF model directory)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--model {path}: no tokenizer saved with it ({err})") from None
        self.model = load_frozen("reward", path)
        self.encoder = RetokenizedRM(tokenizer)
        self.forward, self.micro_batch_size = sequence_scores, micro_batch_size
        self.lock = threading.Lock()  # one batch at a time: torch already uses every core
        self.name = f"model {path}"

    async def __call__(self, prompts: list[str], responses: list[str], rows: list[dict]) -> list:
        del rows  # a reward model reads the text alone
        return await asyncio.to_thread(self.scores, prompts, responses)

    @torch.no_grad()
    def scores(self, prompts: list[str], responses: list[str]) -> list[float | None]:
        """[B] scores of (prompt, response) texts, NaN as None."""
        ids = [self.encoder.encode(p, r) for p, r in zip(prompts, responses)]
        out: list[float] = []
        with self.lock:
            for i in range(0, len(ids), self.micro_batch_size):
                part = ids[i : i + self.micro_batch_size]
                seqs = pad_rows(part, self.encoder.pad_id, left=False)
                mask = pad_rows([[1] * len(p) for p in part], 0, left=False)
                out += self.forward(self.model, seqs, mask).cpu().tolist()
        return [s if math.isfinite(s) else None for s in out]


def build_app(scorer) -> FastAPI:
    """The HTTP app around `scorer`, an async `(prompts, responses, rows) -> list` with a
    `name`. Mountable elsewhere (e.g. a Ray Serve deployment)."""
    app = FastAPI(title="rayrlhf reward server", summary=scorer.name)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "scorer": scorer.name}

    @app.post("/score")
    async def score(request: ScoreRequest) -> JSONResponse:
        rows = request.rows if request.rows is not None else [{} for _ in request.prompts]
        if not request.prompts:
            return JSONResponse({"scores": []})
        try:
            scores = await scorer(request.prompts, request.responses, rows)
        except Exception as err:  # the client shows the message, the log keeps it too
            print(f"rayrlhf: reward server: {type(err).__name__}: {err}", file=sys.stderr)
            return JSONResponse({"detail": f"{type(err).__name__}: {err}"}, status_code=500)
        return JSONResponse({"scores": scores})

    return app


def build_scorer(cfg: ServeRewardConfig):
    """The rule or model scorer; bad input is a ConfigError (exit 2, before listening)."""
    if cfg.model is not None:
        return ModelScorer(cfg.model, cfg.micro_batch_size)
    try:
        return RuleScorer(cfg.rule)
    except RewardFnError as err:
        raise ConfigError(str(err)) from None


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port): bound before the URL is printed, so a client that
    reads it and connects at once is queued, not refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(128)
    return sock


def serve(cfg: ServeRewardConfig) -> None:
    """Load the scorer, listen, print the URL, serve until SIGTERM or SIGINT."""
    scorer = build_scorer(cfg)
    sock = listen(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"rayrlhf: reward server ({scorer.name}) on http://{shown}:{port}/score", flush=True)
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"rayrlhf: {host} is reachable from other machines; there is no authentication")
    stops: list[int] = []
    server = uvicorn.Server(
        uvicorn.Config(build_app(scorer), log_level="warning", timeout_graceful_shutdown=5)
    )
    # uvicorn re-raises the stopping signal after its graceful shutdown; with these handlers
    # that ends in a clean exit 0 rather than death by SIGTERM.
    previous = {s: signal.signal(s, lambda sig, _: stops.append(sig)) for s in _SIGNALS}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    why = signal.Signals(stops[0]).name if stops else "shutdown"
    print(f"rayrlhf: reward server stopped ({why})", flush=True)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def main(**options) -> None:
    """`rayrlhf serve-reward`: options not given take ServeRewardConfig's defaults."""
    try:
        cfg = ServeRewardConfig(**options)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    serve(cfg)
