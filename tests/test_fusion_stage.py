"""Stage `fuse` end to end on Ray, checked element by element against independent computations."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import torch
from fusion_helpers import TASKS, load_state, make_run, with_fuse

from cpi_ray.fusion.stage import STATS_NAME, FuseStage
from cpi_ray.fusion.worker import FuseError
from cpi_ray.io.masks import MaskFile
from cpi_ray.io.safetensors_io import save_model_dir

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("ray_local")


def masks_of(ctx, names):
    """Per task: tensor name -> bool mask (absent tensors: no core)."""
    out = {}
    for t in ctx.task_names():
        mf = MaskFile(ctx.path("regions", f"{t}.mask.safetensors"))
        out[t] = {n: mf.flat(n).reshape(names[n].shape) for n in mf.names()}
        mf.close()
    return out


def ref_slerp64(a, b, t, eps):
    """SLERP of two float64 vectors, from the formula."""
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return None
    cos = float(torch.dot(a / na, b / nb))
    if abs(cos) > 1 - eps:
        return 1 - t, t
    om = math.acos(cos)
    return math.sin((1 - t) * om) / math.sin(om), math.sin(t * om) / math.sin(om)


def expected_noncore(models, keep, omegas, eps):
    """Fold the full tensors in float64, with angles taken over the non-core elements."""
    theta = models[0].double().reshape(-1)
    for k in range(1, len(models)):
        x = models[k].double().reshape(-1)
        c = ref_slerp64(theta[keep], x[keep], omegas[k - 1], eps)
        if c is None:
            c = (1 - omegas[k - 1], omegas[k - 1])
        theta = c[0] * theta + c[1] * x
    return theta


def expected_task_vectors(models, keep, fc):
    """Task arithmetic or TIES of the full tensors in float64; TIES trims each task vector to its
    exact top `density` share of the non-core elements by magnitude (ties to the lower index)."""
    base = models[0].double().reshape(-1)
    deltas = [m.double().reshape(-1) - base for m in models[1:]]
    if fc.method == "task_arithmetic":
        return base + fc.scale * sum(deltas)
    idx = torch.nonzero(keep).squeeze(1)
    k = math.floor(fc.density * len(idx) + 1e-9)
    trimmed = []
    for m in models[1:]:
        mag = (m.float().reshape(-1) - models[0].float().reshape(-1)).abs()[idx]
        # stable sort on -mag: equal magnitudes stay in index order
        top = idx[torch.sort(-mag.double(), stable=True).indices[:k]]
        sel = torch.zeros_like(keep)
        sel[top] = True
        d = m.double().reshape(-1) - base
        trimmed.append(torch.where(sel, d, 0.0))
    d = torch.stack(trimmed)
    sign = torch.where(d.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(d) == sign
    merged = (d * agree).sum(0) / agree.sum(0).clamp(min=1)
    return base + fc.scale * merged


def check_fused(ctx, fused, policy, groups=None):
    base = load_state(ctx.base_model_dir)
    probes = {t: load_state(ctx.path("probes", t)) for t in ctx.task_names()}
    masks = masks_of(ctx, base)
    tasks = ctx.task_names()
    fc = ctx.cfg.fuse
    if fc.backbone == "base":
        order = [base] + [probes[t] for t in tasks]
    else:
        order = [probes[fc.backbone]] + [probes[t] for t in tasks if t != fc.backbone]
    rank = {t: g for g, m in enumerate(groups or []) for t in m}
    n_core = n_noncore = 0
    for name, b in base.items():
        got = fused[name].reshape(-1)
        assert fused[name].dtype == b.dtype and fused[name].shape == b.shape
        owned = {t: masks[t][name].reshape(-1) for t in tasks if name in masks[t]}
        union = torch.zeros(b.numel(), dtype=torch.bool)
        for m in owned.values():
            union |= m
        keep = ~union
        if fc.method in ("task_arithmetic", "ties"):
            want = expected_task_vectors([m[name] for m in order], keep, fc)
        else:
            om = fc.omega
            for pat, w in fc.omega_overrides.items():
                if re.search(pat, name):
                    om = w
                    break
            n = len(order)
            omegas = [1 / (k + 1) for k in range(1, n)] if om is None else [om] * (n - 1)
            want = expected_noncore([m[name] for m in order], keep, omegas, fc.epsilon)
        if keep.any():
            err = (got[keep].double() - want[keep]).abs().max() / want[keep].abs().max()
            tol = 1e-6 if b.dtype == torch.float32 else 8e-3
            assert err < tol, (name, float(err))
            n_noncore += int(keep.sum())
        # core: the owner's value, exactly (vectorized over elements; ties to the earlier task,
        # which is what argmax returns)
        if union.any():
            present = [t for t in tasks if t in owned]
            own = torch.stack([owned[t] for t in present])  # (T, n)
            vals = torch.stack([probes[t][name].reshape(-1) for t in present])
            delta = (vals.float() - b.reshape(-1).float()).abs()
            if policy == "mean":
                s = torch.where(own, vals.double(), 0.0).sum(0)
                want_v = (s / own.sum(0).clamp(min=1))[union]
                torch.testing.assert_close(got[union].double(), want_v, rtol=1e-6, atol=1e-7)
                single = union & (own.sum(0) == 1)
                lone = vals[own.float().argmax(0), torch.arange(b.numel())]
                assert torch.equal(got[single], lone[single])
            else:
                eligible = own
                if policy == "priority":
                    r = torch.tensor([rank[t] for t in present])[:, None].expand_as(own)
                    r = torch.where(own, r, 10**9)
                    eligible = own & (r == r.min(0).values)
                key = torch.where(eligible, delta, -1.0)
                win = key.argmax(0)
                want_v = vals[win, torch.arange(b.numel())]
                assert torch.equal(got[union], want_v[union]), name
            n_core += int(union.sum())
    assert n_core > 100 and n_noncore > 1000
    return n_core


@pytest.fixture(scope="module")
def run3(tmp_path_factory, tiny_model_dir):
    return make_run(tmp_path_factory.mktemp("fuse3"), groups=[["b"], ["a", "c"]], base_dir=tiny_model_dir)


@pytest.mark.parametrize("policy", ["magnitude", "mean", "priority"])
def test_core_and_noncore_match_independent_computation(run3, policy):
    ctx = with_fuse(run3, policy=policy)
    (out,) = FuseStage().run(ctx)
    check_fused(ctx, load_state(out), policy, groups=[["b"], ["a", "c"]])


@pytest.mark.parametrize(
    "fuse",
    [
        {"method": "task_arithmetic", "scale": 0.6},
        {"method": "ties", "scale": 0.8},
        {"method": "ties", "density": 0.3, "policy": "mean"},
    ],
)
def test_task_vector_merges_match_independent_computation(run3, fuse):
    ctx = with_fuse(run3, **fuse)
    (out,) = FuseStage(chunk_elems=2048).run(ctx)
    check_fused(ctx, load_state(out), fuse.get("policy", "magnitude"))


def test_ties_trim_is_bitwise_independent_of_chunks_and_actors(run3):
    ctx = with_fuse(run3, method="ties", density=0.2, num_actors=1)
    (out,) = FuseStage().run(ctx)
    one = digest(out)
    (out,) = FuseStage(chunk_elems=1024).run(with_fuse(ctx, num_actors=3))
    assert digest(out) == one


def test_backbone_task_omega_overrides_and_generation(tmp_path, tiny_model_dir):
    ctx = make_run(
        tmp_path,
        base_dir=tiny_model_dir,
        tasks=["a", "b"],
        backbone="b",
        omega=0.3,
        omega_overrides={r"self_attn\.": 0.8},
    )
    (out,) = FuseStage().run(ctx)
    check_fused(ctx, load_state(out), "magnitude")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("abc", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4
    fused = load_state(out)
    for n, p in model.state_dict().items():
        assert torch.equal(p, fused[n])


def test_bf16_base_is_written_in_bf16(tmp_path, tiny_model_dir):
    ctx = make_run(tmp_path, base_dir=tiny_model_dir, tasks=["a", "b"], dtype=torch.bfloat16)
    (out,) = FuseStage().run(ctx)
    fused = load_state(out)
    assert all(v.dtype == torch.bfloat16 for v in fused.values())
    check_fused(ctx, fused, "magnitude")


def ref_multislerp64(xs, keep, w):
    """Weighted tangent-space mean on the sphere, from the formula, directions and norms taken
    over the non-core elements; returns the full combined tensor."""
    w = torch.tensor(w, dtype=torch.float64)
    w = w / w.sum()
    full = [x.double().reshape(-1) for x in xs]
    sub = [x[keep] for x in full]
    norms = torch.stack([x.norm() for x in sub])
    us = [x / n for x, n in zip(sub, norms)]
    p = sum(wi * u for wi, u in zip(w, us))
    p = p / p.norm()
    # express everything as a combination of the inputs so that core positions get values too
    coef = torch.zeros(len(xs), dtype=torch.float64)
    pc = w / norms / sum(wi * u for wi, u in zip(w, us)).norm()  # p = sum pc_i x_i
    v = torch.zeros_like(p)
    vc = torch.zeros(len(xs), dtype=torch.float64)
    for i, (wi, u) in enumerate(zip(w, us)):
        th = math.acos(float(torch.clamp(torch.dot(u, p), -1, 1)))
        f = th / math.sin(th) if th > 1e-12 else 1.0
        v = v + wi * f * (u - math.cos(th) * p)
        vc[i] += wi * f / norms[i]
        vc -= wi * f * math.cos(th) * pc
    nv = float(v.norm())
    coef = (math.cos(nv) * pc + math.sin(nv) / nv * vc) * float((w * norms).sum())
    return sum(c * x for c, x in zip(coef, full))


def test_multislerp_matches_formula(tmp_path, tiny_model_dir):
    ctx = make_run(tmp_path, base_dir=tiny_model_dir, tasks=["a", "b", "c"], method="multislerp", omega=0.4)
    (out,) = FuseStage().run(ctx)
    fused = load_state(out)
    base = load_state(ctx.base_model_dir)
    probes = [load_state(ctx.path("probes", t)) for t in TASKS]
    masks = masks_of(ctx, base)
    w = [0.6, 0.4 / 3, 0.4 / 3, 0.4 / 3]  # backbone base gets 1 - omega, the tasks share omega
    for n in base:
        union = torch.zeros(base[n].numel(), dtype=torch.bool)
        for t in TASKS:
            if n in masks[t]:
                union |= masks[t][n].reshape(-1)
        keep = ~union
        want = ref_multislerp64([base[n]] + [p[n] for p in probes], keep, w)
        got = fused[n].reshape(-1).double()
        err = (got[keep] - want[keep]).abs().max() / want[keep].abs().max()
        assert err < 1e-6, (n, float(err))


def digest(d):
    """The model's files (not the stage's timing record)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.iterdir())
        if p.name != STATS_NAME
    }


def test_bitwise_determinism_across_actors_and_chunks(run3):
    outs = []
    for actors, chunk in [(1, None), (3, 1024), (2, 3072)]:
        ctx = with_fuse(run3, num_actors=actors)
        (out,) = FuseStage(chunk_elems=chunk).run(ctx)
        outs.append(digest(out))
    assert outs[0] == outs[1] == outs[2]
    assert sum(n.endswith(".safetensors") for n in outs[0]) > 2
    # The stats outlive the stage object: a fresh one (as the runner makes) summarizes them.
    n_shards = sum(n.endswith(".safetensors") for n in outs[-1])
    assert FuseStage().summary(ctx).startswith(f"fused {n_shards} shard(s) with 2 actor(s)")


def test_actor_killed_mid_shard_is_retried_bitwise(run3, tmp_path):
    """An actor dies (SIGKILL) half-way through writing a shard: Ray restarts it, the shard is
    redone, and the output is bitwise the fault-free one, with no partial file left behind."""
    from cpi_ray.fusion.stage import run_fusion

    ctx = with_fuse(run3, num_actors=2)
    inputs = (
        ctx.base_model_dir,
        {t: ctx.path("probes", t) for t in TASKS},
        {t: ctx.path("regions", f"{t}.mask.safetensors") for t in TASKS},
    )
    run_fusion(*inputs, tmp_path / "clean", ctx.cfg, chunk_elems=1024)
    clean = digest(tmp_path / "clean")
    shards = sorted(n for n in clean if n.endswith(".safetensors"))
    victim, marker = shards[len(shards) // 2], tmp_path / "killed"
    run_fusion(*inputs, tmp_path / "faulty", ctx.cfg, chunk_elems=1024, fault=(victim, str(marker)))
    assert marker.exists(), "the fault was not injected"
    assert digest(tmp_path / "faulty") == clean


def test_identical_inputs_return_the_base(tmp_path, tiny_model_dir):
    ctx = make_run(tmp_path, base_dir=tiny_model_dir, identical=True)
    for fuse in (
        {"policy": "magnitude"},
        {"policy": "mean"},
        {"method": "task_arithmetic"},
        {"method": "ties"},
    ):
        (out,) = FuseStage(chunk_elems=2048).run(with_fuse(ctx, **fuse))
        fused, base = load_state(out), load_state(ctx.base_model_dir)
        for n in base:
            assert torch.equal(fused[n], base[n]), n


def corrupt(ctx, task, fn):
    d = ctx.path("probes", task)
    st = load_state(d)
    st = fn(st)
    save_model_dir(st, d, 100_000, copy_from=ctx.base_model_dir)


def test_nan_in_a_task_model_is_reported_and_nothing_is_written(tmp_path, tiny_model_dir):
    ctx = make_run(tmp_path, base_dir=tiny_model_dir, tasks=["a", "b"])
    name = "model.layers.1.mlp.down_proj.weight"

    def nan(st):
        st[name].view(-1)[5000] = float("nan")
        return st

    corrupt(ctx, "b", nan)
    for fuse in ({}, {"method": "ties", "density": 0.5}):
        with pytest.raises(FuseError) as e:
            FuseStage(chunk_elems=1024).run(with_fuse(ctx, **fuse))
        msg = str(e.value)
        assert name in msg and str(ctx.path("probes", "b")) in msg and "5000" in msg
        assert not ctx.path("fused").exists()
    assert not [p for p in ctx.run_dir.iterdir() if p.name.startswith(".fused")]


def test_missing_tensor_and_shape_mismatch(tmp_path, tiny_model_dir):
    ctx = make_run(tmp_path, base_dir=tiny_model_dir, tasks=["a", "b"])
    name = "model.layers.0.self_attn.q_proj.weight"
    corrupt(ctx, "a", lambda st: {k: v for k, v in st.items() if k != name})
    with pytest.raises(FuseError, match=re.escape(name)) as e:
        FuseStage().run(ctx)
    assert "missing" in str(e.value) and str(ctx.path("probes", "a")) in str(e.value)
    assert not ctx.path("fused").exists()

    base = load_state(ctx.base_model_dir)
    save_model_dir(
        {**base, name: base[name][:, :-1].clone()},
        ctx.path("probes", "a"),
        100_000,
        copy_from=ctx.base_model_dir,
    )
    with pytest.raises(FuseError, match=re.escape(name)) as e:
        FuseStage().run(ctx)
    assert "shape" in str(e.value)
    assert not ctx.path("fused").exists()


def test_bad_mask_is_reported(tmp_path, tiny_model_dir):
    from cpi_ray.io.masks import pack_mask, write_mask_file

    ctx = make_run(tmp_path, base_dir=tiny_model_dir, tasks=["a", "b"])
    name = "model.norm.weight"
    write_mask_file(
        ctx.path("regions", "a.mask.safetensors"),
        {name: pack_mask(torch.ones(9, dtype=torch.bool))},
        {name: 9},
    )
    with pytest.raises(FuseError, match="covers 9 elements"):
        FuseStage().run(ctx)
    ctx.path("regions", "b.mask.safetensors").unlink()
    with pytest.raises(FuseError, match="mask file"):
        FuseStage().run(ctx)


def test_priority_needs_every_task_in_a_group(run3):
    ctx = with_fuse(run3, policy="priority")
    p = ctx.path("groups", "groups.json")
    saved = p.read_text()
    try:
        p.write_text(json.dumps([["a"], ["b"]]))
        with pytest.raises(FuseError, match="in no group"):
            FuseStage().run(ctx)
    finally:
        p.write_text(saved)


def test_task_vector_knobs_fingerprint_only_their_methods(run3):
    """A run fused with a SLERP method before `scale` and `density` existed stays current; with
    ties both knobs redo the stage."""
    stage = FuseStage()
    fold = stage.config_slice(run3.cfg)["fuse"]
    assert "scale" not in fold and "density" not in fold
    ties = [stage.config_slice(with_fuse(run3, method="ties", density=d).cfg) for d in (1.0, 0.5)]
    assert ties[0] != ties[1] and ties[1]["fuse"]["density"] == 0.5
