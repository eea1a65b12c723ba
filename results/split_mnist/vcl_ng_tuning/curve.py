import sys, numpy as np
from vcl_jax.protocols import split_mnist as sm
from vcl_jax.configs.split_mnist import PRESETS
from vcl_jax.config import override
orig = sm._trained
def traced(fit, where):
    f = orig(fit, where)
    def g(*a, **k):
        st, hist = f(*a, **k)
        print(a[4], " ".join(f"{h['loss']:.3f}/{h.get('kl',0):.0f}" for h in hist[::12]), flush=True)
        return st, hist
    return g
sm._trained = traced
cfg = override(PRESETS["paper"], sys.argv[1:])
tasks = sm.load_tasks(cfg)
runner = sm.Runner(cfg)
for name in cfg.runs:
    r = sm.run_one(runner, name, tasks, progress=False)
    print(name, r["accuracy"][-1], r["average"], "train_s %.1f" % r["train_s"])
    if "posterior_std" in r:
        for t, sp in enumerate(r["posterior_std"]):
            print("  std after task", t, {k: [f"{v:.2e}" for v in vs] for k, vs in sp.items()})
