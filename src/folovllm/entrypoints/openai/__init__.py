"""The OpenAI-compatible HTTP server (``folovllm serve``): per endpoint a schema, a serving class and a router."""
