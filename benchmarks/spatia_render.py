"""Spatia geometry throughput: point rendering, voxel down-sampling and ICP, with peers.

Measures, in one process and on the same inputs:

* render time vs number of points (1e4 .. 1e6, 256 x 256) and vs resolution (64^2 .. 720p,
  1e5 points) for the 1-px z-buffer, the min-filter splat, the footprint splat and the top-K soft
  compositor (`spatia.render`); peers: a vectorised numpy z-buffer (lexsort by pixel and depth)
  and Open3D's ``t.geometry.PointCloud.project_to_depth_image`` (z-buffered projection, C++);
* the paper's workload: one frame of ~1e6 points at 704 x 1248 with Spatia's renderer settings
  (PyTorch3D radius 0.01 NDC = 3.5 px, K = 5), extrapolated to an 81-frame clip;
* voxel down-sampling (`spatia.memory.voxel_downsample`) vs Open3D ``voxel_down_sample`` and the
  numpy reference, on surface-like clouds (a synthetic room) of 1e5 and 1e6 points;
* ICP: `spatia.slam.icp_refine` (projective frame-to-model point-to-plane, 2 levels) vs Open3D
  ``registration_icp`` (KD-tree point-to-plane; target normals estimated beforehand, not timed) on
  the same frame, memory and initial perturbation.

Times are the median of ``--repeats`` calls after one warm-up call (compile time reported apart),
each with its `benchmarks/timing.py` record (spread, process CPU time, the machine's background
load); ratios are peer time / our time (> 1: ours is faster). The machine's load average at start and end
is stored in the JSON: on a shared machine every number is inflated by other processes.
Open3D is optional (``pip install open3d-cpu``; it needs the system library libusb-1.0-0).
Prints a table and writes JSON (default benchmarks/results/spatia_render.json).

    python benchmarks/spatia_render.py [--out PATH] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from common.report import write_json
from spatia import geometry as geo
from spatia import memory as mem_lib
from spatia import render as rnd
from spatia import scenes, slam, trajectories

if __package__:  # python -m benchmarks.spatia_render
    from .timing import time_call
else:  # python benchmarks/spatia_render.py: this folder is first on sys.path
    from timing import time_call

try:  # optional peer
    import open3d as o3d
except Exception:  # noqa: BLE001 - any import failure means "no peer"
    o3d = None


def _cloud(n, seed=0):
    """Random points in a 4 x 4 x 4 m box in front of an identity camera."""
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(-2, 2, (n, 3)).astype(np.float32)
    xyz[:, 2] += 4.0
    return xyz, rng.uniform(0, 1, (n, 3)).astype(np.float32)


def _intr(h, w):
    return np.array([0.8 * w, 0.8 * w, w / 2, h / 2], np.float32)


def numpy_zbuffer(xyz, rgb, w2c, intr, h, w):
    """Vectorised numpy 1-px z-buffer: lexsort by (pixel, depth, index), first per pixel."""
    xc = xyz @ w2c[:3, :3].T + w2c[:3, 3]
    z = xc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.floor(intr[0] * xc[:, 0] / z + intr[2])
        v = np.floor(intr[1] * xc[:, 1] / z + intr[3])
    ok = (z > 1e-4) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
    idx = np.nonzero(ok)[0]
    pix = (v[idx] * w + u[idx]).astype(np.int64)
    order = np.lexsort((idx, z[idx], pix))
    pix_s = pix[order]
    first = np.r_[True, pix_s[1:] != pix_s[:-1]]
    win = idx[order][first]
    img = np.zeros((h * w, 3), np.float32)
    img[pix_s[first]] = rgb[win]
    return img.reshape(h, w, 3)


def _open3d_project(xyz, h, w, intr):
    pc = o3d.t.geometry.PointCloud(o3d.core.Tensor(xyz))
    k = o3d.core.Tensor(
        np.array([[intr[0], 0, intr[2]], [0, intr[1], intr[3]], [0, 0, 1]], np.float64)
    )
    ext = o3d.core.Tensor(np.eye(4))
    return lambda: pc.project_to_depth_image(w, h, k, ext, depth_scale=1.0, depth_max=100.0)


def bench_render(args, rows, results):
    w2c = np.eye(4, dtype=np.float32)
    sizes_n = [10_000, 100_000] if args.quick else [10_000, 100_000, 300_000, 1_000_000]
    sizes_r = (
        [(64, 64), (256, 256)] if args.quick else [(64, 64), (256, 256), (512, 512), (720, 1280)]
    )
    configs = [
        ("point", 0.0, 5),
        ("minfilter", 2.0, 5),
        ("footprint", 1.5, 5),
        ("soft", 1.5, 5),
        ("soft_minfilter", 1.5, 5),
    ]
    grid = [(n, 256, 256) for n in sizes_n] + [
        (100_000, h, w) for h, w in sizes_r if (h, w) != (256, 256)
    ]
    for n, h, w in grid:
        xyz_np, rgb_np = _cloud(n)
        xyz, rgb, intr = jnp.asarray(xyz_np), jnp.asarray(rgb_np), _intr(h, w)
        entry = dict(points=n, height=h, width=w)
        for mode, radius, k in configs:
            if mode in ("footprint", "soft") and n > 300_000:
                continue  # N x stencil fragments: the min-filter is the path for large N
            chunk = 262_144 if mode in ("footprint", "soft") else None
            fn = (
                lambda mode=mode, radius=radius, k=k, chunk=chunk, xyz=xyz, rgb=rgb, intr=intr, h=h, w=w: (
                    rnd.render(
                        xyz,
                        rgb,
                        None,
                        w2c,
                        intr,
                        height=h,
                        width=w,
                        mode=mode,
                        radius=radius,
                        k=k,
                        chunk=chunk,
                    ).rgb
                )
            )
            t = time_call(fn, repeats=args.repeats)
            entry[mode] = dict(
                ms=t["median_s"] * 1e3,
                cpu_ms=t["cpu_s"] * 1e3,
                first_call_s=t["compile_s"],
                radius=radius,
                timing=t,
            )
        # numpy compiles nothing: no warm-up call
        t = time_call(
            functools.partial(numpy_zbuffer, xyz_np, rgb_np, w2c, intr, h, w),
            repeats=args.repeats,
            warmup=False,
        )
        entry["numpy_zbuffer_ms"], entry["numpy_zbuffer_timing"] = t["median_s"] * 1e3, t
        if o3d is not None:
            t = time_call(_open3d_project(xyz_np, h, w, intr), repeats=args.repeats)
            entry["open3d_project_depth_ms"], entry["open3d_timing"] = t["median_s"] * 1e3, t
        results["render"].append(entry)
        o3 = entry.get("open3d_project_depth_ms")
        rows.append(
            [
                f"render N={n:.0e} {h}x{w}",
                f"{entry['point']['ms']:.1f}",
                f"{entry['minfilter']['ms']:.1f}",
                f"{entry['footprint']['ms']:.1f}" if "footprint" in entry else "-",
                f"{entry['soft']['ms']:.1f}" if "soft" in entry else "-",
                f"{entry['soft_minfilter']['ms']:.1f}",
                f"{entry['numpy_zbuffer_ms']:.1f} ({entry['numpy_zbuffer_ms'] / entry['point']['ms']:.1f}x)",
                f"{o3:.1f} ({o3 / entry['point']['ms']:.2f}x)" if o3 else "-",
            ]
        )


def bench_paper_workload(args, rows, results):
    """~1e6 points at 704 x 1248 (Spatia's released resolution), radius 3.5 px, K = 5."""
    n, h, w = (200_000, 352, 624) if args.quick else (1_000_000, 704, 1248)
    xyz_np, rgb_np = _cloud(n, seed=1)
    xyz, rgb, intr = jnp.asarray(xyz_np), jnp.asarray(rgb_np), _intr(h, w)
    r_px = rnd.pytorch3d_radius_to_pixels(0.01, h, w)
    out = dict(points=n, height=h, width=w, radius_px=r_px, k=5)
    for mode, radius, chunk in [
        ("point", 0.0, None),
        ("minfilter", r_px, None),
        ("soft_minfilter", r_px, None),
        ("soft", r_px, 131_072),
    ]:
        fn = lambda mode=mode, radius=radius, chunk=chunk: (
            rnd.render(
                xyz,
                rgb,
                None,
                np.eye(4, dtype=np.float32),
                intr,
                height=h,
                width=w,
                mode=mode,
                radius=radius,
                k=5,
                chunk=chunk,
            ).rgb
        )
        t = time_call(fn, repeats=1 if mode == "soft" else args.repeats)
        best, cpu = t["median_s"], t["cpu_s"]
        out[mode] = dict(
            ms_per_frame=best * 1e3,
            cpu_ms_per_frame=cpu * 1e3,
            clip_81_frames_s=81 * best,
            first_call_s=t["compile_s"],
            timing=t,
        )
        rows.append(
            [
                f"paper workload {mode} (r={radius:.2f})",
                f"{best * 1e3:.0f} ms/frame (cpu {cpu * 1e3:.0f})",
                f"81 frames: {81 * best:.1f} s",
                "",
                "",
                "",
                "",
                "",
            ]
        )
    results["paper_workload"] = out


def _room_cloud(n_target, seed=0):
    """A surface-like cloud: back-projected pixels of a synthetic room, ~n_target points."""
    scene = scenes.make_scene(seed)
    h, w = 120, 160
    t = max(1, int(np.ceil(n_target / (h * w))))
    w2c = jnp.asarray(trajectories.exploration_trajectory(seed, t, scene=scene))
    intr = geo.intrinsics_from_fov(h, w, 75.0)
    fr = scenes.raycast_views(scene, w2c, intr, h, w, batch=4)
    xyz, col, ok = mem_lib.frames_points(fr.rgb, fr.depth, w2c, intr)
    return np.asarray(xyz)[np.asarray(ok)][:n_target], np.asarray(col)[np.asarray(ok)][:n_target]


def bench_voxel(args, rows, results):
    for n in [100_000] if args.quick else [100_000, 1_000_000]:
        xyz_np, rgb_np = _room_cloud(n)
        xyz, rgb = jnp.asarray(xyz_np), jnp.asarray(rgb_np)
        for voxel in (0.01, 0.05):
            fn = lambda voxel=voxel, xyz=xyz, rgb=rgb: mem_lib.voxel_downsample(
                xyz, rgb, None, voxel
            )[0]
            t = time_call(fn, repeats=args.repeats)
            best = t["median_s"]
            n_out = int(mem_lib.voxel_downsample(xyz, rgb, None, voxel)[4])
            t_ref = time_call(
                functools.partial(mem_lib.voxel_downsample_reference, xyz_np, rgb_np, voxel),
                repeats=1,
                warmup=False,
            )
            t_np = t_ref["median_s"]
            entry = dict(
                points=len(xyz_np),
                voxel=voxel,
                out_points=n_out,
                ms=best * 1e3,
                cpu_ms=t["cpu_s"] * 1e3,
                first_call_s=t["compile_s"],
                numpy_ms=t_np * 1e3,
                timing=t,
                numpy_timing=t_ref,
            )
            if o3d is not None:
                pc = o3d.geometry.PointCloud()
                pc.points = o3d.utility.Vector3dVector(xyz_np.astype(np.float64))
                pc.colors = o3d.utility.Vector3dVector(rgb_np.astype(np.float64))
                t_o3 = time_call(
                    lambda pc=pc, voxel=voxel: pc.voxel_down_sample(voxel), repeats=args.repeats
                )
                entry["open3d_ms"], entry["open3d_timing"] = t_o3["median_s"] * 1e3, t_o3
                entry["open3d_out_points"] = len(pc.voxel_down_sample(voxel).points)
            results["voxel"].append(entry)
            o3 = entry.get("open3d_ms")
            rows.append(
                [
                    f"voxel N={len(xyz_np):.0e} v={voxel}",
                    f"{best * 1e3:.1f}",
                    f"-> {n_out} pts",
                    "",
                    "",
                    "",
                    f"{t_np * 1e3:.1f} ({t_np / best:.1f}x)",
                    f"{o3:.1f} ({o3 / (best * 1e3):.2f}x)" if o3 else "-",
                ]
            )


def bench_icp(args, rows, results):
    h, w = (60, 80) if args.quick else (120, 160)
    scene = scenes.make_scene(2)
    intr = geo.intrinsics_from_fov(h, w, 75.0)
    hi = np.asarray(scene.room_hi)
    corner = np.array([hi[0], hi[1], 0.3])
    eyes = [np.array([0.3, -0.2, 1.5]), np.array([0.0, 0.0, 1.4]), np.array([-0.3, 0.1, 1.6])]
    w2c = jnp.stack([geo.look_at(e, corner) for e in eyes])
    fr = scenes.raycast_views(scene, w2c, intr, h, w)
    idx = jnp.array([0, 2])
    mem, _ = mem_lib.build_memory(
        fr.rgb[idx], fr.depth[idx], w2c[idx], intr, None, capacity=65536, voxel=0.01
    )
    rng = np.random.default_rng(0)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    shift = rng.normal(size=3)
    shift *= 0.05 / np.linalg.norm(shift)
    delta = geo.se3_exp(jnp.asarray(np.r_[axis * np.radians(3.0), shift], jnp.float32))
    init = geo.se3_inverse(delta @ geo.se3_inverse(w2c[1]))
    fn = lambda: slam.icp_refine(mem, fr.depth[1], init, intr).w2c
    t = time_call(fn, repeats=args.repeats)
    best = t["median_s"]
    ang, dist = slam.pose_error(fn(), w2c[1])
    entry = dict(
        height=h,
        width=w,
        memory_points=mem.count(),
        ms=best * 1e3,
        cpu_ms=t["cpu_s"] * 1e3,
        first_call_s=t["compile_s"],
        timing=t,
        rot_err_deg=float(ang),
        trans_err_m=float(dist),
    )
    if o3d is not None:
        reg = o3d.pipelines.registration
        src = o3d.geometry.PointCloud()
        pts_cam = np.asarray(slam.frame_normals(fr.depth[1], intr)[0]).reshape(-1, 3)
        src.points = o3d.utility.Vector3dVector(pts_cam.astype(np.float64))  # camera frame
        tgt = o3d.geometry.PointCloud()
        tgt.points = o3d.utility.Vector3dVector(
            np.asarray(mem.xyz)[np.asarray(mem.valid)].astype(np.float64)
        )
        tgt.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=0.1, max_nn=30))
        c2w0 = np.asarray(geo.se3_inverse(init), np.float64)
        crit = reg.ICPConvergenceCriteria(max_iteration=30)
        run = lambda: reg.registration_icp(
            src, tgt, 0.1, c2w0, reg.TransformationEstimationPointToPlane(), crit
        )
        t_o3 = time_call(run, repeats=args.repeats)
        est = np.linalg.inv(run().transformation).astype(np.float32)
        a2, d2 = slam.pose_error(jnp.asarray(est), w2c[1])
        entry.update(
            open3d_ms=t_o3["median_s"] * 1e3,
            open3d_timing=t_o3,
            open3d_rot_err_deg=float(a2),
            open3d_trans_err_m=float(d2),
            open3d_source_points=len(src.points),
        )
    results["icp"] = entry
    o3 = entry.get("open3d_ms")
    rows.append(
        [
            f"ICP {h}x{w}, {mem.count()} model pts",
            f"{best * 1e3:.1f}",
            f"err {float(ang):.4f} deg {1e3 * float(dist):.3f} mm",
            "",
            "",
            "",
            "",
            f"{o3:.1f} ({o3 / (best * 1e3):.2f}x), err {entry['open3d_rot_err_deg']:.4f} deg "
            f"{1e3 * entry['open3d_trans_err_m']:.3f} mm"
            if o3
            else "-",
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/spatia_render.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke run)")
    parser.add_argument("--only", default="render,paper,voxel,icp", help="comma-separated subset")
    args = parser.parse_args(argv)
    parts = set(args.only.split(","))
    results = dict(
        render=[],
        voxel=[],
        machine=dict(
            platform=platform.platform(),
            cpu_count=os.cpu_count(),
            jax=jax.__version__,
            backend=jax.default_backend(),
            open3d=None if o3d is None else o3d.__version__,
            loadavg_start=os.getloadavg(),
        ),
    )
    rows: list[list[str]] = []
    if "render" in parts:
        bench_render(args, rows, results)
    if "paper" in parts:
        bench_paper_workload(args, rows, results)
    if "voxel" in parts:
        bench_voxel(args, rows, results)
    if "icp" in parts:
        bench_icp(args, rows, results)
    results["machine"]["loadavg_end"] = os.getloadavg()
    head = [
        "case",
        "point / ours (ms)",
        "minfilter r=2",
        "footprint r=1.5",
        "soft r=1.5 K=5",
        "soft_minfilter",
        "numpy ref ms (numpy/ours)",
        "Open3D ms (Open3D/ours)",
    ]
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(wd) for c, wd in zip(r, widths, strict=True)))
    print(f"wrote {write_json(args.out, results)}")


if __name__ == "__main__":
    main()
