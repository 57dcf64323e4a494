"""`cosine-http`: the OpenAI-compatible HTTP API and Prometheus metrics (docs/http.md).

A client of `cosine-serve` through cosine.client.AsyncClient: it holds no model state,
so several gateways can front one serve. Modules:

    app.py        Starlette app: routes, auth, body limits, health, models
    generate.py   one generation through serve: non-streaming, SSE streaming, disconnects
    requests.py   OpenAI request bodies -> validated generation arguments
    responses.py  serve results -> OpenAI response and chunk objects (usage, speculation figures)
    chat.py       the model's chat template, rendered as transformers renders it
    metrics.py    serve's counters (its `stats` op) and the gateway's own, for /metrics
    errors.py     OpenAI-shaped errors and their HTTP statuses
    process.py    cosine-http as a child process (benchmark, tests)
    __main__.py   `cosine-http --config config.toml` / `python -m cosine.gateway`
"""
