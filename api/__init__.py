"""The OpenAI-compatible gateway: validate, admit, enqueue, relay tokens as SSE."""
