"""Tests of llavakit.serve: real uvicorn servers on 127.0.0.1 with a tiny checkpoint."""
