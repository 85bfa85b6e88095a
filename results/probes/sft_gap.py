import sys, torch, numpy as np, time
from dgpo.models import load_model
from dgpo.shapes.pretrain import build_pool, pool_latents, Pool, PretrainConfig, DenoiserTraining
from dgpo.shapes.captions import EXACT_CAPTIONS, caption_scene, OPPOSITE_RELATION
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
path, lr = sys.argv[1], float(sys.argv[2])
m = load_model("shapes", path)
test = build_pool(6000, 5)
idx = [i for i, s in enumerate(test.specs) if s.category == "position"][:200]
tlat = pool_latents(m, test.pixels[idx])
true, swap = [], []
for k, i in enumerate(idx):
    c = caption_scene(test.scenes[i], EXACT_CAPTIONS, np.random.default_rng(k))
    rel = next(r for r in OPPOSITE_RELATION if f" {r} " in c)
    true.append(c); swap.append(c.replace(f" {rel} ", f" {OPPOSITE_RELATION[rel]} "))
def gap():
    g = torch.Generator().manual_seed(0)
    res = []
    with torch.no_grad():
        et, es = m.encode_prompts(true), m.encode_prompts(swap)
        for t in (0.7, 0.85):
            noise = torch.randn(tlat.shape, generator=g)
            xt = (1 - t) * tlat + t * noise
            tt = torch.full((len(idx),), t)
            lt = ((m.velocity(xt, tt, et) - (noise - tlat)) ** 2).mean(dim=(1, 2, 3))
            ls = ((m.velocity(xt, tt, es) - (noise - tlat)) ** 2).mean(dim=(1, 2, 3))
            res.append(f"t{t} gap {float((ls - lt).mean() / lt.mean()):+.4f} acc {float((lt < ls).float().mean()):.2f}")
    return " | ".join(res)
pool = build_pool(12000, 11)
keep = [i for i, s in enumerate(pool.specs) if s.category == "position"]
pool = Pool([pool.specs[i] for i in keep], [pool.scenes[i] for i in keep], pool.pixels[keep])
lat = pool_latents(m, pool.pixels)
tr = DenoiserTraining(m, PretrainConfig(captions=EXACT_CAPTIONS, dit_lr=lr, warmup_steps=0, dit_steps=10**6, seed=11))
print(0, gap(), flush=True)
t0 = time.time()
for s in range(1, 1001):
    tr.train_step(pool, lat)
    if s % 100 == 0:
        m.transformer.eval(); print(s, f"{time.time()-t0:.0f}s", gap(), flush=True); m.transformer.train()
