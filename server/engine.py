"""The model, its tokenizer and the tiered prompt cache; one generation.

:meth:`Engine.load` and :meth:`Engine.generate` run on the single worker
thread that owns MLX. Tokenization and validation are pure Python and may be
called from HTTP threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ServerConfig
from .output import Fetched, RequestOutput

logger = logging.getLogger("tiercache.server")

DEMO_MODEL_ID = "tiercache-demo"
DEMO_MODEL_NOTE = (
    "the built-in demo model has random weights, so its replies are meaningless "
    "text: it is there to show the cache working without a download "
    "(pass --model for a real model)"
)
_MAX_NAMES_LOGGED = 32


class RequestError(ValueError):
    """A request that cannot be served as given (HTTP 400).

    Args:
        message: Explanation for the client.
        param: The offending request field, if any.
        code: A short machine-readable code.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class Cancelled(Exception):
    """Raised inside prefill when the client went away."""


@dataclass
class GenParams:
    """What to generate for one request.

    Attributes:
        tokens: Prompt token ids.
        max_tokens: Completion token limit.
        temperature: Sampling temperature (0 = greedy).
        top_p: Nucleus sampling mass.
        seed: Optional random seed.
        stops: Stop strings (not included in the output).
        salt: Cache isolation salt.
        user_start: Token position where the last user or tool-result
            message starts (chat requests on models with non-trimmable
            cache layers).
        arrived: ``time.perf_counter()`` when the request arrived.
        request_id: For the log line.
        api: Which client API the request came through (dashboard).
        top_k: Sample among the ``top_k`` most likely tokens (0 = all).
        min_p: Minimum probability relative to the top token (0 = off).
        presence_penalty: Additive penalty on tokens already generated.
        frequency_penalty: Additive penalty proportional to a token's count.
        repetition_penalty: Multiplicative penalty on repeated tokens.
        logit_bias: Token id -> additive logit bias.
        chat: Parse the output into content, reasoning and tool calls
            (:class:`tiercache.chat.OutputParser`); False for plain completions.
        tools: The tools the prompt was rendered with (tool calls are only
            parsed when there are some).
        reasoning: Route the model's thinking to ``("reasoning", text)`` events.
        parallel_tool_calls: When False, generation ends after the first tool call.
    """

    tokens: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    salt: str | None = None
    arrived: float = field(default_factory=time.perf_counter)
    request_id: str = ""
    user_start: int = 0
    api: str = "openai.chat"
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[int, float] | None = None
    chat: bool = False
    tools: list | None = None
    reasoning: bool = False
    parallel_tool_calls: bool = True


def make_token_sampler(p: GenParams):
    """Return mlx-lm's sampler for the request's sampling parameters."""
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(p.temperature, top_p=p.top_p, min_p=p.min_p, top_k=p.top_k)


def make_token_processors(p: GenParams) -> list:
    """Return mlx-lm's logits processors for the request's penalties and biases."""
    from mlx_lm.sample_utils import make_logits_processors

    return make_logits_processors(
        logit_bias=p.logit_bias or None,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
    )


def _cache_offset(prompt_cache: list) -> int | None:
    """Return the token count held by the first layer that reports one."""
    for layer in prompt_cache:
        offset = getattr(layer, "offset", None)
        if isinstance(offset, int):
            return offset
    return None


class Engine:
    """Owns the model, tokenizer and :class:`tiercache.TieredPromptCache`.

    Args:
        cfg: Server configuration.
        metrics: A :class:`server.metrics.Metrics` (optional).
    """

    def __init__(self, cfg: ServerConfig, metrics: Any = None):
        self.cfg = cfg
        self.metrics = metrics
        self.model = None
        self.tokenizer = None
        self.cache = None
        self.model_path: str | None = None
        names = list(cfg.served_model_name)
        self.model_id = names[0] if names else (cfg.model or DEMO_MODEL_ID)
        self.aliases: list[str] = names[1:]
        self._names_logged: set[str] = set()
        self.model_key: str | None = None
        self.context_length: int | None = None
        self.vocab_size: int | None = None
        self.trimmable = True
        self.namespace: str | None = None
        self.created = int(time.time())

    # ------------------------------------------------------------------ load
    def load(self) -> None:
        """Load (or build) the model and open the tiered cache. Worker thread."""
        from mlx_lm import load as mlx_load

        from tiercache import TieredPromptCache

        cfg = self.cfg
        if cfg.model is None:
            from tiercache.demo_model import default_demo_model_path

            path = str(default_demo_model_path())
        else:
            local = Path(cfg.model).expanduser()
            path = str(local.resolve()) if local.is_dir() else cfg.model
        t0 = time.perf_counter()
        model, tokenizer, config = mlx_load(path, return_config=True)
        self.model, self.tokenizer, self.model_path = model, tokenizer, path
        self.model_key = path
        text_cfg = config.get("text_config", config) if isinstance(config, dict) else {}
        self.context_length = text_cfg.get("max_position_embeddings") or config.get(
            "max_position_embeddings"
        )
        self.vocab_size = text_cfg.get("vocab_size") or config.get("vocab_size")
        self.cache = TieredPromptCache(
            max_size=cfg.prompt_cache_size,
            max_bytes=cfg.prompt_cache_bytes if cfg.prompt_cache_bytes else 1 << 63,
            disk_dir=cfg.disk_dir,
            disk_bytes=cfg.disk_bytes,
            block_size=cfg.block_size,
            write_policy=cfg.write_policy,
            prewarm_bytes=cfg.prewarm_bytes,
            writer_queue_bytes=cfg.writer_queue_bytes,
            remote_url=cfg.remote_url,
            remote_ttl=cfg.remote_ttl,
            remote_timeout_ms=cfg.remote_timeout_ms,
            # Every request re-inserts what it computed, so a disk hit needn't also
            # stay in memory (that copy would make the first decode step copy it all).
            keep_promoted=False,
        )
        ns = self.cache.register_model(self.model_key, path, model)
        self.namespace = bytes(ns).hex() if ns is not None else None
        from mlx_lm.models.cache import (
            RotatingKVCache,
            can_trim_prompt_cache,
            make_prompt_cache,
        )

        # A sliding-window layer is trimmable only until its window wraps, so
        # treat it like a recurrent layer: it needs checkpoints.
        probe = make_prompt_cache(model)
        self.trimmable = bool(can_trim_prompt_cache(probe)) and not any(
            isinstance(c, RotatingKVCache) for c in probe
        )
        logger.info(
            "loaded model %s in %.2fs (context %s, vocab %s; disk tier %s; remote tier %s)%s",
            path,
            time.perf_counter() - t0,
            self.context_length,
            self.vocab_size,
            cfg.disk_dir or "off",
            self.cache.remote.stats()["url"] if self.cache.remote is not None else "off",
            f"; {DEMO_MODEL_NOTE}" if cfg.model is None else "",
        )

    def close(self, flush_timeout: float) -> None:
        """Flush and close the cache (bounded by ``flush_timeout``)."""
        if self.cache is not None:
            self.cache.close(flush_timeout=flush_timeout)

    def served_names(self) -> list[str]:
        """Return the served model's id followed by its aliases."""
        return [self.model_id, *self.aliases]

    def knows_model(self, name: str | None) -> bool:
        """Whether ``name`` is the served id, an alias, or the model's path or folder name."""
        if name in (None, "", "default_model", self.cfg.model, *self.served_names()):
            return True
        return bool(self.model_path) and name in (self.model_path, Path(self.model_path).name)

    def matches_model(self, name: str | None) -> bool:
        """Whether a request naming ``name`` is served.

        One model is loaded, so by default any name is served by it (clients
        such as Claude Code send their own model names); the first request
        with each unknown name is logged. With ``--strict-model-name`` only
        :meth:`knows_model` names are.
        """
        if self.knows_model(name):
            return True
        if self.cfg.strict_model_name:
            return False
        if name not in self._names_logged and len(self._names_logged) < _MAX_NAMES_LOGGED:
            self._names_logged.add(name)
            logger.info("requests for model %r are served by %s (pass --strict-model-name "
                        "to refuse names other than %s)", name, self.model_id,
                        ", ".join(self.served_names()))
        return True

    # ------------------------------------------------------------ tokenize
    def render(self, messages: list[dict], tools: list | None = None,
               template_kwargs: dict | None = None):
        """Render a chat with the model's template (:func:`tiercache.chat.render_chat`).

        The last user / tool-result message start is only computed for models
        with non-trimmable cache layers, which need a checkpoint there (see
        ``tiercache.tiers.checkpoints``).

        Args:
            messages: Hugging Face chat-template message dicts.
            tools: OpenAI function tools, or None.
            template_kwargs: Extra template variables (``enable_thinking``...).

        Returns:
            A :class:`tiercache.chat.RenderedPrompt`.

        Raises:
            RequestError: If the chat cannot be rendered.
        """
        from tiercache.chat import RenderError, render_chat

        try:
            return render_chat(self.tokenizer, messages, tools=tools,
                               template_kwargs=template_kwargs,
                               need_user_start=not self.trimmable)
        except RenderError as exc:
            raise RequestError(str(exc), "messages") from None

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """Render chat messages (no tools) and return the prompt token ids."""
        return self.render(messages).tokens

    def thinking_default(self, template_kwargs: dict | None) -> bool:
        """Whether the model thinks for a request with these template variables."""
        if not getattr(self.tokenizer, "has_thinking", False):
            return False
        return (template_kwargs or {}).get("enable_thinking", True) is not False

    def prompt_tokens(self, prompt: Any) -> list[int]:
        """Tokenize a completion prompt (string) or pass token ids through."""
        if isinstance(prompt, str):
            try:
                return list(self.tokenizer.encode(prompt))
            except Exception as exc:  # e.g. a lone surrogate: the request's fault
                raise RequestError(f"the prompt cannot be tokenized: {exc}", "prompt",
                                   "invalid_prompt") from None
        return [int(t) for t in prompt]

    def resolve_max_tokens(self, tokens: Sequence[int], requested: int | None) -> int:
        """Validate a prompt and return the completion limit to use.

        Args:
            tokens: Prompt token ids.
            requested: ``max_tokens`` from the request, if any.

        Returns:
            The effective ``max_tokens``.

        Raises:
            RequestError: Empty prompt, ids outside the vocabulary, or a
                prompt / completion that does not fit the context.
        """
        if len(tokens) == 0:
            raise RequestError("the prompt is empty", "prompt")
        if self.vocab_size:
            bad = [t for t in tokens if t < 0 or t >= self.vocab_size]
            if bad:
                raise RequestError(
                    f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                    "prompt",
                    "invalid_token_id",
                )
        ctx = self.context_length
        if ctx:
            if len(tokens) >= ctx:
                raise RequestError(
                    f"the prompt has {len(tokens)} tokens; this model's context is {ctx} tokens",
                    "messages",
                    "context_length_exceeded",
                )
            if requested is not None and len(tokens) + requested > ctx:
                raise RequestError(
                    f"max_tokens={requested} plus {len(tokens)} prompt tokens exceeds "
                    f"this model's context of {ctx} tokens",
                    "max_tokens",
                    "context_length_exceeded",
                )
        limit = requested if requested is not None else self.cfg.max_tokens
        if ctx:
            limit = min(limit, ctx - len(tokens))
        return max(1, limit)

    # ------------------------------------------------------------ generate
    def fetch(self, p: GenParams) -> Fetched:
        """Find the longest cached prefix of a request's prompt. Worker thread.

        A broken cache never fails the request: it then runs cold.

        Args:
            p: The request.

        Returns:
            The :class:`server.output.Fetched` lookup (its ``prompt_cache`` is
            ``None`` on a miss).
        """
        from tiercache import FetchResult

        tokens = list(p.tokens)
        t_start = time.perf_counter()
        try:
            found = self.cache.fetch(self.model_key, tokens, salt=p.salt)
        except Exception:  # a broken cache must not fail the request: run cold
            logger.exception("prefix lookup failed; computing the prompt from scratch")
            found = FetchResult(None, tokens, len(tokens))
        if found.prompt_cache is None:
            found = FetchResult(None, tokens, len(tokens))
        return Fetched(found, time.perf_counter() - t_start,
                       disk_tier=getattr(self.cache, "disk", None) is not None,
                       remote_tier=getattr(self.cache, "remote", None) is not None)

    def new_output(self, p: GenParams, emit: Callable[[tuple], None]) -> RequestOutput:
        """Return the :class:`server.output.RequestOutput` for a request (either path)."""
        return RequestOutput(p, self.tokenizer, emit, self.metrics, self.cache)

    def generate(self, p: GenParams, emit: Callable[[tuple], None], cancelled: Callable[[], bool]):
        """Serve one request on the worker thread (the sequential path).

        Emits ``("start", usage)``, then ``("text", str)``, ``("reasoning", str)``
        and ``("tool_call", ToolCallEvent)`` events, then
        ``("done", finish_reason, usage, stop_sequence)`` (see
        :class:`server.output.RequestOutput`). Whatever was computed (also
        after a cancel) is inserted into the cache.

        Args:
            p: What to generate.
            emit: Thread-safe callback for events.
            cancelled: Returns True once the client has gone away.
        """
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.models.cache import make_prompt_cache

        tokens = list(p.tokens)
        output = self.new_output(p, emit)
        fetched = self.fetch(p)
        output.start(fetched)
        prompt_cache, rest = fetched.prompt_cache, fetched.rest
        if prompt_cache is None:
            prompt_cache = make_prompt_cache(self.model)

        if p.seed is not None:
            mx.random.seed(p.seed)
        sampler = make_token_sampler(p)
        processors = make_token_processors(p)

        def progress(done: int, total: int) -> None:
            if cancelled():
                raise Cancelled()

        if not self.trimmable and len(rest) > 1:
            rest = self._checkpointed_prefill(p, tokens, rest, fetched.cached, prompt_cache)

        reason = None
        stream = stream_generate(
            self.model,
            self.tokenizer,
            mx.array(rest),
            max_tokens=p.max_tokens,
            sampler=sampler,
            prompt_cache=prompt_cache,
            logits_processors=processors or None,
            prefill_step_size=self.cfg.prefill_step_size,
            prompt_progress_callback=progress,
        )
        try:
            for gen in stream:
                if output.feed(gen.token) or gen.finish_reason is not None:
                    break
                if cancelled():
                    reason = "cancelled"
                    break
        except Cancelled:
            reason = "cancelled"
        finally:
            stream.close()
        output.finish(reason)
        # The worker serves the next request only after this insert, so a
        # follow-up request always sees it.
        self.insert_computed(tokens + output.generated, prompt_cache, p.salt)

    def _checkpointed_prefill(self, p: GenParams, tokens: list[int], rest: list[int],
                              cached: int, prompt_cache: list) -> list[int]:
        """Prefill all but the last token of a non-trimmable cache, snapshotting.

        Follows the chunk-boundary rule of ``tiercache.tiers.checkpoints`` so that a
        restored checkpoint continues exactly like a cold run, and inserts a
        ``"system"`` checkpoint at the start of the last user message and a
        ``"user"`` one at the end of the prefill.

        Returns:
            The tokens still to feed (the last prompt token).
        """
        try:
            from tiercache.store.layout import DEFAULT_BLOCK_SIZE
            from tiercache.tiers.checkpoints import CheckpointPolicy, prefill_with_checkpoints
        except ImportError:
            return rest
        # parse_config resolves the block size; a ServerConfig built in code may leave it None.
        policy = CheckpointPolicy(min_tokens=self.cfg.block_size or DEFAULT_BLOCK_SIZE)
        stops = policy.stops(prompt_len=len(tokens), user_start=p.user_start,
                             trimmable=False, cached=cached)
        # The end of the prefill (all but the last prompt token) is also worth a
        # snapshot: the same prompt again then restores all it can. It is the
        # last chunk boundary anyway, so the chunking rule is unchanged.
        end = len(tokens) - 1
        if end > cached and end >= policy.min_tokens:
            stops = sorted(set(stops) | {end})
        snaps = prefill_with_checkpoints(self.model, prompt_cache, rest[:-1], stops,
                                         self.cfg.prefill_step_size, offset=cached)
        for pos in sorted(snaps):
            try:
                self.cache.insert_cache(self.model_key, tokens[:pos], snaps[pos],
                                        cache_type="user" if pos == end else "system",
                                        salt=p.salt)
            except Exception:
                logger.exception("checkpoint insert failed")
        return rest[-1:]

    def insert_computed(self, key: list[int], prompt_cache: list, salt) -> None:
        """Insert a request's cache under exactly the tokens it holds.

        Args:
            key: The tokens fed so far (prompt + generated); trimmed to the
                cache's offset when the cache holds fewer.
            prompt_cache: The request's cache after generation.
            salt: The request's cache isolation salt.
        """
        import mlx.core as mx
        from mlx_lm.models.cache import can_trim_prompt_cache as can_trim
        from mlx_lm.models.cache import trim_prompt_cache as trim

        offset = _cache_offset(prompt_cache)
        if offset is not None:
            if offset < len(key):
                key = key[:offset]
            elif offset > len(key):
                if not can_trim(prompt_cache):
                    logger.debug("cache holds more tokens than known; not inserted")
                    return
                trim(prompt_cache, offset - len(key))
        if len(key) == 0:
            return
        try:
            mx.eval([c.state for c in prompt_cache])
        except Exception as exc:  # some layer types have no evaluable state
            logger.debug("cache state not evaluated: %s", exc)
        try:
            self.cache.insert_cache(
                self.model_key, key, prompt_cache, cache_type="assistant", salt=salt
            )
        except Exception:
            logger.exception("prompt cache insert failed")

    # --------------------------------------------------------------- stats
    def cache_stats(self) -> dict | None:
        """Return ``cache.stats()`` or ``None`` before the cache exists."""
        return self.cache.stats() if self.cache is not None else None

    def namespaces(self) -> list[dict]:
        """Disk namespaces (model + cache layout) known to the store."""
        disk = getattr(self.cache, "disk", None)
        if disk is None:
            return []
        out = []
        try:
            for ns, desc in disk.namespaces().items():
                ns_hex = bytes(ns).hex()
                out.append({
                    "id": ns_hex,
                    "current": ns_hex == self.namespace,
                    "model": desc.get("model"),
                    "block_size": desc.get("block_size"),
                    "created": desc.get("created"),
                })
        except Exception as exc:  # stats are best effort
            logger.debug("namespaces unavailable: %s", exc)
        return out
