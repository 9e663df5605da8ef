"""Host-side (NumPy) preprocessing for Qwen2.5-VL: images -> patches, vision layouts and
M-RoPE position ids. Nothing here is traced; every output has a static shape for ``jit``.

* :func:`preprocess_images`: smart resize (bicubic), x/255, CLIP mean/std normalisation,
  frame repeated to T = 2, patchify in merge-grouped order (docs/lir.md D20).
* :func:`vision_layout`: the window permutation, window / image segment ids (so one
  boolean-mask attention kernel serves window and full-attention blocks), the 2-D rotary
  row/col ids and the inverse permutation for the merged tokens (HF ``get_window_index``).
* :func:`rope_index`: (3, B, S) M-RoPE position ids and the per-row rope delta used for
  decoding (HF ``get_rope_index``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from lir.backbones.qwen2_5_vl.config import VisionConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
    """Pixel budget and patch geometry. Defaults are the processor's own (min 3,136 and
    max 12,845,056 pixels); docs/lir.md D7 uses max_pixels = 1280 * 28 * 28 for training."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 16384,
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, aspect ratio kept as far as possible,
    area clamped into [min_pixels, max_pixels]."""
    if min(height, width) < 1:
        raise ValueError(f"image size must be positive; got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio must be below 200; got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(image: np.ndarray, cfg: ProcessorConfig) -> np.ndarray:
    """Normalised float32[C, H, W] -> float32[gh * gw, C * T * P * P] in merge-grouped order
    (rows 4g..4g+3 are the 2x2 patches of merge group g, groups in row-major order)."""
    c, h, w = image.shape
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    x = image.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (t,) + x.shape[5:])
    return np.ascontiguousarray(x).reshape(gh * gw, c * t * p * p)


def preprocess_image(
    image: np.ndarray, cfg: ProcessorConfig = ProcessorConfig()
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8[H, W, 3] RGB image -> (float32[gh * gw, 1176] patches, grid (1, gh, gw))."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8[H, W, 3] RGB; got {image.dtype}{list(image.shape)}")
    h, w = image.shape[:2]
    rh, rw = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if (rh, rw) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((rw, rh), Image.Resampling.BICUBIC))
    x = image.astype(np.float32) * np.float32(1 / 255)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    patches = patchify(x.transpose(2, 0, 1), cfg)
    return patches, (1, rh // cfg.patch_size, rw // cfg.patch_size)


def preprocess_images(
    images, cfg: ProcessorConfig = ProcessorConfig()
) -> tuple[np.ndarray, np.ndarray]:
    """A list of uint8[H, W, 3] images -> (float32[sum N_i, 1176], int64[M, 3] grid_thw)."""
    out = [preprocess_image(im, cfg) for im in images]
    if not out:
        return np.zeros((0, 3 * cfg.temporal_patch_size * cfg.patch_size**2), np.float32), np.zeros(
            (0, 3), np.int64
        )
    return (np.concatenate([p for p, _ in out]), np.asarray([g for _, g in out], np.int64))


def image_token_counts(grid_thw: np.ndarray, merge_size: int = 2) -> np.ndarray:
    """LM tokens (``<|image_pad|>`` count) of each image: t * h * w / merge^2. int64[M]."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    return grid.prod(-1) // (merge_size * merge_size)


# ------------------------------------------------------------------------ vision layout


@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Everything the vision tower needs about the packed patch sequence (N patches of all
    images, optionally padded to ``n_padded``). Arrays, all NumPy:

    patch_order int32[N]: window order -> original patch index (gather to reorder).
    window_segments int32[N]: window id of each reordered patch (pad: -1).
    image_segments int32[N]: image id of each reordered patch (pad: -1).
    rope_rows, rope_cols int32[N]: patch row / column in its image (reordered).
    merged_order int32[N / 4]: gather index that puts the merged tokens back in image order.
    """

    patch_order: np.ndarray
    window_segments: np.ndarray
    image_segments: np.ndarray
    rope_rows: np.ndarray
    rope_cols: np.ndarray
    merged_order: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return dataclasses.asdict(self)


def _image_windows(gh: int, gw: int, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge-group indices of one image in window order and each group's window id
    (windows of ``window`` x ``window`` merged tokens tile the image from the top-left)."""
    lh, lw = gh // merge, gw // merge
    rows, cols = np.divmod(np.arange(lh * lw), lw)
    win = (rows // window) * (-(-lw // window)) + cols // window
    order = np.argsort(win, kind="stable")
    return order, win[order]


def vision_layout(
    grid_thw: np.ndarray, cfg: VisionConfig, n_padded: int | None = None
) -> VisionLayout:
    """The :class:`VisionLayout` of images with ``grid_thw`` int[M, 3] (t must be 1).

    ``n_padded`` (a multiple of 4, >= N) pads every array so that one compiled vision tower
    serves several image sizes; padded patches form their own segment (-1) and their merged
    outputs come last in ``merged_order``."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    m, unit = cfg.spatial_merge_size, cfg.merge_unit
    window = cfg.window_size // m // cfg.patch_size
    group_order, wins, imgs, rows, cols = [], [], [], [], []
    group_base, win_base = 0, 0
    for i, (t, gh, gw) in enumerate(grid.tolist()):
        if t != 1:
            raise ValueError(
                f"grid_thw[{i}] = {(t, gh, gw)}: only still images (t = 1) are supported"
            )
        if gh % m or gw % m:
            raise ValueError(
                f"grid_thw[{i}] = {(t, gh, gw)}: h and w must be multiples of the merge size {m}"
            )
        order, win = _image_windows(gh, gw, m, window)
        group_order.append(order + group_base)
        wins.append(np.repeat(win + win_base, unit))
        imgs.append(np.full(order.size * unit, i))
        # patch (row, col) in merge-grouped order: group g = (gr, gc), inner (a, b)
        lw = gw // m
        gr, gc = np.divmod(order, lw)
        a, b = np.divmod(np.arange(unit), m)
        rows.append((gr[:, None] * m + a[None]).reshape(-1))
        cols.append((gc[:, None] * m + b[None]).reshape(-1))
        group_base += order.size
        win_base += int(win.max()) + 1
    groups = np.concatenate(group_order) if group_order else np.zeros(0, np.int64)
    n = groups.size * unit
    patch_order = (groups[:, None] * unit + np.arange(unit)[None]).reshape(-1)
    merged_order = np.argsort(groups, kind="stable")
    parts = [
        patch_order,
        np.concatenate(wins or [np.zeros(0)]),
        np.concatenate(imgs or [np.zeros(0)]),
        np.concatenate(rows or [np.zeros(0)]),
        np.concatenate(cols or [np.zeros(0)]),
    ]
    if n_padded is not None:
        if n_padded < n or n_padded % unit:
            raise ValueError(
                f"n_padded={n_padded} must be a multiple of {unit} and >= the "
                f"{n} patches of the images"
            )
        pad = n_padded - n
        parts[0] = np.concatenate([patch_order, np.arange(n, n_padded)])
        parts[1] = np.concatenate([parts[1], np.full(pad, -1)])
        parts[2] = np.concatenate([parts[2], np.full(pad, -1)])
        parts[3] = np.concatenate([parts[3], np.zeros(pad)])
        parts[4] = np.concatenate([parts[4], np.zeros(pad)])
        merged_order = np.concatenate([merged_order, np.arange(n // unit, n_padded // unit)])
    p, w, im, r, c = (x.astype(np.int32) for x in parts)
    return VisionLayout(p, w, im, r, c, merged_order.astype(np.int32))


# ---------------------------------------------------------------------------- M-RoPE


def rope_index(
    input_ids: np.ndarray,
    grid_thw: np.ndarray,
    image_token_id: int,
    valid: np.ndarray | None = None,
    merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids of a batch (HF ``get_rope_index``).

    Args:
      input_ids: int[B, S]; each run of ``image_token_id`` is one image, consuming the rows
        of ``grid_thw`` in order across the batch.
      grid_thw: int[M, 3] of all images of the batch.
      valid: bool[B, S] (False = padding; its positions are 0 and do not count).
    Returns:
      positions int32[3, B, S] (t, h, w) and rope_delta int32[B] = max position + 1 -
      number of valid tokens (decode token i of a row then has position i + rope_delta on
      every axis, where i counts the row's valid tokens before it).
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, S]; got shape {ids.shape}")
    b, s = ids.shape
    valid = np.ones((b, s), bool) if valid is None else np.asarray(valid, bool)
    grids = iter(np.asarray(grid_thw, np.int64).reshape(-1, 3).tolist())
    pos = np.zeros((3, b, s), np.int64)
    delta = np.zeros(b, np.int64)
    for row in range(b):
        cols = np.nonzero(valid[row])[0]
        is_img = ids[row, cols] == image_token_id
        out = np.zeros((3, cols.size), np.int64)
        cur, i = 0, 0
        while i < cols.size:
            j = i
            while j < cols.size and is_img[j] == is_img[i]:
                j += 1
            if not is_img[i]:
                out[:, i:j] = cur + np.arange(j - i)
                cur += j - i
            else:
                try:
                    t, gh, gw = next(grids)
                except StopIteration:
                    raise ValueError(
                        f"input_ids row {row} has more image-token runs than grid_thw rows"
                    ) from None
                lh, lw = gh // merge_size, gw // merge_size
                if j - i != t * lh * lw:
                    raise ValueError(
                        f"row {row}: an image run of {j - i} tokens does not match "
                        f"grid {(t, gh, gw)} ({t * lh * lw} tokens)"
                    )
                tt, hh, ww = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
                out[:, i:j] = np.stack([tt, hh, ww]).reshape(3, -1) + cur
                cur += max(lh, lw)
            i = j
        pos[:, row, cols] = out
        delta[row] = (out.max() + 1 if out.size else 0) - cols.size
    return pos.astype(np.int32), delta.astype(np.int32)
