"""How far CAT-K rollouts of a checkpoint drift from the log, and what the SFT targets ask for
from the visited states (length and heading change of target, executed and logged moves, by
speed), on the first 8 training scenes.

    python benchmarks/catk_drift.py RUN_DIR K      # RUN_DIR: a pipeline run with bc/model.pt
"""
import sys, torch
from smart_r1.data.dataset import iter_scenarios
from smart_r1.model.checkpoint import load_checkpoint
from smart_r1.rl.catk import catk_targets
from smart_r1.rollout.closed_loop import closed_loop
from smart_r1.rollout.sampling import catk_selector, Sampler
from smart_r1.tokens.scene import build_scene, collate
from smart_r1.tokens.motion_vocab import SHIFT, NUM_HISTORY_TOKENS
torch.set_num_threads(2); torch.manual_seed(0)
R = sys.argv[1]
model = load_checkpoint(f"{R}/bc/model.pt")
recs = [r for r in iter_scenarios(f"{R}/data/train") if r.sim_agent_mask.any()][:8]
batch = collate([build_scene(r, model.vocab, agents="sim") for r in recs])
K = int(sys.argv[2]) if len(sys.argv) > 2 else 5
sel = catk_selector(batch, 1, K) if K > 0 else Sampler(top_k=8)
ro = closed_loop(model, batch, 1, sel)
tg, valid = catk_targets(batch, ro, model.vocab)
v = valid[:, 0]  # [B, A, 16]
first = NUM_HISTORY_TOKENS + 1
log_end = batch.log_anchor_pose[:, :, first:]  # [B,A,16,3]
reached = ro.poses[:, 0, :, SHIFT - 1::SHIFT]  # [B,A,16,3]
drift = (reached[..., :2] - log_end[..., :2]).norm(dim=-1)
print("K", K, "drift mean", drift[v].mean().item(), "p90", drift[v].quantile(0.9).item())
for t in (0, 3, 7, 15):
    print(" step", t, "drift mean", drift[..., t][v[..., t]].mean().item())
# end-of-token displacement length of target vs executed contours
tg = tg[:, 0]; types = batch.agent_type[:, :, None].expand_as(tg)
cont = model.vocab.contours[types, tg][..., -1, :]  # [B,A,16,3] target token end displacement (local)
cont_ex = model.vocab.contours[types, ro.tokens[:, 0]][..., -1, :]
tl = cont[..., :2].norm(dim=-1)[v]; el = cont_ex[..., :2].norm(dim=-1)[v]
logdisp = torch.cat([batch.anchor_pose[:, :, NUM_HISTORY_TOKENS:NUM_HISTORY_TOKENS+1], log_end], 2)
ll = (logdisp[:, :, 1:, :2] - logdisp[:, :, :-1, :2]).norm(dim=-1)[v]
print("len target", tl.mean().item(), "executed", el.mean().item(), "log", ll.mean().item())
print("target==executed", (tg == ro.tokens[:, 0])[v].float().mean().item())
print("|target len - log len| mean", (tl - ll).abs().mean().item(), "p90", (tl - ll).abs().quantile(0.9).item())
# BC tokens on log: how far are their lengths from the log?
bt = batch.tokens[:, :, first - 1:first - 1 + 16]
bl = model.vocab.contours[types, bt][..., -1, :2].norm(dim=-1)[v]
print("BC token len", bl.mean().item(), "|bc - log| mean", (bl - ll).abs().mean().item())
print("target heading change abs mean", cont[..., 2].abs()[v].mean().item(), "exec", cont_ex[..., 2].abs()[v].mean().item())
from smart_r1.tokens.geometry import wrap_angle
print("BC token heading change", model.vocab.contours[types, bt][..., -1, 2].abs()[v].mean().item())
herr = wrap_angle(reached[..., 2] - log_end[..., 2]).abs()
print("visited heading err mean", herr[v].mean().item(), "p90", herr[v].quantile(0.9).item())
# log heading change per interval
lh = wrap_angle(logdisp[:, :, 1:, 2] - logdisp[:, :, :-1, 2]).abs()[v]
print("log heading change", lh.mean().item())
# is target end pose close to the log end pose? and executed?
from smart_r1.tokens.geometry import compose
start = torch.cat([batch.anchor_pose[:, :, NUM_HISTORY_TOKENS:NUM_HISTORY_TOKENS+1], reached[:, :, :-1]], 2)
tend = compose(start, model.vocab.contours[types, tg][..., -1, :])
print("target end err pos", (tend[..., :2]-log_end[..., :2]).norm(dim=-1)[v].mean().item(), "head", wrap_angle(tend[...,2]-log_end[...,2]).abs()[v].mean().item())
print("exec end err pos", (reached[..., :2]-log_end[..., :2]).norm(dim=-1)[v].mean().item())
print("--- by log speed bin (log disp per 0.5s)")
for lo, hi in ((0, 0.25), (0.25, 2), (2, 100)):
    m = v & (torch.cat([logdisp[:, :, 1:, :2] - logdisp[:, :, :-1, :2]], 2).norm(dim=-1) >= lo) & ((logdisp[:, :, 1:, :2] - logdisp[:, :, :-1, :2]).norm(dim=-1) < hi)
    print(f" [{lo},{hi}) n={int(m.sum())} target dh {cont[...,2].abs()[m].mean():.3f} exec dh {cont_ex[...,2].abs()[m].mean():.3f} log dh {wrap_angle(logdisp[:, :, 1:, 2] - logdisp[:, :, :-1, 2]).abs()[m].mean():.3f} target len {cont[..., :2].norm(dim=-1)[m].mean():.2f} drift {drift[m].mean():.2f} head err {herr[m].mean():.3f}")
