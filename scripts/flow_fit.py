"""Does a flow loss make the policy match the flows? A diagnostic on one fixed batch.

Fits a fresh tiny model (1 layer, hidden 32) on 16 training samples of a small synthetic
catalog (60 items) with ``theta * SFT + (1 - theta) * flow``, popularity rewards (``logp``), for
each theta given, and reports on the batch's prompts after training:

- ``flow``: the flow loss on fresh rollouts (per pair for SubTB);
- ``KL(R/Z||trie)``: mean over prompts of KL from the reward distribution R/Z to the model's
  trie-constrained item distribution (what sampling and sampled top-K draw from);
- ``item mass``: the model's full-vocabulary probability of generating any catalog item then EOS
  (1 when all mass stays on the catalog);
- ``top share``: the trie-constrained probability of each prompt's most likely item (mean).

This is the evidence behind docs/ablation.md's "why" section (on-policy SubTB alone lowers its
loss while the policy collapses onto one title):

    python scripts/flow_fit.py --flow-loss subtb --theta 0 0.9 0.99 1

and of the objectives that answer it (docs/ablation.md, "The objectives"):

    python scripts/flow_fit.py --policy masked --theta 0 0.5 0.9 0.99
    python scripts/flow_fit.py --leakage-weight 1 --theta 0 0.5 0.9 0.99
    python scripts/flow_fit.py --policy masked --off-policy-share 0.5 --theta 0 0.5 0.9
"""

from __future__ import annotations

import argparse

import torch

from flower_rec.data import prepare_synthetic
from flower_rec.decoding import Catalog, TrieDecoder
from flower_rec.models import corpus, tiny_llama, train_tokenizer
from flower_rec.prompts import build_prompt
from flower_rec.rewards import PopularityRewards
from flower_rec.training import (
    FLOW_LOSSES,
    POLICIES,
    FlowerObjective,
    RecommendationCollator,
    encode_samples,
)


def fit(setup: dict, theta: float, steps: int, lr: float, **options) -> dict[str, float]:
    tokenizer, catalog, batch = setup["tokenizer"], setup["catalog"], setup["batch"]
    objective = FlowerObjective(
        catalog, method="flower", eos_token_id=tokenizer.eos_token_id, theta=theta,
        rewards=setup["rewards"], reward_variant="logp", **options,
    )
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        terms = objective(model, batch, seed=step)
        optimizer.zero_grad()
        terms.loss.backward()
        optimizer.step()

    with torch.no_grad():
        flow = float(objective(model, batch, seed=steps).flow)
    decoder = TrieDecoder(model.eval(), tokenizer, catalog, progress=False)
    trie = decoder.exact_item_log_probs(setup["prompts"], normalize="trie").double()
    full = decoder.exact_item_log_probs(setup["prompts"], normalize="model", include_eos=True)
    target = setup["target"]
    return {
        "flow": flow,
        "KL(R/Z||trie)": float((target * (target.log() - trie)).sum(1).mean()),
        "item mass": float(full.double().exp().sum(1).mean()),
        "top share": float(trie.exp().max(1).values.mean()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flow-loss", choices=FLOW_LOSSES, default="subtb")
    parser.add_argument("--policy", choices=POLICIES, default="full")
    parser.add_argument("--leakage-weight", type=float, default=0.0)
    parser.add_argument("--off-policy-share", type=float, default=0.0)
    parser.add_argument("--theta", type=float, nargs="+", default=[0.0, 0.9, 0.99, 1.0])
    parser.add_argument("--steps", type=int, default=60, help="Adam steps on the batch")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    args = parser.parse_args()
    torch.set_num_threads(1)

    dataset = prepare_synthetic(None, items=60, users=300, progress=False)
    tokenizer = train_tokenizer(corpus(dataset))
    catalog = Catalog.from_titles(dataset.titles, tokenizer, build_prompt([]))
    encoded = encode_samples(dataset, "train", tokenizer, catalog)
    chosen = range(0, 160, 10)
    features = [
        {"sample_index": i, "prompt": encoded.prompts[i], "target": encoded.targets[i]}
        for i in chosen
    ]
    rewards = PopularityRewards.from_dataset(dataset)
    setup = {
        "tokenizer": tokenizer,
        "catalog": catalog,
        "batch": RecommendationCollator(tokenizer.pad_token_id)(features),
        "prompts": [encoded.prompts[i] for i in chosen],
        "rewards": rewards,
        "target": torch.softmax(rewards.item_log_rewards("logp").double(), dim=0),
    }
    options = {"flow_loss": args.flow_loss, "policy": args.policy,
               "leakage_weight": args.leakage_weight, "off_policy_share": args.off_policy_share}
    untrained = fit(setup, 1.0, 0, args.lr, **options)
    described = ", ".join(f"{k} {v}" for k, v in options.items())
    print(f"{described}; {args.steps} Adam steps at lr {args.lr:g} on 16 samples "
          f"(untrained: KL {untrained['KL(R/Z||trie)']:.3f}, top share "
          f"{untrained['top share']:.3f})\n")
    print("| theta | " + " | ".join(untrained) + " |")
    print("|---|" + "---|" * len(untrained))
    for theta in args.theta:
        row = fit(setup, theta, args.steps, args.lr, **options)
        print(f"| {theta:g} | " + " | ".join(f"{value:.3g}" for value in row.values()) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
