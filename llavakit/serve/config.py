"""ServeConfig: the server's address, credentials and every limit that protects it, with defaults that
are safe for a server reachable by untrusted clients. The CLI maps `llavakit serve` flags onto it."""

from __future__ import annotations

from dataclasses import dataclass, field

from llavakit.processing.media import FetchPolicy

MAX_N = 8  # completions per request (the limit; OpenAI's is higher, but n multiplies the cost)


def server_fetch_policy(max_image_bytes: int = 20 * 2**20, local_media_root: str | None = None,
                        **overrides) -> FetchPolicy:
    """The fetch policy a server uses: no plain paths, public addresses only, file:// only under
    `local_media_root`, at most 3 redirects, 5 s to connect and 20 s per image in all."""
    settings = {"max_bytes": max_image_bytes, "connect_timeout": 5.0, "total_timeout": 20.0, "max_redirects": 3,
                "allow_private_networks": False, "allow_local_files": False, "local_media_root": local_media_root,
                "user_agent": "llavakit-server"}
    return FetchPolicy(**{**settings, **overrides})


@dataclass(slots=True)
class ServeConfig:
    """Server settings. Image bytes, timeouts, redirects and file:// access are in `fetch`; videos are
    fetched under the same policy with `max_video_bytes` as their byte cap."""

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "llavakit"  # the id clients pass as "model" and /v1/models lists
    api_key: str | None = None  # when set, every API route needs "Authorization: Bearer <key>"
    web: bool = True  # the chat page at / (serve/web); False: the API only
    max_body_bytes: int = 32 * 2**20
    body_timeout: float = 30.0  # seconds a client may take to send its request body
    max_buffered_body_bytes: int | None = None  # bodies held at once, all requests together (None: 8 bodies)
    header_timeout: float = 10.0  # seconds from connecting (or a next request's first byte) to its last header
    idle_timeout: float = 5.0  # seconds a keep-alive connection may wait for its next request
    max_header_bytes: int = 16 * 2**10  # request line and headers together
    max_connections: int | None = None  # open at once; None: derived from the descriptor limit at start
    max_images_per_request: int = 4
    max_image_pixels: int = 16_000_000  # checked from the header, before decoding
    max_image_aspect_ratio: float = 100.0  # longer side / shorter side
    max_videos_per_request: int = 1  # LLaVA-NeXT-Video checkpoints only; others refuse any video
    max_video_bytes: int = 64 * 2**20  # per video, download or base64 (a data: URL is also under max_body_bytes)
    max_video_seconds: float = 600.0  # the duration its header declares; decoded frames are capped as well
    max_queue: int = 256  # sequences that may wait beyond the running batch; more get 503
    retry_after: int = 2  # seconds, sent with 503
    shutdown_timeout: float = 30.0  # on SIGTERM: how long in-flight requests may take to finish
    media_workers: int = 16  # threads that fetch and decode images and videos, off the event loop
    max_decoding_images: int | None = None  # images and videos decoded at once; None: media_workers // 4
    fetch: FetchPolicy = field(default_factory=server_fetch_policy)

    def __post_init__(self):
        if self.max_buffered_body_bytes is None:
            self.max_buffered_body_bytes = 8 * self.max_body_bytes
        if self.max_decoding_images is None:
            self.max_decoding_images = max(1, self.media_workers // 4)
        positive = {"max_body_bytes": self.max_body_bytes, "body_timeout": self.body_timeout,
                    "max_image_pixels": self.max_image_pixels, "retry_after": self.retry_after,
                    "media_workers": self.media_workers, "max_video_bytes": self.max_video_bytes,
                    "max_video_seconds": self.max_video_seconds, "header_timeout": self.header_timeout,
                    "idle_timeout": self.idle_timeout, "max_header_bytes": self.max_header_bytes,
                    "max_decoding_images": self.max_decoding_images}
        for name, value in positive.items():
            if not value > 0:  # (NaN too)
                raise ValueError(f"ServeConfig.{name} must be positive, got {value}")
        if min(self.max_images_per_request, self.max_videos_per_request, self.max_queue, self.shutdown_timeout) < 0:
            raise ValueError("ServeConfig.max_images_per_request, max_videos_per_request, max_queue and "
                             "shutdown_timeout must be >= 0")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError(f"ServeConfig.max_connections must be positive, got {self.max_connections}")
        if self.max_buffered_body_bytes < self.max_body_bytes:
            raise ValueError(f"ServeConfig.max_buffered_body_bytes ({self.max_buffered_body_bytes}) must be at least "
                             f"max_body_bytes ({self.max_body_bytes}), or no body of the largest size is ever read")
        if self.max_image_aspect_ratio < 1:
            raise ValueError(f"ServeConfig.max_image_aspect_ratio must be >= 1, got {self.max_image_aspect_ratio}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("ServeConfig.api_key must not be empty; leave it unset to serve without a key")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServeConfig.port must be in 0..65535, got {self.port}")
