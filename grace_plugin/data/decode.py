"""Sample decoding: one WebDataset sample (image bytes + label) -> a [0,1] image tensor and a label, or a skip
record naming why it cannot be used. Headers are checked before any pixel is decoded, so a hostile image becomes a
counted ``decode_error`` instead of a crash.
"""
from __future__ import annotations

import io
import logging
from collections.abc import Callable

import torch
from PIL import Image

from ..errors import UsageError
from .shards import IMAGE_KEYS
from .transforms import as_tensor_transform

__all__ = ["DECODERS", "SKIP_REASONS", "IMAGE_FORMATS", "check_image_header", "class_label", "decode_sample"]

log = logging.getLogger(__name__)

DECODERS = ("pil", "tensor")
SKIP_REASONS = ("missing_image", "missing_label", "bad_label", "label_out_of_range", "decode_error", "tar_error",
                "duplicate_member", "bad_record", "answer_not_in_vocabulary")


def skip_record(reason: str, key: str = "", url: str = "") -> dict:
    return {"__skip__": reason, "__key__": key, "__url__": url}


# Formats a shard image may hold (PIL names); others (PDF, EPS, ICO, ...) are decode errors. The tensor path hands
# the first three to torchvision and decodes the rest with PIL.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_TORCHVISION_FORMATS = ("JPEG", "PNG", "WEBP")


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel (PNG spec, Table 11.1)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_raw_size(width: int, height: int, bit_depth: int, colour_type: int, interlace: int) -> int:
    """Bytes the zlib stream of a PNG must inflate to: per (pass and) row one filter byte plus the packed samples
    (https://www.w3.org/TR/png/#7Scanline and #8Interlace)."""
    bits = _PNG_CHANNELS[colour_type] * bit_depth

    def rows(w: int, h: int) -> int:
        return h * (1 + (w * bits + 7) // 8) if w > 0 and h > 0 else 0

    if not interlace:
        return rows(width, height)
    return sum(rows((width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy) for x0, y0, dx, dy in _ADAM7)


def png_data_complete(data: bytes, chunk_out: int = 1 << 20) -> bool:
    """True when the PNG's IDAT stream inflates to at least the size its IHDR promises. A short stream makes
    torchvision's libpng decoder (0.29) crash the process instead of raising (PIL raises), so the tensor path
    refuses it first. The work is bounded: inflated in pieces of ``chunk_out`` bytes, discarded, and stopped at the
    promise."""
    import struct
    import zlib

    pos, ihdr, idat = 8, None, []
    while pos + 8 <= len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR" and len(body) == 13:
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if ihdr is None or ihdr[3] not in _PNG_CHANNELS:
        return False
    w, h, depth, colour, _, _, interlace = ihdr
    need = png_raw_size(w, h, depth, colour, interlace)
    inflate, got, pending = zlib.decompressobj(), 0, b"".join(idat)
    try:
        while got < need:
            out = inflate.decompress(pending, min(chunk_out, need - got))
            got += len(out)
            pending = inflate.unconsumed_tail
            if not out:
                break
    except zlib.error:
        return False
    return got >= need


def check_image_header(data: bytes) -> str | None:
    """The image format if ``data`` may be decoded, else None. Reads headers only, never pixels:

    * ``PIL.Image.open`` parses the header (format and size) without decoding;
    * width x height above ``PIL.Image.MAX_IMAGE_PIXELS`` (PIL's decompression-bomb limit, about 89 Mpx) is refused
      before any decoder allocates it (PIL itself only refuses above twice the limit);
    * a PNG's chunk structure and CRCs are walked (``Image.verify``, no decompression), so a truncated or damaged
      PNG never reaches a native decoder (a PNG whose image data is short is caught before torchvision's decoder
      by ``decode_sample``; PIL raises on it by itself).
    """
    import warnings

    if not data:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt, (w, h) = im.format, im.size
                limit = Image.MAX_IMAGE_PIXELS
                if fmt not in IMAGE_FORMATS or w <= 0 or h <= 0 or (limit is not None and w * h > limit):
                    return None
                if fmt == "PNG":
                    im.verify()
    except Exception:  # PIL raises many types (and bomb warnings, made errors above) for bad headers
        return None
    return fmt


def class_label(sample: dict, num_classes: int | None = None) -> dict | str:
    """The classification target of a raw sample: ``{"label": int}`` from its ``cls`` member, or a skip reason."""
    if "cls" not in sample:
        return "missing_label"
    raw = sample["cls"]
    try:
        label = int(raw.decode("ascii").strip() if isinstance(raw, (bytes, bytearray)) else raw)
    except (ValueError, UnicodeDecodeError, TypeError):
        return "bad_label"
    if label < 0 or (num_classes is not None and label >= num_classes):
        return "label_out_of_range"
    return {"label": label}


def decode_sample(sample: dict, transform: Callable, num_classes: int | None = None,
                  draft_size: int | None = None, tensor_transform: Callable | None = None,
                  target: Callable[[dict], dict | str] | None = None) -> dict:
    """Raw tar sample -> ``{"image", "label", ...}`` or a skip record naming the reason.

    ``target(sample)``: the task's fields of the sample (``{"label": ..., ...}``) or a skip reason; default the
    classification label (``class_label``); a VQA set's comes from ``grace_plugin/tasks.py``.

    ``draft_size``: let libjpeg decode JPEGs at a reduced scale (1/2, 1/4, 1/8) that still covers this size
    (PIL ``Image.draft``) before the transform resizes; several times faster for large photos, slightly different
    pixels from a full decode, so it is off unless asked for.
    ``tensor_transform``: decode with torchvision (libjpeg-turbo, libpng, libwebp) into a uint8 tensor and apply
    this tensor version of ``transform`` (``as_tensor_transform``) instead of PIL: about twice as fast for photos,
    within 2 grey levels of the PIL path.
    """
    key, url = sample.get("__key__", ""), sample.get("__url__", "")
    img_key = next((k for k in IMAGE_KEYS if k in sample), None)
    if img_key is None:
        return skip_record("missing_image", key, url)
    fields = target(sample) if target is not None else class_label(sample, num_classes)
    if isinstance(fields, str):
        return skip_record(fields, key, url)
    fmt = check_image_header(sample[img_key])
    if fmt is None:
        return skip_record("decode_error", key, url)
    if tensor_transform is not None and not draft_size and fmt in _TORCHVISION_FORMATS:
        from torchvision.io import ImageReadMode, decode_image

        if fmt == "PNG" and not png_data_complete(sample[img_key]):  # torchvision 0.29 crashes on it
            return skip_record("decode_error", key, url)
        try:  # the header is sound (check_image_header); damaged pixel data still fails here
            decoded = decode_image(torch.frombuffer(bytearray(sample[img_key]), dtype=torch.uint8),
                                   mode=ImageReadMode.RGB)
        except Exception:
            return skip_record("decode_error", key, url)
        if decoded.dtype == torch.uint8:  # (16-bit PNGs fall through to PIL below)
            return {"image": tensor_transform(decoded), **fields}
    try:
        with Image.open(io.BytesIO(sample[img_key])) as im:
            if draft_size and im.format == "JPEG":
                im.draft("RGB", (draft_size, draft_size))
            im.load()
            image = transform(im.convert("RGB"))
    except Exception:  # PIL raises many types for corrupt data; all mean "undecodable"
        return skip_record("decode_error", key, url)
    return {"image": image, **fields}


def tensor_path(transform: Callable, decode: str) -> Callable | None:
    if decode not in DECODERS:
        raise UsageError(f"unknown decode {decode!r}; valid: {', '.join(DECODERS)}")
    return as_tensor_transform(transform) if decode == "tensor" else None
