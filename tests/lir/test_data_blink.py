"""BLINK-format task data: record parsing, prompts, answer parsing, accuracy, clear errors,
and the ``finetune`` / ``evaluate`` CLI end to end on a tiny random Qwen2.5-VL checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from lir import data_blink as db


def _write_images(root, n=3, size=(40, 60)):
    rng = np.random.default_rng(0)
    (root / "img").mkdir(exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size + (3,), np.uint8)).save(root / f"img/{i}.png")


def _records():
    return [
        {
            "id": "a",
            "task": "localization",
            "images": ["img/0.png"],
            "prompt": "Which box?",
            "choices": ["Box A", "Box B"],
            "answer": "(B)",
        },
        {
            "idx": "b",
            "sub_task": "Jigsaw",
            "image_1": "img/0.png",
            "image_2": "img/1.png",
            "question": "Pick one.\n(A) the second image\n(B) the third image",
            "choices": ["the second image", "the third image"],
            "answer": "A",
        },
        {
            "id": "c",
            "task": "counting",
            "image": "img/2.png",
            "prompt": "How many dogs are there in the image?",
            "answer": 7,
        },
    ]


@pytest.fixture()
def folder(tmp_path):
    _write_images(tmp_path)
    with open(tmp_path / "train.jsonl", "w") as f:
        for r in _records():
            f.write(json.dumps(r) + "\n")
    return tmp_path


def test_records_prompts_and_answers(folder):
    recs = db.load_split(folder, "train")
    assert [r.id for r in recs] == ["a", "b", "c"]
    assert [r.answer for r in recs] == ["B", "A", "7"]
    assert [r.kind for r in recs] == ["mcq", "mcq", "count"]
    assert recs[1].images == (folder / "img/0.png", folder / "img/1.png")
    assert recs[1].task == "Jigsaw"
    assert db.build_prompt(recs[0]) == (
        "Which box?\nSelect from the following choices.\n(A) Box A\n(B) Box B"
    )
    assert db.build_prompt(recs[1]) == recs[1].prompt  # options already listed: verbatim
    assert db.build_prompt(recs[2]) == recs[2].prompt
    img = db.load_image(recs[0].images[0])
    assert img.dtype == np.uint8 and img.shape == (40, 60, 3)


@pytest.mark.parametrize(
    "text,kind,n,want",
    [
        ("B", "mcq", 2, "B"),
        ("(C) Point C", "mcq", 4, "C"),
        ("Answer: D.", "mcq", 4, "D"),
        ("The answer is A", "mcq", 2, "A"),
        ("none", "mcq", 4, None),
        ("E", "mcq", 4, None),
        ("There are 12 dogs, not 3", "count", 0, "12"),
        ("seven", "count", 0, None),
        ("07", "count", 0, "7"),
    ],
)
def test_parse_prediction(text, kind, n, want):
    assert db.parse_prediction(text, kind, n) == want


def test_accuracy(folder):
    recs = db.load_split(folder, "train")
    assert db.accuracy(["(B)", "B", "7 dogs"], recs) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="predictions"):
        db.accuracy(["A"], recs)


def test_clear_errors(folder, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        db.load_split(folder / "missing", "train")
    with pytest.raises(FileNotFoundError, match="'val' split"):
        db.load_split(folder, "val")
    bad = dict(_records()[0], images=["img/nope.png"])
    (folder / "test.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        db.load_split(folder, "test")
    for broken, match in [
        (dict(_records()[0], answer="(E)"), "not one of the letters"),
        ({k: v for k, v in _records()[0].items() if k != "prompt"}, "prompt"),
        ({k: v for k, v in _records()[0].items() if k != "images"}, "image"),
        (dict(_records()[2], answer="many"), "integer"),
    ]:
        (folder / "test.jsonl").write_text(json.dumps(broken) + "\n")
        with pytest.raises(ValueError, match=match):
            db.load_split(folder, "test")
    (folder / "test.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="test.jsonl:1: not valid JSON"):
        db.load_split(folder, "test")


def test_finetune_and_evaluate_cli(folder, tmp_path):
    pytest.importorskip("safetensors")
    from lir.__main__ import main
    from lir.backbones.qwen2_5_vl.model import QwenVL
    from lir.backbones.qwen2_5_vl.weights import save_checkpoint
    from tests.lir.test_qwen_livr import CFG

    ckpt = save_checkpoint(QwenVL(CFG, rngs=nnx.Rngs(0)), tmp_path / "ckpt")
    (folder / "test.jsonl").write_text((folder / "train.jsonl").read_text())
    run = tmp_path / "run"
    common = [
        "--checkpoint",
        str(ckpt),
        "--task-data",
        str(folder),
        "--run-dir",
        str(run),
        "--tokenizer",
        "bytes",
        "--dtype",
        "float32",
        "--max-pixels",
        str(28 * 28 * 4),
        "--min-pixels",
        str(28 * 28),
        "--max-new-tokens",
        "2",
        "--quiet",
        "--set",
        "finetune.batch_size=3",
        "--set",
        "finetune.sft_epochs=2",
        "--set",
        "finetune.stage1_epochs=1",
        "--set",
        "finetune.stage2_epochs=1",
        "--set",
        "finetune.num_latents=2",
        "--set",
        "finetune.lora.rank=4",
    ]
    assert main(["finetune", "--backbone", "qwen2_5_vl", "--method", "livr"] + common) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["steps"] == 2 and res["num_latents"] == 2
    assert (run / "adapter.npz").is_file()
    assert main(["evaluate", "--adapter", str(run / "adapter.npz")] + common) == 0
    ev = json.loads((run / "eval_test.json").read_text())
    assert ev["n"] == 3 and ev["accuracy"] == res["test_accuracy"]
    # the accuracy is the fraction of generations whose parsed answer is the gold one
    records = db.load_split(folder, "test")
    assert [p["id"] for p in ev["predictions"]] == [r.id for r in records]
    hits = [
        db.parse_prediction(p["text"], r.kind, len(r.choices)) == r.answer
        for p, r in zip(ev["predictions"], records, strict=True)
    ]
    assert ev["accuracy"] == sum(hits) / len(hits)
    with pytest.raises(SystemExit):
        main(
            [
                "finetune",
                "--checkpoint",
                str(tmp_path / "none"),
                "--task-data",
                str(folder),
                "--run-dir",
                str(run),
            ]
        )
