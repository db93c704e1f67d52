"""Element-exact freezing under ZeRO-3 on two Ray Train workers, and the pieces around it."""

from __future__ import annotations

import math
import random

import pytest
import torch

from cpi_ray.config.schema import ConsolidateConfig, PipelineConfig
from cpi_ray.io.masks import MaskFile, pack_mask, write_mask_file
from cpi_ray.io.safetensors_io import CheckpointReader
from cpi_ray.run.progress import METRICS_FILE, read_metrics
from cpi_ray.training.consolidate import fit_group, frozen_tasks, union_masks
from cpi_ray.training.sft import make_scheduler
from cpi_ray.training.zero3 import build_ds_config, deep_merge


def test_deep_merge_nested_and_copies():
    base = {"a": 1, "z": {"stage": 3, "x": {"y": 1}}, "l": [1]}
    over = {"z": {"x": {"w": 2}, "offload_optimizer": {"device": "cpu"}}, "l": [2]}
    out = deep_merge(base, over)
    assert out == {
        "a": 1,
        "z": {"stage": 3, "x": {"y": 1, "w": 2}, "offload_optimizer": {"device": "cpu"}},
        "l": [2],
    }
    assert base["z"]["x"] == {"y": 1}


def test_ds_config_from_ours_with_passthrough():
    tc = ConsolidateConfig(
        batch_size=8,
        grad_accum=2,
        lr=1e-3,
        weight_decay=0.1,
        max_grad_norm=0.5,
        precision="bf16",
        deepspeed={"zero_optimization": {"reduce_bucket_size": 1000}},
    )
    ds = build_ds_config(tc, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["optimizer"]["params"]["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="train_batch_size"):
        build_ds_config(tc.model_copy(update={"deepspeed": {"train_batch_size": 3}}), 2)
    with pytest.raises(ValueError, match="fp16"):
        build_ds_config(tc.model_copy(update={"deepspeed": {"fp16": {"enabled": True}}}), 2)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_one_lr_schedule(schedule):
    """Every trainer's schedule: warm-up from 0 over int(ratio * steps) steps, then the decay."""
    steps, ratio, peak = 10, 0.25, 1e-3
    tc = ConsolidateConfig(steps=steps, warmup_ratio=ratio, lr=peak, schedule=schedule)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=peak)
    sched = make_scheduler(opt, tc)
    warm = int(ratio * steps)

    def expected(s: int) -> float:
        if s < warm:
            return peak * s / warm
        frac = (s - warm) / (steps - warm)
        return (
            peak
            * {"cosine": 0.5 * (1 + math.cos(math.pi * frac)), "linear": 1 - frac, "constant": 1.0}[schedule]
        )

    got = []
    for _ in range(steps):
        got.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert got == pytest.approx([expected(s) for s in range(steps)])


def test_frozen_task_modes():
    g = [["a", "b"], ["c"], ["d"]]
    assert frozen_tasks(g, 0, "prior") == []
    assert frozen_tasks(g, 2, "prior") == ["a", "b", "c"]
    assert frozen_tasks(g, 1, "others") == ["a", "b", "d"]
    assert frozen_tasks(g, 0, "all") == ["a", "b", "c", "d"]
    assert frozen_tasks(g, 2, "none") == []


def test_union_masks(tmp_path):
    numels = {"x": 13, "y": 4}
    m1 = {"x": torch.zeros(13, dtype=torch.bool), "y": torch.tensor([1, 0, 0, 0], dtype=torch.bool)}
    m2 = {"x": torch.zeros(13, dtype=torch.bool), "y": torch.tensor([0, 0, 1, 0], dtype=torch.bool)}
    m1["x"][[0, 12]] = True
    m2["x"][[12, 5]] = True
    for i, m in enumerate((m1, m2)):
        write_mask_file(tmp_path / f"{i}.mask", {k: pack_mask(v) for k, v in m.items()}, numels)
    n = union_masks([tmp_path / "0.mask", tmp_path / "1.mask"], tmp_path / "0.mask", tmp_path / "u.mask")
    u = MaskFile(tmp_path / "u.mask")
    assert n == 5
    assert torch.equal(u.flat("x"), m1["x"] | m2["x"]) and torch.equal(u.flat("y"), m1["y"] | m2["y"])
    assert union_masks([], tmp_path / "0.mask", tmp_path / "e.mask") == 0


# ---------------------------------------------------------------------------- Ray Train + ZeRO-3


def random_mask_file(model_dir, path, density: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    packed, numels = {}, {}
    with CheckpointReader(model_dir) as r:
        for name in r.names():
            n = r.info(name).numel
            packed[name] = pack_mask(torch.rand(n, generator=g) < density)
            numels[name] = n
    write_mask_file(path, packed, numels)


def synthetic_examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randint(7, 90) for _ in range(rng.randint(8, 30))]
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


def assert_frozen_exact(start_dir, out_dir, mask_path) -> tuple[int, int, int]:
    """Bitwise check of the frozen elements; returns (frozen, changed non-frozen, non-frozen)."""
    mask = MaskFile(mask_path)
    frozen = changed = free = 0
    with CheckpointReader(start_dir) as a, CheckpointReader(out_dir) as b:
        assert sorted(a.names()) == sorted(b.names())
        for name in a.names():
            x, y = a.read_flat(name), b.read_flat(name)
            assert x.dtype == y.dtype
            f = mask.flat(name)
            xb = x.view(torch.uint8).view(-1, x.element_size())
            yb = y.view(torch.uint8).view(-1, y.element_size())
            moved = (xb[f] != yb[f]).any(dim=1).sum().item()
            assert moved == 0, f"{name}: {moved} frozen elements changed"
            frozen += int(f.sum())
            changed += int((x[~f] != y[~f]).sum())
            free += int((~f).sum())
    mask.close()
    return frozen, changed, free


def tiny_cfg(**consolidate) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "model": {"source": "tiny", "max_shard_size": "100kB"},
            "tasks": [{"name": "t", "hub_id": "none"}],
            "data": {"max_seq_len": 64},
            "consolidate": consolidate,
        }
    )


@pytest.mark.slow
def test_zero3_frozen_bitwise_with_decay_accum_clip_and_worker_kill(ray_session, tiny_model_dir, tmp_path):
    """Two workers, ZeRO-3 on CPU, AdamW weight decay + accumulation + clipping: frozen elements
    stay bitwise equal, the others move, the export loads and generates; a worker killed mid-stage
    (after a checkpoint) ends in a completed stage resumed from that checkpoint."""
    mask = tmp_path / "frozen.mask.safetensors"
    random_mask_file(tiny_model_dir, mask, density=0.2)
    cfg = tiny_cfg(
        steps=4,
        batch_size=4,
        grad_accum=2,
        lr=1e-2,
        weight_decay=0.1,
        max_grad_norm=0.05,
        num_workers=2,
        checkpoint_every=2,
        max_failures=1,
    )
    marker = tmp_path / "killed"
    out = tmp_path / "out"
    rec = fit_group(
        cfg,
        stage=1,
        tasks=["t"],
        frozen=["t"],
        start_dir=tiny_model_dir,
        out_dir=out,
        mask_path=mask,
        examples=synthetic_examples(48),
        pad_id=0,
        storage=tmp_path / "_ray",
        fingerprint="fp",
        job="test stage",
        metrics_path=tmp_path / "live.metrics.jsonl",
        fault={"step": 3, "rank": 1, "marker": str(marker)},
    )
    assert marker.exists(), "the fault was not injected"
    assert rec["resumed_at_step"] == 2, "the restarted workers did not resume from the checkpoint"
    assert rec["steps"] == 4 and rec["world_size"] == 2 and rec["frozen_elements"] > 0
    frozen, changed, free = assert_frozen_exact(tiny_model_dir, out, out / "frozen.mask.safetensors")
    assert frozen == rec["frozen_elements"]
    assert changed > 0.95 * free
    # The resumed job rewrote the steps after its checkpoint: each step once, in order, at the
    # rate of the one schedule (4 steps, no warm-up at ratio 0.1, cosine from lr 1e-2).
    rows = read_metrics(out / METRICS_FILE)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lr"] for r in rows] == pytest.approx(
        [1e-2 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)]
    )
    assert all(r["tokens"] > 0 and math.isfinite(r["loss"]) for r in rows)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("abc", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4


def test_check_frozen_counts_bit_changes(tmp_path):
    from cpi_ray.io.safetensors_io import save_sharded
    from cpi_ray.training.consolidate import check_frozen

    a = {"w": torch.arange(10, dtype=torch.float32), "b": torch.zeros(3, dtype=torch.bfloat16)}
    b = {"w": a["w"].clone(), "b": a["b"].clone()}
    b["w"][[1, 7]] += 1  # 1 frozen, 7 free
    b["b"][0] = -0.0  # equal as a number, not as bits
    for d, st in (("a", a), ("b", b)):
        (tmp_path / d).mkdir()
        save_sharded(st, tmp_path / d, 16)
    mw = torch.zeros(10, dtype=torch.bool)
    mw[[0, 1]] = True
    write_mask_file(
        tmp_path / "m",
        {"w": pack_mask(mw), "b": pack_mask(torch.ones(3, dtype=torch.bool))},
        {"w": 10, "b": 3},
    )
    chk = check_frozen(tmp_path / "a", tmp_path / "b", tmp_path / "m", chunk=4)
    assert chk["frozen"] == 5 and chk["frozen_moved"] == 2 and sorted(chk["broken"]) == ["b", "w"]
    assert chk["free"] == 8 and chk["free_changed"] == 1


def test_freezing_needs_zero3(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="zero_stage 2 with freeze prior"):
        tiny_cfg(zero_stage=2)
    cfg = tiny_cfg(zero_stage=2, freeze="none")  # nothing frozen: any ZeRO stage trains
    # A baseline names its frozen tasks itself: refused before any trainer starts.
    with pytest.raises(ValueError, match="ZeRO-3 partitions only"):
        fit_group(
            cfg,
            stage=1,
            tasks=["t"],
            frozen=["t"],
            start_dir=tmp_path,
            out_dir=tmp_path / "o",
            mask_path=tmp_path / "m",
            examples=[],
            pad_id=0,
            storage=tmp_path,
            fingerprint="f",
            job="j",
            metrics_path=tmp_path / "m.jsonl",
        )


@pytest.mark.slow
def test_gradient_checkpointing_trains_the_same_weights(ray_session, tiny_model_dir, tmp_path):
    """Recomputing activations is a memory option, not a change of the math: a ZeRO-3 stage with
    it exports the same bits as without (fp32, CPU), frozen elements held either way."""
    mask = tmp_path / "frozen.mask.safetensors"
    random_mask_file(tiny_model_dir, mask, density=0.2)
    outs = {}
    for on in (False, True):
        cfg = tiny_cfg(steps=3, batch_size=4, grad_accum=2, lr=1e-2, gradient_checkpointing=on)
        outs[on] = tmp_path / f"out-{on}"
        fit_group(
            cfg,
            stage=1,
            tasks=["t"],
            frozen=["t"],
            start_dir=tiny_model_dir,
            out_dir=outs[on],
            mask_path=mask,
            examples=synthetic_examples(24),
            pad_id=0,
            storage=tmp_path / "_ray",
            fingerprint=f"gc-{on}",
            job="test stage",
            metrics_path=tmp_path / f"gc-{on}.metrics.jsonl",
        )
    with CheckpointReader(outs[False]) as a, CheckpointReader(outs[True]) as b:
        for name in a.names():
            assert torch.equal(a.read(name), b.read(name)), name
    assert_frozen_exact(tiny_model_dir, outs[True], mask)


def test_gradient_checkpointing_is_on_and_changes_no_gradient():
    from cpi_ray.config.schema import ProbeConfig
    from cpi_ray.models.tiny import build_tiny_model
    from cpi_ray.training.sft import apply_memory_options

    model, _ = build_tiny_model()
    model.train()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    apply_memory_options(model, ProbeConfig(gradient_checkpointing=True))
    # transformers 5 renamed the flag; 4.x has only the old name
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert all(torch.equal(a, b) for a, b in zip(plain, grads()))


def test_execution_fields_stay_out_of_fingerprints():
    from cpi_ray.config.schema import ProbeConfig

    on = ProbeConfig(gradient_checkpointing=True, cpus_per_worker=4, zero_stage=0, checkpoint_every=5)
    off = ProbeConfig()
    assert on.recipe_dump() == off.recipe_dump()
    assert ProbeConfig(lr=1e-3).recipe_dump() != off.recipe_dump()
