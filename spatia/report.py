"""Report prose, tables and figures of ``python -m spatia reproduce`` (and the image strips of the
geometry commands): our numbers beside the paper's (`spatia.paper`), written into a
`common.report.Report`.

`write_report(cfg, results, report, preset)` reads the results dict of `spatia.reproduce` in its
JSON form (keys of the K / clips / voxel tables are strings, as in ``results.json``), so a
report rebuilt from cached results renders exactly as the first one.
"""

from __future__ import annotations

import os

import numpy as np

from common.report import Report, Row, figure, savefig
from spatia import datasets as D
from spatia import memory as mem_lib
from spatia.config import SpatiaConfig
from spatia.paper import PAPER

__all__ = ["save_strip", "loop_strip", "write_report", "table4_rows", "table5_rows", "table6_rows"]


# ------------------------------------------------------------------------------------ figures


def save_strip(path, rows, titles=None, col_titles=None, scale=1.6) -> str:
    """Saves a grid of images: rows = list of lists of [H, W, 3] (RGB in [0, 1]) or [H, W]
    (colour-mapped) arrays; a short row leaves its last cells empty. Returns the path."""
    n_r, n_c = len(rows), max(len(r) for r in rows)
    h, w = np.asarray(rows[0][0]).shape[:2]
    fig, axes = figure(
        n_r, n_c, figsize=(scale * n_c * w / h + 0.8, scale * n_r + 0.4), dpi=110, squeeze=False
    )
    for i, row in enumerate(rows):
        for j in range(n_c):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                img = np.asarray(row[j])
                rgb = img.ndim == 3
                ax.imshow(
                    np.clip(img, 0, 1) if rgb else img,
                    cmap=None if rgb else "viridis",
                    interpolation="nearest",
                )
            else:
                ax.axis("off")
            if j == 0 and titles:
                ax.set_ylabel(titles[i], fontsize=8)
            if i == 0 and col_titles and j < len(col_titles):
                ax.set_title(col_titles[j], fontsize=8)
    return savefig(fig, os.fspath(path))


def loop_strip(path, loop, results: dict) -> str:
    """The frame strip of one closed loop: ground truth, each rollout in `results`
    ({"none" | "both" | ...: spatia.pipeline.VideoResult}) and, for "both", the memory
    projection each generated frame was given."""
    rows = [list(loop.gt_rgb)]
    titles = ["ground truth"]
    for name, res in results.items():
        rows.append(list(res.rgb))
        titles.append({"none": "no memory", "both": "memory"}.get(name, name))
    if "both" in results:
        res = results["both"]
        proj = [np.zeros_like(loop.gt_rgb[0])]
        for rec in res.clips:
            n_hist = len(rec.history_index)
            proj += list(rec.projection[n_hist : n_hist + len(rec.frame_index)])
        rows.append(proj)
        titles.append("memory projection")
    return save_strip(
        path, rows, titles, [f"frame {i}" for i in range(len(loop.gt_rgb))], scale=1.1
    )


# ------------------------------------------------------------------------- paper-vs-ours rows

_T4_METRICS = (("camera_score", "camera score"), ("psnr_c", "PSNR_C"), ("ssim_c", "SSIM_C"))


def table4_rows(t4: dict) -> list[Row]:
    """Table 4 (projection / references on or off) as rows `variant: metric`."""
    return [
        Row(f"{variant}: {label}", v[key], PAPER["table4"][variant][key])
        for variant, v in t4.items()
        for key, label in _T4_METRICS
    ]


def table5_rows(t5: dict) -> list[Row]:
    """Table 5 (number of references K): our K values, then the paper's K we did not run."""
    rows = []
    for k, v in t5.items():
        p = PAPER["table5"].get(int(k), {})
        for key, label in (("psnr_c", "PSNR_C"), ("ssim_c", "SSIM_C"), ("match_acc", "match acc")):
            rows.append(Row(f"K={k}: {label}", v[key], p.get(key)))
    ours = {int(k) for k in t5}
    for k, p in PAPER["table5"].items():
        if k not in ours:
            rows.append(Row(f"K={k}: PSNR_C", None, p["psnr_c"], note="not run here"))
    return rows


def table6_rows(t6: dict) -> list[Row]:
    """Table 6 (long horizon) as rows `model, clips: metric`."""
    rows = []
    for model in ("no_memory", "memory"):
        for clips, v in t6[model].items():
            p = PAPER["table6"][model].get(int(clips), {})
            for key, label in _T4_METRICS:
                rows.append(
                    Row(f"{model.replace('_', ' ')}, {clips} clips: {label}", v[key], p.get(key))
                )
    return rows


# ------------------------------------------------------------------------------------ report


def _cells(d: dict | None, keys) -> list:
    return [d.get(k) if d is not None else None for k in keys]


def write_report(cfg: SpatiaConfig, results: dict, report: Report, preset: str | None) -> None:
    """Adds the sections of the reproduction report to `report` (see the module docstring)."""
    m, d, t, e = cfg.model, cfg.data, cfg.train, cfg.eval
    H, W = m.frame_size
    r = report
    r.paragraph(
        f"Preset `{preset or 'custom'}`. Everything below was run by this command on synthetic "
        "rooms "
        f"(docs/spatia.md D12): an RGB-D flow-matching video DiT ({m.depth} main blocks of width "
        f"{m.dim}, "
        f"{len(m.control_layers)} control blocks after main layers {list(m.control_layers)}, "
        f"{H}x{W} frames, patch {m.patch_size}, N = {m.num_target_frames} new frames per clip, "
        f"M = {m.num_prev_frames} history frame(s), K <= {m.max_refs} references) trained in the "
        f"paper's stages on {d.num_scenes * d.samples_per_scene} clips from {d.num_scenes} rooms: "
        f"base without memory ({t.base.steps} steps), control branch with the base frozen "
        f"({t.control.steps} steps), main branch by {t.main_mode.upper()} with references and "
        f"history noise t_aug <= {t.hist_noise_max} ({t.main.steps} steps). The paper fine-tunes "
        "a pretrained 5B video model on real video; nothing here is pretrained, so absolute "
        "numbers are not comparable, only the direction of each effect."
    )
    r.paragraph(
        f"Evaluation: {e.num_loops} held-out rooms, each with an out-and-back '{e.loop_kind}' loop "
        f"(yaw {e.yaw_deg} deg, {e.dist_m} m) whose last pose equals its first; clip 1 starts from "
        "the ground-truth frame 0 and a memory built from it, later clips condition on the "
        f"generated history, retrieved references and the memory projection; the memory is updated "
        f"from every generated clip (depth: {e.depth_source}; dynamic pixels masked by colour "
        "key). "
        f"Sampler: {e.sampler}, {e.sample_steps} steps, CFG {e.guidance_scale}. PSNR_C / SSIM_C "
        "compare the first and last frame; match accuracy is the geometric stand-in for RoMa "
        "(fraction of co-visible pixels whose colours agree within 0.1); the camera score maps "
        "ICP-estimated pose errors of the generated RGB-D frames to [0, 100] (WorldScore "
        "normalisation, 15 deg / 0.5 m; a frame whose depth ICP cannot align counts with the "
        "maximum errors). LPIPS is not computed (no pretrained network at 16-32 px)."
    )

    tr = results["training"]
    r.heading("Training")
    r.table(
        ["stage", "steps", "final train loss", "validation loss"],
        [[k, str(v["steps"]), v["final_train_loss"], v.get("val_loss")] for k, v in tr.items()],
        "{:.4f}",
    )
    r.paragraph(
        "Validation loss: the flow-matching loss on held-out rooms with fixed noise draws "
        "(each stage on its own inputs), so a lower loss after the control stage means "
        "the memory projection is informative."
    )

    t3 = results["table3"]
    r.heading("Table 3 analogue: memory on closed loops (2 clips)")
    keys = ("psnr_c", "ssim_c", "match_acc", "psnr_revisit")
    rows = [
        ["no memory (base)"] + _cells(t3["no_memory"], keys),
        ["memory (ours)"] + _cells(t3["memory"], keys),
    ]
    rows += [[f"paper: {k}"] + _cells(v, keys[:3]) + [None] for k, v in PAPER["table3"].items()]
    r.table(["method", "PSNR_C", "SSIM_C", "match acc", "PSNR revisited"], rows, "{:.3f}")

    r.rows(
        "Table 4: scene projection and reference frames",
        table4_rows(results["table4_full"]),
        fmt="{:.3f}",
    )

    r.rows(
        "Table 5: number of references K",
        table5_rows(results["table5"]),
        fmt="{:.3f}",
        note=f"K = 1, 3, 5, 7 in the paper; here K <= {m.max_refs} (the model's reference slots), "
        "one model trained with K ~ U{0..K} evaluated at each K.",
    )

    r.rows("Table 6: long horizon (more clips)", table6_rows(results["table6_full"]), fmt="{:.3f}")

    t7 = results["table7"]
    r.heading("Table 7: memory density")
    paper7 = list(PAPER["table7"].items())
    rows = []
    for i, (v, row) in enumerate(t7.items()):
        pv, pr = paper7[i] if i < len(paper7) else (None, {})
        rows.append(
            [
                f"{float(v):g} s0",
                row["voxel_m"] * 100,
                row["memory_points"],
                row["memory_bytes"],
                row["psnr_all"],
                row["psnr_c"],
                f"{pv} m" if pv else None,
                pr.get("psnr"),
            ]
        )
    r.table(
        ["voxel", "cm", "points", "bytes", "PSNR all frames", "PSNR_C", "paper cube", "paper PSNR"],
        rows,
        "{:.2f}",
    )
    r.paragraph(
        f"s0 = 3 m / fx = {D.voxel_size(cfg, 1.0) * 100:.1f} cm (one pixel at a typical depth), "
        "the paper's 1:3:5:7 ratios; the model was trained with memories at "
        f"{d.voxel_s0:g} s0. Bytes = points x {mem_lib.bytes_per_point()} B."
    )

    if "dynamic" in results:
        dyn = results["dynamic"]
        r.heading("Dynamic objects: memory with vs. without dynamic masking")
        r.table(
            [
                "memory",
                "ghost pixels in later projections",
                "dynamic-coloured points",
                "PSNR static pixels",
                "PSNR_C",
            ],
            [
                [k, v["ghost_pixels"], v["dynamic_points_in_memory"], v["psnr_static"], v["psnr_c"]]
                for k, v in dyn.items()
            ],
            "{:.2f}",
        )
        r.paragraph(
            f"{e.dynamic_loops} rooms with a moving object in a reserved colour. Ghost pixels: "
            "pixels of the projections of clips >= 2 that show a dynamic colour where the "
            "ground truth at that pose and time is static (means per loop). The paper has no "
            "numbers for this test (docs/spatia.md D11, H5)."
        )

    r.heading("A closed loop")
    r.image(
        "loop_strip.png",
        "ground truth, the base model without memory, the full model, and the "
        "memory projection it was given (frame 0 is the ground-truth start frame)",
    )
