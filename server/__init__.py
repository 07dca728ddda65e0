"""tiercache's inference server.

* ``tiercache-server`` (:mod:`tiercache.server.cli`): an OpenAI-compatible FastAPI server
  on :class:`tiercache.TieredPromptCache`.
* ``tiercache-mlx-lm-server`` (:mod:`tiercache.server.mlx_lm_dropin`): mlx_lm.server with
  its prompt cache replaced by the tiered cache.
"""
