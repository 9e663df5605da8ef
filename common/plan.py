"""Planning a preset before running it: lower and compile each stage's step for an N-device
mesh from abstract shapes, and read parameters, FLOPs and bytes per device off the compiled
program.

Nothing is allocated: the model is built with `nnx.eval_shape`, the state and the batch are
`jax.ShapeDtypeStruct`s carrying their mesh shardings, and XLA's own cost and memory analyses
of the compiled step give FLOPs and bytes. Simulated CPU devices stand in for accelerators
(`set_host_device_count`): the partitioned program and its per-device buffers are those of
the target mesh, the time per step is an estimate from the stated accelerator's peak rate at
a stated utilisation.

    set_host_device_count(8)                      # before JAX starts a backend
    mesh = make_mesh()
    graphdef, state = abstract_train_state(lambda: Model(cfg, rngs=nnx.Rngs(0)), tx)
    row = plan_step("pretrain", step_fn, state, batch_spec, mesh, steps=cfg.steps,
                    items_per_step=("sequences", 256))
    print(render_plan([row]))
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from common import distributed as dist

__all__ = [
    "ACCELERATORS",
    "Accelerator",
    "PlanRow",
    "abstract_batch",
    "abstract_train_state",
    "plan_note",
    "plan_step",
    "render_plan",
    "set_host_device_count",
]

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """Peak dense matrix rates (FLOP/s) of one accelerator, its memory, and the utilisation
    assumed for estimates."""

    name: str
    peak_bf16: float
    peak_f32: float
    memory_gib: float
    utilisation: float = 0.4


#: Vendor peak dense rates (no sparsity). f32 matrix work runs as TF32 on these GPUs, JAX's
#: default matmul precision there.
ACCELERATORS = {
    "h100": Accelerator("NVIDIA H100 SXM 80 GB", 989e12, 495e12, 80.0),
    "a100": Accelerator("NVIDIA A100 SXM 80 GB", 312e12, 156e12, 80.0),
    "h200": Accelerator("NVIDIA H200 141 GB", 989e12, 495e12, 141.0),
}


def set_host_device_count(n: int) -> None:
    """Makes the CPU backend expose `n` devices; call before JAX starts any backend.

    Raises:
      RuntimeError: a backend already started with another device count (the flag can no
        longer take effect), naming what to do instead.
    """
    if n < 1:
        raise ValueError(f"--devices must be >= 1, got {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as err:  # the backend is up already
        if jax.device_count() != n:
            raise RuntimeError(
                f"cannot simulate {n} devices: JAX already started with {jax.device_count()}; "
                f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting"
            ) from err


def abstract_train_state(build_model: Callable[[], nnx.Module], tx, trainable=nnx.Param):
    """`(graphdef, TrainState of ShapeDtypeStructs)` of a model, without allocating it."""
    from common.train import create_train_state

    def make():
        return create_train_state(build_model(), tx, jax.random.key(0), trainable)[1]

    model = nnx.eval_shape(build_model)
    graphdef = nnx.split(model, trainable, ...)[0]
    return graphdef, jax.eval_shape(make)


def abstract_batch(shapes: dict[str, tuple[tuple[int, ...], Any]]) -> dict[str, Any]:
    """`{name: ShapeDtypeStruct(shape, dtype)}` from `{name: (shape, dtype)}`."""
    return {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}


def _with_sharding(tree: Any, sharding_for: Callable[[Any], Any]) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_for(x)), tree
    )


def _count(tree: Any) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape")))


@dataclasses.dataclass
class PlanRow:
    """One stage of a plan. Bytes are per device; FLOPs are per device and per step call."""

    stage: str
    devices: int
    params: int
    trainable: int
    items_per_step: str
    flops_per_device: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    steps: int
    dtype: str
    compile_seconds: float
    est_step_seconds: float
    accelerator: str
    utilisation: float
    memory_gib: float
    note: str = ""

    @property
    def bytes_per_device(self) -> int:
        # donated inputs alias outputs: their buffers are counted once
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.bytes_per_device <= self.memory_gib * GIB

    @property
    def est_stage_hours(self) -> float:
        return self.est_step_seconds * self.steps / 3600

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            bytes_per_device=self.bytes_per_device,
            fits=self.fits,
            est_stage_hours=self.est_stage_hours,
        )
        return d


def plan_step(
    stage: str,
    step_fn: Callable,
    state: Any,
    batch: Any,
    mesh,
    *,
    steps: int,
    items_per_step: str,
    accelerator: Accelerator = ACCELERATORS["h100"],
    trainable: int | None = None,
    dtype: str = "float32",
    note: str = "",
    donate_state: bool = True,
) -> PlanRow:
    """Lowers and compiles `step_fn(state, batch)` on `mesh` (state replicated, batch split
    over the `data` axis) from abstract values and measures it.

    Args:
      step_fn: a pure or jitted function of (state, batch); it is re-jitted here with the
        mesh's shardings (and the state donated, as the trainers do).
      state, batch: pytrees of `jax.ShapeDtypeStruct` (e.g. from `abstract_train_state`).
      steps: step calls the stage makes (for the stage-time estimate).
      items_per_step: what one call consumes, e.g. "256 sequences × 100 steps".
      trainable: trainable parameter count (default: all leaves of `state.params`).
      dtype: the dtype of the step's matrix work, which picks the accelerator's peak rate.
    """
    replicated, sharded = dist.replicated(mesh), dist.batch_sharding(mesh)
    n_data = mesh.shape[dist.DATA_AXIS]
    for x in jax.tree.leaves(batch):
        if x.ndim and x.shape[0] % n_data:
            raise ValueError(
                f"{stage}: batch dimension {x.shape[0]} is not divisible by the {n_data} "
                "devices of the data axis"
            )
    state_in = _with_sharding(state, lambda x: replicated)
    batch_in = _with_sharding(batch, lambda x: sharded if x.ndim else replicated)
    fn = getattr(step_fn, "__wrapped__", step_fn)
    jitted = jax.jit(fn, donate_argnums=(0,) if donate_state else ())
    t0 = time.perf_counter()
    compiled = jitted.lower(state_in, batch_in).compile()
    compile_seconds = time.perf_counter() - t0
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older JAX returned one dict per program
        cost = cost[0] if cost else {}
    flops = float(cost.get("flops", float("nan")))
    mem = compiled.memory_analysis()
    params = getattr(state, "params", state)
    n_params = _count(params) + _count(getattr(state, "frozen", {}))
    peak = accelerator.peak_bf16 if dtype == "bfloat16" else accelerator.peak_f32
    return PlanRow(
        stage=stage,
        devices=mesh.size,
        params=n_params,
        trainable=_count(params) if trainable is None else trainable,
        items_per_step=items_per_step,
        flops_per_device=flops,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        steps=int(steps),
        dtype=dtype,
        compile_seconds=compile_seconds,
        est_step_seconds=flops / (peak * accelerator.utilisation),
        accelerator=accelerator.name,
        utilisation=accelerator.utilisation,
        memory_gib=accelerator.memory_gib,
        note=note,
    )


def _si(x: float) -> str:
    if not np.isfinite(x):
        return "?"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.0f} s"
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def render_plan(rows: Sequence[PlanRow]) -> str:
    """A Markdown table of plan rows (bytes and FLOPs per device; times are estimates)."""
    from common.report import markdown_table

    headers = [
        "stage",
        "devices",
        "params (trainable)",
        "per step",
        "FLOPs/step/device",
        "GiB/device (args+out−alias+temp)",
        f"fits {rows[0].memory_gib:.0f} GiB" if rows else "fits",
        "est. s/step",
        "steps",
        "est. stage time",
        "note",
    ]
    body = []
    for r in rows:
        gib = r.bytes_per_device / GIB
        parts = [r.argument_bytes, r.output_bytes, -r.alias_bytes, r.temp_bytes]
        detail = "+".join(f"{p / GIB:.2f}" for p in parts).replace("+-", "−")
        body.append(
            [
                r.stage,
                str(r.devices),
                f"{_si(r.params)} ({_si(r.trainable)})",
                r.items_per_step,
                _si(r.flops_per_device),
                f"{gib:.2f} ({detail})",
                "yes" if r.fits else "**no**",
                f"{r.est_step_seconds:.3g}",
                str(r.steps),
                _hours(r.est_stage_hours),
                r.note,
            ]
        )
    return markdown_table(headers, body)


def plan_note(rows: Sequence[PlanRow]) -> str:
    """The paragraph stating how the estimates were made (to print under `render_plan`)."""
    if not rows:
        return ""
    r = rows[0]
    return (
        f"Compiled with JAX {jax.__version__} for {r.devices} simulated device(s); FLOPs and "
        "bytes come from XLA's cost and memory analyses of the partitioned step. Time per "
        f"step is an estimate: FLOPs per device / ({r.accelerator} peak dense rate × "
        f"{r.utilisation:.0%} utilisation). Memory is compared with {r.memory_gib:.0f} GiB "
        "per device."
    )


def env_device_count() -> int | None:
    """The device count forced by XLA_FLAGS, if any (for messages)."""
    flags = os.environ.get("XLA_FLAGS", "")
    for part in flags.split():
        if part.startswith("--xla_force_host_platform_device_count="):
            return int(part.split("=", 1)[1])
    return None


# --------------------------------------------------------------------------------------------
# Command line: `python -m <pkg> plan` and `python -m common.plan` (collects reports/plan.md)
# --------------------------------------------------------------------------------------------


def add_plan_args(parser) -> None:
    """`--devices N`, `--accelerator NAME`, `--utilisation U`, `--out DIR` of a plan verb."""
    parser.add_argument(
        "--devices", type=int, default=8, help="simulated devices of the mesh (default 8)"
    )
    parser.add_argument(
        "--accelerator",
        default="h100",
        choices=sorted(ACCELERATORS),
        help="accelerator whose peak rate and memory the estimates use",
    )
    parser.add_argument(
        "--utilisation",
        type=float,
        default=None,
        help="fraction of peak assumed for time estimates (default 0.4)",
    )
    parser.add_argument(
        "--out",
        default="reports/plan",
        help="directory for <package>_<N>dev.{md,json} (default reports/plan)",
    )


def accelerator_from_args(args) -> Accelerator:
    acc = ACCELERATORS[args.accelerator]
    if args.utilisation is not None:
        if not 0 < args.utilisation <= 1:
            raise ValueError(f"--utilisation must be in (0, 1], got {args.utilisation}")
        acc = dataclasses.replace(acc, utilisation=args.utilisation)
    return acc


def write_plan(
    rows: Sequence[PlanRow], out_dir: str | os.PathLike, package: str, preset: str, command: str
) -> str:
    """Writes `<out_dir>/<package>_<N>dev.json` and `.md`; returns the Markdown path."""
    from common.report import _write_text_atomic, write_json

    if not rows:
        raise ValueError(f"write_plan: no rows for {package}")
    devices = rows[0].devices
    stem = os.path.join(os.fspath(out_dir), f"{package}_{devices}dev")
    write_json(
        stem + ".json",
        {
            "package": package,
            "preset": preset,
            "devices": devices,
            "command": command,
            "jax": jax.__version__,
            "rows": [r.to_json() for r in rows],
        },
    )
    text = (
        f"### {package} — preset `{preset}`, {devices} device(s)\n\n`{command}`\n\n"
        + render_plan(rows)
        + "\n\n"
        + plan_note(rows)
        + "\n"
    )
    _write_text_atomic(stem + ".md", text)
    return stem + ".md"


def collect(out_dir: str | os.PathLike, target: str | os.PathLike) -> str:
    """Concatenates every `<package>_<N>dev.md` under `out_dir` (sorted) into `target`."""
    import json

    from common.report import _write_text_atomic, markdown_table

    out_dir = os.fspath(out_dir)
    parts = sorted(f for f in os.listdir(out_dir) if f.endswith("dev.md"))
    if not parts:
        raise FileNotFoundError(f"no <package>_<N>dev.md plan files under {out_dir}")
    body = [open(os.path.join(out_dir, f), encoding="utf-8").read() for f in parts]
    summary = []
    for f in parts:
        with open(os.path.join(out_dir, f[:-3] + ".json"), encoding="utf-8") as fh:
            plan = json.load(fh)
        rows = plan["rows"]
        over = [
            f"{r['stage']} ({r['bytes_per_device'] / GIB:.0f} GiB)" for r in rows if not r["fits"]
        ]
        summary.append(
            [
                f[:-3],
                f"`{plan['preset']}`",
                str(plan["devices"]),
                str(len(rows)),
                "all" if not over else f"{len(rows) - len(over)} of {len(rows)}",
                "; ".join(over) or "—",
            ]
        )
    header = (
        "# Plans of the paper presets\n\nEach table comes from the command above it: every "
        "stage's train step is built from abstract shapes, lowered and compiled for the "
        "stated number of simulated devices. Bytes and FLOPs are per device; times are "
        "estimates (see the note under each table). Where a model recomputes activations in "
        "the backward pass (the Qwen2.5-VL and spatia paper stages) the bytes are an upper "
        "bound: XLA's CPU compiler keeps rematerialised buffers live, reporting the same "
        "temporaries with and without `jax.checkpoint` (measured on a chain of layers).\n\n"
        + markdown_table(
            [
                "plan",
                "preset",
                "devices",
                "stages",
                "fit 80 GiB",
                "stages over 80 GiB (bytes per device)",
            ],
            summary,
        )
        + "\n\n"
    )
    _write_text_atomic(os.fspath(target), header + "\n".join(body))
    return os.fspath(target)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Collects reports/plan/*.md into reports/plan.md")
    p.add_argument("--dir", default="reports/plan")
    p.add_argument("--out", default="reports/plan.md")
    a = p.parse_args()
    print(collect(a.dir, a.out))
