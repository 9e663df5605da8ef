"""``python -m lir finetune|evaluate --backbone qwen2_5_vl ...``: LIVR or direct SFT of a local
Qwen2.5-VL checkpoint on BLINK-format task data (``lir.data_blink``), and evaluation.

    python -m lir finetune --backbone qwen2_5_vl --checkpoint CKPT --task-data DATA \\
        --method livr --run-dir runs/qwen_livr [--preset paper] [--set finetune.x=y ...]
    python -m lir evaluate --backbone qwen2_5_vl --checkpoint CKPT --task-data DATA \\
        --run-dir runs/qwen_livr [--adapter runs/qwen_livr/adapter.npz] [--split test]

``finetune`` trains on DATA/train.jsonl with the preset's two-stage schedule (``paper``:
LoRA r 16 / alpha 32 / dropout 0.05, lr 1e-4, K = 16, 4 + 6 epochs; SFT 10 epochs), picks
the best validation epoch when DATA/val.jsonl exists, saves the LoRA + latent parameters to
RUN_DIR/adapter.npz and reports test accuracy when DATA/test.jsonl exists. Frozen weights are
bf16 and sharded over every visible device (FSDP); LoRA and latents are float32.
``--tokenizer bytes`` uses a byte-level tokenizer for tiny random checkpoints that ship none.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from common.config import ConfigError, add_config_args, get_preset, override
from lir.config import PRESETS

BACKBONES = ("qwen2_5_vl",)

# Per-backbone changes to a preset, applied before ``--set``. The paper trains Qwen2.5-VL
# with per-device batch 1 x gradient accumulation 8 (LIVR appendix, training details);
# ``lir.config.paper`` keeps 8 x 1 for the tiny model, but 8 rows of three full-resolution
# images do not fit one GPU. ``--set finetune.batch_size=...`` or
# ``finetune.accumulation_steps=...`` replaces both values of this split (they are one choice).
BACKBONE_PRESETS = {
    ("qwen2_5_vl", "paper"): {"finetune.batch_size": "1", "finetune.accumulation_steps": "8"},
}
_BATCH_KEYS = ("finetune.batch_size", "finetune.accumulation_steps")


def backbone_config(backbone: str, preset: str, overrides: Sequence[str]):
    """The ``lir.config`` preset with ``BACKBONE_PRESETS[(backbone, preset)]`` and then the
    ``--set`` ``overrides`` applied."""
    extra = dict(BACKBONE_PRESETS.get((backbone, preset), {}))
    if any(o.split("=", 1)[0].strip() in _BATCH_KEYS for o in overrides):
        for key in _BATCH_KEYS:
            extra.pop(key, None)
    return override(
        get_preset(PRESETS, preset), [f"{k}={v}" for k, v in extra.items()] + list(overrides)
    )


class ByteTokenizer:
    """Byte-level stand-in tokenizer for random test checkpoints: byte b -> id 3 + b (bytes
    >= 150 -> id 152). It has no special tokens; template markers are spelled in bytes."""

    size = 153

    def encode(self, text: str) -> list[int]:
        return [3 + min(b, 149) for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 153).decode(errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer (tokenizer.json in the checkpoint directory)."""

    def __init__(self, path: pathlib.Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(checkpoint: pathlib.Path, kind: str):
    if kind == "bytes":
        return ByteTokenizer()
    if not any((checkpoint / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"{str(checkpoint)!r} has no tokenizer files; pass "
            "--tokenizer bytes for a random test checkpoint"
        )
    return HFTokenizer(checkpoint)


def _round_up(n: int, m: int) -> int:
    return max(m, int(math.ceil(n / m) * m))


@dataclasses.dataclass(frozen=True)
class Example:
    """One encoded record: token ids / roles, its images' grid and its feature-cache key
    (the visual tokens themselves stay in the cache until a batch needs them)."""

    encoded: object  # livr.Encoded
    grid: np.ndarray
    key: str

    @property
    def answer_tokens(self) -> int:
        from lir.masks import Role

        return sum(r == Role.ANSWER for r in self.encoded.roles)


class Encoder:
    """Records -> :class:`Example` s -> fixed-shape :class:`QwenBatch` es for one model /
    tokenizer / K, with the frozen vision features from a ``VisionFeatureCache``."""

    def __init__(self, model_cfg, tokenizer, num_latents: int, pcfg, latent_token_id: int, cache):
        self.cfg, self.tok, self.k, self.pcfg = model_cfg, tokenizer, num_latents, pcfg
        self.latent_token_id = latent_token_id
        self.cache = cache

    def encode(self, records, with_answer: bool) -> list[Example]:
        """Token ids of every record; each record's images go through the vision tower once
        (its cache entry), one record at a time, so no split's patches are held at once."""
        from lir.backbones.qwen2_5_vl.features import example_key
        from lir.backbones.qwen2_5_vl.livr import encode_example
        from lir.backbones.qwen2_5_vl.processor import image_token_counts, preprocess_images
        from lir.data_blink import build_prompt, load_image

        out = []
        for r in records:
            key = example_key(r.id, r.images)
            grid = self.cache.ensure(
                key, lambda r=r: preprocess_images([load_image(p) for p in r.images], self.pcfg)
            )
            ex = encode_example(
                self.tok.encode,
                build_prompt(r),
                image_token_counts(grid, self.pcfg.merge_size),
                r.answer if with_answer else None,
                self.k,
                vision_start=self.cfg.vision_start_token_id,
                vision_end=self.cfg.vision_end_token_id,
                image_pad=self.cfg.image_token_id,
                latent_token_id=self.latent_token_id,
            )
            out.append(Example(ex, grid, key))
        return out

    def batches(
        self, examples: Sequence[Example], batch_size: int, seq_len: int, n_tokens: int
    ) -> tuple[Batches, list[int]]:
        """Batches of ``batch_size`` rows (the last one padded by repeating its first row),
        built on access; returns (batches, number of real rows per batch)."""
        groups, real = [], []
        for i in range(0, len(examples), batch_size):
            rows = list(examples[i : i + batch_size])
            real.append(len(rows))
            groups.append(rows + [rows[0]] * (batch_size - len(rows)))
        return Batches(self, groups, seq_len, n_tokens), real


class Batches(Sequence):
    """A sequence of :class:`QwenBatch` es whose visual tokens are read from the feature
    cache when a batch is indexed: one batch's features are in host memory at a time."""

    def __init__(self, encoder: Encoder, groups: list[list[Example]], seq_len: int, n_tokens: int):
        self.encoder, self.groups, self.seq_len, self.n_tokens = encoder, groups, seq_len, n_tokens

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i):
        from lir.backbones.qwen2_5_vl.livr import make_feature_batch

        if isinstance(i, slice):
            return Batches(self.encoder, self.groups[i], self.seq_len, self.n_tokens)
        rows = self.groups[i]
        feats = np.concatenate([self.encoder.cache.get(e.key)[0] for e in rows])
        grid = np.concatenate([e.grid for e in rows])
        return make_feature_batch(
            [e.encoded for e in rows], feats, grid, self.encoder.cfg, self.seq_len, self.n_tokens
        )


def _shapes(examples: Sequence[Example], batch_size: int) -> tuple[int, int]:
    """Static (seq_len, n_tokens) covering every batch: lengths rounded up to 64 tokens and
    the visual tokens of a batch to 64 rows, so few shapes compile."""
    from lir.backbones.qwen2_5_vl.processor import image_token_counts

    seq = max(len(e.encoded.ids) for e in examples)
    counts = [int(image_token_counts(e.grid).sum()) for e in examples]
    tokens = max(sum(counts[i : i + batch_size]) for i in range(0, len(counts), batch_size))
    return _round_up(seq, 64), _round_up(tokens, 64)


def predict(
    model, encoder: Encoder, examples: Sequence[Example], batch_size: int, max_new_tokens: int
) -> list[str]:
    """Greedy generations (decoded text) for prompt-only ``examples`` (``encode(records,
    with_answer=False)``), latents in place, causal mask."""
    from flax import nnx

    from lir.backbones.qwen2_5_vl.livr import generate

    if not examples:
        return []
    seq, ntok = _shapes(examples, batch_size)
    batches, real = encoder.batches(examples, batch_size, seq, ntok)
    eos = encoder.cfg.eos_token_id
    run = nnx.jit(lambda m, b: generate(m, b, max_new_tokens, eos))
    model.eval()
    texts = []
    for b, n in zip(batches, real, strict=True):
        ids = np.asarray(run(model, b))[:n]
        for row in ids:
            stop = np.nonzero(row == eos)[0]
            texts.append(encoder.tok.decode(row[: stop[0]] if stop.size else row))
    model.train()
    return texts


def _adapter_state(model):
    from flax import nnx

    from lir.model import LIVR_FILTER

    return nnx.to_flat_state(nnx.state(model, LIVR_FILTER))


def save_adapter(model, path: pathlib.Path, meta: dict) -> None:
    arrays = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in _adapter_state(model)}
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))


def load_adapter(model, path: pathlib.Path) -> None:
    import jax.numpy as jnp
    from flax import nnx

    data = np.load(path)
    flat = _adapter_state(model)
    missing = ["/".join(map(str, p)) for p, _ in flat if "/".join(map(str, p)) not in data]
    if missing:
        raise ValueError(
            f"adapter {path} lacks {missing[:4]} (was it trained with other LoRA targets or K?)"
        )
    new = [(p, v.replace(jnp.asarray(data["/".join(map(str, p))], v[...].dtype))) for p, v in flat]
    nnx.update(model, nnx.from_flat_state(new))


def build_model(args, cfg, num_latents: int, with_lora: bool, cache_dir: pathlib.Path | None):
    """(QwenLIVR, tokenizer, Encoder) for the checkpoint in ``args``; the Encoder's vision
    feature cache lives under ``cache_dir`` (None: host memory)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lir.backbones.qwen2_5_vl.config import read_config
    from lir.backbones.qwen2_5_vl.features import VisionFeatureCache
    from lir.backbones.qwen2_5_vl.livr import QwenLIVR, add_lora
    from lir.backbones.qwen2_5_vl.processor import ProcessorConfig
    from lir.backbones.qwen2_5_vl.sharding import fsdp_sharding
    from lir.backbones.qwen2_5_vl.weights import load_checkpoint

    ckpt = pathlib.Path(args.checkpoint)
    qcfg = dataclasses.replace(
        read_config(ckpt), remat=not args.no_remat, attention_chunk=args.attention_chunk or None
    )
    tok = load_tokenizer(ckpt, args.tokenizer)
    place = fsdp_sharding() if jax.device_count() > 1 else None
    base = load_checkpoint(ckpt, dtype=jnp.dtype(args.dtype), cfg=qcfg, sharding=place)
    vocab_rows = min(tok.size, qcfg.text.vocab_size)
    model = QwenLIVR(base, num_latents, key=jax.random.key(cfg.seed), vocab_rows=vocab_rows)
    if with_lora:
        add_lora(model, cfg.finetune.lora, rngs=nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1))
    pcfg = ProcessorConfig(
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        patch_size=qcfg.vision.patch_size,
        temporal_patch_size=qcfg.vision.temporal_patch_size,
        merge_size=qcfg.vision.spatial_merge_size,
    )
    latent_id = tok.size if tok.size < qcfg.text.vocab_size else 0
    cache = VisionFeatureCache(model.base.visual, pcfg, cache_dir)
    return model, tok, Encoder(qcfg, tok, num_latents, pcfg, latent_id, cache)


def _cache_dir(args, run_dir: pathlib.Path) -> pathlib.Path | None:
    if args.feature_cache == "memory":
        return None
    return pathlib.Path(args.feature_cache) if args.feature_cache else run_dir / "vision_features"


def run_finetune(args, cfg, run_dir: pathlib.Path) -> dict:
    from common.report import write_json
    from lir.backbones.qwen2_5_vl.trainer import finetune
    from lir.data_blink import accuracy, load_split, split_file

    ft = cfg.finetune
    k = ft.num_latents if args.method == "livr" else 0
    model, _, encoder = build_model(
        args, cfg, k, with_lora=True, cache_dir=_cache_dir(args, run_dir)
    )
    train = load_split(args.task_data, "train")[: args.limit or None]
    val = (
        load_split(args.task_data, "val")[: args.limit or None]
        if split_file(args.task_data, "val")
        else []
    )
    test = (
        load_split(args.task_data, "test")[: args.limit or None]
        if split_file(args.task_data, "test")
        else []
    )
    # every split's vision features are computed here, before training: the train steps
    # donate the model's buffers, the frozen tower's included
    enc = encoder.encode(train, with_answer=True)
    enc_val = encoder.encode(val, with_answer=False)
    enc_test = encoder.encode(test, with_answer=False)
    seq, ntok = _shapes(enc, ft.batch_size)
    max_answer = _round_up(max(e.answer_tokens for e in enc), 8)
    batches, _ = encoder.batches(enc, ft.batch_size, seq, ntok)
    batches = batches[: len(batches) - len(batches) % ft.accumulation_steps or None]

    def on_epoch(m, stage, epoch):
        if not val:
            return None
        acc = accuracy(predict(m, encoder, enc_val, args.eval_batch_size, args.max_new_tokens), val)
        print(json.dumps({"stage": stage, "epoch": epoch, "val_accuracy": acc}), flush=True)
        return acc

    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as log_file:

        def log(row):
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            if not args.quiet:
                print(json.dumps(row), flush=True)

        hist = finetune(
            model,
            args.method,
            ft,
            batches,
            seed=cfg.seed,
            max_answer_tokens=max_answer,
            on_epoch=on_epoch,
            log=log,
        )
    model = hist.pop("model")
    save_adapter(model, run_dir / "adapter.npz", {"method": args.method, "num_latents": k})
    result = {
        "method": args.method,
        "num_latents": k,
        "train_examples": len(train),
        "steps": len(hist["losses"]),
        "first_loss": hist["losses"][0],
        "last_loss": hist["losses"][-1],
        "val": hist["val"],
        "best_epoch": hist["best_epoch"],
        "seq_len": seq,
        "n_visual_tokens": ntok,
        "max_answer_tokens": max_answer,
        "batch_size": ft.batch_size,
        "accumulation_steps": ft.accumulation_steps,
        "vision_tower_calls": encoder.cache.calls,
    }
    if test:
        result["test_accuracy"] = accuracy(
            predict(model, encoder, enc_test, args.eval_batch_size, args.max_new_tokens), test
        )
    write_json(run_dir / "results.json", result)
    return result


def run_evaluate(args, cfg, run_dir: pathlib.Path) -> dict:
    from common.report import write_json
    from lir.data_blink import accuracy, load_split

    adapter = pathlib.Path(args.adapter) if args.adapter else None
    k = 0
    if adapter is not None:
        if not adapter.is_file():
            raise FileNotFoundError(f"adapter file {str(adapter)!r} not found")
        k = int(json.loads(adapter.with_suffix(".json").read_text())["num_latents"])
    model, _, encoder = build_model(
        args, cfg, k, with_lora=adapter is not None, cache_dir=_cache_dir(args, run_dir)
    )
    if adapter is not None:
        load_adapter(model, adapter)
    records = load_split(args.task_data, args.split)[: args.limit or None]
    texts = predict(
        model,
        encoder,
        encoder.encode(records, with_answer=False),
        args.eval_batch_size,
        args.max_new_tokens,
    )
    result = {
        "split": args.split,
        "n": len(records),
        "num_latents": k,
        "adapter": str(adapter) if adapter else None,
        "accuracy": accuracy(texts, records),
        "predictions": [
            {"id": r.id, "gold": r.answer, "text": t} for r, t in zip(records, texts, strict=True)
        ],
    }
    write_json(run_dir / f"eval_{args.split}.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lir", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("finetune", "evaluate"))
    add_config_args(parser, default_preset="paper")
    parser.add_argument("--backbone", choices=BACKBONES, default="qwen2_5_vl")
    parser.add_argument("--checkpoint", required=True, help="local HF checkpoint directory")
    parser.add_argument("--task-data", required=True, help="folder with train/val/test.jsonl")
    parser.add_argument("--run-dir", required=True, help="output directory")
    parser.add_argument("--method", choices=("sft", "livr"), default="livr")
    parser.add_argument("--adapter", default=None, help="evaluate: adapter.npz from finetune")
    parser.add_argument("--split", default="test", help="evaluate: which split")
    parser.add_argument("--tokenizer", choices=("auto", "bytes"), default="auto")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--min-pixels", type=int, default=56 * 56)
    # docs/lir.md D7: at most 1,280 merged visual tokens per image
    parser.add_argument("--max-pixels", type=int, default=1280 * 28 * 28)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument(
        "--eval-batch-size",
        type=int,
        default=8,
        help="rows per generation call (validation, test, evaluate)",
    )
    parser.add_argument(
        "--feature-cache",
        default=None,
        help="directory of the per-example vision feature cache (default "
        "RUN_DIR/vision_features; entries are keyed by the vision "
        "weights, so one directory can serve several runs), or 'memory'",
    )
    parser.add_argument("--limit", type=int, default=0, help="use the first N records per split")
    parser.add_argument("--no-remat", action="store_true", help="keep activations (no remat)")
    parser.add_argument(
        "--attention-chunk",
        type=int,
        default=512,
        help="LM query rows per attention chunk in training (0: one pass); "
        "bounds each layer's softmax to [H, chunk, S]",
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = backbone_config(args.backbone, args.preset, args.overrides)
    except (ConfigError, ValueError) as err:
        parser.error(str(err))
    ckpt = pathlib.Path(args.checkpoint)
    if not ckpt.is_dir():
        parser.error(
            f"--checkpoint {str(ckpt)!r} is not a directory (weights are never "
            "downloaded; pass a local Hugging Face checkpoint)"
        )
    if not pathlib.Path(args.task_data).is_dir():
        parser.error(f"--task-data {args.task_data!r} is not a directory")
    from common.runtime import start_process, start_run_dir

    start_process()
    run_dir = start_run_dir(args.run_dir, cfg)
    if args.command == "finetune":
        result = run_finetune(args, cfg, run_dir)
    else:
        result = run_evaluate(args, cfg, run_dir)
        result = {k: v for k, v in result.items() if k != "predictions"}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
