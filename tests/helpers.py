"""What several test files share: tiny recipes and runs, tiny diffusers pipelines, benchmark scripts as modules,
the source-import reader, and the test rewards that launched scripts name.

Not a test file (pytest collects only test_*.py), so test files import from here and never from one another;
scripts that the tests launch in subprocesses import it from tests/ on their sys.path. Importing it registers
the test rewards (section "test rewards")."""
from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, models
from torch.distributed.tensor import DTensor
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from dgpo.rewards import register_reward
from dgpo.train.config import load_config
from dgpo.train.loop import Trainer
from dgpo.train.sharding import local_bytes

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"

# ----- tiny recipes and runs ------------------------------------------------------------------------------------------


def tiny_overrides(model_dir, output_dir, **extra) -> list[str]:
    """The tiny recipe as `--set` overrides: 2 steps of 2 groups of 4 on the tiny model, ``extra`` replacing or adding settings."""
    values = {
        "model.path": str(model_dir),
        "model.lora_rank": 4,
        "data.group_size": 4,
        "data.groups_per_step": 2,
        "data.micro_batch": 4,
        "rollout.num_steps": 2,
        "rollout.ema_after": 1,
        "loss.grid_points": 2,
        "loss.kl_beta": 0.01,
        "run.max_steps": 2,
        "run.save_every": 1,
        "run.tensorboard": False,
        "run.output_dir": str(output_dir),
        "run.threads": 1,
        "eval.ema_decay": 0.5,
        # JPEG size varies between any two images, so advantages are never all zero on a random model.
        "reward.weights": {"jpeg_incompressibility": 1.0},
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


# Flow-GRPO's settings over the tiny recipe.
FLOW_GRPO = {"loss.algorithm": "flow_grpo", "rollout.sampler": "sde", "loss.ppo_clip_eps": 1e-4, "rollout.ema_after": -1}

# The baselines' settings over the tiny recipe (4 rollout steps where an algorithm trains on a window or a grid of them),
# and every algorithm by name.
NFT = {"loss.algorithm": "diffusionnft", "rollout.ema_after": 0, "rollout.guidance_scale": 1.0, "data.text_dropout": 0.0}
AWM = {"loss.algorithm": "awm", "rollout.ema_after": 0, "rollout.num_steps": 4, "loss.grid_points": 4, "loss.timesteps": 2,
       "loss.ema_kl_beta": 1.0, "rollout.guidance_scale": 1.0}
FAST = {**FLOW_GRPO, "rollout.num_steps": 4, "rollout.sde_window": 2, "rollout.sde_window_range": "[0, 4]", "loss.timesteps": 2}
ALGORITHMS = {"dgpo": {}, "flow-grpo": FLOW_GRPO, "diffusionnft": NFT, "awm": AWM, "flow-grpo-fast": FAST}


def trainable_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """A copy of the trainer's trainable parameters, by name."""
    return {n: p.detach().clone() for n, p in trainer.policy.trainable}


def tiny_recipe_file(tmp_path, model_dir, out, **extra) -> str:
    """The tiny test recipe as a YAML file (nested sections), as a user would write it."""
    nested: dict = {}
    for item in tiny_overrides(model_dir, out, **extra):
        key, value = item.split("=", 1)
        section, field = key.split(".")
        nested.setdefault(section, {})[field] = yaml.safe_load(value)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(nested))
    return str(path)


def tiny_dgpo_recipe(model_dir, folder):
    """The tiny DGPO recipe with the ShapesEval reward and no rollout EMA, written to ``folder``/dgpo.yaml."""
    recipe = folder / "dgpo.yaml"
    recipe.write_text(
        f"model: {{path: {model_dir}, lora_rank: 4}}\n"
        "data: {group_size: 4, groups_per_step: 2, micro_batch: 4}\n"
        "rollout: {num_steps: 2, ema_after: -1}\n"
        "reward: {weights: {shapes_partial: 1.0}}\n"
        "loss: {grid_points: 2}\n"
        "run: {tensorboard: false, threads: 1}\n"
    )
    return recipe


def train_recording_group_sums(overrides: list[str], resume_from: str | None = None) -> tuple[Trainer, list[dict[int, float]]]:
    """Train ``overrides`` in this process, resuming from a copy of the checkpoint folder ``resume_from`` where one is
    given: the trainer, and the cross-rank group sums of every step as this rank saw them."""
    trainer = Trainer(load_config(None, overrides), log=lambda *a: None)
    if resume_from and trainer.acc.is_main_process:
        shutil.copytree(resume_from, trainer.checkpoint_dir / Path(resume_from).name)
    trainer.acc.wait_for_everyone()
    sums = []
    original = trainer.collectives.group_sum

    def recording_group_sum(values, group_ids):
        totals = original(values, group_ids)
        sums.append({int(g): float(t) for g, t in zip(group_ids, totals)})
        return totals

    trainer.collectives.group_sum = recording_group_sum
    trainer.train(resume=resume_from is not None)
    return trainer, sums


TWO_PROCESS_SCRIPT = """
import json, sys, torch
import torch.distributed as dist
sys.path.insert(0, sys.argv[3])
from helpers import held_bytes, train_recording_group_sums, whole_state  # registers the test rewards too

jobs, out = json.loads(sys.argv[1]), sys.argv[2]
results = {}
for job in jobs:
    trainer, sums = train_recording_group_sums(job["overrides"], job.get("resume_from"))
    trainer.export_adapter(trainer.output / "adapter")
    result = results[job["name"]] = whole_state(trainer)
    for key, mine in (("sums", sums), ("bytes", held_bytes(trainer))):
        result[key] = [None] * dist.get_world_size()
        dist.all_gather_object(result[key], mine)
if dist.get_rank() == 0:
    torch.save(results, out + "/results.pt")
dist.destroy_process_group()  # a gloo group alive at exit can abort the process in teardown
"""


def train_on_two_processes(jobs: list[dict], out: Path) -> dict[str, dict]:
    """Train each job (``name``, ``overrides``, optionally ``resume_from`` a checkpoint folder), one after another, on two
    CPU processes of one torchrun launch (one launch, since starting the processes costs more than the tiny runs), each
    exporting its adapter into its output folder. By name: the whole trained state (``whole_state``, gathered from
    shards), and every rank's group sums and held bytes (``held_bytes``)."""
    out.mkdir(parents=True, exist_ok=True)
    script = out / "run.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(29502 + os.getpid() % 1000),
           str(script), json.dumps(jobs), str(out), str(Path(__file__).parent)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out / "results.pt")


# ----- `dgpo train` in a subprocess, with a test reward that can be slowed or fail ------------------------------------

TINY_RECIPE_STEPS = 4  # the steps of write_recipe's recipe

# A jpeg reward that can be slowed (so a signal lands mid-run) or made to fail on one rank.
RUNNER = """
import os, sys, time
from dgpo.rewards import get_reward, register_reward

@register_reward("test_jpeg")
def test_jpeg():
    inner = get_reward("jpeg_incompressibility")
    calls = {"n": 0}
    def score(images, prompts, metadata):
        calls["n"] += 1
        time.sleep(float(os.environ.get("TEST_REWARD_DELAY", "0")))
        # The test that sets TEST_FAIL_RANK runs two micro-batches (two calls) per step on each rank: fail in step 2.
        if os.environ.get("TEST_FAIL_RANK") == os.environ.get("RANK", "0") and calls["n"] == 3:
            raise OSError("scorer lost its weights")
        return inner(images, prompts, metadata)
    return score

from dgpo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_recipe(tmp_path: Path, model_dir: Path, reward: str = "test_jpeg") -> Path:
    """A tiny recipe; the default reward is registered by RUNNER, so in-process runs name a built-in one."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        f"model: {{path: {model_dir}, lora_rank: 4}}\n"
        "data: {group_size: 4, groups_per_step: 2, micro_batch: 4}\n"
        "rollout: {num_steps: 2, ema_after: 2}\n"
        f"reward: {{weights: {{{reward}: 1.0}}}}\n"
        "loss: {grid_points: 2, kl_beta: 0.01}\n"
        "eval: {ema_decay: 0.5, final_images_per_category: 1}\n"
        f"run: {{max_steps: {TINY_RECIPE_STEPS}, save_every: 1, keep_checkpoints: 2, tensorboard: false, threads: 1}}\n"
    )
    (tmp_path / "runner.py").write_text(RUNNER)
    return recipe


def start_training(tmp_path: Path, recipe: Path, out: Path, *extra: str, delay: float = 0.0, nproc: int = 1, fail_rank: str = "") -> subprocess.Popen:
    """`dgpo train` of ``recipe`` through write_recipe's runner in a subprocess (under torchrun when ``nproc`` > 1), its output piped;
    ``delay`` slows each test_jpeg call by that many seconds, ``fail_rank`` names the rank whose test_jpeg fails in step 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "TEST_REWARD_DELAY": str(delay), "TEST_FAIL_RANK": fail_rank}
    port = str(29600 + os.getpid() % 1000)
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", port]
    cmd = [*launcher, str(tmp_path / "runner.py"), "train", str(recipe), "--set", f"run.output_dir={out}", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# ----- tiny diffusers pipelines (random configs, character-level tokenizers, no downloads) ----------------------------

RESOLUTION = 32  # the image side the tiny pipelines are trained at
CHARACTERS = [chr(c) for c in range(33, 127)]


def character_clip_tokenizer(directory: Path) -> CLIPTokenizer:
    """CLIP's BPE tokenizer with no merges: every character is a token (the real class, a tiny vocabulary)."""
    tokens = ["<|startoftext|>", "<|endoftext|>", *CHARACTERS, *(c + "</w>" for c in CHARACTERS)]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)


def character_t5_tokenizer() -> T5TokenizerFast:
    """T5's fast tokenizer over a Unigram model whose pieces are single characters."""
    pieces = ["<pad>", "</s>", "<unk>", *CHARACTERS]
    return T5TokenizerFast(tokenizer_object=Tokenizer(models.Unigram([(p, 0.0) for p in pieces], unk_id=2)),
                           pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0, model_max_length=32)


def tiny_vae(latent_channels: int) -> AutoencoderKL:
    """A two-block autoencoder with SD3's shift and scaling factors."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(4, 8), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
                         use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def clip_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """A two-layer CLIP text encoder's config over ``tokenizer``'s vocabulary."""
    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                          num_hidden_layers=2, vocab_size=len(tokenizer), projection_dim=32)


def build_sd3(root: Path, with_t5: bool = False) -> StableDiffusion3Pipeline:
    """Without T5 (SD3 then feeds zeros in its place), or with a tiny one as in the released checkpoints."""
    tokenizer = character_clip_tokenizer(root / "clip-tokenizer")
    t5_tokenizer = character_t5_tokenizer() if with_t5 else None
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=64, d_kv=8, d_ff=37, num_layers=2, num_heads=4)) if with_t5 else None
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
                                          caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4),
        vae=tiny_vae(4),
        text_encoder=CLIPTextModelWithProjection(clip_config(tokenizer)), text_encoder_2=CLIPTextModelWithProjection(clip_config(tokenizer)),
        text_encoder_3=t5, tokenizer=tokenizer, tokenizer_2=tokenizer, tokenizer_3=t5_tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def build_flux(root: Path) -> FluxPipeline:
    """A tiny FLUX pipeline: one double and one single block, CLIP and T5 text encoders."""
    tokenizer, t5_tokenizer = character_clip_tokenizer(root / "clip-tokenizer"), character_t5_tokenizer()
    return FluxPipeline(
        transformer=FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                           joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True),
        vae=tiny_vae(1),
        text_encoder=CLIPTextModel(clip_config(tokenizer)),
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)),
        tokenizer=tokenizer, tokenizer_2=t5_tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(),
    )


def character_gemma_tokenizer() -> GemmaTokenizer:
    """Gemma's BPE tokenizer with no merges over single characters ("▁" is the space), adding <bos> as Gemma does."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "▁", *CHARACTERS]
    return GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, add_bos_token=True)


def build_sana(root: Path) -> SanaPipeline:
    """The components of diffusers' own SANA fast test, with a vocabulary that covers the prompts."""
    tokenizer = character_gemma_tokenizer()
    return SanaPipeline(
        transformer=SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
                                           num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8, sample_size=16),
        vae=AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
                          decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                          encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                          decoder_layers_per_block=(1, 1), downsample_block_type="conv", upsample_block_type="interpolate",
                          decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407),
        text_encoder=Gemma2Model(Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1,
                                              num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                              attn_implementation="eager")),
        tokenizer=tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


# Backend name -> the builder of its tiny pipeline.
BUILDERS = {"sd3": build_sd3, "flux": build_flux, "sana": build_sana}


def save_tiny(build, root: Path) -> Path:
    """The pipeline ``build`` makes (seeded) saved under ``root``/pipeline, and that folder."""
    torch.manual_seed(0)
    build(root).save_pretrained(root / "pipeline")
    return root / "pipeline"


# ----- benchmark and probe scripts ------------------------------------------------------------------------------------


def load_benchmark(name: str = "gpu_sd35m_step"):
    """A script of benchmarks/ as a module, ``name`` its path under benchmarks/ without ".py" (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(Path(name).name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----- sharded training: what the comparisons look at -----------------------------------------------------------------


def whole_state(trainer: Trainer) -> dict:
    """What the comparisons look at, as whole tensors (gathered from shards)."""
    def whole(t):
        return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()

    p = trainer.policy
    return {"params": {n: whole(t) for n, t in p.trainable},
            **{name: {n: whole(s) for n, s in zip(ema.names, ema.shadow)} for name, ema in (("rollout_ema", p.rollout_ema), ("eval_ema", p.eval_ema))},
            "history": [{k: h[k] for k in ("reward_mean", "grad_norm")} for h in trainer.counters.history]}


def held_bytes(trainer: Trainer) -> tuple[int, int]:
    """Bytes of transformer weights (the policy's and a full fine-tuning reference's) and of optimizer state this process holds."""
    p = trainer.policy
    transformers = [p.model.transformer] + ([p.reference_transformer] if p.reference_transformer is not None else [])
    param_bytes = local_bytes(t for module in transformers for t in module.parameters())
    optimizer_bytes = local_bytes(t for state in trainer.optimizer.state.values() for t in state.values() if t.dim() > 0)
    return param_bytes, optimizer_bytes


# ----- reading a source tree's imports (tests/test_import_graph.py, tests/test_plugins.py) ----------------------------


def module_names(src: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` under ``src``: dotted name -> file (a package's name maps to its ``__init__.py``)."""
    names = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def is_type_checking_guard(test: ast.expr) -> bool:
    """Whether an ``if`` tests ``TYPE_CHECKING`` (bare or as ``typing.TYPE_CHECKING``)."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(tree: ast.AST):
    """Every import statement of a parsed module, at any depth, except inside ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and is_type_checking_guard(node.test):
            for child in node.orelse:
                yield from imports_of(ast.Module(body=[child], type_ignores=[]))
        else:
            yield from imports_of(node)


def absolute_origin(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names: relative levels resolved against ``module``."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


# ----- test rewards, registered on import -----------------------------------------------------------------------------


@register_reward("test_brightness")
def brightness_reward():
    """The mean pixel of each image, for the multi-process runs of tests/test_train.py and tests/test_sharding.py and their
    one-process references: continuous in the pixels, so last-bit differences between batch layouts stay last-bit
    differences in the rewards (a JPEG's size can jump by a byte)."""
    return lambda images, prompts, metadata: images.mean(dim=(1, 2, 3)).tolist()


@register_reward("test_flat_category")
def flat_category_reward():
    """Equal rewards for every image of a 'flat' prompt (a saturated category), the brightness otherwise (tests/test_prompt_sampling.py)."""
    def reward(images, prompts, metadata):
        brightness = images.mean(dim=(1, 2, 3)).tolist()
        return [0.5 if m.get("category") == "flat" else b for m, b in zip(metadata, brightness)]

    return reward
