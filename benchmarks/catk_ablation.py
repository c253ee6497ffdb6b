"""What does a short closed-loop SFT (CAT-K) do to a BC checkpoint, against the same number of BC
steps? In-process, no Ray: `--steps` updates of 4 training scenes at `--lr`, then the fast WOSAC
metrics on the first `--eval-scen` held-out scenarios (8 rollouts, top-8 sampling).

    python benchmarks/catk_ablation.py --ckpt runs/X/bc/model.pt --train runs/X/data/train \
        --heldout runs/X/data/sumo_heldout --mode catk --k 5        # or --mode bc; --steps 0: no update
    --target executed: train on the executed CAT-K tokens instead of the corrective targets
"""
import argparse, json, random, sys, time
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from eval_bc import evaluate
from smart_r1.data.dataset import iter_scenarios
from smart_r1.model.checkpoint import load_checkpoint, save_checkpoint
from smart_r1.rl.bc import bc_loss
from smart_r1.rl.catk import catk_sft_loss
from smart_r1.rollout.sampling import Sampler
from smart_r1.tokens.scene import build_scene, collate

p = argparse.ArgumentParser()
p.add_argument("--ckpt"); p.add_argument("--train"); p.add_argument("--heldout")
p.add_argument("--mode", default="catk"); p.add_argument("--k", type=int, default=5)
p.add_argument("--lr", type=float, default=1e-4); p.add_argument("--steps", type=int, default=30)
p.add_argument("--eval-scen", type=int, default=12); p.add_argument("--rollouts", type=int, default=8)
p.add_argument("--save", default="")
p.add_argument("--eval-seed", type=int, default=0)
p.add_argument("--target", default="best")
a = p.parse_args()
torch.set_num_threads(2)
def ev(model, tag):
    torch.manual_seed(a.eval_seed)
    held = list(iter_scenarios(a.heldout, a.eval_scen))
    ours, _ = evaluate(model, held, a.rollouts, Sampler(top_k=8))
    keys = ["metametric", "simulated_collision_rate", "simulated_offroad_rate", "min_average_displacement_error",
            "linear_speed_likelihood", "linear_acceleration_likelihood", "angular_speed_likelihood", "distance_to_nearest_object_likelihood"]
    print(tag, json.dumps({k: round(ours[k], 4) for k in keys if k in ours}), flush=True)
model = load_checkpoint(a.ckpt)
if a.steps == 0:
    ev(model, "base"); sys.exit()
recs = [r for r in iter_scenarios(a.train) if r.sim_agent_mask.any()]
agents = "all" if a.mode == "bc" else "sim"
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
rng = random.Random(0); torch.manual_seed(1)
cache = {}  # scene index -> tokenised scene, built once


def scene(i):
    if i not in cache:
        cache[i] = build_scene(recs[i], model.vocab, agents=agents, max_agents=64 if agents == "all" else 128)
    return cache[i]


t0 = time.time()
for step in range(a.steps):
    batch = collate([scene(i) for i in rng.sample(range(len(recs)), 4)])
    model.train()
    if a.mode == "bc":
        loss, st = bc_loss(model, batch)
    else:
        if a.target == "executed":
            import smart_r1.rl.catk as C
            orig = C.catk_targets
            C.catk_targets = lambda b, r, v: (r.tokens, orig(b, r, v)[1])
            loss, st = catk_sft_loss(model, batch, a.k)
            C.catk_targets = orig
        else:
            loss, st = catk_sft_loss(model, batch, a.k)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    if step % 10 == 0 or step == a.steps - 1:
        print(step, {k: round(v, 3) if isinstance(v, float) else v for k, v in st.items()}, f"{time.time()-t0:.0f}s", flush=True)
ev(model, f"{a.mode} k{a.k} lr{a.lr} steps{a.steps}")
if a.save: save_checkpoint(a.save, model, {"stage": "exp"})
