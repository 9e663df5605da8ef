"""The paper's numbers (LIVR, arXiv 2512.21218), as data: accuracies in %, as printed.

Nothing here is computed from our runs; ``lir.report`` sets these beside our numbers and
``results.json`` carries them under ``paper``.
"""

from __future__ import annotations

#: The backbone of every ablation (LIVR §4.4.2-4.4.3) and of the paper columns of our tables.
PAPER_BACKBONE = "Qwen3-VL-4B"

#: LIVR Table 1 tasks, in the order of the rows of :data:`_T1`.
T1_TASKS = (
    "counting",
    "jigsaw",
    "localization",
    "visual_correspondence",
    "art_style",
    "semantic_correspondence",
    "functional_correspondence",
    "relative_reflectance",
    "visual_similarity",
)
# LIVR Table 1: backbone -> (zero-shot, SFT, LIVR) accuracy per task of T1_TASKS.
_T1 = {
    "Qwen2.5-VL-3B": (
        (46.78, 49.33, 56.56, 29.86, 55.56, 32.37, 26.71, 45.52, 50.37),
        (60.04, 53.33, 75.41, 88.00, 83.76, 41.01, 18.49, 44.78, 89.63),
        (63.64, 65.33, 79.51, 90.43, 87.18, 46.76, 31.51, 51.49, 94.82),
    ),
    "Qwen3-VL-4B": (
        (58.52, 84.67, 59.02, 55.43, 77.78, 39.57, 31.51, 47.76, 82.22),
        (66.86, 83.33, 79.51, 90.86, 78.63, 61.15, 58.90, 56.72, 91.11),
        (66.67, 85.33, 83.61, 93.29, 81.20, 64.75, 67.81, 62.69, 92.59),
    ),
    "LLaVA-OV-1.5-4B": (
        (53.98, 56.00, 56.56, 36.86, 56.41, 29.50, 21.92, 35.82, 51.11),
        (60.42, 65.33, 68.85, 86.86, 76.92, 46.76, 23.29, 52.24, 92.59),
        (63.64, 70.67, 72.95, 88.71, 80.34, 51.08, 50.69, 53.73, 91.85),
    ),
}

#: The three tasks of every ablation (LIVR Tables 3-4, §4.4.3), in the order of their tuples.
ABL_TASKS = ("localization", "semantic_correspondence", "functional_correspondence")
#: LIVR Table 3 (Qwen3-VL-4B): arm -> accuracy per task of ABL_TASKS.
PAPER_TABLE3 = {
    "latents_only": (79.51, 61.15, 58.22),
    "mask_only": (80.33, 61.16, 59.59),
    "prompt_tuning": (71.31, 49.64, 36.30),
}

#: backbone -> task -> arm -> accuracy (Table 1, plus Table 3's arms for PAPER_BACKBONE).
PAPER_TABLE1 = {
    bb: {
        t: {
            "zero_shot": z,
            "sft": s,
            "livr": lv,
            **(
                {a: v[ABL_TASKS.index(t)] for a, v in PAPER_TABLE3.items()}
                if bb == PAPER_BACKBONE and t in ABL_TASKS
                else {}
            ),
        }
        for t, z, s, lv in zip(T1_TASKS, *rows, strict=True)
    }
    for bb, rows in _T1.items()
}

#: LIVR Table 4(b): stage-1 epochs (of 10) -> accuracy per task of ABL_TASKS.
PAPER_STAGE_SPLIT = {
    0: (79.51, 61.15, 58.22),
    2: (80.33, 58.27, 65.75),
    4: (83.61, 64.75, 67.81),
    6: (81.15, 61.87, 66.44),
    8: (77.87, 59.71, 60.27),
}
#: LIVR Table 4(c): number of latents K -> accuracy per task of ABL_TASKS.
PAPER_K = {
    4: (81.15, 62.59, 66.40),
    8: (80.33, 63.31, 67.12),
    16: (83.61, 64.75, 67.81),
    32: (80.33, 62.59, 63.01),
}
#: LIVR Table 4(a): stage-1 mask variant -> accuracy per task of ABL_TASKS.
PAPER_MASKS = {
    "answer_only": (77.87, 60.43, 60.27),
    "bottleneck": (83.61, 64.75, 67.81),
    "bottleneck_no_latent_prompt": (81.15, 62.59, 63.01),
}
#: LIVR §4.4.3 (in the text): latent design -> accuracy per task of ABL_TASKS.
PAPER_LATENT_DESIGN = {
    "after_prompt_unshared": (83.61, 64.75, 67.81),
    "before_prompt": (80.33, 61.87, 63.70),
    "shared": (81.15, 61.87, 63.70),
}

#: LIVR Table 2 tasks (Qwen3-VL-4B, multi-task, final checkpoint), then their mean.
T2_TASKS = (
    "counting",
    "localization",
    "visual_correspondence",
    "semantic_correspondence",
    "functional_correspondence",
    "relative_reflectance",
    "mean",
)
#: LIVR Table 2: method -> task (or "mean") -> accuracy.
PAPER_TABLE2 = {
    m: dict(zip(T2_TASKS, v, strict=True))
    for m, v in (
        ("zero_shot", (58.52, 59.02, 55.43, 39.57, 31.51, 47.76, 48.64)),
        ("sft", (66.10, 77.87, 91.29, 62.59, 63.01, 56.72, 69.60)),
        ("livr", (67.80, 81.97, 92.00, 67.63, 64.38, 60.45, 72.37)),
    )
}

#: LIVR §4.4.1 (Qwen3-VL-4B, localization): condition -> (latents-only, LIVR); accuracies in
#: %, the attention mass as a fraction.
PAPER_DIAGNOSTICS = {
    "accuracy": (79.51, 83.61),
    "accuracy_latents_dropped": (79.51, 76.23),
    "accuracy_test_bottleneck": (43.44, 70.49),
    "accuracy_bottleneck_dropped": (43.44, 43.44),
    "answer_latent_attention": (0.028, 0.076),
}
