"""modelconsole.server: the HTTP face (KServe V2, control API, events, metrics) — not built yet."""
