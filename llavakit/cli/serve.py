"""`llavakit serve`: an OpenAI-compatible HTTP server (plus TGI, vLLM and Triton formats) on the
continuous-batching engine, with limits for untrusted clients."""

from __future__ import annotations

import argparse
import os
import sys

from llavakit.cli.common import CliError, add_model_flags, load_pipeline, number

HELP = "serve a model over HTTP (OpenAI chat/completions, TGI, vLLM, Triton formats)"
EXAMPLE = """examples:
  llavakit serve --model llava-1.5-7b --port 8000
      (then open http://127.0.0.1:8000/ in a browser to chat; --no-web turns the page off)
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "llava-1.5-7b", "messages": [{"role": "user", "content": "Hi"}]}'
  llavakit serve --model DIR --served-model-name llava --host 0.0.0.0 --api-key "$KEY" --max-num-seqs 32
      (clients send "model": "llava" and the header "Authorization: Bearer $KEY")
  llavakit serve --model llava-next-video-7b --video-frames 16 --max-video-seconds 120
      (then send {"type": "video_url", "video_url": {"url": "https://.../clip.mp4"}} content parts)
"""

MiB = 2**20


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_flags(p, required=False)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    g.add_argument("--port", type=number(int, 0, 65535), default=8000, help="TCP port (0: any free one)")
    g.add_argument("--api-key", metavar="KEY", default=os.environ.get("LLAVAKIT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $LLAVAKIT_API_KEY; unset: no key)")
    g.add_argument("--served-model-name", metavar="NAME",
                   help="the model id clients send as \"model\" (default: --model as given, or demo)")
    g.add_argument("--no-web", action="store_true",
                   help="do not serve the chat page at / (serve the API only)")
    g.add_argument("--shutdown-timeout", type=number(float, 0), default=30.0, metavar="S",
                   help="seconds in-flight requests may take to finish after SIGTERM")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="info logs one line per request; debug also /health and /metrics")
    g.add_argument("--video-frames", type=number(int, 1), metavar="N",
                   help="frames sampled uniformly from each video (LLaVA-NeXT-Video checkpoints; default: the "
                        "checkpoint's, else 32)")
    _add_engine_flags(p)
    _add_limit_flags(p)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    count, positive = number(int, 1), number(float, above=0)
    g.add_argument("--max-num-seqs", type=count, metavar="N", default=64, help="sequences in the running batch")
    g.add_argument("--max-num-batched-tokens", type=count, metavar="N", default=4096,
                   help="tokens computed per step")
    g.add_argument("--max-model-len", type=count, metavar="N", help="context limit (default: the model's)")
    g.add_argument("--block-size", type=count, metavar="N", default=16, help="tokens per KV-cache block")
    g.add_argument("--num-kv-blocks", type=count, metavar="N", help="KV-cache blocks (default: from memory)")
    g.add_argument("--kv-cache-memory", type=positive, metavar="GiB", help="KV-cache size in GiB")
    g.add_argument("--gpu-memory-utilization", type=number(float, above=0, maximum=1), default=0.9, metavar="F",
                   help="fraction of the GPU's free memory the KV cache may fill")
    g.add_argument("--no-prefix-caching", action="store_true", help="do not reuse the KV cache of shared prefixes")
    g.add_argument("--no-chunked-prefill", action="store_true", help="prefill each prompt in one step")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps (as vLLM's flag)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "cpu", "triton", "flex"],
                   help="paged attention: auto = the Triton kernel on CUDA, llavakit's C kernel on the CPU (PyTorch "
                        "where it cannot run)")


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits (for untrusted clients)")
    count, positive = number(int, 0), number(float, above=0)
    g.add_argument("--max-queue", type=count, metavar="N", default=256,
                   help="sequences that may wait beyond the running batch; more get 503 + Retry-After")
    g.add_argument("--max-body-mb", type=positive, default=32, metavar="MiB", help="request body size cap in MiB")
    g.add_argument("--max-buffered-body-mb", type=positive, metavar="MiB",
                   help="request bodies held at once, all requests together, in MiB; more get 503 (default: 8 "
                        "times --max-body-mb)")
    g.add_argument("--header-timeout", type=positive, default=10.0, metavar="S",
                   help="seconds a client may take to send a request's headers, from connecting or from its "
                        "first byte on a kept-alive connection; then 408 and the connection closes")
    g.add_argument("--idle-timeout", type=positive, default=5.0, metavar="S",
                   help="seconds a kept-alive connection may wait for its next request")
    g.add_argument("--max-header-kb", type=positive, default=16, metavar="KiB",
                   help="request line and headers together, in KiB (431 or 414 beyond)")
    g.add_argument("--max-connections", type=number(int, 1), metavar="N",
                   help="open connections at once; beyond, the one idle the longest is closed (default: 3/4 of "
                        "the file descriptors free at start, at most 8192; the soft limit is raised to the hard one)")
    g.add_argument("--max-decoding-images", type=number(int, 1), metavar="N", default=4,
                   help="images (and videos) decoded at once, across requests: bounds the memory decoding takes")
    g.add_argument("--max-images-per-request", type=count, metavar="N", default=4, help="image parts per request")
    g.add_argument("--max-image-mb", type=positive, default=20, metavar="MiB",
                   help="size cap per image (download or base64), in MiB")
    g.add_argument("--max-image-pixels", type=number(int, 1), metavar="N", default=16_000_000,
                   help="pixels per image at most, checked before decoding")
    g.add_argument("--max-image-aspect-ratio", type=number(float, 1), default=100.0, metavar="R",
                   help="longer side / shorter side at most")
    g.add_argument("--max-videos-per-request", type=count, metavar="N", default=1,
                   help="video_url parts per chat request (LLaVA-NeXT-Video checkpoints; others refuse videos)")
    g.add_argument("--max-video-mb", type=positive, default=64, metavar="MiB",
                   help="size cap per video (download or base64), in MiB; a data: URL is also under --max-body-mb")
    g.add_argument("--max-video-seconds", type=positive, default=600, metavar="S",
                   help="longest video accepted, in seconds")
    g.add_argument("--fetch-timeout", type=positive, default=20.0, metavar="S",
                   help="seconds per image or video download, redirects included")
    g.add_argument("--connect-timeout", type=positive, default=5.0, metavar="S",
                   help="seconds to connect to an image or video host")
    g.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="serve file:// image and video URLs from under DIR (default: file:// is refused)")


def run(args: argparse.Namespace) -> int:
    from llavakit.config import EngineConfig
    from llavakit.serve.config import ServeConfig, server_fetch_policy
    from llavakit.serve.server import serve
    from llavakit.serve.service import Service

    root = args.allowed_local_media_path
    if root is not None and not os.path.isdir(root):
        raise ValueError(f"--allowed-local-media-path {root!r} is not a directory")
    fetch = server_fetch_policy(int(args.max_image_mb * MiB), root, total_timeout=args.fetch_timeout,
                                connect_timeout=args.connect_timeout)
    buffered = int(args.max_buffered_body_mb * MiB) if args.max_buffered_body_mb else None
    cfg = ServeConfig(host=args.host, port=args.port, api_key=args.api_key or None, web=not args.no_web,
                      model_name=args.served_model_name or str(args.model or "demo"),
                      max_body_bytes=int(args.max_body_mb * MiB),
                      max_buffered_body_bytes=buffered,
                      header_timeout=args.header_timeout, idle_timeout=args.idle_timeout,
                      max_header_bytes=int(args.max_header_kb * 1024), max_connections=args.max_connections,
                      max_decoding_images=args.max_decoding_images, max_images_per_request=args.max_images_per_request,
                      max_image_pixels=args.max_image_pixels, max_image_aspect_ratio=args.max_image_aspect_ratio,
                      max_videos_per_request=args.max_videos_per_request,
                      max_video_bytes=int(args.max_video_mb * MiB), max_video_seconds=args.max_video_seconds,
                      max_queue=args.max_queue, shutdown_timeout=args.shutdown_timeout, fetch=fetch)
    engine_cfg = EngineConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory=int(args.kv_cache_memory * 2**30) if args.kv_cache_memory else None,
        gpu_memory_utilization=args.gpu_memory_utilization, enable_prefix_caching=not args.no_prefix_caching,
        enable_chunked_prefill=not args.no_chunked_prefill, cuda_graphs=not args.enforce_eager,
        attention_backend=args.attention_backend)
    sock = _bind(args.host, args.port)  # before the model loads: a taken port fails now, not in minutes
    try:
        service = Service(load_pipeline(args), engine_cfg, cfg)
        port = sock.getsockname()[1]
        url = f"http://{_url_host(cfg.host)}:{port}"
        page = f"; chat in a browser at {url}/" if cfg.web else ""
        print(f"serving {cfg.model_name!r} on {url} (OpenAI API under /v1; /docs lists every route{page})",
              file=sys.stderr, flush=True)
        serve(service, args.log_level, sock=sock)
    finally:
        sock.close()
    return 0


def _bind(host: str, port: int):
    """The listening socket for --host/--port, or one line saying why it cannot be had."""
    import errno
    import socket

    from llavakit.serve.server import listen_socket

    try:
        return listen_socket(host, port)
    except socket.gaierror as e:
        raise CliError(f"--host {host}: not an address of this machine ({e.strerror}); pass an IP address such as "
                       "127.0.0.1 or 0.0.0.0") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise CliError(f"port {port} on {host} is in use; pick another with --port") from None
        if e.errno == errno.EACCES:
            raise CliError(f"port {port} on {host} needs privileges ({e.strerror}); pick a port above 1023 with "
                           "--port") from None
        raise CliError(f"cannot listen on {host} port {port} ({e.strerror or e}); check --host and --port") from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
