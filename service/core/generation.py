"""Generation: sample tokens from a token model, one step per token through the batcher.

`Generator.generate` runs a whole generation as ONE applied chunk of a session (seq = last + 1): the state
then holds the prime and every generated token, a retry of that seq replays the cached tokens, and a failure
or a cancelled stream rolls the state back. Each sampled token is fed back as one step through the batcher,
so concurrent generations batch together. Prime encoding and sampling are pure functions (numpy only).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import numpy as np

from service.config import Settings
from service.core.scheduler import StepRequest
from service.core.sessions import SessionManager
from service.core.stepping import out_of_order
from service.core.table import Session
from service.core.types import GeneratedToken, ModelSpec, StepResult
from service.errors import FailedPrecondition, InvalidArgument, OutOfRange, ServeError

GENERATED = "generated_tokens"  # the cached output of a generation chunk: the sampled token ids


def encode_text(text: str, vocabulary: Sequence[str]) -> list[int]:
    """Token ids of `text`: longest vocabulary entry first at each position.

    Raises InvalidArgument naming every character that no vocabulary entry covers.
    """
    index = {tok: i for i, tok in enumerate(vocabulary) if tok}
    longest = max((len(t) for t in index), default=1)
    ids: list[int] = []
    unknown: list[str] = []
    pos = 0
    while pos < len(text):
        for width in range(min(longest, len(text) - pos), 0, -1):
            tid = index.get(text[pos : pos + width])
            if tid is not None:
                ids.append(tid)
                pos += width
                break
        else:
            if text[pos] not in unknown:
                unknown.append(text[pos])
            pos += 1
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:20])
        raise InvalidArgument(
            f"prime text has characters outside the model's vocabulary: {shown}; "
            f"expected only characters from the {len(vocabulary)}-token vocabulary"
        )
    return ids


def check_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Raise InvalidArgument unless every id is in [0, vocab_size)."""
    bad = [i for i in ids if not 0 <= int(i) < vocab_size]
    if bad:
        raise InvalidArgument(f"token ids {bad[:10]} are out of range; expected 0 <= id < {vocab_size}")


def sample(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """One token id from a `(V,)` logit vector.

    temperature 0 means greedy (argmax); top_k 0 means the whole vocabulary.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[0]:
        cut = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled >= cut, scaled, -np.inf)
    scaled -= scaled.max()
    probs = np.exp(scaled)
    probs /= probs.sum()
    return int(rng.choice(probs.shape[0], p=probs))


class Generator:
    """Generations on sessions (see the module docstring)."""

    def __init__(self, settings: Settings, sessions: SessionManager) -> None:
        self.settings = settings
        self.sessions = sessions

    async def generate(
        self,
        *,
        model: str | None = None,
        version: int | None = None,
        session_id: str | None = None,
        seq: int = 0,
        prime_ids: Sequence[int] | None = None,
        prime_text: str | None = None,
        n: int = 1,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
    ) -> AsyncIterator[GeneratedToken]:
        """Sample `n` tokens after a prime, streaming each as it is sampled (token models only).

        On an existing session the whole generation is ONE applied chunk (seq = last + 1); the state then
        holds the prime and every generated token, and a retry of that seq replays the cached tokens. With
        `model` it runs on a throwaway session. A failure or a cancelled stream rolls the state back. Wrap the
        iterator in `contextlib.aclosing` so a cancelled caller releases the session at once.
        """
        if (session_id is None) == (model is None):
            raise InvalidArgument("generate needs exactly one of a model (fresh session) or a session id")
        if not isinstance(n, int) or n < 1 or n > self.settings.max_chunk_steps:
            raise OutOfRange(f"n must be between 1 and {self.settings.max_chunk_steps} tokens, got {n}")
        if not np.isfinite(temperature) or temperature < 0:
            raise InvalidArgument(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = whole vocabulary), got {top_k}")
        if session_id is None:
            assert model is not None
            self._token_model(self.sessions.host.get(model, version).spec)
            info = self.sessions.info(await self.sessions.create(model, version, None, None, "native"))
            session_id, seq, temporary = info.session_id, 1, True
        else:
            temporary = False
        try:
            async with self.sessions.exclusive(session_id) as s:
                spec = self._token_model(s.mv.spec)
                cached = self.sessions.cached(s) if seq == s.last_seq else None
                if cached is not None and GENERATED in cached.outputs:
                    for tid in cached.outputs[GENERATED].tolist():
                        yield GeneratedToken(int(tid), spec.vocabulary[tid])  # type: ignore[index]
                    return
                if seq != s.last_seq + 1:
                    out_of_order(self.sessions, s, seq, False)
                    raise FailedPrecondition(f"seq {seq} was not a generation; expected seq {s.last_seq + 1}")
                prime = self._prime(spec, prime_ids, prime_text)
                if self.sessions.admission.rate_limited:  # the tenant's timesteps-per-second quota
                    self.sessions.admission.take_steps(s.tenant, len(prime) + n)
                sampler = self._sample(s, spec, seq, prime, n, temperature, top_k, seed)
                # Closing this generator closes the sampler at once, so its rollback runs in time.
                async with contextlib.aclosing(sampler):
                    async for token in sampler:
                        yield token
        finally:
            if temporary:
                with contextlib.suppress(ServeError):
                    await self.sessions.close(session_id)

    @staticmethod
    def _token_model(spec: ModelSpec) -> ModelSpec:
        if (
            spec.vocabulary is None
            or len(spec.inputs) != 1
            or spec.inputs[0].dtype.kind not in "iu"
            or not spec.time_axis
            or not spec.outputs
            or spec.outputs[0].dtype.kind != "f"
            or spec.controls
        ):
            raise FailedPrecondition(
                f"model {spec.name!r} is not a token model (needs a vocabulary, one integer "
                "token input with a time axis and a logits output); generate works on those"
            )
        return spec

    def _prime(self, spec: ModelSpec, prime_ids: Sequence[int] | None, prime_text: str | None) -> list[int]:
        assert spec.vocabulary is not None
        if prime_ids is not None and prime_text is not None and len(prime_ids) and prime_text:
            raise InvalidArgument("give the prime as token ids or as text, not both")
        ids = list(prime_ids) if prime_ids is not None and len(prime_ids) else []
        if not ids and prime_text:
            ids = encode_text(prime_text, spec.vocabulary)
        if not ids:
            raise InvalidArgument("the prime needs at least one token (ids or text)")
        check_ids(ids, len(spec.vocabulary))
        if len(ids) > spec.config.max_chunk_steps:
            raise OutOfRange(
                f"prime of {len(ids)} tokens is longer than max_chunk_steps ({spec.config.max_chunk_steps})"
            )
        return ids

    async def _sample(
        self,
        s: Session,
        spec: ModelSpec,
        seq: int,
        prime: list[int],
        n: int,
        temperature: float,
        top_k: int,
        seed: int | None,
    ) -> AsyncGenerator[GeneratedToken, None]:
        mv = s.mv
        assert mv.slab is not None and mv.batcher is not None and spec.vocabulary is not None
        saved = mv.slab.read(s.slot)
        token_in, logits_name = spec.inputs[0], spec.outputs[0].name
        rng = np.random.default_rng(seed)
        tokens: list[int] = []
        fut: asyncio.Future | None = None
        done = False
        try:
            chunk = np.asarray(prime, dtype=token_in.dtype)
            for i in range(n + 1):
                fut = asyncio.get_running_loop().create_future()
                mv.batcher.submit(StepRequest(s.slot, (chunk,), chunk.shape, fut, None, 0, len(chunk)))
                outs = await asyncio.shield(fut)
                if i == n:  # the last sampled token is fed too, so the state has consumed everything
                    break
                tid = sample(outs[logits_name][-1], temperature, top_k, rng)
                tokens.append(tid)
                yield GeneratedToken(tid, spec.vocabulary[tid])
                chunk = np.asarray([tid], dtype=token_in.dtype)
            s.last_seq = seq
            s.last_result = StepResult(seq, {GENERATED: np.asarray(tokens, np.int64)}, False)
            s.steps += len(prime) + n
            self.sessions.table.touch(s, time.monotonic())
            done = True
            if self.sessions.persist:
                await self.sessions.save(s)
        finally:
            if not done:
                if fut is not None and not fut.done():  # let the in-flight step land before rolling back
                    with contextlib.suppress(BaseException):
                        await asyncio.wait([fut])
                if mv.slab is not None and self.sessions.table.sessions.get(s.session_id) is s:
                    mv.slab.write(s.slot, saved)
