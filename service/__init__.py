"""The serving side, in four layers, each importing only those below it (`lint-imports` checks this):

- `service.server`: gunicorn's worker, request framing and hooks;
- `service.api`: the Flask app, routes and schemas;
- `service.models`: the model repository and the runtime that serves its versions;
- `service.engine`: the inference engine, torch only.

`settings`, `metrics` and `lifecycle` are leaves that every layer may use.
"""
