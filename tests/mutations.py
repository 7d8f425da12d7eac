"""The mutation check (`make mutations`): break one line of shardtune on purpose and see a test fail.

Each mutation below is a file under src/shardtune, an exact snippet of it and its replacement. For each one the
script copies src/ into a temporary folder, replaces the snippet there (it must occur exactly once: a snippet
that is missing, say after a refactor, stops the script, so it can never quietly test nothing), and runs the few
tests that should catch it with PYTHONPATH=<copy>/src. A mutation is killed when those tests fail, and survives
when they pass. First the same tests run once on an unchanged copy: a test that already fails proves nothing.
Prints a table (mutation, file, tests, killed/survived, seconds); the exit code is 1 if any mutation survives.

Not a test module (pytest collects test_*.py only): run `python tests/mutations.py [NAME...]` or `make mutations`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAGS, RESUME, STORE = "tests/test_flags.py::", "tests/test_resume.py::", "tests/test_object_store.py::"
RESUME_EXACT = "tests/test_faults.py::test_two_kills_and_a_kill_inside_a_checkpoint_write_resume_bit_for_bit[0]"  # dropout on
WEIGHTING = FLAGS + "test_a_step_weights_tokens_alike_over_micro_batches_and_ranks"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # under src/shardtune
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation("drop 1/grad_accum (per-micro-batch mean)", "trainer.py",
             "s.backward(loss_sum / total[0])", "s.backward(loss_sum / size.weight.clamp(min=1))", (WEIGHTING,)),
    Mutation("average token counts over ranks", "trainer.py",
             "total = s.data_sum(torch.stack([z.weight for z in sizes]).sum().float().reshape(1)).clamp(min=1)",
             "total = (s.data_sum(torch.stack([z.weight for z in sizes]).sum().float().reshape(1)) / s.world).clamp(min=1)",
             (WEIGHTING,)),
    Mutation("skip the RNG restore on resume", "resume.py", "        rng.load(ckpt, s.rank)", "        pass", (RESUME_EXACT,)),
    Mutation("skip the optimizer restore", "distributed/dcp.py",
             'set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])',
             'set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]); optimizer.state.clear()',
             (RESUME_EXACT,)),
    Mutation("skip the data-position restore", "resume.py", "    trainer.task.load_state_dict(saved.data)", "    pass", (RESUME_EXACT,)),
    Mutation("no weight decay", "optim.py", '{"params": decay, "weight_decay": weight_decay}', '{"params": decay, "weight_decay": 0.0}',
             ("tests/test_units.py::test_no_weight_decay_on_biases_and_layernorm",)),
    Mutation("ignore --temperature (always greedy)", "generate.py",
             'sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}',
             'sampling = {"do_sample": False}', ("tests/test_generate.py::test_sampling_follows_the_temperature_and_the_seed",)),
    Mutation("ignore --temperature's value", "generate.py",
             '{"do_sample": True, "temperature": temperature}', '{"do_sample": True, "temperature": 1.0}',
             ("tests/test_generate.py::test_sampling_follows_the_temperature_and_the_seed",)),
    Mutation("ignore model.compile", "distributed/base.py",
             'dynamo_backend="inductor" if cfg.model.compile else None,', "dynamo_backend=None,",
             (FLAGS + "test_compile_makes_the_prepared_model_a_compiled_module",)),
    Mutation("ignore data.doc_positions", "data/stream.py",
             "PackOptions(cfg.seq_len, eos, pad, split_docs, cfg.doc_positions, cfg.emit_doc_ids)",
             "PackOptions(cfg.seq_len, eos, pad, split_docs, False, cfg.emit_doc_ids)",
             (FLAGS + "test_doc_positions_isolate_a_packed_document",)),
    Mutation("KV cache in the training forward", "tasks/causal_lm.py",
             "            out = model(**_inputs(batch), use_cache=False)", "            out = model(**_inputs(batch))",
             (FLAGS + "test_doc_positions_isolate_a_packed_document",)),
    Mutation("skip the manifest check", "checkpoint.py", "    for name, size in expected.items():", "    for name, size in {}.items():",
             (RESUME + "test_torn_newest_checkpoint_falls_back_to_the_previous_one",)),
    Mutation("ignore model.gradient_checkpointing", "models.py", "        model.gradient_checkpointing_enable()", "        pass",
             (FLAGS + "test_gradient_checkpointing_recomputes_each_layer_in_backward",)),
    Mutation("ignore train.mixed_precision", "distributed/base.py",
             "mixed_precision=self.mixed_precision, cpu=not cuda,", 'mixed_precision="no", cpu=not cuda,',
             (FLAGS + "test_mixed_precision_sets_the_dtype_linears_compute_in",)),
    Mutation("ignore model.attention", "models.py", "        return cfg.attention\n", '        return "sdpa"\n',
             (FLAGS + "test_attention_is_the_implementation_asked_for",)),
    Mutation("ignore model.dropout (causal LM)", "models.py",
             "for key, value in _dropout_overrides(mcfg, cfg.dropout).items():", "for key, value in {}.items():",
             (FLAGS + "test_dropout_of_a_causal_lm",)),
    Mutation("stream workers seeded from the global RNG", "data/stream.py",
             "collate_fn=_passthrough,\n                                    generator=torch.Generator().manual_seed(0))", "collate_fn=_passthrough)",
             ("tests/test_faults.py::test_the_kill_matrix_on_the_streamed_data_stage[0]",)),
    Mutation("DataLoader workers take the rank's start method", "data/workers.py",
             'kwargs.setdefault("multiprocessing_context", multiprocessing.get_context("fork"))', "pass",
             ("tests/test_classification_data.py::test_workers_are_forked_from_their_rank_whatever_start_method_the_rank_has",)),
    Mutation("every rank requeues (is_main read after the process group is gone)", "trainer.py",
             "requeued = requeue() if main else None", "requeued = requeue() if self.strategy.is_main else None",
             ("tests/test_signals.py::test_a_preempted_slurm_job_is_requeued_once_by_rank_0_after_its_wandb_run_is_closed",)),
    Mutation("autocast keeps its cast cache", "distributed/base.py",
             "kwargs_handlers=[process_group_kwargs(cfg), autocast_kwargs()]", "kwargs_handlers=[process_group_kwargs(cfg)]",
             (FLAGS + "test_mixed_precision_sets_the_dtype_linears_compute_in",)),
    Mutation("the peak measurement draws from the run's RNG", "hardware.py",
             "torch.randn(n, n, device=device, generator=rng)", "torch.randn(n, n, device=device)",
             ("tests/test_hardware.py::test_measuring_the_peak_leaves_the_seeded_random_stream_alone",)),
    Mutation("the longest batch stays where the shuffle put it", "data/grouping.py",
             "batches[0], batches[longest] = batches[longest], batches[0]", "pass",
             ("tests/test_grouping.py::test_the_longest_full_batch_comes_first_in_every_epoch",)),
    Mutation("a peak measured on a busy machine is never measured again", "hardware.py",
             "if key not in known or remeasure:", "if key not in known:",
             ("tests/test_hardware.py::test_a_peak_measured_on_a_busy_machine_is_measured_again_once_a_run_beats_it",)),
    Mutation("FSDP2 x TP scales the loss by the world, not the dp x sp ranks", "distributed/fsdp.py",
             "(loss * self.mesh.batch).backward()", "(loss * self.world).backward()",
             ("tests/test_mesh.py::test_every_step_matches_one_process[fsdp_tp]",)),
    Mutation("a tp group's ranks read different data slots", "tasks/causal_lm.py",
             "rank=s.dp_rank, world_size=s.dp_world", "rank=s.rank, world_size=s.world",
             ("tests/test_mesh.py::test_every_step_matches_one_process[tp]",)),
    Mutation("sequence chunks lose the target past their last token", "distributed/parallel.py",
             'targets = shift_labels(batch["labels"])', 'targets = torch.cat([shift_labels(c) for c in batch["labels"].chunk(world, 1)], 1)',
             ("tests/test_mesh.py::test_every_step_matches_one_process[sp]",)),
    Mutation("a checkpoint in the store counts without its seal", "run_store.py",
             "            if self._is_sealed(name):\n                return name",
             "            if True:\n                return name",
             (STORE + "test_a_rank_killed_mid_upload_leaves_no_seal_and_the_rerun_resumes_bit_for_bit",)),
    Mutation("a fetched checkpoint is loaded without its hashes checked", "run_store.py",
             'if sha256(path) != entry["sha256"]:', "if False:",
             (STORE + "test_a_file_replaced_after_sealing_is_refused_before_anything_is_unpickled",)),
    Mutation("a store error is not retried", "storage.py",
             "            if time.monotonic() + delay > deadline:", "            if True:",
             (STORE + "test_the_server_restarted_mid_stream_is_retried_and_the_losses_are_the_uninterrupted_runs",)),
    Mutation("GRPO scale_rewards batch scales each micro-batch by its own std", "tasks/grpo.py",
             'group_advantages(b["total"], self.g.num_generations, "batch", std)', 'group_advantages(b["total"], self.g.num_generations, "batch")',
             ("tests/test_grpo_task.py::test_two_ranks_match_one_process[cpu]",)),
    Mutation("FSDP2: the root's generate is not a forward (LoRA rollouts skip the root's lazy init)", "distributed/fsdp.py",
             'register_fsdp_forward_method(model, "generate")', "pass",
             ("tests/test_grpo_task.py::test_lora_under_sharded_parameters_matches_one_process[fsdp]",)),
    Mutation("train.eval_batches caps each process, not all ranks", "tasks/causal_lm.py",
             "cap = self.cfg.train.eval_batches  #", "cap = self.cfg.train.eval_batches and self.cfg.train.eval_batches * s.dp_world  #",
             ("tests/test_paths.py::test_eval_reads_exactly_the_validation_sources_and_eval_batches_caps_it",)),
]


def copy_src(dest: Path) -> Path:
    shutil.copytree(ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest / "src"


def apply(src: Path, m: Mutation) -> None:
    path = src / "shardtune" / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        sys.exit(f"mutation {m.name!r}: the snippet occurs {text.count(m.old)} times in src/shardtune/{m.file}, not once; "
                 f"update MUTATIONS in tests/mutations.py.\nsnippet: {m.old!r}")
    path.write_text(text.replace(m.old, m.new))


def _env(src: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1")
    where = subprocess.run([sys.executable, "-c", "import shardtune; print(shardtune.__file__)"], env=env, cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(src)):  # an editable install elsewhere would test the unmutated code
        sys.exit(f"shardtune imports from {where}, not from the copy {src}; the check would test nothing.")
    return env


def run_tests(src: Path, tests: tuple[str, ...]) -> tuple[int, float, str]:
    """(pytest's exit code, seconds, the end of its output)."""
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    proc = subprocess.run(cmd, env=_env(src), cwd=ROOT, capture_output=True, text=True, check=False)  # failing = killed
    return proc.returncode, time.monotonic() - t0, (proc.stdout + proc.stderr)[-1500:]


def baseline(chosen: list[Mutation]) -> None:
    tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    with tempfile.TemporaryDirectory(prefix="mutations-") as tmp:
        for m in chosen:  # every snippet is checked before anything runs
            apply(copy_src(Path(tmp) / "check"), m)
            shutil.rmtree(Path(tmp) / "check")
        code, secs, tail = run_tests(copy_src(Path(tmp)), tests)
    if code != 0:
        sys.exit(f"the chosen tests fail on the unchanged code (exit {code}, {secs:.0f} s): fix them first.\n{tail}")
    print(f"baseline: {len(tests)} test(s) pass on the unchanged code ({secs:.0f} s)", flush=True)


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    if names and len(chosen) != len(names):
        sys.exit(f"unknown mutation(s) {sorted(set(names) - {m.name for m in MUTATIONS})}; see MUTATIONS in tests/mutations.py")
    baseline(chosen)
    rows = []
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
            src = copy_src(Path(tmp))
            apply(src, m)
            code, secs, tail = run_tests(src, m.tests)
        verdict = "survived" if code == 0 else "killed" if code == 1 else f"killed (pytest exit {code})"
        rows.append((m.name, m.file, ", ".join(t.split("::")[-1] for t in m.tests), verdict, f"{secs:.0f}"))
        print(f"{m.name}: {verdict} ({secs:.0f} s)", flush=True)
        if code == 0:
            print(tail, flush=True)
    print_table(rows)
    return 1 if any(r[3] == "survived" for r in rows) else 0


def print_table(rows) -> None:
    head = ("mutation", "file", "tests run", "result", "seconds")
    print("\n| " + " | ".join(head) + " |\n|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(f"`{c}`" if i in (1, 2) else c for i, c in enumerate(row)) + " |")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
