"""The HTTP API: the Flask app, its routes, request and response models, the OpenAI-compatible
endpoints, streaming, OpenAPI and logs. Uses the models and the engine."""
