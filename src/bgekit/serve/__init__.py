"""``bgekit serve``: an OpenAI-compatible embedding and Cohere-style rerank server.

Needs the ``serve`` extra (``pip install 'bgekit[serve]'``: fastapi, uvicorn,
prometheus-client). Modules, one job each:

- :mod:`bgekit.serve.schemas`: pydantic request / response models, the single source of
  truth for the HTTP API and its OpenAPI docs;
- :mod:`bgekit.serve.batcher`: the async queue that groups requests into token-budget
  batches, applies back-pressure and watches the worker's heartbeat;
- :mod:`bgekit.serve.engines`: library models as the batcher's stages (tokenize, forward,
  post-process), through the models' own ``tokenize`` / ``embed_tokenized`` methods;
- :mod:`bgekit.serve.metrics`: the Prometheus metrics;
- :mod:`bgekit.serve.app`: the FastAPI app, routes, errors, API key;
- :mod:`bgekit.serve.cli`: the ``bgekit serve`` command.

Importing this package is free: nothing heavy loads until the app is built.
"""
