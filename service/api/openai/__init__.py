"""OpenAI's completions and chat completions on top of the engine."""
