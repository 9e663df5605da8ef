"""BLINK-format multiple-choice data and the paper's custom task data from a local folder
(LIVR §4.1, App. A): records -> prompts (BLINK wording, LIVR App. A) -> answer parsing and
accuracy.

A data folder holds ``{split}.jsonl`` (or ``{split}.json``, a list) per split, one record per
line, with image paths relative to the folder:

    {"id": "loc-17", "task": "localization", "images": ["img/17.png"],
     "prompt": "A bounding box is ...", "choices": ["Box A", "Box B"], "answer": "(A)"}

Also accepted: BLINK's own columns (``idx``, ``sub_task``, ``image_1`` ... ``image_4``,
``question``), a bare ``image`` path, and counting records with no ``choices`` and an integer
``answer``. Multiple-choice gold answers are normalised to a bare letter ("(A)" -> "A"),
counting answers to a decimal integer string.

Prompts: a record whose prompt already lists its options ("(A) ...") is used verbatim, as
BLINK's ``prompt`` field does; otherwise the BLINK layout is built:
``question + "\\nSelect from the following choices.\\n" + "(A) c1\\n(B) c2..."``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from collections.abc import Sequence

import numpy as np

LETTERS = "ABCDEFGH"
SPLIT_FILES = ("{split}.jsonl", "{split}.json")


@dataclasses.dataclass(frozen=True)
class Record:
    """One example. ``answer``: a bare letter (MCQ) or an integer string (counting)."""

    id: str
    task: str
    images: tuple[pathlib.Path, ...]
    prompt: str
    choices: tuple[str, ...]
    answer: str

    @property
    def kind(self) -> str:
        """ "mcq" (letter answer) or "count" (integer answer)."""
        return "mcq" if self.choices else "count"


def _record_error(where: str, msg: str) -> ValueError:
    return ValueError(f"{where}: {msg}")


def normalise_answer(answer, n_choices: int, where: str = "record") -> str:
    """Gold answer -> bare letter among the first ``n_choices`` letters, or integer string."""
    text = str(answer).strip()
    if n_choices:
        m = re.fullmatch(r"\(?([A-Za-z])\)?\.?", text)
        letter = m.group(1).upper() if m else None
        if letter is None or letter not in LETTERS[:n_choices]:
            raise _record_error(
                where, f"answer {answer!r} is not one of the letters {list(LETTERS[:n_choices])}"
            )
        return letter
    if not re.fullmatch(r"-?\d+", text):
        raise _record_error(
            where, f"answer {answer!r} of a record without choices must be an integer"
        )
    return str(int(text))


def parse_record(raw: dict, root: pathlib.Path, where: str, check_images: bool = True) -> Record:
    """One raw JSON record -> :class:`Record` (image paths resolved against ``root``)."""
    if not isinstance(raw, dict):
        raise _record_error(where, f"expected a JSON object; got {type(raw).__name__}")
    images = raw.get("images")
    if images is None:
        images = [
            raw[k] for k in ("image", "image_1", "image_2", "image_3", "image_4") if raw.get(k)
        ]
    if isinstance(images, str):
        images = [images]
    if not images:
        raise _record_error(where, "no image paths (expected 'images', 'image' or 'image_1')")
    prompt = raw.get("prompt", raw.get("question"))
    if not isinstance(prompt, str) or not prompt.strip():
        raise _record_error(where, "missing 'prompt' (or 'question') text")
    choices = raw.get("choices") or []
    if not isinstance(choices, list) or len(choices) > len(LETTERS):
        raise _record_error(
            where, f"'choices' must be a list of at most {len(LETTERS)} strings; got {choices!r}"
        )
    if "answer" not in raw:
        raise _record_error(where, "missing 'answer'")
    paths = tuple(root / str(p) for p in images)
    if check_images:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{where}: image files not found: {missing}")
    return Record(
        id=str(raw.get("id", raw.get("idx", where))),
        task=str(raw.get("task", raw.get("sub_task", ""))),
        images=paths,
        prompt=prompt,
        choices=tuple(str(c) for c in choices),
        answer=normalise_answer(raw["answer"], len(choices), where),
    )


def split_file(folder: str | pathlib.Path, split: str) -> pathlib.Path | None:
    """The file of ``split`` in ``folder`` (None if the split does not exist)."""
    folder = pathlib.Path(folder)
    for pattern in SPLIT_FILES:
        path = folder / pattern.format(split=split)
        if path.is_file():
            return path
    return None


def load_split(folder: str | pathlib.Path, split: str, check_images: bool = True) -> list[Record]:
    """Every record of ``split`` in ``folder``; clear errors for a missing folder / split,
    malformed JSON, malformed records and missing images."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"task data folder {str(folder)!r} does not exist")
    path = split_file(folder, split)
    if path is None:
        raise FileNotFoundError(
            f"no {split!r} split in {str(folder)!r} (expected one of "
            f"{[p.format(split=split) for p in SPLIT_FILES]})"
        )
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of records")
        items = [(f"{path}[{i}]", r) for i, r in enumerate(rows)]
    else:
        items = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err})") from err
    return [parse_record(r, path.parent, where, check_images) for where, r in items]


def build_prompt(record: Record) -> str:
    """The question text the model sees (module docstring)."""
    if not record.choices or re.search(r"\(A\)", record.prompt):
        return record.prompt
    options = "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(record.choices))
    return f"{record.prompt}\nSelect from the following choices.\n{options}"


def parse_prediction(text: str, kind: str, n_choices: int = 4) -> str | None:
    """The answer in a generation: the first standalone choice letter (MCQ) or the first
    integer (counting); None if there is none (LIVR App. A, docs/lir.md D9)."""
    if kind == "mcq":
        letters = LETTERS[: max(n_choices, 1)]
        m = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
        return m.group(1) if m else None
    if kind == "count":
        m = re.search(r"-?\d+", text)
        return str(int(m.group(0))) if m else None
    raise ValueError(f"kind must be 'mcq' or 'count'; got {kind!r}")


def accuracy(predictions: Sequence[str], records: Sequence[Record]) -> float:
    """Fraction of generations whose parsed answer equals the gold answer."""
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    if not records:
        return float("nan")
    hits = [
        parse_prediction(p, r.kind, len(r.choices)) == r.answer
        for p, r in zip(predictions, records, strict=True)
    ]
    return float(np.mean(hits))


def load_image(path: pathlib.Path) -> np.ndarray:
    """An image file -> uint8[H, W, 3] RGB."""
    from PIL import Image

    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"image file {str(path)!r} not found")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_colour_pairs(
    folder: str | pathlib.Path,
    sizes: dict[str, int],
    seed: int = 0,
    image_size: tuple[int, int] = (56, 84),
) -> pathlib.Path:
    """Write a tiny synthetic BLINK-format task to ``folder`` (for smoke runs of the CLI):
    two flat-colour images per record with pixel noise, "same colour (A) or different (B)?",
    balanced labels. ``sizes``: records per split, e.g. {"train": 16, "val": 8}."""
    from PIL import Image

    folder = pathlib.Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = image_size
    for split, n in sizes.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for i in range(n):
                same = i % 2 == 0
                c1 = rng.integers(0, 256, 3)
                c2 = c1 if same else (c1 + rng.integers(80, 176, 3)) % 256
                names = []
                for j, c in enumerate((c1, c2)):
                    px = np.clip(c + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
                    name = f"img/{split}_{i}_{j}.png"
                    Image.fromarray(px).save(folder / name)
                    names.append(name)
                f.write(
                    json.dumps(
                        {
                            "id": f"{split}-{i}",
                            "task": "colour_pairs",
                            "images": names,
                            "prompt": "Do the two images have the same colour?",
                            "choices": ["same", "different"],
                            "answer": "A" if same else "B",
                        }
                    )
                    + "\n"
                )
    return folder
