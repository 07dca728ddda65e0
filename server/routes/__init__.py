"""HTTP routers: OpenAI-compatible routes and admin routes (the Anthropic routes live beside them)."""
