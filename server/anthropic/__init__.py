"""Anthropic Messages API (``/v1/messages``) on top of the chat engine.

* :mod:`.schemas`: request bodies (pydantic, unknown fields ignored).
* :mod:`.translate`: Anthropic request -> chat-template messages, tools and
  template kwargs (pure, deterministic: the same history renders the same tokens).
* :mod:`.responses`: response bodies, usage, stop reasons, the streaming event
  builder and error bodies (pure).
* ``server/routes/anthropic.py``: the FastAPI router.
"""
