"""Request and response models: `common` (the base model, caps, usage, errors), `native` (the /v1 API's own
endpoints) and `openai` (completions and chat)."""
