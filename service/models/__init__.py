"""The models a process serves: the repository of model versions (loading, verifying, rolling out and
unloading them, with leases held by requests), the session codec, and the runtime that builds each
version's engine. Uses the engine; no Flask."""
