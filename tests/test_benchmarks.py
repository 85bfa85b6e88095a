"""The timing benchmarks of benchmarks/ on the tiny model: gpu_sd35m_step.py and gpu_fsdp2_step.py time the trainer's own
rollout and update (their code path runs here); dgpo_shapes_cpu.py resumes a seed only under the config its checkpoints
were trained with; screen_readout.py compares a set of screens with their baseline; copy_run.sh copies a run in to commit it."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from helpers import BENCHMARKS, load_benchmark

from dgpo.train.config import load_config, save_config


def test_gpu_step_benchmark_runs_the_trainer_on_the_tiny_model(tmp_path):
    benchmark = load_benchmark()
    summary = benchmark.main(["--tiny", "--repeats", "1", "--results", str(tmp_path / "result.json")])
    assert json.loads((tmp_path / "result.json").read_text()) == summary
    assert summary["group_size"] == 4 and summary["rollout_seconds_per_group"] > 0 and summary["update_seconds_per_group"] > 0
    assert "Trainer" in summary["code"]


def test_time_step_moves_the_weights(tmp_path):
    benchmark = load_benchmark()
    args = benchmark.argparse.Namespace(tiny=True, group_size=4, timesteps=1, lora_rank=4, repeats=0)
    trainer = benchmark.build_trainer(args, tmp_path)
    before = [p.detach().clone() for _, p in trainer.policy.trainable]
    rollout_seconds, update_seconds = benchmark.time_step(trainer, 0)
    assert rollout_seconds > 0 and update_seconds > 0
    assert any(not (a == p).all() for a, (_, p) in zip(before, trainer.policy.trainable))


def test_fsdp2_benchmark_runs_every_mode_on_the_tiny_model(tmp_path):
    import torch.distributed as dist

    module = load_benchmark("gpu_fsdp2_step")
    try:
        summary = module.main(["--tiny", "--repeats", "1", "--results", str(tmp_path / "result.json")])
    finally:
        # The sharded modes made this process a one-member process group; later tests expect none.
        if dist.is_initialized():
            dist.destroy_process_group()
    assert json.loads((tmp_path / "result.json").read_text()) == summary
    assert list(summary["modes"]) == ["lora", "fsdp2-full", "fsdp2-full-offload"]
    assert all(mode["step_seconds_per_group"] > 0 for mode in summary["modes"].values())


def test_a_seed_trained_under_another_recipe_is_refused_naming_what_changed(tmp_path):
    benchmark = load_benchmark("dgpo_shapes_cpu")
    trained = load_config(benchmark.RECIPE, ["run.seed=1"])
    save_config(trained, tmp_path / "config.yaml")
    benchmark.refuse_another_config(tmp_path, load_config(benchmark.RECIPE, ["run.seed=1"]))
    edited = load_config(benchmark.RECIPE, ["run.seed=1", "model.lora_rank=0", "optim.lr=1e-4"])
    with pytest.raises(SystemExit, match=r"another config \(model.lora_rank, optim.lr\); move it aside"):
        benchmark.refuse_another_config(tmp_path, edited)


def _screen_run(folder, final_rates, images_per_category, rewards, zero_variance):
    folder.mkdir(parents=True)
    categories = dict(zip(("counting", "position", "color_attr", "two_object"), final_rates))
    final = {"step": 4, "overall": sum(final_rates) / len(final_rates), "categories": categories, "images_per_category": images_per_category,
             "num_images": 4 * images_per_category, "artifact": 0.005, "diversity": 0.27}
    (folder / "evals.json").write_text(json.dumps([{**final, "step": 0, "overall": 0.5}, final]))
    metrics = [{"step": s, "forward_equivalents": 100.0 * s, "elapsed_seconds": 2.0 * s, "zero_variance_groups": zero_variance[s - 1],
                **{f"reward_by/{c}": rewards[s - 1] for c in categories}} for s in range(1, 5)]
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n")
    (folder / "results.json").write_text("{}")


def test_screen_readout_compares_each_screen_with_the_baseline(tmp_path):
    readout = load_benchmark("screen_readout")
    _screen_run(tmp_path / "runs" / "base" / "seed-0", [0.5, 0.5, 0.5, 0.5], 100, [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.2, 0.4])
    _screen_run(tmp_path / "runs" / "change" / "seed-0", [0.7, 0.7, 0.7, 0.7], 100, [0.5, 0.6, 0.7, 0.8], [0.0, 0.0, 0.1, 0.1])
    (tmp_path / "runs" / "unfinished" / "seed-0").mkdir(parents=True)
    readout.main([str(tmp_path), "--baseline", "base", "--last", "2"])
    saved = json.loads((tmp_path / "readout.json").read_text())
    assert list(saved["runs"]) == ["base", "change"]  # baseline first; a run without results.json is left out
    change = saved["runs"]["change"]
    assert change["training_reward_last"]["counting"] == pytest.approx(0.75) and change["zero_variance_groups_last"] == pytest.approx(0.1)
    assert change["forwards_per_step"] == 100 and change["seconds_per_step"] == 2
    assert change["final"]["se"] == pytest.approx((4 * 0.7 * 0.3 / 100) ** 0.5 / 4)
    se = (saved["runs"]["base"]["final"]["se"] ** 2 + change["final"]["se"] ** 2) ** 0.5
    assert f"+0.200 +- {se:.3f}" in (tmp_path / "readout.md").read_text()
    with pytest.raises(SystemExit, match="no finished run of 'missing'"):
        readout.main([str(tmp_path), "--baseline", "missing"])


def test_screen_readout_compares_a_replicate_with_its_own_baseline(tmp_path):
    readout = load_benchmark("screen_readout")
    _screen_run(tmp_path / "runs" / "base" / "seed-0", [0.5, 0.5, 0.5, 0.5], 100, [0.1] * 4, [0.5] * 4)
    _screen_run(tmp_path / "runs" / "base_s1" / "seed-0", [0.6, 0.6, 0.6, 0.6], 100, [0.1] * 4, [0.5] * 4)
    _screen_run(tmp_path / "runs" / "change_s1" / "seed-0", [0.7, 0.7, 0.7, 0.7], 100, [0.1] * 4, [0.5] * 4)
    readout.main([str(tmp_path), "--baseline", "base", "--pair", "change_s1=base_s1"])
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[3] for line in (tmp_path / "readout.md").read_text().splitlines()[2:5]}
    se = (4 * 0.6 * 0.4 / 100 + 4 * 0.7 * 0.3 / 100) ** 0.5 / 4  # of the difference, change_s1 against base_s1
    assert rows == {"base": "-", "base_s1": "-", "change_s1": f"+0.100 +- {se:.3f} (vs base_s1)"}
    assert json.loads((tmp_path / "readout.json").read_text())["pairs"] == {"change_s1": "base_s1"}
    with pytest.raises(SystemExit, match="no finished run of 'gone'"):
        readout.main([str(tmp_path), "--baseline", "base", "--pair", "change_s1=gone"])
    with pytest.raises(SystemExit, match="--pair takes SCREEN=BASELINE"):
        readout.main([str(tmp_path), "--baseline", "base", "--pair", "change_s1"])


def test_a_seed_keeps_its_adapters_metrics_and_evaluations_without_checkpoints(tmp_path):
    benchmark = load_benchmark("dgpo_shapes_cpu")
    run = tmp_path / "run"
    for folder in ("adapter", "adapter_ema", "checkpoints/step-00000025"):
        (run / folder).mkdir(parents=True)
        (run / folder / "weights.safetensors").write_text(folder)
    for name in ("metrics.jsonl", "evals.json", "config.yaml", "results.json"):
        (run / name).write_text(name)
    kept = tmp_path / "results" / "seed-0"
    kept.mkdir(parents=True)
    (kept / "stale.txt").write_text("from an earlier run of this seed")
    benchmark.keep_seed_files(run, kept)
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == [
        "adapter/weights.safetensors", "adapter_ema/weights.safetensors", "config.yaml", "evals.json", "metrics.jsonl", "results.json"]
    assert (kept / "adapter_ema" / "weights.safetensors").read_text() == "adapter_ema"


def test_training_readout_averages_each_window_per_category(tmp_path):
    readout = load_benchmark("training_readout")
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": step, "reward_mean": 0.1 * step, "zero_variance_groups": 0.5 if step > 2 else 0.0, "grad_norm": float(step),
             "reward_by/counting": 0.2 * step, "prompts/zero_variance/counting": float(step % 2)} for step in range(1, 6)]
    rows[3]["reward_by/position"] = 0.9  # a category drawn only at step 4
    rows[4]["grad_norm"] = float("nan")  # a step whose norm was not finite counts as missing
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    readout.main([str(run), "--window", "2", "--output", str(tmp_path / "readout.json")])
    saved = json.loads((tmp_path / "readout.json").read_text())
    windows = saved["runs"][str(run)]
    assert [w["steps"] for w in windows] == [[1, 2], [3, 4], [5, 5]]
    assert windows[0]["reward"] == pytest.approx(0.15) and windows[1]["no_preference_groups"] == pytest.approx(0.5)
    assert windows[1]["categories"]["counting"] == {"reward": pytest.approx(0.7), "no_preference_groups": pytest.approx(0.5)}
    assert windows[0]["categories"]["position"]["reward"] is None and windows[1]["categories"]["position"]["reward"] == 0.9
    assert windows[2]["grad_norm"] is None and "| 3-4 | 0.350 / 0.50 |" in (tmp_path / "readout.md").read_text()
    with pytest.raises(SystemExit, match="has no metrics.jsonl"):
        readout.main([str(tmp_path / "missing")])


@pytest.mark.parametrize("keep_checkpoint, checkpoints", [("1", ["step-00000050"]), ("0", [])])
def test_copy_run_leaves_out_tensorboard_and_all_checkpoints_but_the_newest_when_asked(tmp_path, keep_checkpoint, checkpoints):
    run = tmp_path / "run"
    for folder in ("adapter", "tensorboard", "checkpoints/step-00000025", "checkpoints/step-00000050"):
        (run / folder).mkdir(parents=True)
        (run / folder / "file").write_text(folder)
    (run / "config.yaml").write_text("run: {}\n")
    dest = tmp_path / "results" / "seed-0"
    dest.mkdir(parents=True)
    (dest / "stale.txt").write_text("from an earlier copy")
    done = subprocess.run(["bash", str(BENCHMARKS / "copy_run.sh"), str(run), str(dest)], env={**os.environ, "KEEP_CHECKPOINT": keep_checkpoint},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in dest.iterdir()) == sorted(["adapter", "config.yaml", *([".gitignore", "checkpoints"] if checkpoints else [])])
    if checkpoints:
        assert sorted(p.name for p in (dest / "checkpoints").iterdir()) == checkpoints
    assert (run / "tensorboard" / "file").is_file() and (run / "checkpoints" / "step-00000025" / "file").is_file()


@pytest.mark.parametrize("keep_checkpoint", ["1", "0"])
def test_copy_run_lets_git_commit_a_kept_checkpoint_and_a_finished_copy_drops_the_exception(tmp_path, keep_checkpoint):
    """The repository ignores results/**/checkpoints/; the checkpoint of a run stopped part-way must still reach git."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text((BENCHMARKS.parent / ".gitignore").read_text())
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000025").mkdir(parents=True)
    (run / "checkpoints" / "step-00000025" / "state.pt").write_text("state")
    (run / "config.yaml").write_text("run: {output_dir: /home/someone/comparison/runs/awm/seed-1}\n")
    (run / ".gitignore").write_text("!checkpoints/\n")  # carried from an earlier copy of the run when it was stopped
    dest = repo / "results" / "compare" / "runs" / "awm" / "seed-1"
    done = subprocess.run(["bash", str(BENCHMARKS / "copy_run.sh"), str(run), str(dest)], env={**os.environ, "KEEP_CHECKPOINT": keep_checkpoint},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    listed = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "-uall", "results"], capture_output=True, text=True, check=True).stdout
    tracked = sorted(line[3:] for line in listed.splitlines())
    prefix = "results/compare/runs/awm/seed-1/"
    if keep_checkpoint == "1":
        assert tracked == [prefix + ".gitignore", prefix + "checkpoints/step-00000025/state.pt", prefix + "config.yaml"]
    else:
        assert tracked == [prefix + "config.yaml"]
    # The committed record names where it lies in the repository, not the folder outside it that it trained in.
    assert (dest / "config.yaml").read_text() == "run: {output_dir: results/compare/runs/awm/seed-1}\n"


def test_copy_run_rewrites_the_recorded_output_dir_and_only_that_path(tmp_path):
    run = tmp_path / "home" / "runs" / "seed-1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"run:\n  output_dir: {run}\n  seed: 1\n")
    (run / "results.json").write_text(json.dumps({"output_dir": str(run), "sibling": f"{run}0", "config": {"run": {"output_dir": str(run)}}}))
    (run / "report.md").write_text(f"# dgpo run report: {run}\n")
    (run / "checkpoints" / "step-00000025").mkdir(parents=True)
    (run / "checkpoints" / "step-00000025" / "state.json").write_text(json.dumps({"config": {"run": {"output_dir": str(run)}}}))
    dest = tmp_path / "elsewhere" / "seed-1"
    done = subprocess.run(["bash", str(BENCHMARKS / "copy_run.sh"), str(run), str(dest)], env={**os.environ, "KEEP_CHECKPOINT": "1"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load((dest / "config.yaml").read_text())["run"] == {"output_dir": str(dest.resolve()), "seed": 1}
    assert json.loads((dest / "results.json").read_text()) == {"output_dir": str(dest.resolve()), "sibling": f"{run}0",
                                                              "config": {"run": {"output_dir": str(dest.resolve())}}}
    assert (dest / "report.md").read_text() == f"# dgpo run report: {dest.resolve()}\n"
    state = json.loads((dest / "checkpoints" / "step-00000025" / "state.json").read_text())
    assert state["config"]["run"]["output_dir"] == str(dest.resolve())
    assert (run / "config.yaml").read_text().startswith(f"run:\n  output_dir: {run}\n")


def test_copy_run_refuses_a_folder_that_is_not_a_run(tmp_path):
    done = subprocess.run(["bash", str(BENCHMARKS / "copy_run.sh"), str(tmp_path), str(tmp_path / "dest")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip() == f"copy_run.sh: {tmp_path} is not a run directory (no config.yaml)"
    assert not (tmp_path / "dest").exists()
