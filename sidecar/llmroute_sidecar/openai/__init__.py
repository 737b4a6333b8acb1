"""OpenAI awareness: request validation, token estimates, SSE parsing and usage accounting."""
