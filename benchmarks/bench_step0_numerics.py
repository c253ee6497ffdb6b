"""How far the rollout actors' log-probs are from the learner's at RFT step 0, in float32 and in
bfloat16 on this CPU (issue 27, item 3).

    python benchmarks/bench_step0_numerics.py [--preset cpu] [--scenarios 4] [--rollouts 8] [--bc-steps 60]

At RFT step 0 the policy is the reference and the weights the actors sampled with: the mean ratio
pi / pi_old is 1 and the k3 KL(pi || pi_ref) is 0, up to the numerics. The actors' pi_old comes from
the closed-loop sampler (KV cache, `closed_loop`), their pi_ref from `token_log_probs` (a full
teacher-forced forward), each in the actors' precision; the learner's pi from `token_log_probs` in
its own. For every pair (actor precision, learner precision) this prints, over the live sampled
tokens: the mean ratio exp(log pi - log pi_old), the mean and largest |log ratio|, the k3 estimate
of KL(pi_old || pi) (mean of ratio - 1 - log ratio) and the k3 KL of the learner's log pi against
the actors' log pi_ref. Data: SUMO scenarios generated into a temporary folder;
model: the preset, BC-trained for --bc-steps steps on them (an untrained model's near-uniform
tokens would hide the error of peaked ones). Then, for scale, the same figures where the actors'
log-probs come from another sampling config or other weights than the learner's (what the RFT
stage's first-step check must catch). Last line: `worst ratio_dev R kl K` over the pairs whose
precisions differ or are bfloat16.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="cpu")
    p.add_argument("--scenarios", type=int, default=4)
    p.add_argument("--rollouts", type=int, default=8)
    p.add_argument("--bc-steps", type=int, default=60)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from smart_r1.data.dataset import iter_scenarios
    from smart_r1.data.sumo import make_dataset
    from smart_r1.model import precision
    from smart_r1.model.config import ModelConfig
    from smart_r1.model.smart_tiny import SmartTiny
    from smart_r1.rl.bc import bc_train_step
    from smart_r1.rl.mpo import kl_per_token
    from smart_r1.rollout.closed_loop import closed_loop, token_log_probs
    from smart_r1.rollout.sampling import Sampler
    from smart_r1.tokens.motion_vocab import build_vocab
    from smart_r1.tokens.scene import build_scene, collate

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(tmp, num_scenarios=args.scenarios, seed=0)
        records = list(iter_scenarios(str(Path(tmp) / "*.tfrecord"), args.scenarios))
    torch.manual_seed(0)
    vocab = build_vocab(records, size=1024, seed=0)
    model = SmartTiny(ModelConfig.preset(args.preset, vocab_size=vocab.size), vocab)
    train = collate([build_scene(r, vocab) for r in records])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with precision.using("float32"):
        for _ in range(args.bc_steps):
            stats = bc_train_step(model, optimizer, train)
    model.eval()
    print(f"model {args.preset}: {model.num_parameters():,} parameters, BC {args.bc_steps} steps "
          f"(last loss {stats['loss']:.3f}); bf16 native on this CPU: {precision.cpu_has_bf16()}")
    scenes = [build_scene(r, vocab, agents="sim") for r in records]
    sampling = dict(top_k=args.top_k, top_p=1.0, temperature=1.0)
    names = ("float32", "bfloat16")
    worst = (0.0, 0.0)
    print("| actors | learner | mean ratio | mean abs log ratio | max abs log ratio | k3 KL(pi_old || pi) "
          "| k3 KL (learner's pi vs actors' pi_ref) | tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for actor in names:
        sampled = []
        for i, scene in enumerate(scenes):
            with precision.using(actor):
                torch.manual_seed(i)
                tensors = closed_loop(model, scene, args.rollouts, Sampler(**sampling))
                ref = token_log_probs(model, scene, tensors.tokens, tensors.poses, **sampling)
            sampled.append((scene, tensors, ref.detach()))
        for learner in names:
            sums = torch.zeros(5, dtype=torch.float64)
            biggest = 0.0
            for scene, tensors, ref in sampled:
                with precision.using(learner), torch.no_grad():
                    lp = token_log_probs(model, scene, tensors.tokens, tensors.poses, **sampling)
                live = (scene.sim_mask & scene.agent_mask)[:, None, :, None].expand_as(lp)
                log_ratio = (lp - tensors.log_probs)[live].double()
                kl = kl_per_token(lp, ref)[live].double()
                kl_old = log_ratio.exp() - 1 - log_ratio
                sums += torch.tensor([log_ratio.exp().sum(), log_ratio.abs().sum(), kl_old.sum(), kl.sum(), live.sum()])
                biggest = max(biggest, float(log_ratio.abs().max()))
            ratio, abs_log, kl_old, kl, n = (sums[:4] / sums[4]).tolist() + [int(sums[4])]
            print(f"| {actor} | {learner} | {ratio:.6f} | {abs_log:.2e} | {biggest:.2e} | {kl_old:.2e} | {kl:.2e} | {n} |")
            if actor != learner or actor == "bfloat16":
                worst = (max(worst[0], abs(ratio - 1)), max(worst[1], kl, kl_old))
    # What the stage's check is for: the actors' log-probs of another sampling config or other
    # weights than the learner's (float32 throughout)
    with precision.using("float32"):
        sampled = []
        for i, scene in enumerate(scenes):
            torch.manual_seed(i)
            tensors = closed_loop(model, scene, args.rollouts, Sampler(**sampling))
            sampled.append((scene, tensors, token_log_probs(model, scene, tensors.tokens, tensors.poses, **sampling)))
        ahead = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(ahead.parameters(), lr=1e-3)
        for _ in range(10):
            bc_train_step(ahead, optimizer, train)
        ahead.eval()
        for name, net, kwargs in (("learner samples the whole vocabulary (actors top_k)", model, {}),
                                  ("learner 10 BC steps ahead of the actors' weights", ahead, sampling)):
            sums = torch.zeros(4, dtype=torch.float64)
            for scene, tensors, ref in sampled:
                with torch.no_grad():
                    lp = token_log_probs(net, scene, tensors.tokens, tensors.poses, **kwargs)
                live = (scene.sim_mask & scene.agent_mask)[:, None, :, None].expand_as(lp)
                log_ratio = (lp - tensors.log_probs)[live].double()
                sums += torch.tensor([log_ratio.exp().sum(), (log_ratio.exp() - 1 - log_ratio).sum(),
                                      kl_per_token(lp, ref)[live].double().sum(), live.sum()])
            ratio, kl_old, kl = (sums[:3] / sums[3]).tolist()
            print(f"mismatch: {name}: mean ratio {ratio:.4f}, k3 KL(pi_old || pi) {kl_old:.3e}, "
                  f"k3 KL to pi_ref {kl:.3e}")
    print(f"worst ratio_dev {worst[0]:.3e} kl {worst[1]:.3e}")


if __name__ == "__main__":
    main()
