"""The device mesh on 4 CPU ranks (gloo, FSDP2 + DTensor): HSDP, FSDP2 x TP, TP and Ulysses sequence parallelism each
against the one-process run, over whole runs; checkpoints resharded across meshes.

Every run: a tiny Llama from scratch (fp32, dropout 0) on real text, packed 32-token rows (token counts per row vary:
documents end with EOS, labels of the held-out tail are ignored), weight decay 0.5, clipping at 1.0 (active: grad
norms start above it), 22 steps with a checkpoint at 11. The stream's rows depend on its number of slots S = data
ranks x workers only, so every run here has S = 4 and the same global batch of 8 rows: the one-process reference
reads with 4 workers, HSDP 2 x 2 with 1 worker per data rank, FSDP2 x TP (2 x 2) and sp with 2.

Tolerance 1e-4 relative on every step's loss and grad norm: TP sums each row-parallel matmul's halves in another
order, Ulysses computes attention per head group; measured differences are printed by the assertion on failure.
"""

from __future__ import annotations

import json

import pytest

import forklaunch
from conftest import lm_overrides

STEPS, SAVE = 22, 11
TOL = 1e-4
MESHES = {
    "hsdp": (4, {"dist.mesh.dp_replicate": 2, "dist.mesh.dp_shard": 2, "train.batch_size": 2}),
    "fsdp_tp": (4, {"dist.mesh.dp_shard": 2, "dist.mesh.tp": 2, "train.batch_size": 4, "data.num_workers": 2}),
    "tp": (2, {"dist.mesh.tp": 2, "train.batch_size": 8, "data.num_workers": 4}),
    "sp": (4, {"dist.mesh.dp_shard": 2, "dist.mesh.sp": 2, "train.batch_size": 4, "data.num_workers": 2}),
    "shard4": (4, {"train.batch_size": 2}),
}
MESH_NAMES = {"hsdp": "dp_replicate 2 x dp_shard 2", "fsdp_tp": "dp_shard 2 x tp 2", "tp": "tp 2", "sp": "dp_shard 2 x sp 2",
              "shard4": "dp_shard 4"}
# the transitions of issue #22 (and tp -> sp): each run's step-11 checkpoint resumed under the next layout
TRANSITIONS = [("hsdp", "shard4"), ("shard4", "fsdp_tp"), ("fsdp_tp", "one"), ("tp", "sp")]


@pytest.fixture(scope="module")
def lm_yaml(tmp_path_factory):
    f = tmp_path_factory.mktemp("mesh-config") / "lm.yaml"
    f.write_text("task: causal_lm\n")
    return f


def _argv(yaml, tok, corpus, out, **extra) -> list[str]:
    over = {"train.max_steps": STEPS, "train.batch_size": 8, "optim.weight_decay": 0.5, "optim.max_grad_norm": 1.0,
            "train.save_every": SAVE, "train.async_save": "false", "model.dropout": 0, "train.mixed_precision": "no",
            "data.holdout": 40, **extra}  # the whole held-out set: a train.eval_batches cap reads other documents on other meshes
    return ["train", str(yaml), *lm_overrides(tok, corpus, out, **over)]


def _run(argv, logs, world):
    logs.mkdir(parents=True, exist_ok=True)
    codes = forklaunch.launch(argv, logs, world=world, timeout=600)
    assert codes == [0] * world, (codes, (logs / "rank0.log").read_text()[-4000:])


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _curve(run) -> dict[int, tuple[float, float]]:
    return {r["step"]: (r["train/loss"], r["train/grad_norm"]) for r in _rows(run) if "train/loss" in r}


def _metrics(run) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _worst(got, want, steps) -> float:
    assert set(steps) <= set(got), sorted(set(steps) - set(got))
    return max(abs(a - b) / abs(b) for s in steps for a, b in zip(got[s], want[s]))


@pytest.fixture(scope="module")
def reference(lm_yaml, tiny_lm_tokenizer, lm_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh-ref")
    _run(_argv(lm_yaml, tiny_lm_tokenizer, lm_corpus, out / "run", **{"data.num_workers": 4, "dist.strategy": "fsdp"}), out / "logs", 1)
    return out / "run"


@pytest.fixture(scope="module")
def mesh_run(lm_yaml, tiny_lm_tokenizer, lm_corpus, tmp_path_factory):
    """name -> the run folder of that mesh's whole run (launched once, on first use)."""
    done: dict = {}

    def get(name: str):
        if name not in done:
            world, extra = MESHES[name]
            out = tmp_path_factory.mktemp(name)
            _run(_argv(lm_yaml, tiny_lm_tokenizer, lm_corpus, out / "run", **{"dist.strategy": "fsdp", **extra}), out / "logs", world)
            done[name] = out / "run"
        return done[name]

    return get


@pytest.mark.parametrize("name", list(MESHES))
def test_every_step_matches_one_process(reference, mesh_run, name):
    worst = _worst(_curve(mesh_run(name)), _curve(reference), range(1, STEPS + 1))
    assert worst < TOL, (name, worst)
    got, want = _metrics(mesh_run(name)), _metrics(reference)  # eval over every data slot, tp duplicates counted once
    assert got["best/eval/loss"] == pytest.approx(want["best/eval/loss"], rel=TOL)
    assert (got["train/samples"], got["train/tokens"]) == (want["train/samples"], want["train/tokens"])  # counted once
    assert got["dist/mesh"] == MESH_NAMES[name] and got["dist/num_processes"] == MESHES[name][0]


@pytest.mark.parametrize("name", list(MESHES))
def test_per_rank_bytes_are_what_the_planner_predicts_per_axis(mesh_run, name):
    """Live per-rank parameter, gradient and Adam bytes against plan_memory.mesh_state_bytes: FSDP2 shards over
    dp_shard x sp, tp splits the blocks' Linears once more, replicas hold the same shard."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from shardtune.mesh import Mesh
    from shardtune.plan_memory import mesh_state_bytes, tensor_parallel_params

    run = mesh_run(name)
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    shape = SimpleNamespace(num_params=sum(p.numel() for p in model.parameters()), tp_params=tensor_parallel_params(model))
    assert 0 < shape.tp_params < shape.num_params
    axes = {k.removeprefix("dist.mesh."): v for k, v in MESHES[name][1].items() if k.startswith("dist.mesh.")}
    world = MESHES[name][0]
    mesh = Mesh(**{"dp_shard": world // (axes.get("dp_replicate", 1) * axes.get("tp", 1) * axes.get("sp", 1)), **axes})
    want, m = mesh_state_bytes(shape, mesh), _metrics(run)
    for key, plan_key in [("param_bytes", "params"), ("grad_bytes", "grads"), ("optim_state_bytes", "optim")]:
        for rank in range(world):
            assert m[f"dist/{key}"][rank] == pytest.approx(want[plan_key], rel=0.01), (name, key, rank)


@pytest.mark.parametrize("name", ["hsdp", "fsdp_tp", "sp"])
def test_export_of_a_mesh_checkpoint_gives_the_live_models_logits(mesh_run, name, tmp_path):
    """`shardtune export` of the last checkpoint (DCP shards of 2-D DTensors) == RUN/model, which the end of the run
    wrote from the live sharded model."""
    import torch
    from transformers import AutoModelForCausalLM

    from shardtune.export import export_checkpoint

    run = mesh_run(name)
    export_checkpoint(run / "checkpoints" / f"step-{STEPS:08d}", tmp_path / "hf")
    live = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, exported.config.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=x).logits, live(input_ids=x).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("source,target", TRANSITIONS)
def test_a_checkpoint_resumes_under_another_mesh(reference, mesh_run, lm_yaml, tiny_lm_tokenizer, lm_corpus, tmp_path, source, target):
    """Step 11 of a run under one mesh, resumed under another: DCP reshards model and Adam state; steps 12-22 continue
    the uninterrupted run."""
    ckpt = mesh_run(source) / "checkpoints" / f"step-{SAVE:08d}"
    world, extra = MESHES[target] if target != "one" else (1, {"data.num_workers": 4})
    run = tmp_path / "run"
    _run(_argv(lm_yaml, tiny_lm_tokenizer, lm_corpus, run, **{"dist.strategy": "fsdp", **extra, "train.resume": ckpt}), tmp_path / "logs", world)
    curve = _curve(run)
    assert min(curve) == SAVE + 1  # continued, not restarted
    worst = _worst(curve, _curve(reference), range(SAVE + 1, STEPS + 1))
    assert worst < TOL, (source, target, worst)
    restored = next(r["resume/optim_state_norm"] for r in _rows(run) if "resume/optim_state_norm" in r)
    assert restored > 0  # Adam's moments came back
    said = (tmp_path / "logs" / "rank0.log").read_text()
    assert "was saved by" in said and "(mesh " in said  # another layout, said at resume (even at the same world size)
