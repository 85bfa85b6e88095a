"""Diagnostic: how fast does supervised flow matching on EXACT captions teach the shipped base the relations?"""
import sys, time, json, copy, torch
from dgpo.models import load_model
from dgpo.shapes.pretrain import PretrainConfig, build_pool, pool_latents, DenoiserTraining
from dgpo.shapes.captions import EXACT_CAPTIONS
from dgpo.shapes.evaluator import shapes_eval
from dgpo.rollout import SamplerSettings
torch.set_num_threads(2)
adapter = load_model("shapes", "shipped")
model = adapter.model if hasattr(adapter, "model") else adapter
print(type(adapter), type(model))
lr = float(sys.argv[1]) if len(sys.argv) > 1 else 5e-4
cfg = PretrainConfig(captions=EXACT_CAPTIONS, dit_lr=lr, warmup_steps=0, dit_steps=100000, seed=11)
pool = build_pool(8000, 11)
latents = pool_latents(model, pool.pixels)
training = DenoiserTraining(model, cfg)
settings = SamplerSettings(num_steps=10)
def ev(step):
    model.transformer.eval()
    with torch.no_grad():
        r = shapes_eval(adapter, settings, images_per_category=48, seed=0)
    model.transformer.train()
    print(step, f"overall {r.overall:.3f}", {k: round(v, 3) for k, v in r.categories.items()}, flush=True)
ev(0)
t0 = time.time()
for step in range(1, 601):
    training.train_step(pool, latents)
    if step in (100, 300, 600):
        print("time", time.time() - t0); ev(step)
