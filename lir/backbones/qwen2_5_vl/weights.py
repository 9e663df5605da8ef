"""Load a local Hugging Face Qwen2.5-VL checkpoint (config.json + safetensors shards) into
:class:`lir.backbones.qwen2_5_vl.model.QwenVL`, streaming one tensor at a time (docs/lir.md
D20). Nothing is ever downloaded: a missing directory or file is an error.

Name mapping (hub names; re-saved checkpoints use ``model.language_model.*`` for ``model.*``
and ``model.visual.*`` for ``visual.*``, and both are accepted):

=================================================  ===============================================
``visual.patch_embed.proj.weight`` (D,C,T,P,P)     ``visual.patch_embed.kernel`` reshape (D, -1).T
``visual.blocks.{i}.norm{1,2}.weight``             ``visual.blocks[i].norm{1,2}.scale``
``visual.blocks.{i}.attn.{qkv,proj}.{w,b}``        ``visual.blocks[i].attn.{qkv,proj}.{kernel,bias}``
``visual.blocks.{i}.mlp.{gate,up,down}_proj.*``    ``visual.blocks[i].mlp.{gate,up,down}_proj.*``
``visual.merger.ln_q.weight``                      ``visual.merger.ln_q.scale``
``visual.merger.mlp.{0,2}.{w,b}``                  ``visual.merger.{fc1,fc2}.{kernel,bias}``
``model.embed_tokens.weight`` (V, D)               ``language.embed_tokens.embedding`` as is
``model.layers.{i}.self_attn.{q,k,v,o}_proj.*``    ``language.layers[i].self_attn.*``
``model.layers.{i}.mlp.{gate,up,down}_proj.*``     ``language.layers[i].mlp.*``
``model.layers.{i}.{input,post_attention}_layernorm.weight``  ``...layernorm.scale``
``model.norm.weight``                              ``language.norm.scale``
``lm_head.weight`` (V, D)                          ``language.lm_head.kernel`` transposed (ignored
                                                   when the head is tied)
=================================================  ===============================================

Every torch Linear weight (out, in) becomes a Flax kernel (in, out).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lir.backbones.qwen2_5_vl.config import QwenVLConfig, read_config
from lir.backbones.qwen2_5_vl.model import QwenVL

_RULES: list[tuple[re.Pattern, Callable[[re.Match], tuple], str]] = []


def _rule(pattern: str, transform: str):
    def deco(fn):
        _RULES.append((re.compile(pattern + r"$"), fn, transform))
        return fn

    return deco


_LEAF = {"weight": "kernel", "bias": "bias"}


@_rule(r"visual\.patch_embed\.proj\.weight", "conv")
def _patch(m):
    return ("visual", "patch_embed", "kernel")


@_rule(r"visual\.blocks\.(\d+)\.(norm1|norm2)\.weight", "none")
def _vnorm(m):
    return ("visual", "blocks", int(m[1]), m[2], "scale")


@_rule(r"visual\.blocks\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)", "linear")
def _vattn(m):
    return ("visual", "blocks", int(m[1]), "attn", m[2], _LEAF[m[3]])


@_rule(r"visual\.blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)", "linear")
def _vmlp(m):
    return ("visual", "blocks", int(m[1]), "mlp", m[2], _LEAF[m[3]])


@_rule(r"visual\.merger\.ln_q\.weight", "none")
def _lnq(m):
    return ("visual", "merger", "ln_q", "scale")


@_rule(r"visual\.merger\.mlp\.(0|2)\.(weight|bias)", "linear")
def _merger(m):
    return ("visual", "merger", "fc1" if m[1] == "0" else "fc2", _LEAF[m[2]])


@_rule(r"model\.embed_tokens\.weight", "none")
def _embed(m):
    return ("language", "embed_tokens", "embedding")


@_rule(r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)", "linear")
def _attn(m):
    return ("language", "layers", int(m[1]), "self_attn", m[2], _LEAF[m[3]])


@_rule(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", "linear")
def _mlp(m):
    return ("language", "layers", int(m[1]), "mlp", m[2], "kernel")


@_rule(r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", "none")
def _lnorm(m):
    return ("language", "layers", int(m[1]), m[2], "scale")


@_rule(r"model\.norm\.weight", "none")
def _norm(m):
    return ("language", "norm", "scale")


@_rule(r"lm_head\.weight", "linear")
def _head(m):
    return ("language", "lm_head", "kernel")


def canonical_name(name: str) -> str:
    """Hub naming for a tensor name of either naming scheme."""
    for old, new in (
        ("model.language_model.", "model."),
        ("model.visual.", "visual."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def map_name(name: str) -> tuple[tuple, str] | None:
    """(module path, transform) of a checkpoint tensor, or None if it is not a weight of the
    model. transform: "linear" (transpose), "conv" (reshape (D, -1) then transpose), "none"."""
    name = canonical_name(name)
    for pattern, fn, transform in _RULES:
        m = pattern.match(name)
        if m:
            return fn(m), transform
    return None


def convert(array, transform: str):
    """A torch-layout tensor -> the Flax layout (see :func:`map_name`)."""
    if transform == "linear" and array.ndim == 2:
        return array.T
    if transform == "conv":
        return array.reshape(array.shape[0], -1).T
    return array


def safetensor_files(checkpoint_dir: pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint's shard files: from ``model.safetensors.index.json`` if present, else
    every ``*.safetensors`` in the directory."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [checkpoint_dir / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
        return files
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {str(checkpoint_dir)!r}")
    return files


def _variable(model: nnx.Module, path: tuple) -> nnx.Variable:
    node = model
    for key in path:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _all_param_paths(model: nnx.Module) -> set[tuple]:
    return {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_checkpoint(
    checkpoint_dir: str | pathlib.Path,
    *,
    dtype=jnp.bfloat16,
    cfg: QwenVLConfig | None = None,
    sharding: Callable[[tuple, tuple], jax.sharding.Sharding | None] | None = None,
) -> QwenVL:
    """Build :class:`QwenVL` from a local checkpoint directory without materialising random
    weights: the module is created abstractly and every parameter is filled from the files.

    Args:
      checkpoint_dir: directory with config.json and the safetensors shards.
      dtype: storage dtype of every weight (bfloat16 for training; float32 for parity tests).
      cfg: overrides the config read from config.json (e.g. to switch ``remat`` on).
      sharding: ``(param path, shape) -> Sharding`` placing each tensor as it is read (e.g.
        :func:`lir.backbones.qwen2_5_vl.sharding.fsdp_sharding`); None = default device.
    Raises:
      FileNotFoundError for a missing directory / config / shard; ValueError when a tensor has
      the wrong shape, or parameters of the model are missing from the checkpoint.
    """
    from safetensors import safe_open

    path = pathlib.Path(checkpoint_dir)
    cfg = cfg or read_config(path)
    model = nnx.eval_shape(lambda: QwenVL(cfg, param_dtype=dtype, rngs=nnx.Rngs(0)))
    wanted = _all_param_paths(model)
    filled: set[tuple] = set()
    for file in safetensor_files(path):
        with safe_open(str(file), framework="flax") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                mapped = map_name(name)
                if mapped is None:
                    continue
                target, transform = mapped
                if target[:2] == ("language", "lm_head") and cfg.text.tie_word_embeddings:
                    continue
                if target not in wanted:
                    raise ValueError(
                        f"checkpoint tensor {name!r} maps to {target}, which the "
                        "model (from config.json) does not have"
                    )
                var = _variable(model, target)
                value = convert(f.get_tensor(name), transform).astype(dtype)
                if tuple(value.shape) != tuple(var.shape):
                    raise ValueError(
                        f"checkpoint tensor {name!r} has shape {value.shape} after "
                        f"conversion; the model expects {tuple(var.shape)}"
                    )
                place = sharding(target, tuple(value.shape)) if sharding else None
                var.set_value(jax.device_put(value, place) if place is not None else value)
                filled.add(target)
    missing = sorted(wanted - filled, key=str)
    if missing:
        shown = [".".join(map(str, p)) for p in missing[:8]]
        raise ValueError(
            f"{len(missing)} model parameters are missing from {str(path)!r}, e.g. {shown}"
        )
    return model


def hf_name(path: tuple) -> tuple[str, str]:
    """(hub tensor name, transform) of a model parameter path; the inverse of
    :func:`map_name`."""
    parts = [str(p) for p in path]
    if parts[:2] == ["language", "lm_head"]:
        return "lm_head.weight", "linear"
    if parts == ["visual", "patch_embed", "kernel"]:
        return "visual.patch_embed.proj.weight", "conv"
    leaf = {"scale": "weight", "kernel": "weight", "embedding": "weight", "bias": "bias"}
    body = {"fc1": "mlp.0", "fc2": "mlp.2"}
    head = {"visual": "visual", "language": "model"}[parts[0]]
    name = ".".join([head] + [body.get(p, p) for p in parts[1:-1]] + [leaf[parts[-1]]])
    return name, "linear" if parts[-1] == "kernel" else "none"


def hf_config_dict(cfg: QwenVLConfig) -> dict:
    """A Hugging Face style ``config.json`` dict (re-saved layout) for ``cfg``."""
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
        "text_config": {
            "model_type": "qwen2_5_vl_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "hidden_act": "silu",
            "eos_token_id": cfg.eos_token_id,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": list(t.mrope_section),
            },
        },
        "vision_config": {
            "model_type": "qwen2_5_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "window_size": v.window_size,
            "out_hidden_size": v.out_hidden_size,
            "hidden_act": "silu",
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
        },
    }


def save_checkpoint(model: QwenVL, checkpoint_dir: str | pathlib.Path) -> pathlib.Path:
    """Write ``model`` as a hub-named float32 safetensors checkpoint + config.json (e.g. a
    tiny random checkpoint for tests and demos); :func:`load_checkpoint` reads it back."""
    from safetensors.numpy import save_file

    path = pathlib.Path(checkpoint_dir)
    path.mkdir(parents=True, exist_ok=True)
    v = model.cfg.vision
    tensors = {}
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transform = hf_name(tuple(p))
        x = np.asarray(var[...], np.float32)
        if transform == "linear":
            x = x.T
        elif transform == "conv":
            x = x.T.reshape(
                v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size
            )
        tensors[name] = np.ascontiguousarray(x)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf_config_dict(model.cfg), indent=1))
    return path
