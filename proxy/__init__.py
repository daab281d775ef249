"""llm-proxy: an LLM API gateway for OpenAI, Anthropic and Gemini clients."""

__version__ = "0.1.0"
