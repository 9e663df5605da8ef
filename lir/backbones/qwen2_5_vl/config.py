"""Qwen2.5-VL configuration (frozen dataclasses) read from a Hugging Face ``config.json``.

Both config layouts are accepted: the hub files (text fields at the top level,
``rope_scaling.mrope_section``) and newer re-saves (``text_config`` / ``vision_config``
sub-dicts, ``rope_parameters``). ``qwen2_5_vl_3b()`` / ``qwen2_5_vl_7b()`` give the published
shapes (docs/lir.md D20) without any weights, for memory estimates and shape tests.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower and patch merger (released configs: depth 32, width 1280, 16 heads)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 2048
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} must split into "
                f"{self.num_heads} heads whose size is a multiple of 4 (2-D RoPE)"
            )
        unit = self.spatial_merge_size * self.patch_size
        if self.window_size % unit:
            raise ValueError(
                f"vision window_size {self.window_size} must be a multiple of "
                f"patch_size * spatial_merge_size = {unit}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Features of one flattened patch: C * T * P * P (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The language model (released configs; defaults are the 3B model)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_layers: int = 36
    num_heads: int = 16
    num_kv_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"text hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}"
            )
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim / 2 = "
                f"{self.head_dim // 2}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    """Whole model: vision tower, LM and the special token ids (as in the released configs)."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    eos_token_id: int = 151645
    # Rematerialise each LM decoder layer and vision block in the backward pass.
    remat: bool = False
    # Query rows per chunk of the LM's training attention (`common.nn.chunked_attention`):
    # bounds each layer's softmax to [B, H, chunk, S] instead of [B, H, S, S]; None: one pass.
    attention_chunk: int | None = None

    def __post_init__(self):
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"vision out_hidden_size {self.vision.out_hidden_size} must equal "
                f"the LM hidden_size {self.text.hidden_size}"
            )


def qwen2_5_vl_3b() -> QwenVLConfig:
    """Qwen2.5-VL-3B-Instruct shapes (tied head)."""
    return QwenVLConfig(vision=VisionConfig(out_hidden_size=2048), text=TextConfig())


def qwen2_5_vl_7b() -> QwenVLConfig:
    """Qwen2.5-VL-7B-Instruct shapes (untied head)."""
    return QwenVLConfig(
        vision=VisionConfig(out_hidden_size=3584),
        text=TextConfig(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            tie_word_embeddings=False,
        ),
    )


def _mrope_section(d: dict) -> tuple[int, ...]:
    for key in ("rope_parameters", "rope_scaling"):
        sub = d.get(key) or {}
        if "mrope_section" in sub:
            return tuple(int(s) for s in sub["mrope_section"])
    return (16, 24, 24)


def _rope_theta(d: dict) -> float:
    sub = d.get("rope_parameters") or {}
    return float(sub.get("rope_theta", d.get("rope_theta", 1e6)))


def config_from_dict(d: dict) -> QwenVLConfig:
    """``QwenVLConfig`` from a parsed Hugging Face Qwen2.5-VL ``config.json``."""
    if "vision_config" not in d:
        raise ValueError("config.json has no 'vision_config': not a Qwen2.5-VL checkpoint")
    v = d["vision_config"]
    t = dict(d)
    t.update(d.get("text_config") or {})
    try:
        vision = VisionConfig(
            depth=int(v["depth"]),
            hidden_size=int(v["hidden_size"]),
            intermediate_size=int(v["intermediate_size"]),
            num_heads=int(v["num_heads"]),
            in_channels=int(v.get("in_channels", v.get("in_chans", 3))),
            patch_size=int(v.get("patch_size", 14)),
            temporal_patch_size=int(v.get("temporal_patch_size", 2)),
            spatial_merge_size=int(v.get("spatial_merge_size", 2)),
            window_size=int(v.get("window_size", 112)),
            out_hidden_size=int(v["out_hidden_size"]),
            fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", ())),
        )
        text = TextConfig(
            vocab_size=int(t["vocab_size"]),
            hidden_size=int(t["hidden_size"]),
            intermediate_size=int(t["intermediate_size"]),
            num_layers=int(t["num_hidden_layers"]),
            num_heads=int(t["num_attention_heads"]),
            num_kv_heads=int(t.get("num_key_value_heads", t["num_attention_heads"])),
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(t),
            mrope_section=_mrope_section(t),
            tie_word_embeddings=bool(
                d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))
            ),
        )
    except KeyError as err:
        raise ValueError(
            f"config.json lacks the field {err.args[0]!r} needed for Qwen2.5-VL"
        ) from err
    eos = t.get("eos_token_id", 151645)
    return QwenVLConfig(
        vision=vision,
        text=text,
        image_token_id=int(d.get("image_token_id", 151655)),
        video_token_id=int(d.get("video_token_id", 151656)),
        vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
        eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
    )


def read_config(checkpoint_dir: str | pathlib.Path) -> QwenVLConfig:
    """Read ``checkpoint_dir/config.json``; a missing directory or file is a clear error
    (weights are never downloaded)."""
    path = pathlib.Path(checkpoint_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"checkpoint directory {str(path)!r} does not exist (expected a "
            "local Hugging Face Qwen2.5-VL directory; nothing is downloaded)"
        )
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"{str(cfg_file)!r} is missing: a Qwen2.5-VL checkpoint "
            "directory needs config.json next to its safetensors files"
        )
    return config_from_dict(json.loads(cfg_file.read_text()))
