"""``vembed serve``: an HTTP embedding and search service (FastAPI + uvicorn) with dynamic batching.

- :mod:`~vembed.serve.service`: decode, embed and search without HTTP (:class:`EmbedService`);
- :mod:`~vembed.serve.batcher`: concurrent requests batched on one model (:class:`DynamicBatcher`);
- :mod:`~vembed.serve.app`: the FastAPI routes, limits and one-line JSON errors (``vembed[serve]``);
- :mod:`~vembed.serve.server`: load once, run under uvicorn, graceful shutdown.
"""
