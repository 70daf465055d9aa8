"""`llavakit serve`'s HTTP app (OpenAI, TGI, vLLM and Triton routes, /health, /metrics) as a Ray Serve deployment:
Ray starts the replicas on the cluster's GPUs, routes requests among them and restarts one that dies.

    pip install "ray[serve]"
    LLAVAKIT_MODEL=llava-1.5-7b serve run examples/scale/ray_serve.py:app   # http://127.0.0.1:8000/v1/...

LLAVAKIT_MODEL (default: the demo model), LLAVAKIT_REPLICAS (default 2) and LLAVAKIT_GPUS (GPUs per replica,
default 1 when this machine has CUDA, else 0) choose what runs. Each replica builds the app when it starts, so the
model loads on the replica, never on the machine that deploys it.
"""

from __future__ import annotations

import os

import torch
from ray import serve

MODEL = os.environ.get("LLAVAKIT_MODEL", "demo")
REPLICAS = int(os.environ.get("LLAVAKIT_REPLICAS", "2"))
GPUS = float(os.environ.get("LLAVAKIT_GPUS", "1" if torch.cuda.is_available() else "0"))


def llavakit_app():
    """The FastAPI app of one replica, as `llavakit serve` builds it (its default limits and engine settings;
    HTTP timeouts and connection caps are Ray's proxy's business here)."""
    import llavakit
    from llavakit.config import EngineConfig
    from llavakit.serve.app import build_app
    from llavakit.serve.config import ServeConfig
    from llavakit.serve.service import Service

    if not GPUS:
        torch.set_num_threads(1)
    pipe = llavakit.load(MODEL, device="cuda" if GPUS else "cpu")
    return build_app(Service(pipe, EngineConfig(), ServeConfig(model_name=MODEL, web=False)))


# Ray Serve balances by requests in flight; each replica still answers /health and /metrics on its own app.
LlavakitServer = serve.deployment(serve.ingress(llavakit_app)(), name="llavakit", num_replicas=REPLICAS,
                                  ray_actor_options={"num_gpus": GPUS, "num_cpus": 1},
                                  max_ongoing_requests=64)  # the engine's --max-num-seqs default: one batch
app = LlavakitServer.bind()
