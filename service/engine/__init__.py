"""The inference engine: the networks' serving kernels, the prompt encoder, the decode batch and its
scheduler, scoring and the prefix cache. torch only: no Flask, no gunicorn (a lint rule,
`lint-imports`, holds it to that). `service.engine.engine.Engine` is its public surface."""
