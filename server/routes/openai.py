"""OpenAI-compatible routes: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ..errors import APIError, error_response, sse_error
from ..jobs import (
    ChatSpec,
    PromptSpec,
    ServerState,
    next_event,
    submit_chat,
    submit_prompt,
)
from ..openai_format import (
    ChatAccumulator,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    event_delta,
    sse,
    usage_chunk,
)
from ..schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from ..worker import Job, NotAccepting
from .auth import require_key

router = APIRouter(dependencies=[Depends(require_key)])


def _state(request: Request) -> ServerState:
    return request.app.state.tiercache


def _sampling(body: _Sampling) -> dict:
    """The :class:`server.jobs.PromptSpec` fields of an OpenAI request body."""
    return {
        "model": body.model, "max_tokens": body.requested_max_tokens(),
        "temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k,
        "min_p": body.min_p, "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repetition_penalty, "logit_bias": body.bias_by_id(),
        "seed": body.seed, "stops": body.stop_list(), "salt": body.cache_salt,
    }


def chat_spec(body: ChatCompletionRequest) -> ChatSpec:
    """Turn a chat completion request into a :class:`server.jobs.ChatSpec`.

    Raises:
        APIError: 400 for non-text content parts or tool-call arguments that
            are not a JSON object.
    """
    messages = []
    for i, m in enumerate(body.messages):
        try:
            messages.append(m.to_template())
        except ValueError as exc:
            raise APIError(400, f"messages[{i}]: {exc}", f"messages[{i}]") from None
    choice = body.tool_choice
    if choice is not None and not isinstance(choice, str):
        choice = choice.function.name
    tools = [t.to_template() for t in body.tools] if body.tools else None
    return ChatSpec(messages=messages, tools=tools, tool_choice=choice,
                    parallel_tool_calls=body.parallel_tool_calls,
                    template_kwargs=dict(body.chat_template_kwargs or {}), **_sampling(body))


def _base(state: ServerState, job: Job, prefix: str) -> dict:
    return {"id": prefix + job.id, "created": int(time.time()),
            "model": state.engine.model_id, "system_fingerprint": "tiercache"}


async def _collect(job: Job, request: Request, acc: ChatAccumulator | None, texts: list):
    """Read events until done; return ``(finish, usage)`` or an error response."""
    try:
        while True:
            ev = await next_event(job, request)
            if ev[0] == "done":
                return ev[1], ev[2]
            if ev[0] == "error":
                return _error_response(ev[1]), None
            if acc is not None:
                acc.add(ev)
            elif ev[0] == "text":
                texts.append(ev[1])
    except BaseException:
        job.cancel()
        raise


def _error_response(exc: BaseException):
    """Return the response for a job's error event (503 when shutdown cut it off)."""
    if isinstance(exc, NotAccepting):
        return error_response(503, str(exc), None, "not_ready")
    return error_response(500, f"generation failed: {exc}", None, "generation_failed")


def _sse_error(exc: BaseException) -> str:
    """Return the SSE error line for a job's error event (503 at the shutdown deadline)."""
    if isinstance(exc, NotAccepting):
        return sse_error(str(exc), 503)
    return sse_error(f"generation failed: {exc}")


def _streaming(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    """Chat completion with tools, reasoning and the cache's usage details."""
    state = _state(request)
    spec = chat_spec(body)
    job, _ = await submit_chat(state, spec, request)
    base = _base(state, job, "chatcmpl-")
    if body.stream:
        return _streaming(_chat_stream(job, base, body.include_usage()))
    acc = ChatAccumulator()
    finish, usage = await _collect(job, request, acc, [])
    if usage is None:
        return finish
    return chat_response(base, acc.message(), finish, usage)


async def _chat_stream(job: Job, base: dict, include_usage: bool) -> AsyncIterator[str]:
    done = False
    tools = 0
    try:
        yield sse(chat_chunk(base, {"role": "assistant", "content": ""},
                             include_usage=include_usage))
        while True:
            ev = await job.events.get()
            if ev[0] == "done":
                yield sse(chat_chunk(base, {}, ev[1], include_usage))
                if include_usage:
                    yield sse(usage_chunk(base, ev[2]))
                break
            if ev[0] == "error":
                yield _sse_error(ev[1])
                break
            delta = event_delta(ev, tools)
            if delta is not None:
                tools += ev[0] == "tool_call"
                yield sse(chat_chunk(base, delta, include_usage=include_usage))
        done = True
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            job.cancel()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    """Plain text completion of a prompt (text or token ids)."""
    if body.echo:
        raise APIError(400, "echo is not supported", "echo")
    state = _state(request)
    spec = PromptSpec(prompt=body.prompt, api="openai.completions", **_sampling(body))
    job, _ = await submit_prompt(state, spec, request)
    base = _base(state, job, "cmpl-")
    if body.stream:
        return _streaming(_completion_stream(job, base, body.include_usage()))
    texts: list[str] = []
    finish, usage = await _collect(job, request, None, texts)
    if usage is None:
        return finish
    return completion_response(base, "".join(texts), finish, usage)


async def _completion_stream(job: Job, base: dict, include_usage: bool) -> AsyncIterator[str]:
    done = False
    try:
        while True:
            ev = await job.events.get()
            if ev[0] == "text":
                yield sse(completion_chunk(base, ev[1], include_usage=include_usage))
            elif ev[0] == "done":
                yield sse(completion_chunk(base, "", ev[1], include_usage))
                if include_usage:
                    yield sse(usage_chunk(base, ev[2], chat=False))
                break
            elif ev[0] == "error":
                yield _sse_error(ev[1])
                break
        done = True
        yield "data: [DONE]\n\n"
    finally:
        if not done:
            job.cancel()


def _model_card(state: ServerState, name: str | None = None) -> dict:
    engine = state.engine
    return {"id": name or engine.model_id, "object": "model", "created": engine.created,
            "owned_by": "tiercache"}


@router.get("/v1/models")
async def models(request: Request):
    """List the served model under each of its names."""
    state = _state(request)
    return {"object": "list",
            "data": [_model_card(state, n) for n in state.engine.served_names()]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request):
    """Describe the served model (404 for a name it does not serve)."""
    state = _state(request)
    engine = state.engine
    if not engine.matches_model(model_id):
        raise APIError(404, f"the model {model_id!r} does not exist", "model",
                       "model_not_found")
    # The model's path or folder name answers with the served id; an alias (or,
    # without --strict-model-name, any other name) answers as itself.
    by_path = engine.knows_model(model_id) and model_id not in engine.served_names()
    return _model_card(state, None if by_path else model_id)
