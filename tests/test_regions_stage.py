"""Stages regions and groups on a local Ray: masks against an in-memory reference computed
here from plain safetensors loads, bad input refused, p changing only what depends on it."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cpi_ray.config.schema import PipelineConfig
from cpi_ray.io.masks import MaskFile
from cpi_ray.io.records import file_sha256
from cpi_ray.io.safetensors_io import CheckpointError, save_model_dir
from cpi_ray.models.tiny import save_tiny_model
from cpi_ray.regions.stage import (
    GroupsStage,
    RegionsStage,
    load_groups,
    load_histogram,
    load_overlap,
    load_region_stats,
    mask_path,
)
from cpi_ray.run.stage import RunContext

TASKS = ["a", "b", "d"]


def load_dir(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("regions")
    # embeddings of 4096 x 128 fp32 = 2 MiB: 1 MiB chunks split them mid-tensor
    base = save_tiny_model(
        root / "base", max_shard_size=1_500_000, vocab_size=4096, hidden_size=128, intermediate_size=256
    )
    state = load_dir(base)
    g = torch.Generator().manual_seed(7)
    pa = {n: t.clone() for n, t in state.items()}
    for n in pa:
        if "layers.0." in n or "embed" in n:
            pa[n] += torch.randn(pa[n].shape, generator=g) * 0.01
    pb = {n: t.clone() for n, t in state.items()}
    for n in pb:
        if "layers.1." in n or "lm_head" in n or "layers.0.mlp" in n:
            pb[n] += torch.randn(pb[n].shape, generator=g) * 0.01
    # d moves only 500 elements: the rest of its core is zeros, taken in flat-index order
    pd = {n: t.clone() for n, t in state.items()}
    flat = pd["model.layers.1.self_attn.o_proj.weight"].view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:500]] += 0.05
    run = root / "run"
    save_model_dir(pa, run / "probes" / "a", 700_000, copy_from=base)
    save_model_dir(pb, run / "probes" / "b", 3_000_000, copy_from=base)
    save_model_dir(pd, run / "probes" / "d", 900_000, copy_from=base)
    return {"base": base, "run": run, "root": root, "probes": {"a": pa, "b": pb, "d": pd}, "state": state}


def make_cfg(**regions):
    return PipelineConfig.model_validate(
        {
            "tasks": [{"name": t, "hub_id": f"x/{t}"} for t in TASKS],
            "regions": {"chunk_mib": 1, "num_actors": 2, **regions},
            "groups": {"tau": 0.1, "order": "size"},
        }
    )


def make_ctx(models, run_dir, **regions):
    return RunContext(make_cfg(**regions), run_dir, models["base"], "tiny-test")


def reference(
    models, task, k_p, granularity="element", include=None, exclude=None, fisher=None, score="delta"
):
    """Plain in-memory top-k: every scored tensor loaded, scores concatenated in sorted-name
    order, a stable sort on descending score (equal scores keep flat order)."""
    import re

    base, probe = models["state"], models["probes"][task]
    names = sorted(
        n
        for n, t in base.items()
        if t.is_floating_point()
        and (not include or any(re.search(p, n) for p in include))
        and not any(re.search(p, n) for p in (exclude or []))
    )
    D = sum(base[n].numel() for n in names)
    k = int(k_p * D // 100)
    unit_scores, unit_w, unit_src = [], [], []
    for n in names:
        s = (probe[n].float() - base[n].float()).abs()
        if score == "fisher":
            s = fisher[n].float()
        elif score == "delta_fisher":
            s = s * fisher[n].double().sqrt().float()  # √F correctly rounded
        if granularity == "row" and s.dim() >= 2:
            rows = s.reshape(s.shape[0], -1)
            us = (rows.double().sum(1) / rows.shape[1]).float()
            w = rows.shape[1]
        else:
            us, w = s.reshape(-1), 1
        unit_scores.append(us.numpy())
        unit_w.append(np.full(us.numel(), w))
        unit_src.append([(n, i) for i in range(us.numel())])
    sc = np.concatenate(unit_scores)
    w = np.concatenate(unit_w)
    src = [x for s in unit_src for x in s]
    order = np.argsort(-sc.astype(np.float64), kind="stable")
    masks = {n: torch.zeros(base[n].numel(), dtype=torch.bool) for n in names}
    used = 0
    for i in order:
        if used + w[i] > k:
            break
        used += w[i]
        n, u = src[i]
        masks[n][u * w[i] : (u + 1) * w[i]] = True
    return masks, k, D


def check_against_reference(models, run_dir, task, p, **kw):
    ref, k, D = reference(models, task, p, **kw)
    m = MaskFile(mask_path(run_dir, task))
    assert sorted(m.names()) == sorted(ref)
    for n, want in ref.items():
        assert torch.equal(m.flat(n), want), (task, n)
    assert int(m.metadata["k"]) == k and int(m.metadata["D"]) == D
    return m, k, D, sum(int(v.sum()) for v in ref.values())


def test_masks_overlap_and_groups(ray_local, models, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(models["run"], run)
    ctx = make_ctx(models, run)
    outs = RegionsStage().run(ctx)
    assert {p.name for p in outs} >= {"a.mask.safetensors", "stats.json", "histograms.npz"}
    stats = load_region_stats(run)
    assert stats["num_chunks"] > stats["num_tensors"]  # chunks split tensors
    for t in TASKS:
        m, k, D, count = check_against_reference(models, run, t, 1.0)
        assert m.count() == k == count  # exactly k
        assert m.metadata["p"] == "1.0" and m.metadata["score"] == "delta"
        st = stats["tasks"][t]
        assert st["k"] == k and st["D"] == D
        assert sum(st["per_layer"].values()) == k == sum(st["per_module"].values())
        # the threshold is the k-th largest |delta| of the reference
        all_d = np.concatenate(
            [
                (models["probes"][t][n].float() - models["state"][n].float()).abs().reshape(-1).numpy()
                for n in sorted(models["state"])
            ]
        )
        assert st["threshold"] == float(np.sort(all_d)[::-1][k - 1])
        assert load_histogram(run, t).sum() == D
    # d's core is its 500 moved elements plus zeros in flat order: the protocol took ties
    assert stats["tasks"]["d"]["threshold"] == 0.0
    assert stats["tasks"]["a"]["per_layer"].get("layer.1", 0) == 0

    GroupsStage().run(ctx)
    ov = load_overlap(run)
    masks = {t: MaskFile(mask_path(run, t)) for t in TASKS}
    sets = {
        t: {(n, int(i)) for n in masks[t].names() for i in masks[t].flat(n).nonzero().view(-1)} for t in TASKS
    }
    for i, ti in enumerate(TASKS):
        for j, tj in enumerate(TASKS):
            u = sets[ti] | sets[tj]
            assert ov["jaccard"][i][j] == pytest.approx(len(sets[ti] & sets[tj]) / len(u))
    expected = [[t] for t in TASKS]  # no overlap reaches 0.1 here
    assert load_groups(run) == expected


def test_row_granularity_filters_and_fallback(ray_local, models, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(models["run"], run)
    kw = dict(include=["layers"], exclude=["norm"])
    ctx = make_ctx(models, run, p=5.0, granularity="row", max_candidates=1024, **kw)
    RegionsStage().run(ctx)
    for t in TASKS:
        m, k, D, count = check_against_reference(models, run, t, 5.0, granularity="row", **kw)
        assert not any("norm" in n or "embed" in n for n in m.names())
        assert 0 < m.count() == count <= k
    # the smallest budget forces the histogram and quota passes on d's flood of zero scores
    RegionsStage().run(make_ctx(models, run, p=5.0, max_candidates=1024, **kw))
    for t in TASKS:
        m, k, _, _ = check_against_reference(models, run, t, 5.0, **kw)
        assert m.count() == k
    assert "quota" in load_region_stats(run)["tasks"]["d"]["passes"]


def test_bad_inputs_write_no_mask(ray_local, models, tmp_path):
    base_state = models["state"]
    cases = {}
    bad = dict(base_state, **{"model.norm.weight": torch.zeros(3)})
    cases["shape"] = (bad, r"'model\.norm\.weight' has shape")
    bad = dict(base_state, **{"model.norm.weight": base_state["model.norm.weight"].double()})
    cases["dtype"] = (bad, r"'model\.norm\.weight' has dtype")
    bad = {n: t for n, t in base_state.items() if n != "lm_head.weight"}
    cases["missing"] = (bad, r"'lm_head\.weight'.*missing")
    nan = {n: t.clone() for n, t in base_state.items()}
    nan["model.layers.0.mlp.up_proj.weight"].view(-1)[1234] = float("nan")
    cases["nan"] = (
        nan,
        r"NaN or Inf.*'model\.layers\.0\.mlp\.up_proj\.weight'.*element 1234"
        r".*probe file .*model-\d+-of-\d+\.safetensors",
    )
    for case, (state, pattern) in cases.items():
        run = tmp_path / case
        shutil.copytree(models["run"], run)
        shutil.rmtree(run / "probes" / "b")
        save_model_dir(state, run / "probes" / "b", 1_000_000, copy_from=models["base"])
        with pytest.raises(CheckpointError, match=pattern):
            RegionsStage().run(make_ctx(models, run))
        assert not list((run / "regions").glob("*.mask.safetensors")), case
    # a shard file the index names is gone
    run = tmp_path / "shard"
    shutil.copytree(models["run"], run)
    victim = sorted((run / "probes" / "a").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"names shard '{victim.name}', which is missing"):
        RegionsStage().run(make_ctx(models, run))
    assert not list((run / "regions").glob("*.mask.safetensors"))


def test_p_changes_only_the_masks(ray_local, models, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(models["run"], run)
    (run / "probes" / "stage.json").write_text(json.dumps({"fingerprint": "probe-fp"}))
    probe_files = {p: file_sha256(p) for p in sorted((run / "probes").rglob("*")) if p.is_file()}
    ctx = make_ctx(models, run, p=1.0)
    rec1, ran = RegionsStage().execute(ctx)
    assert ran
    assert not RegionsStage().execute(make_ctx(models, run, p=1.0, num_actors=1))[1]
    g1, _ = GroupsStage().execute(ctx)
    k1 = MaskFile(mask_path(run, "a")).count()
    ctx5 = make_ctx(models, run, p=5.0)
    rec5, ran = RegionsStage().execute(ctx5)
    assert ran and rec5["fingerprint"] != rec1["fingerprint"]
    _, k5, _, _ = check_against_reference(models, run, "a", 5.0)
    assert MaskFile(mask_path(run, "a")).count() == k5 > k1
    # groups depend on the masks: their fingerprint follows
    g5, ran = GroupsStage().execute(ctx5)
    assert ran and g5["fingerprint"] != g1["fingerprint"]
    # the probes are untouched
    assert probe_files == {p: file_sha256(p) for p in probe_files}


@pytest.mark.parametrize("score", ["fisher", "delta_fisher"])
def test_fisher_scores_match_in_memory_reference(ray_local, models, tmp_path, score):
    from cpi_ray.io.safetensors_io import save_sharded
    from cpi_ray.run.layout import RunLayout

    run = tmp_path / "run"
    shutil.copytree(models["run"], run)
    g = torch.Generator().manual_seed(11)
    fishers = {}
    for t in TASKS:
        # Squared-gradient-like values with exact ties (rounded) to exercise the tie-break.
        f = {
            n: (torch.rand(v.shape, generator=g) ** 4 * 100).round() / 100
            for n, v in models["state"].items()
            if v.is_floating_point()
        }
        d = RunLayout(run).fisher(t)
        d.mkdir(parents=True)
        save_sharded(f, d, 1_000_000)
        fishers[t] = f
    ctx = make_ctx(models, run, score=score, p=2.0)
    RegionsStage().run(ctx)
    for t in TASKS:
        ref, k, _ = reference(models, t, 2.0, fisher=fishers[t], score=score)
        m = MaskFile(mask_path(run, t))
        assert m.count() == k and m.metadata["score"] == score
        for n, want in ref.items():
            assert torch.equal(m.flat(n), want), (t, n)
