"""Benchmark of stage `fuse`: wall time and peak memory against a plain in-memory torch merge and
against mergekit 0.1.5's `slerp`, on random Llama checkpoints.

    python benchmarks/bench_fuse.py --workdir DIR [--sizes demo,1gb] [--tasks 2,4]
                                    [--actors 2] [--chunk-mib 64] [--shard-size 100MB]
                                    [--no-mergekit] [--json results.json]

Sizes: `demo` has SmolLM2-135M's shapes (134.5M parameters, 538 MB in fp32), `1gb` about 1.1 GB
per model. Each measurement runs in a fresh Python process, so peak RSS is that run's alone.
Models and masks are cached in DIR. mergekit is installed by this script into its own virtual
environment (DIR/mergekit-venv, torch pinned first so that it stays the CPU build); it is never
a dependency of the project. mergekit SLERPs two models (`t` = 1/2, base = the first), which is
what the stage does for two task models with empty masks and the first task as backbone; the
outputs must agree to 1e-6 relative (max |difference| / max |value| per tensor).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()

SIZES = {
    # SmolLM2-135M's shapes
    "demo": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
    ),
    # about 1.1 GB in fp32
    "1gb": dict(
        vocab_size=49152,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=4,
    ),
}
CORE_P = 0.01  # share of each task's elements in its (random) core region


def peak_rss() -> int:
    from cpi_ray.fusion.worker import peak_rss_bytes

    return peak_rss_bytes()  # VmHWM: ru_maxrss would carry this script's peak into children


# ---------------------------------------------------------------------------- inputs


def llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(
        **SIZES[size],
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        torch_dtype="float32",
        architectures=["LlamaForCausalLM"],
    )


def build_inputs(work: Path, size: str, n_tasks: int) -> Path:
    """base/, task0..task{n-1}/ (base plus small random deltas), masks/{empty,p1}/ under
    work/size. Cached: existing directories are kept."""
    import torch
    from transformers import LlamaForCausalLM

    from cpi_ray.io.masks import pack_mask, write_mask_file
    from cpi_ray.io.safetensors_io import save_model_dir

    root = work / size
    cfg = llama_config(size)
    with torch.device("meta"):
        shapes = {
            n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).state_dict().items() if n != "lm_head.weight"
        }  # tied to the embedding
    side = {"config.json": cfg.to_json_string()}

    def state(seed: int, base=None):
        g = torch.Generator().manual_seed(seed)
        for n, shp in shapes.items():
            if base is None:
                x = torch.randn(shp, generator=g) * 0.02
                if n.endswith("norm.weight"):
                    x += 1.0
            else:
                # a fine-tuning-sized move: angles well inside SLERP's non-linear branch
                x = base[n] + torch.randn(shp, generator=g) * 0.004
            yield n, x

    for d in [root / "base"] + [root / f"task{t}" for t in range(n_tasks)]:
        if d.exists():  # refresh the config of cached models
            (d / "config.json").write_text(side["config.json"])
    if not (root / "base").exists():
        print(f"[{size}] writing base", flush=True)
        save_model_dir(state(0), root / "base", 2 * 10**9, extra_files=side)
    base = None
    for t in range(n_tasks):
        d = root / f"task{t}"
        if d.exists():
            continue
        if base is None:
            from safetensors.torch import load_file

            base = {}
            for f in sorted((root / "base").glob("*.safetensors")):
                base.update(load_file(f))
        print(f"[{size}] writing task{t}", flush=True)
        save_model_dir(state(100 + t, base), d, 2 * 10**9, extra_files=side)
    del base
    for t in range(n_tasks):
        e = root / "masks" / "empty" / f"task{t}.mask.safetensors"
        if not e.exists():
            write_mask_file(e, {}, {})
        p = root / "masks" / "p1" / f"task{t}.mask.safetensors"
        if not p.exists():
            g = torch.Generator().manual_seed(1000 + t)
            packed = {n: pack_mask(torch.rand(shp, generator=g) < CORE_P) for n, shp in shapes.items()}
            numel = {n: int(torch.Size(shp).numel()) for n, shp in shapes.items()}
            write_mask_file(p, packed, numel)
    return root


def pipeline_config(n_tasks: int, actors: int, chunk_mib: int, shard_size: str, backbone: str, omega):
    from cpi_ray.config.schema import PipelineConfig

    return PipelineConfig.model_validate(
        {
            "tasks": [
                {"name": f"task{t}", "reasoning_gym": {"name": "spell_backward"}} for t in range(n_tasks)
            ],
            "model": {"max_shard_size": shard_size},
            "fuse": {"num_actors": actors, "chunk_mib": chunk_mib, "backbone": backbone, "omega": omega},
        }
    )


# ---------------------------------------------------------------------------- runners (children)


def child_stage(a) -> dict:
    t_start = time.perf_counter()
    import psutil
    import ray

    from cpi_ray.fusion.stage import run_fusion

    root = Path(a.root)
    tasks = [f"task{t}" for t in range(a.n_tasks)]
    cfg = pipeline_config(a.n_tasks, a.actors, a.chunk_mib, a.shard_size, a.backbone, a.omega)
    t0 = time.perf_counter()
    ray.init(num_cpus=a.actors, include_dashboard=False, log_to_driver=False)
    t_ray = time.perf_counter() - t0
    rss_before = peak_rss()
    stats = run_fusion(
        root / "base",
        {t: root / t for t in tasks},
        {t: root / "masks" / a.masks / f"{t}.mask.safetensors" for t in tasks},
        Path(a.out),
        cfg,
    )
    daemons = 0
    for p in psutil.Process().children(recursive=True):
        try:
            if not p.cmdline() or "ray::" not in p.cmdline()[0]:
                daemons += p.memory_info().rss
        except psutil.Error:
            pass
    ray.shutdown()
    driver = peak_rss()
    actors = sum(stats["actor_peak_rss"])
    return {
        "wall_s": stats["total_s"],
        "ray_init_s": t_ray,
        "process_s": time.perf_counter() - t_start,
        "driver_peak_rss": driver,
        "driver_rss_before_stage": rss_before,
        "actors_peak_rss": stats["actor_peak_rss"],
        "peak_rss": driver + actors,
        "ray_daemons_rss": daemons,
        "shards": len(stats["shards"]),
    }


def child_plain(a) -> dict:
    """A plain in-memory torch merge: load every model whole, merge tensor by tensor, save."""
    t_start = time.perf_counter()
    import math

    import torch
    from safetensors.torch import load_file, save_file

    from cpi_ray.io.masks import MaskFile

    root = Path(a.root)
    t0 = time.perf_counter()

    def load(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(f))
        return out

    tasks = [f"task{t}" for t in range(a.n_tasks)]
    base = load(root / "base")
    models = {t: load(root / t) for t in tasks}
    masks = {t: MaskFile(root / "masks" / a.masks / f"{t}.mask.safetensors") for t in tasks}
    if a.backbone == "base":
        order = [base] + [models[t] for t in tasks]
    else:
        order = [models[a.backbone]] + [models[t] for t in tasks if t != a.backbone]
    out = {}
    for name, b in base.items():
        owned = [masks[t].flat(name).reshape(b.shape) if name in masks[t] else None for t in tasks]
        union = torch.zeros(b.shape, dtype=torch.bool)
        for m in owned:
            if m is not None:
                union |= m
        keep = ~union
        theta = order[0][name].float()
        for k in range(1, len(order)):
            w = a.omega if a.omega is not None else 1 / (k + 1)
            x = order[k][name].float()
            u, v = theta[keep], x[keep]
            # products in fp32, sums in float64: a plain fp32 dot over the 28M-element
            # embedding is off by ~1e-4 relative, enough to move the result by 1e-3
            uv = float((u * v).sum(dtype=torch.float64))
            uu = float((u * u).sum(dtype=torch.float64))
            vv = float((v * v).sum(dtype=torch.float64))
            cos = uv / math.sqrt(uu * vv)
            if abs(cos) > 1 - 5e-4:
                s0, s1 = 1 - w, w
            else:
                om = math.acos(cos)
                s0, s1 = math.sin((1 - w) * om) / math.sin(om), math.sin(w * om) / math.sin(om)
            theta = s0 * theta + s1 * x
        if union.any():
            best = torch.full(b.shape, -1.0)
            for t, m in zip(tasks, owned):
                if m is None:
                    continue
                d = (models[t][name] - b).abs()
                win = m & (d > best)
                best = torch.where(win, d, best)
                theta = torch.where(win, models[t][name], theta)
        out[name] = theta.to(b.dtype).contiguous()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    save_file(out, str(Path(a.out) / "model.safetensors"), metadata={"format": "pt"})
    return {
        "wall_s": time.perf_counter() - t0,
        "process_s": time.perf_counter() - t_start,
        "peak_rss": peak_rss(),
    }


# ---------------------------------------------------------------------------- parent


def run_child(kind: str, a, **kw) -> dict:
    args = [sys.executable, str(HERE), "_child", kind]
    for k, v in kw.items():
        if v is not None:
            args += [f"--{k.replace('_', '-')}", str(v)]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{kind} run failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def mergekit_venv(work: Path) -> Path:
    venv = work / "mergekit-venv"
    py = venv / "bin" / "python"
    if (venv / "bin" / "mergekit-yaml").exists():
        return venv
    print("installing mergekit 0.1.5 into its own virtual environment", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    # torch first, pinned to the project's version, so mergekit does not pull a CUDA build
    subprocess.run(pip + ["torch==2.13.0"], check=True)
    subprocess.run(pip + ["mergekit==0.1.5", "torch==2.13.0"], check=True)
    return venv


MEASURE = (
    "import json,resource,subprocess,sys,time\n"
    "t=time.perf_counter(); r=subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "w=time.perf_counter()-t\n"
    "if r.returncode: sys.stderr.write(r.stderr[-4000:]); sys.exit(r.returncode)\n"
    "print(json.dumps({'process_s': w, "
    "'peak_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024}))\n"
)


def run_mergekit(work: Path, root: Path, out: Path, threads: int) -> dict:
    venv = mergekit_venv(work)
    cfg = out.with_suffix(".yml")
    cfg.write_text(
        "merge_method: slerp\n"
        f"base_model: {root / 'task0'}\n"
        "models:\n"
        f"  - model: {root / 'task0'}\n"
        f"  - model: {root / 'task1'}\n"
        "parameters:\n  t: 0.5\n"
        "dtype: float32\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            MEASURE,
            str(venv / "bin" / "mergekit-yaml"),
            str(cfg),
            str(out),
            "--allow-crimes",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode:
        raise RuntimeError(f"mergekit failed:\n{r.stderr[-4000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["wall_s"] = res["process_s"]
    return res


def compare(a_dir: Path, b_dir: Path) -> float:
    """Largest per-tensor max|a - b| / max|b| between two model directories."""

    from cpi_ray.io.safetensors_io import CheckpointReader

    worst = 0.0
    with CheckpointReader(a_dir) as ra, CheckpointReader(b_dir) as rb:
        for n in rb.names():
            x = ra.read(n).double()
            y = rb.read(n).double()
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp(min=1e-30)))
    return worst


def compare_exact_slerp(root: Path, out: Path, t: float = 0.5) -> float:
    """Largest per-tensor relative error of `out` against slerp(task0, task1, t) evaluated in
    float64 from the formula: who is closer to the exact value, when stage and mergekit differ."""
    import math

    from cpi_ray.io.safetensors_io import CheckpointReader

    worst = 0.0
    with (
        CheckpointReader(root / "task0") as r0,
        CheckpointReader(root / "task1") as r1,
        CheckpointReader(out) as ro,
    ):
        for n in r0.names():
            a, b = r0.read(n).double(), r1.read(n).double()
            cos = float((a * b).sum() / (a.norm() * b.norm()))
            if abs(cos) > 1 - 5e-4:
                ref = (1 - t) * a + t * b
            else:
                om = math.acos(cos)
                ref = (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)
            worst = max(worst, float((ro.read(n).double() - ref).abs().max() / ref.abs().max()))
    return worst


def fmt_mb(b: float) -> str:
    return f"{b / 1e6:,.0f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--sizes", default="demo,1gb")
    ap.add_argument("--tasks", default="2,4")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--chunk-mib", type=int, default=64)
    ap.add_argument("--shard-size", default="100MB")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--no-plain", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args()
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    sizes = a.sizes.split(",")
    ntasks = [int(x) for x in a.tasks.split(",")]
    results = []
    for size in sizes:
        root = build_inputs(work, size, max(ntasks))
        for n in ntasks:
            for masks in ("p1", "empty") if n == 2 else ("p1",):
                backbone, omega = ("task0", 0.5) if masks == "empty" else ("base", None)
                common = dict(root=root, n_tasks=n, masks=masks, backbone=backbone, omega=omega)
                label = f"{size} x{n} masks={masks} backbone={backbone}"
                out = work / "out" / f"{size}-{n}-{masks}"
                row = {"size": size, "tasks": n, "masks": masks, "backbone": backbone}
                row["stage"] = run_child(
                    "stage",
                    a,
                    out=out / "stage",
                    actors=a.actors,
                    chunk_mib=a.chunk_mib,
                    shard_size=a.shard_size,
                    **common,
                )
                if not a.no_plain:
                    row["plain"] = run_child("plain", a, out=out / "plain", **common)
                    row["stage_vs_plain_rel"] = compare(out / "stage", out / "plain")
                if masks == "empty" and n == 2 and not a.no_mergekit:
                    row["mergekit"] = run_mergekit(work, root, out / "mergekit", a.actors)
                    row["stage_vs_mergekit_rel"] = compare(out / "stage", out / "mergekit")
                    row["exact_rel"] = {k: compare_exact_slerp(root, out / k) for k in ("stage", "mergekit")}
                results.append(row)
                s = row["stage"]
                print(f"\n{label}")
                print(
                    f"  stage    wall {s['wall_s']:6.2f} s (process {s['process_s']:.2f} s, "
                    f"ray.init {s['ray_init_s']:.2f} s)  peak RSS driver+actors "
                    f"{fmt_mb(s['peak_rss'])} (driver {fmt_mb(s['driver_peak_rss'])}, actors "
                    f"{', '.join(fmt_mb(x) for x in s['actors_peak_rss'])}; ray daemons "
                    f"{fmt_mb(s['ray_daemons_rss'])})"
                )
                for k in ("plain", "mergekit"):
                    if k in row:
                        r = row[k]
                        print(
                            f"  {k:8s} wall {r['wall_s']:6.2f} s (process {r['process_s']:.2f} s)"
                            f"  peak RSS {fmt_mb(r['peak_rss'])}"
                        )
                        print(
                            f"  stage/{k}: wall {s['wall_s'] / r['wall_s']:.2f}x (process "
                            f"{s['process_s'] / r['process_s']:.2f}x), peak RSS "
                            f"{s['peak_rss'] / r['peak_rss']:.2f}x, max rel diff "
                            f"{row[f'stage_vs_{k}_rel']:.2e}"
                        )
                if "exact_rel" in row:
                    print(
                        "  against float64 SLERP from the formula: "
                        + ", ".join(f"{k} {v:.2e}" for k, v in row["exact_rel"].items())
                    )
                sys.stdout.flush()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2, default=str))


def child_main(argv) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind")
    ap.add_argument("--root")
    ap.add_argument("--out")
    ap.add_argument("--n-tasks", type=int)
    ap.add_argument("--masks")
    ap.add_argument("--backbone")
    ap.add_argument("--omega", type=float)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--chunk-mib", type=int, default=64)
    ap.add_argument("--shard-size", default="100MB")
    a = ap.parse_args(argv)
    res = child_stage(a) if a.kind == "stage" else child_plain(a)
    print(json.dumps(res))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2:])
    else:
        main()
