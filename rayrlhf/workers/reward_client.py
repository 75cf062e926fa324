"""The client of a remote reward server (`reward.remote`): one more reward contract function.

A batch of B samples goes out as ceil(B / batch_size) POST requests to `url`
(`{"prompts", "responses", "rows"}` -> `{"scores"}`, the schema in docs/rewards.md), at most
`max_concurrency` in flight. Each attempt has `timeout_s` in all (connect, send, wait, read: a
scorer that accepts and never answers is cut off too); a connection error, a time-out, HTTP 429
or 5xx is retried `retries` times, sleeping `backoff_s`, then twice that, and so on. Anything
else (4xx, a reply that is not the schema) is a bug that a retry would not fix and fails at once.
The first request to fail for good cancels the others, so a scorer that is down costs about
`timeout_s * (retries + 1) + backoff_s * (2**retries - 1)` seconds, never a hang, and the error
(`RemoteRewardError`) names the URL and the cause.

`rayrlhf serve-reward` (rayrlhf.recipes.serve_reward) is the matching server.
"""

from __future__ import annotations

import asyncio
import json
import sys

import httpx

from rayrlhf.config import RemoteRewardConfig

Score = float | dict | None
"""One sample's reply: a float, a dict with a float `score` and float extras, or None (the
scorer could not score it). None and NaN are masked by the reward worker, as a rule's are."""
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses that a later attempt may not see (overload, restart, a proxy's time-out)."""

JSON = {"content-type": "application/json"}


class RemoteRewardError(RuntimeError):
    """The reward server failed for good: down, too slow, or answering outside the schema. The
    message names the URL."""


class _Retryable(Exception):
    """An attempt failed in a way a later attempt may not (connection, time-out, 5xx)."""


class RemoteReward:
    """`await RemoteReward(cfg)(prompts, responses, rows)` -> one score per sample, in order."""

    def __init__(self, cfg: RemoteRewardConfig) -> None:
        self.cfg = cfg

    def __repr__(self) -> str:
        return f"RemoteReward({self.cfg.url})"

    async def __call__(
        self, prompts: list[str], responses: list[str], rows: list[dict] | None = None
    ) -> list[Score]:
        rows = [{} for _ in prompts] if rows is None else rows
        if not len(prompts) == len(responses) == len(rows):
            raise ValueError(
                f"reward server {self.cfg.url}: {len(prompts)} prompts, {len(responses)} "
                f"responses, {len(rows)} rows"
            )
        step = self.cfg.batch_size
        gate = asyncio.Semaphore(self.cfg.max_concurrency)
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency)
        async with httpx.AsyncClient(timeout=self.cfg.timeout_s, limits=limits) as client:
            tasks = [
                asyncio.create_task(
                    self._chunk(client, gate, prompts[i : i + step], responses[i : i + step],
                                rows[i : i + step], i)
                )
                for i in range(0, len(prompts), step)
            ]  # fmt: skip
            try:
                parts = await asyncio.gather(*tasks)
            finally:  # the first failure ends the call: no request outlives it
                for task in tasks:
                    task.cancel()
        return [score for part in parts for score in part]

    async def _chunk(
        self,
        client: httpx.AsyncClient,
        gate: asyncio.Semaphore,
        prompts: list[str],
        responses: list[str],
        rows: list[dict],
        first: int,
    ) -> list[Score]:
        """Scores of samples [first, first + len(prompts)), with retries."""
        payload = {"prompts": prompts, "responses": responses, "rows": rows}
        body = json.dumps(payload, default=_jsonable).encode()  # once, for every attempt
        where = f"samples {first}-{first + len(prompts) - 1}"
        async with gate:
            for attempt in range(self.cfg.retries):
                try:
                    return await self._attempt(client, body, len(prompts), where)
                except _Retryable as err:
                    wait = self.cfg.backoff_s * 2**attempt
                    print(
                        f"rayrlhf: reward server {self.cfg.url}: {err} ({where}); retry "
                        f"{attempt + 1}/{self.cfg.retries} in {wait:g} s",
                        file=sys.stderr,
                    )
                    await asyncio.sleep(wait)
            try:
                return await self._attempt(client, body, len(prompts), where)
            except _Retryable as err:
                raise self._error(f"{err} ({where}; {self.cfg.retries + 1} attempts)") from None

    async def _attempt(
        self, client: httpx.AsyncClient, body: bytes, n: int, where: str
    ) -> list[Score]:
        """One POST; `_Retryable` for what may pass, `RemoteRewardError` for what will not."""
        try:
            async with asyncio.timeout(self.cfg.timeout_s):  # the whole attempt, not per read
                reply = await client.post(self.cfg.url, content=body, headers=JSON)
        except (TimeoutError, httpx.TimeoutException):
            raise _Retryable(f"no reply within timeout_s={self.cfg.timeout_s}") from None
        except httpx.TransportError as err:
            raise _Retryable(f"{type(err).__name__}: {err or 'connection failed'}") from None
        if reply.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {reply.status_code}: {reply.text[:300]}")
        if reply.status_code != 200:
            raise self._error(f"HTTP {reply.status_code} ({where}): {reply.text[:300]}")
        try:
            reply_body = reply.json()
        except ValueError:
            raise self._error(f"reply is not JSON ({where}): {reply.text[:200]!r}") from None
        try:
            return parse_scores(reply_body, n)
        except ValueError as err:
            raise self._error(f"{err} ({where})") from None

    def _error(self, cause: str) -> RemoteRewardError:
        return RemoteRewardError(f"reward server {self.cfg.url}: {cause}")


def parse_scores(body: object, n: int) -> list[Score]:
    """The `scores` of a reply, checked: `n` entries, each a number, None, or a dict with a
    `score` and extras, each a number or None. Raises ValueError naming the first bad entry."""
    scores = body.get("scores") if isinstance(body, dict) else None
    if not isinstance(scores, list):
        raise ValueError(f'reply is not {{"scores": [...]}}: {str(body)[:200]}')
    if len(scores) != n:
        raise ValueError(f"reply has {len(scores)} scores for {n} samples")
    return [_parse_one(s, i) for i, s in enumerate(scores)]


def _jsonable(value: object) -> object:
    """A row value json cannot encode: numpy arrays and scalars (parquet rows) as their Python
    values, anything else (dates, decimals) as its text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _parse_one(value: object, i: int) -> Score:
    if value is None or _number(value):
        return _float(value)
    if isinstance(value, dict) and "score" in value:
        if all(v is None or _number(v) for v in value.values()):
            return {k: _float(v) for k, v in value.items()}
    raise ValueError(
        f'score {i} is {str(value)[:100]!r}: expected a number, null or {{"score": number, '
        f'"<extra>": number, ...}}'
    )


def _float(value: float | None) -> float | None:
    return None if value is None else float(value)
