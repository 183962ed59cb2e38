"""Flower in your own training loop: one step of SFT + sub-trajectory balance on a transformers
causal LM, then recommendations by greedy search, sampling and beam search constrained to the
catalog, with flower_ext's trie and losses and flower_rec.loop's rollout and teacher forcing.

    python examples/custom_loop.py

A tiny Llama built from a config, a BPE tokenizer trained on a 36-game catalog in which some
titles are prefixes of others ("Star Quest", "Star Quest II"), users whose rewards favour the
series they played (personalised flows), one optimizer step; every recommendation is checked
to be a catalog item. A few seconds on a CPU, no download. The part between the "core" marks is
the code of the README section "Using the ops from another trainer" (the tests compare them).
"""

from __future__ import annotations

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

from flower_ext import Trie, losses
from flower_ext.generation import TrieLogitsProcessor
from flower_rec.loop import continuation_labels, continuation_logits, rollout
from flower_rec.models import train_tokenizer

SERIES = ["Star Quest", "Mario Kart", "Zelda Legends", "Dragon Tales", "Space Miners", "Tiny Farm"]
EDITIONS = ["", " II", " III", " Deluxe", " II Deluxe", " Online"]
TITLES = [series + edition for series in SERIES for edition in EDITIONS]
USERS = 8


def prompt_text(history: list[str]) -> str:
    return f"Played: {'; '.join(history)}.\nNext:\n"


def make_batch(tokenizer, item_sequences, generator) -> tuple[dict, torch.Tensor]:
    """``USERS`` users, each with three games of one or two series played: their prompts
    (left-padded), their next game's tokens then EOS (right-padded) and their item log-rewards
    ``[B, I]``: popularity, times e^2 for the series they played."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    popularity = torch.arange(1, len(TITLES) + 1, dtype=torch.float).reciprocal()  # Zipf
    histories, targets, liked = [], [], []
    for _ in range(USERS):
        series = torch.randint(len(SERIES), (2,), generator=generator)
        games = series[torch.randint(2, (4,), generator=generator)] * len(EDITIONS) + torch.randint(
            len(EDITIONS), (4,), generator=generator
        )
        histories.append([TITLES[g] for g in games[:3]])
        targets.append(item_sequences[games[3]] + [eos])
        liked.append(torch.isin(torch.arange(len(TITLES)) // len(EDITIONS), series))
    inputs = tokenizer([prompt_text(h) for h in histories], padding=True, return_tensors="pt")
    width = max(map(len, targets))
    batch = {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "targets": torch.tensor([t + [pad] * (width - len(t)) for t in targets]),
        "target_lengths": torch.tensor([len(t) for t in targets]),
    }
    item_log_rewards = popularity.log() + 2.0 * torch.stack(liked).float()
    return batch, item_log_rewards


# -- core (README) ----------------------------------------------------------------------------
def catalog_trie(item_sequences, eos):
    """The trie of every item's tokens followed by EOS, which ends an item (so that items that
    are prefixes of others can end too) and is the termination token of the losses."""
    return Trie.from_sequences([sequence + [eos] for sequence in item_sequences])


def training_step(model, optimizer, trie, eos, batch, item_log_rewards, theta=0.9995,
                  generator=None):
    """One Flower step: SFT on each user's next item, sub-trajectory balance on one rollout."""
    ids, mask = batch["input_ids"], batch["attention_mask"]  # prompts, left-padded
    targets, target_lengths = batch["targets"], batch["target_lengths"]  # item + EOS, right-padded
    # On-policy trajectories through the trie: KV cache, no gradient, dropout off.
    sample = rollout(model, ids, mask, trie, eos, generator=generator)
    # One teacher-forced forward (with gradient) for the targets and the trajectories.
    target_logits, sample_logits = continuation_logits(
        model, ids, mask, [(targets, target_lengths), (sample.actions, sample.lengths)]
    )
    sft = losses.sft_loss(target_logits, continuation_labels(targets, target_lengths))
    flows = trie.log_flows(item_log_rewards)  # [B, N]: each user's own flows
    log_rewards = losses.state_log_rewards(trie, flows, sample.path, eos)
    subtb = losses.subtb_loss(sample_logits, sample.actions, log_rewards, sample.lengths, eos)
    loss = losses.flower_loss(sft, subtb, theta)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
    return loss.detach()


def recommend(model, trie, eos, pad, ids, mask, **options) -> list[list[int]]:
    """Each generated item's tokens: transformers' generate constrained to the trie."""
    processor = TrieLogitsProcessor(trie, prompt_length=ids.shape[1], eos_token_id=eos)
    with torch.no_grad():
        sequences = model.generate(
            ids, attention_mask=mask, logits_processor=LogitsProcessorList([processor]),
            max_new_tokens=trie.depth, eos_token_id=eos, pad_token_id=pad, **options,
        )
    return [row[: row.index(eos)] for row in sequences[:, ids.shape[1] :].tolist()]
# -- end of core -------------------------------------------------------------------------------


def main(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    tokenizer = train_tokenizer([*TITLES, prompt_text(["a", "b"])], vocab_size=400)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, bos_token_id=tokenizer.bos_token_id, eos_token_id=eos,
        pad_token_id=pad,
    ))
    item_sequences = [tokenizer(title, add_special_tokens=False).input_ids for title in TITLES]
    trie = catalog_trie(item_sequences, eos)

    batch, item_log_rewards = make_batch(tokenizer, item_sequences, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = training_step(model, optimizer, trie, eos, batch, item_log_rewards,
                         generator=torch.Generator().manual_seed(seed))
    if not math.isfinite(loss.item()):
        raise AssertionError(f"the loss is {loss.item()}")
    if all(torch.equal(p, q) for p, q in zip(before, model.parameters())):
        raise AssertionError("the optimizer step changed no weight")

    model.eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    decodings = {
        "greedy": {"do_sample": False},
        "sampling": {"do_sample": True, "top_k": None},
        "beam search": {"num_beams": 10, "num_return_sequences": 10, "do_sample": False},
    }
    titles = {tuple(sequence): title for sequence, title in zip(item_sequences, TITLES)}
    recommendations = {}
    for name, options in decodings.items():
        generated = recommend(model, trie, eos, pad, ids, mask, **options)
        outside = [tokens for tokens in generated if tuple(tokens) not in titles]
        if outside:
            raise AssertionError(f"{name} generated {len(outside)} non-items: {outside[:3]}")
        recommendations[name] = [titles[tuple(tokens)] for tokens in generated]
    return {"loss": loss.item(), "recommendations": recommendations}


if __name__ == "__main__":
    result = main()
    print(f"one Flower step: loss {result['loss']:.4f}")
    for name, titles in result["recommendations"].items():
        print(f"{name}: {titles[:10] if name == 'beam search' else titles}")
