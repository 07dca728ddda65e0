"""The job layer shared by the API routers: request spec -> queued job -> events.

A router (OpenAI, Anthropic) turns its request body into a :class:`ChatSpec`
(or :class:`PromptSpec`), calls :func:`submit_chat` and then reads the job's
events with :func:`next_event`:

* ``("text", str)`` content text (stop strings already applied),
* ``("reasoning", str)`` thinking text,
* ``("tool_call", tiercache.chat.ToolCallEvent)`` one parsed tool call,
* ``("done", finish_reason, usage, stop_sequence)`` with ``finish_reason`` one of
  ``"stop"``, ``"length"``, ``"tool_calls"``, ``"cancelled"`` and ``stop_sequence``
  the stop string that ended generation (or None),
* ``("error", exception)`` if generation failed,
* ``("ping",)`` only from :func:`next_event` with ``ping_after`` (no event for a while).

Errors are raised as :class:`server.errors.APIError` (status, message, param,
code); a router with another error shape converts them in its handler.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from .config import ServerConfig
from .engine import Engine, GenParams, RequestError
from .errors import APIError, ClientGone
from .metrics import Metrics
from .worker import Job, NotAccepting, QueueFull, Worker

__all__ = [
    "ChatSpec",
    "PromptSpec",
    "ServerState",
    "next_event",
    "render_spec",
    "submit_chat",
    "submit_prompt",
]

#: Seconds between client-disconnect checks while waiting for an event.
POLL_SECONDS = 1.0


@dataclass
class ServerState:
    """What every router needs: ``request.app.state.tiercache``.

    Attributes:
        cfg: Server configuration.
        engine: The model, tokenizer and cache.
        worker: The generation worker.
        metrics: Prometheus metrics.
    """

    cfg: ServerConfig
    engine: Engine
    worker: Worker
    metrics: Metrics

    def require_ready(self) -> None:
        """Raise a 503 unless the model is loaded and jobs are accepted."""
        if not self.worker.ready:
            raise APIError(503, self.worker._why_not(), None, "not_ready")

    def require_model(self, name: str | None) -> None:
        """Raise a 404 unless ``name`` names the served model (or is empty)."""
        if not self.engine.matches_model(name):
            served = ", ".join(map(repr, self.engine.served_names()))
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                           f"{served}", "model", "model_not_found")


@dataclass(kw_only=True)
class PromptSpec:
    """Sampling and bookkeeping of one generation request.

    Attributes:
        model: The requested model name (checked against the served one).
        max_tokens: Completion token limit (None: the server default).
        temperature: Sampling temperature (None or 0: greedy).
        top_p, top_k, min_p: mlx-lm sampler parameters (None: off).
        presence_penalty, frequency_penalty, repetition_penalty: mlx-lm
            logits processors (None: off).
        logit_bias: Token id -> additive bias.
        seed: Random seed.
        stops: Stop strings (applied to content text; not included).
        salt: Cache isolation salt.
        prompt: Text or token ids (plain completions only).
        api: The client API, for the dashboard (``"openai.chat"``,
            ``"openai.completions"``, ``"anthropic.messages"``...).
        clamp_max_tokens: Lower ``max_tokens`` to what fits the context
            instead of refusing the request (Anthropic clients send a fixed
            large ``max_tokens`` meant as an upper bound).
    """

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    salt: str | None = None
    prompt: str | list[int] | None = None
    api: str = "openai.chat"
    clamp_max_tokens: bool = False


@dataclass(kw_only=True)
class ChatSpec(PromptSpec):
    """A chat request, in chat-template terms (see ``tiercache.chat.render``).

    Attributes:
        messages: Hugging Face chat-template message dicts (tool-call
            arguments as dicts).
        tools: OpenAI function tools
            (``[{"type": "function", "function": {...}}]``), or None.
        tool_choice: ``"auto"`` (default), ``"none"`` (the tools are not
            rendered and no call is parsed), ``"required"``, or a function
            name. ``"required"`` and a name are validated and rendered like
            ``"auto"``: decoding is not constrained.
        parallel_tool_calls: False ends generation after the first tool call.
        template_kwargs: Extra chat-template variables (``enable_thinking``...).
    """

    messages: list[dict]
    tools: list[dict] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool = True
    template_kwargs: dict[str, Any] = field(default_factory=dict)


def _tool_names(tools: list[dict] | None) -> list[str]:
    return [t.get("function", {}).get("name") for t in tools or ()]


def _effective_tools(spec: ChatSpec) -> list[dict] | None:
    """Return the tools to render, validating ``tool_choice`` against them."""
    choice = spec.tool_choice or "auto"
    if choice == "none":
        return None
    if choice == "required" and not spec.tools:
        raise APIError(400, "tool_choice \"required\" needs tools", "tool_choice")
    if choice not in ("auto", "required") and choice not in _tool_names(spec.tools):
        raise APIError(400, f"tool_choice names the function {choice!r}, which is not "
                       "among the tools", "tool_choice")
    return spec.tools or None


def _check_bias(state: ServerState, bias: dict[int, float] | None) -> None:
    vocab = state.engine.vocab_size
    for tok in bias or ():
        if tok < 0 or (vocab and tok >= vocab):
            raise APIError(400, f"logit_bias names token {tok}, outside the vocabulary",
                           "logit_bias", "invalid_token_id")


async def render_spec(state: ServerState, spec: ChatSpec):
    """Validate a chat spec and render its prompt (e.g. to count tokens).

    Returns:
        A :class:`tiercache.chat.RenderedPrompt`.

    Raises:
        APIError: 503 if not ready, 404 for another model, 400 for a bad
            ``tool_choice`` or a chat the template cannot render.
    """
    state.require_ready()
    state.require_model(spec.model)
    tools = _effective_tools(spec)
    try:
        return await run_in_threadpool(state.engine.render, spec.messages, tools,
                                       spec.template_kwargs)
    except RequestError as exc:
        raise APIError(400, str(exc), exc.param, exc.code) from None


def _params(state: ServerState, spec: PromptSpec, tokens: list[int], **extra) -> GenParams:
    _check_bias(state, spec.logit_bias)
    requested = spec.max_tokens
    ctx = state.engine.context_length
    if spec.clamp_max_tokens and requested is not None and ctx and len(tokens) < ctx:
        requested = min(requested, ctx - len(tokens))
    try:
        max_tokens = state.engine.resolve_max_tokens(tokens, requested)
    except RequestError as exc:
        raise APIError(400, str(exc), exc.param, exc.code) from None
    return GenParams(
        tokens=tokens,
        max_tokens=max_tokens,
        temperature=spec.temperature or 0.0,
        top_p=1.0 if spec.top_p is None else spec.top_p,
        top_k=spec.top_k or 0,
        min_p=spec.min_p or 0.0,
        presence_penalty=spec.presence_penalty,
        frequency_penalty=spec.frequency_penalty,
        repetition_penalty=spec.repetition_penalty,
        logit_bias=spec.logit_bias,
        seed=spec.seed,
        stops=list(spec.stops),
        salt=spec.salt,
        request_id=uuid.uuid4().hex[:12],
        api=spec.api,
        **extra,
    )


async def submit_chat(state: ServerState, spec: ChatSpec, request: Request) -> tuple[Job, dict]:
    """Render, validate and queue a chat request; wait for it to start.

    Args:
        state: The server state.
        spec: The chat request.
        request: The HTTP request (to notice a client that goes away).

    Returns:
        ``(job, usage)``: the running job and its prompt usage
        (``prompt_tokens``, ``prompt_tokens_details`` with ``cached_tokens``,
        ``memory_tokens``, ``disk_tokens``), known once the prefix lookup ran.

    Raises:
        APIError: 400/404/429/500/503 (see :func:`render_spec`); 429 when the
            queue is full.
        ClientGone: If the client disconnected while queued.
    """
    rendered = await render_spec(state, spec)
    tools = _effective_tools(spec)
    params = _params(state, spec, rendered.tokens, user_start=rendered.user_start,
                     chat=True, tools=tools,
                     reasoning=state.engine.thinking_default(spec.template_kwargs),
                     parallel_tool_calls=spec.parallel_tool_calls)
    return await _run(state, params, request)


async def submit_prompt(state: ServerState, spec: PromptSpec, request: Request) -> tuple[Job, dict]:
    """Queue a plain completion of ``spec.prompt`` (text or token ids).

    Returns and raises like :func:`submit_chat`; the job emits only
    ``("text", str)`` content events.
    """
    state.require_ready()
    state.require_model(spec.model)
    try:
        tokens = await run_in_threadpool(state.engine.prompt_tokens, spec.prompt)
    except RequestError as exc:
        raise APIError(400, str(exc), exc.param, exc.code) from None
    return await _run(state, _params(state, spec, tokens), request)


async def _run(state: ServerState, params: GenParams, request: Request) -> tuple[Job, dict]:
    job = Job(params, asyncio.get_running_loop())
    try:
        state.worker.submit(job)
    except QueueFull as exc:
        raise APIError(429, str(exc), None, "queue_full") from None
    except NotAccepting as exc:
        raise APIError(503, str(exc), None, "not_ready") from None
    state.metrics.queue_depth.set(state.worker.queue_depth)
    try:
        first = await next_event(job, request)
    except BaseException:
        job.cancel()
        raise
    if first[0] == "error":
        exc = first[1]
        if isinstance(exc, NotAccepting):
            raise APIError(503, str(exc), None, "not_ready")
        raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}",
                       None, "generation_failed")
    return job, first[1]


async def next_event(job: Job, request: Request, ping_after: float | None = None) -> tuple:
    """Return the job's next event; cancel the job if the client went away.

    Args:
        job: The running job.
        request: Its HTTP request (polled for a disconnect every second).
        ping_after: If set, return ``("ping",)`` after this many seconds
            without an event (so a streaming router can keep the client
            alive during a long prefill); the job keeps running.

    Raises:
        ClientGone: The client disconnected (the job is cancelled).
    """
    loop = asyncio.get_running_loop()
    deadline = None if ping_after is None else loop.time() + ping_after
    while True:
        wait = POLL_SECONDS if deadline is None else min(POLL_SECONDS, deadline - loop.time())
        try:
            return await asyncio.wait_for(job.events.get(), timeout=max(wait, 0.0))
        except TimeoutError:
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone() from None
            if deadline is not None and loop.time() >= deadline:
                return ("ping",)
