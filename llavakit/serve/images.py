"""Images from clients, checked before they cost anything: bytes through the one guarded fetcher
(processing/media.py), then the header alone (format, animation, pixel count, aspect ratio) before a
single pixel is decoded, then decoding (EXIF orientation, transparency onto white) and preprocessing.

Runs on a worker thread (the fetch may take seconds), never on the event loop. Every failure is an
APIError 400 whose message names the image by its position in the request and says what is wrong.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from PIL import Image

from llavakit.processing.image import ImageError, load_image
from llavakit.processing.media import FetchPolicy, MediaError, read_source
from llavakit.processing.prompt import PreparedImage, PromptProcessor
from llavakit.serve.errors import APIError, bad_request

# SPEC §7: what OpenAI accepts. BMP and the rest are refused at the server, though the library reads them.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")


@dataclass(slots=True)
class ImageLimits:
    policy: FetchPolicy
    max_pixels: int
    max_aspect_ratio: float


def prepare_images(sources: list[str], processor: PromptProcessor, limits: ImageLimits,
                   param: str = "messages", decode_slot: Callable[[], AbstractContextManager] = nullcontext
                   ) -> list[PreparedImage]:
    """Fetch, check, decode and preprocess each image URL (http(s), data:, or file:// where allowed). What
    costs memory (a data: URL's bytes, decoding, preprocessing) happens inside `decode_slot()`; a download,
    which waits on the network, does not, so a slow image host holds up no other request's decoding."""
    return [_prepare_one(source, i + 1, processor, limits, param, decode_slot) for i, source in enumerate(sources)]


def _prepare_one(source: str, number: int, processor: PromptProcessor, limits: ImageLimits, param: str,
                 decode_slot: Callable[[], AbstractContextManager]) -> PreparedImage:
    name = f"image {number}"
    if source.startswith("data:"):
        with decode_slot():
            return _decode(_read(source, name, limits, param), name, processor, limits, param)
    data = _read(source, name, limits, param)
    with decode_slot():
        return _decode(data, name, processor, limits, param)


def _read(source: str, name: str, limits: ImageLimits, param: str) -> bytes:
    try:
        data = read_source(source, limits.policy)
    except MediaError as e:
        raise bad_request(f"{name}: {e.client}", param, "invalid_image_url") from None
    check_header(data, name, limits, param)
    return data


def _decode(data: bytes, name: str, processor: PromptProcessor, limits: ImageLimits, param: str) -> PreparedImage:
    try:
        image = load_image(data, max_pixels=limits.max_pixels)
        return processor.prepare_images([image])[0]
    except ImageError as e:
        raise bad_request(f"{name}: {e}", param, "invalid_image") from None
    except Exception:  # noqa: BLE001 - an odd pixel mode of an untrusted file; the client's problem, not a 500
        raise bad_request(f"{name} could not be converted to RGB pixels; send an 8-bit PNG or JPEG", param,
                          "invalid_image") from None


def check_header(data: bytes, name: str, limits: ImageLimits, param: str) -> None:
    """Refuse, from the header alone, anything that is not a still PNG/JPEG/WEBP/GIF of sane size."""
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            fmt, (w, h) = img.format, img.size
            animated = getattr(img, "is_animated", False)
    except Image.DecompressionBombError:
        raise _invalid(f"{name} declares far too many pixels (a decompression bomb); send a smaller image",
                       param) from None
    except Exception:  # noqa: BLE001 - parsers of untrusted bytes raise many types; none may escape
        raise _invalid(f"{name} is not a {', '.join(FORMATS)} image; send one of those formats", param) from None
    if animated:
        raise _invalid(f"{name} is an animated {fmt}; send a single frame as PNG or JPEG", param)
    if w < 1 or h < 1:
        raise _invalid(f"{name} has an empty size {w}x{h}", param)
    if w * h > limits.max_pixels:
        raise _invalid(f"{name} is {w}x{h} = {w * h} pixels, over the {limits.max_pixels}-pixel limit; "
                       "send a smaller image", param)
    if max(w, h) / min(w, h) > limits.max_aspect_ratio:
        raise _invalid(f"{name} is {w}x{h}, more than {limits.max_aspect_ratio:g} times longer than wide; "
                       "crop or pad it closer to square", param)


def _invalid(message: str, param: str) -> APIError:
    return bad_request(message, param, "invalid_image")
