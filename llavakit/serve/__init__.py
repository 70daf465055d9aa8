"""The HTTP server (`llavakit serve`): OpenAI-compatible chat and completions, plus the TGI, vLLM and
Triton generate formats, on the continuous-batching engine.

    config.py     ServeConfig: address, API key, every limit
    protocol.py   request and response bodies (pydantic)
    service.py    admission, preparation off the event loop, context check, generation, metrics
    images.py     client images: guarded fetch, header checks, decode
    videos.py     client videos (LLaVA-NeXT-Video): guarded fetch, duration/size/frame limits, frame sampling
    prompts.py    client text to prompt ids (typed "<image>" and "<video>" stay text)
    openai_api.py, tgi_api.py, vllm_api.py, triton_api.py   the routes of each format
    streaming.py  SSE, first/final outputs, token text
    middleware.py API key and request-body limits;  errors.py  OpenAI-shaped errors
    metrics.py    Prometheus metrics;  app.py  the FastAPI app;  server.py  uvicorn with a draining SIGTERM
"""
