"""The ``flower-rec`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .data import DatasetError

Handler = Callable[[argparse.Namespace], int]


def _prepare_amazon(args: argparse.Namespace) -> int:
    from .data import prepare_amazon

    prepare_amazon(
        args.reviews, args.meta, args.out, window_start=args.window_start,
        window_end=args.window_end, seed=args.seed, log=print,
    )
    return 0


def _prepare_movielens(args: argparse.Namespace) -> int:
    from .data import prepare_movielens

    prepare_movielens(args.path, args.out, seed=args.seed, log=print)
    return 0


def _prepare_synthetic(args: argparse.Namespace) -> int:
    from .data import prepare_synthetic

    prepare_synthetic(args.out, items=args.items, users=args.users, seed=args.seed, log=print)
    return 0


def _stats(args: argparse.Namespace) -> int:
    from .stats import dataset_stats, format_stats

    stats = dataset_stats(args.data, counts=args.counts)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


SUMMARY_METRICS = (
    "NDCG@10", "HR@10", "DGU", "MGU", "word_entropy", "type_token_ratio", "distinct_titles",
    "invalid_outputs",
)


def _evaluate(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import load_dataset
    from .evaluate import evaluate, resolve_guidance, write_evaluation
    from .files import reading
    from .rewards import PopularityRewards

    resolve_guidance(args.guidance, args.guidance_form)  # a bad value fails before any loading

    # Every file is read, and named if it is bad, before the model loads.
    target = None if args.target_distribution is None else _read_counts(args.target_distribution)
    counts = None if args.guidance_prior is None else _read_counts(args.guidance_prior)
    dataset = load_dataset(args.data)
    prior = None
    if counts is not None:
        with reading(args.guidance_prior):
            prior = PopularityRewards.from_counts(dataset.titles, counts).item_log_rewards(
                "logp", dtype=torch.float64
            )
    torch.manual_seed(args.seed)
    with reading(f"model {args.model}"):
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    evaluation = evaluate(
        model, tokenizer, dataset, split=args.split, mode=args.mode, k=args.k,
        domain=args.domain, limit=args.limit, batch_size=args.batch_size, seed=args.seed,
        temperature=args.temperature, target_distribution=target,
        max_prompt_tokens=args.max_prompt_tokens, guidance=args.guidance,
        guidance_form=args.guidance_form, guidance_prior=prior,
        guidance_users=args.guidance_users,
    )
    if evaluation.selection is not None:
        print(evaluation.selection.summary())
    config = {key: value for key, value in vars(args).items() if key != "handler"}
    path = write_evaluation(evaluation, args.out, f"{args.mode} ({Path(args.model).name})", config)
    for name in SUMMARY_METRICS:
        print(f"{name:>18}  {evaluation.metrics[name]:.4f}")
    print(f"wrote {path}, {path.parent / 'recommendations.jsonl'}, {path.parent / 'groups.png'}")
    return 0


def _read_counts(path: str) -> dict:
    """A JSON file ``{title: count}``; ValueError naming the file otherwise."""
    from .files import read_json, reading

    counts = read_json(path)
    with reading(path):
        if not isinstance(counts, dict):
            raise ValueError("not a JSON object {title: count}")
    return counts


AUX_METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20")


def _train_aux(args: argparse.Namespace) -> int:
    from .auxiliary import evaluate_sasrec, most_popular_baseline, save_sasrec, train_sasrec
    from .data import load_dataset
    from .files import atomic_open

    dataset = load_dataset(args.data)
    model, report = train_sasrec(
        dataset, epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
        lr=args.lr, dropout=args.dropout, seed=args.seed, device=args.device,
        threads=args.threads, exclude_history=not args.include_history,
    )
    exclude = not args.include_history
    metrics = {
        split: {
            "sasrec": evaluate_sasrec(model, dataset, split, exclude_history=exclude),
            "most_popular": most_popular_baseline(dataset, split, exclude_history=exclude),
        }
        for split in ("valid", "test")
    }
    out = Path(args.out)
    save_sasrec(model, out)
    config = {key: value for key, value in vars(args).items() if key != "handler"}
    with atomic_open(out / "report.json", "w", encoding="utf-8") as handle:
        json.dump({"command": config, **report, "metrics": metrics}, handle, indent=2)
    print(
        f"SASRec: best epoch {report['best_epoch']} of {len(report['epochs'])}, "
        f"{report['train_seconds']:.1f} s"
    )
    ranked = "all items" if args.include_history else "all items but the user's history"
    print(f"ranking {ranked}")
    print(f"{'':>8}  {'valid':^20}  {'test':^20}")
    print(f"{'':>8}  {'SASRec':>9} {'most-pop':>10}  {'SASRec':>9} {'most-pop':>10}")
    for name in AUX_METRICS:
        row = "  ".join(
            f"{metrics[split]['sasrec'][name]:>9.4f} {metrics[split]['most_popular'][name]:>10.4f}"
            for split in ("valid", "test")
        )
        print(f"{name:>8}  {row}")
    print(f"wrote {out / 'model.safetensors'}, {out / 'config.json'}, {out / 'report.json'}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .files import read_yaml
    from .training import TrainConfig, train

    options = {}
    if args.config:
        options = read_yaml(args.config)
        if options is None:  # an empty file
            options = {}
        if not isinstance(options, dict):
            raise ValueError(f"{args.config}: expected a mapping of training options")
    overrides = {
        key: value for key, value in vars(args).items()
        if value is not None and key not in ("command", "handler", "config", "aux")
    }
    options.update(overrides)
    config = TrainConfig.from_dict(options)  # every option's type and range, before any work
    if args.aux:
        from .auxiliary import load_sasrec, training_probabilities
        from .data import load_dataset

        dataset = load_dataset(config.data)
        aux = load_sasrec(args.aux)
        config.aux_probabilities = training_probabilities(aux, dataset)
        if config.eval_steps is not None:  # validation samples have p_u of their own
            config.valid_aux_probabilities = training_probabilities(aux, dataset, "valid")
    run = train(config)
    print(f"wrote {run}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, main_demo

    return main_demo(
        DemoConfig(
            out=args.out, data=args.data, domain=args.domain, quick=args.quick, seed=args.seed,
            epochs=args.epochs, theta=args.theta, reward=args.reward, eval_limit=args.eval_limit,
            guidance=args.guidance, guidance_users=args.guidance_users,
        )
    )


def _screen(args: argparse.Namespace) -> int:
    from .data import load_dataset
    from .metrics import write_report
    from .screen import format_screen, screen

    dataset = load_dataset(args.data)
    probabilities = None
    if args.aux is not None:
        from .auxiliary import item_probabilities, load_sasrec

        samples = dataset.split(args.split)[: args.limit]
        probabilities = item_probabilities(load_sasrec(args.aux), samples)
    rows = screen(dataset, probabilities, split=args.split, k=args.k, limit=args.limit)
    print(format_screen(rows, args.k))
    if args.out is not None:
        path = write_report({"data": str(args.data), "split": args.split, "k": args.k,
                             "rows": rows}, Path(args.out) / "screen.json")
        print(f"\nwrote {path}")
    return 0


def _rq1(args: argparse.Namespace) -> int:
    from .rq1 import RQ1Config, run_rq1

    report = run_rq1(RQ1Config(
        data=args.data, out=args.out, size=args.size, variants=args.variants, seeds=args.seeds,
        data_seed=args.data_seed, epochs=args.epochs, patience=args.patience,
        batch_size=args.batch_size, valid_limit=args.valid_limit,
    ))
    print(report["table"])
    print(f"\nwrote {Path(args.out) / 'report.json'} and {Path(args.out) / 'rq1.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flower-rec",
        description="Fine-tune, decode and evaluate LLM recommenders with flow-guided (Flower) "
        "training. Datasets use the Flower/BIGRec folder layout (info/, train/, valid/, test/).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .decoding import GUIDANCE_FORMS
    from .demo import DemoConfig
    from .evaluate import DECODING_MODES
    from .prompts import DOMAINS
    from .rewards import REWARD_VARIANTS
    from .training import FLOW_LOSSES, POLICIES, ROLLOUTS

    demo = commands.add_parser(
        "demo",
        help="SFT vs Flower end to end on the synthetic dataset or yours (the main job)",
        description="Prepares the synthetic dataset (or reads --data), trains SASRec (p_u), "
        "fine-tunes the tiny default model with SFT and with Flower, evaluates both on the test "
        "split with beam search, flow-guided beam search (the guidance chosen on the valid "
        "split) and sampled top-K, prints one side-by-side table and writes "
        "report.json and groups.png. Stages already done in --out are skipped, so a rerun "
        "continues.",
    )
    demo.add_argument("--out", default="flower-demo", help="output folder (default: flower-demo)")
    demo.add_argument(
        "--data", help="a dataset folder to use instead of the synthetic one (info/, train/, ...)"
    )
    demo.add_argument(
        "--domain", choices=sorted(DOMAINS), default="items", help="wording of the prompts"
    )
    demo.add_argument("--quick", action="store_true", help="a smoke run of a minute or two")
    demo.add_argument(
        "--seed", type=int, default=DemoConfig.seed, help="random seed of every stage"
    )
    demo.add_argument(
        "--epochs", type=float, default=DemoConfig.epochs,
        help=f"training epochs per method (default: {DemoConfig.epochs:g})",
    )
    demo.add_argument(
        "--theta", type=float, default=DemoConfig.theta,
        help=f"Flower's SFT weight (default: {DemoConfig.theta:g})",
    )
    demo.add_argument(
        "--reward", choices=REWARD_VARIANTS, default=DemoConfig.reward,
        help=f"Flower's item reward variant (default: {DemoConfig.reward})",
    )
    demo.add_argument("--eval-limit", type=int, help="evaluate the first N test samples only")
    demo.add_argument(
        "--guidance", default=DemoConfig.guidance, metavar="BETA|auto",
        help="flow guidance of the guided-beam rows: 'auto' (default) chooses beta and its form "
        "on the valid split (lowest DGU at NDCG@10 >= 0.95x unguided), or a beta",
    )
    demo.add_argument(
        "--guidance-users", type=int, default=DemoConfig.guidance_users,
        help=f"valid samples the guidance is chosen on (default: {DemoConfig.guidance_users})",
    )
    demo.set_defaults(handler=_demo)

    prepare = commands.add_parser("prepare", help="build a dataset folder from raw data")
    sources = prepare.add_subparsers(dest="source", required=True, metavar="SOURCE")

    amazon = sources.add_parser(
        "amazon",
        help="Amazon Review Data 2018 files, with the paper's preprocessing",
        description="Streams the Amazon Review Data 2018 reviews and metadata of one category "
        "(plain or gzipped JSON lines) and applies the paper's preprocessing: time window, "
        "titles of at most 20 words, HTML-ish titles dropped, iterative 5-core, seeded id "
        "shuffle, histories of up to 10 items, global temporal 80/10/10 split.",
    )
    amazon.add_argument("--reviews", required=True, help="<Category>.json[.gz]")
    amazon.add_argument("--meta", required=True, help="meta_<Category>.json[.gz]")
    amazon.add_argument("--out", required=True, help="output dataset folder (created)")
    amazon.add_argument("--window-start", default="2015-10", help="first month kept (YYYY-MM)")
    amazon.add_argument("--window-end", default="2018-11", help="first month no longer kept")
    amazon.add_argument("--seed", type=int, default=42, help="seed of the item id shuffle")
    amazon.set_defaults(handler=_prepare_amazon)

    movielens = sources.add_parser(
        "movielens",
        help="MovieLens ml-100k or ml-1m raw files",
        description="Reads ml-100k (u.data, u.item) or ml-1m (ratings.dat, movies.dat) and builds "
        "the same 5-core, history and split pipeline; titles keep their year.",
    )
    movielens.add_argument("--path", required=True, help="the unpacked MovieLens folder")
    movielens.add_argument("--out", required=True, help="output dataset folder (created)")
    movielens.add_argument("--seed", type=int, default=42, help="seed of the item id shuffle")
    movielens.set_defaults(handler=_prepare_movielens)

    synthetic = sources.add_parser(
        "synthetic",
        help="the embedded synthetic catalog (the demo's default)",
        description="A deterministic synthetic video-game store: long-tailed popularity, users "
        "with taste clusters, readable titles that share prefixes (series, editions, platforms).",
    )
    synthetic.add_argument("--items", type=int, default=400, help="catalog size before 5-core")
    synthetic.add_argument("--users", type=int, default=2000, help="number of users")
    synthetic.add_argument("--seed", type=int, default=0, help="random seed")
    synthetic.add_argument("--out", required=True, help="output dataset folder (created)")
    synthetic.set_defaults(handler=_prepare_synthetic)

    stats = commands.add_parser(
        "stats",
        help="dataset statistics and popularity groups",
        description="Items, unique titles, samples per split, history lengths, popularity "
        "counts, the 8 equal-size popularity groups and their training shares GH.",
    )
    stats.add_argument("--data", required=True, help="dataset folder")
    stats.add_argument(
        "--counts", choices=("history", "interactions"), default="history",
        help="popularity as history-window counts (the paper's) or raw interaction counts",
    )
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    stats.set_defaults(handler=_stats)

    training = commands.add_parser(
        "train",
        help="fine-tune a causal LM recommender with SFT or Flower",
        description="Fine-tunes a Hugging Face causal LM (default: a tiny Llama-style model with "
        "a BPE tokenizer trained on the dataset) on transformers.Trainer. sft is the BIGRec "
        "baseline; flower adds (1 - theta) x modified sub-trajectory balance on one on-policy "
        "trie rollout per sample (or teacher-forced flow matching). Checkpoints every "
        "--save-steps; --resume continues an interrupted run. --eval-steps adds the validation "
        "loss (eval_loss in metrics.jsonl), --early-stopping-patience stops on it and keeps the "
        "best checkpoint. Options may also come from a YAML file (--config; keys are the "
        "TrainConfig fields, e.g. eval_steps); command-line flags override it.",
    )
    training.add_argument("--config", help="YAML file of training options (TrainConfig fields)")
    training.add_argument("--data", help="dataset folder")
    training.add_argument("--out", help="run folder (model, tokenizer, metrics.jsonl, checkpoints)")
    training.add_argument("--method", choices=("sft", "flower"))
    training.add_argument("--flow-loss", dest="flow_loss", choices=FLOW_LOSSES)
    training.add_argument(
        "--policy", choices=POLICIES,
        help="the flow loss's policy: full (full-vocabulary softmax, the paper's) or masked "
        "(renormalised over the trie children)",
    )
    training.add_argument(
        "--leakage-weight", dest="leakage_weight", type=float,
        help="lambda of the conservative penalty on the mass leaving the trie (default 0)",
    )
    training.add_argument(
        "--off-policy-share", dest="off_policy_share", type=float,
        help="share of SubTB trajectories drawn from R_u/Z_u instead of the model (default 0)",
    )
    training.add_argument(
        "--rollout-temperature", dest="rollout_temperature", type=float,
        help="temperature of the on-policy rollouts (default 1)",
    )
    training.add_argument(
        "--rollout", choices=ROLLOUTS,
        help="ours (default) or published: the released code's SubTB step, for parity "
        "(context-free forwards after the prompt; not a recommended setting)",
    )
    training.add_argument(
        "--reward-counts", dest="reward_counts", metavar="JSON",
        help="JSON {title: count} used as the rewards' popularity (default: history counts)",
    )
    training.add_argument("--model", help="local folder or hub id (default: the tiny model)")
    training.add_argument("--lora", action="store_true", default=None, help="train LoRA adapters")
    training.add_argument("--bf16", action="store_true", default=None, help="bf16 mixed precision")
    training.add_argument("--theta", type=float, help="weight of SFT (default 0.9995)")
    training.add_argument(
        "--reward", choices=REWARD_VARIANTS,
        help="item reward variant (logp_div_s, the paper's default, needs --aux)",
    )
    training.add_argument("--aux", help="a train-aux output folder (SASRec giving p_u)")
    training.add_argument("--floor-count", dest="floor_count", type=float,
                          help="popularity count of titles never in a training history")
    training.add_argument("--domain", choices=sorted(DOMAINS), help="wording of the prompt")
    training.add_argument("--lr", dest="learning_rate", type=float, help="learning rate")
    training.add_argument("--epochs", type=float, help="training epochs")
    training.add_argument("--max-steps", dest="max_steps", type=int, help="stop after N steps")
    training.add_argument("--batch-size", dest="batch_size", type=int, help="samples per step")
    training.add_argument("--save-steps", dest="save_steps", type=int, help="checkpoint interval")
    training.add_argument(
        "--eval-steps", dest="eval_steps", type=int,
        help="validation loss on the valid split every N optimizer steps (default: none)",
    )
    training.add_argument(
        "--valid-limit", dest="valid_limit", type=int,
        help="validate on the first N valid samples only (default: all)",
    )
    training.add_argument(
        "--early-stopping-patience", dest="early_stopping_patience", type=int,
        help="stop after N evaluations without a lower eval_loss and keep the best checkpoint "
        "(needs --eval-steps; --save-steps must be a multiple of it)",
    )
    training.add_argument(
        "--max-prompt-tokens", dest="max_prompt_tokens", type=int,
        help="prompt cutoff (the paper's 512): longer prompts drop their oldest history titles",
    )
    training.add_argument("--seed", type=int, help="random seed")
    training.add_argument("--resume", action="store_true", default=None,
                          help="continue from the run folder's last checkpoint")
    training.add_argument("--tensorboard", action="store_true", default=None,
                          help="also write TensorBoard event files")
    training.set_defaults(handler=_train)

    evaluation = commands.add_parser(
        "evaluate",
        help="decode a split with a model and compute every metric",
        description="Recommends for every sample of a split with trie-constrained decoding (beam "
        "search, or sampled top-K without replacement), optionally flow-guided, and writes "
        "metrics.json (HR@K, NDCG@K, DGU, MGU, word entropy, type-token ratio, distinct titles, "
        "invalid outputs, the guidance setting), recommendations.jsonl, groups.png "
        "(recommendation share vs training share per popularity group) and, with --guidance "
        "auto, guidance.png (NDCG@10 against DGU over beta).",
    )
    evaluation.add_argument("--data", required=True, help="dataset folder")
    evaluation.add_argument("--model", required=True, help="Hugging Face causal LM (local folder)")
    evaluation.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    evaluation.add_argument("--split", choices=("train", "valid", "test"), default="test")
    evaluation.add_argument("--mode", choices=DECODING_MODES, default="beam", help="decoding")
    evaluation.add_argument("--k", type=int, default=10, help="list length (beams)")
    evaluation.add_argument(
        "--domain", choices=sorted(DOMAINS), default="items", help="wording of the prompt"
    )
    evaluation.add_argument("--limit", type=int, help="evaluate the first N samples only")
    evaluation.add_argument(
        "--max-prompt-tokens", type=int,
        help="prompt cutoff: longer prompts drop their oldest history titles (as in training)",
    )
    evaluation.add_argument("--batch-size", type=int, default=16, help="prompts per batch")
    evaluation.add_argument("--seed", type=int, default=0, help="seed of sampled decoding")
    evaluation.add_argument("--temperature", type=float, default=1.0, help="of sampled decoding")
    evaluation.add_argument(
        "--guidance", default="0", metavar="BETA|auto",
        help="flow guidance: each item's score gets -BETA x log(R(i)/Z) under the prior R (the "
        "training popularity unless --guidance-prior); 0 turns it off (default); 'auto' (beam) "
        "chooses BETA and the form on the valid split: the lowest DGU at NDCG@10 >= 0.95x "
        "unguided",
    )
    evaluation.add_argument(
        "--guidance-form", choices=GUIDANCE_FORMS, default="normalized",
        help="beam search: divide the guidance by the length with the model term (normalized, "
        "the default), or add it once per item (item)",
    )
    evaluation.add_argument(
        "--guidance-prior", metavar="JSON",
        help="JSON {title: count} of the guidance prior (default: training popularity)",
    )
    evaluation.add_argument(
        "--guidance-users", type=int, default=1000,
        help="valid samples the 'auto' selection uses (a seeded subset)",
    )
    evaluation.add_argument(
        "--target-distribution",
        help="JSON {title: count} to compare the recommended titles with (KL(m||b), KL(b||m), JS)",
    )
    evaluation.add_argument("--out", required=True, help="output folder (created)")
    evaluation.set_defaults(handler=_evaluate)

    train_aux = commands.add_parser(
        "train-aux",
        help="train the SASRec of the personalised rewards",
        description="Trains SASRec (1 block, 1 head, hidden 64, histories of 10 items, BCE with "
        "one sampled negative, Adam) on the train split with early stopping on validation "
        "NDCG@20, prints HR@K/NDCG@K on valid and test beside a most-popular baseline, and "
        "writes the model (model.safetensors, config.json) and report.json into --out.",
    )
    train_aux.add_argument("--data", required=True, help="dataset folder")
    train_aux.add_argument("--out", required=True, help="output model folder (created)")
    train_aux.add_argument("--epochs", type=int, default=200, help="most epochs")
    train_aux.add_argument(
        "--patience", type=int, default=10, help="epochs without a better valid NDCG@20"
    )
    train_aux.add_argument("--batch-size", type=int, default=128, help="samples per step")
    train_aux.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    train_aux.add_argument("--dropout", type=float, default=0.5, help="dropout rate")
    train_aux.add_argument("--seed", type=int, default=0, help="random seed")
    train_aux.add_argument(
        "--include-history", action="store_true",
        help="rank the items of the user's history too (default: left out, as SASRec does)",
    )
    train_aux.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    train_aux.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads while training (one: the model is tiny and threads contend)",
    )
    train_aux.set_defaults(handler=_train_aux)

    screening = commands.add_parser(
        "screen",
        help="what each reward's exact top-K would give, before any training",
        description="Scores every user's items by each reward variant (logp; with --aux also "
        "the personalised logp_div_s and logp_add_logs) and takes the exact top-K: what beam "
        "search on a model that fits the reward perfectly converges to. Prints NDCG/HR@K, DGU, "
        "MGU, word entropy, distinct titles and the targets' entropy, beside SASRec's own top-K "
        "and SASRec's scores under flow guidance at several betas (with --aux).",
    )
    screening.add_argument("--data", required=True, help="dataset folder")
    screening.add_argument("--aux", help="a train-aux output folder (SASRec giving p_u)")
    screening.add_argument("--split", choices=("train", "valid", "test"), default="test")
    screening.add_argument("--k", type=int, default=10, help="list length")
    screening.add_argument("--limit", type=int, help="screen the first N samples only")
    screening.add_argument("--out", help="also write screen.json into this folder")
    screening.set_defaults(handler=_screen)

    from .rq1 import DEFAULT_VARIANTS, RQ1Config
    from .variants import TRAINING_VARIANTS

    rq1 = commands.add_parser(
        "rq1",
        help="the paper's distribution fitting (RQ1) on the movie set",
        description="One fixed prompt without history: trains SFT on titles drawn from the "
        "target distribution m (one per record of train_<size>.json, as the published baseline "
        "does) and each Flower variant with m's counts as its reward, every run up to --epochs "
        "epochs with early stopping on the validation loss, and compares each model with m by "
        "one sampled title per test record (KL(m||b), KL(b||m), JS) and by exact scoring. "
        "Writes report.json, table.md and rq1.png into --out; finished runs are skipped.",
    )
    rq1.add_argument("--data", required=True,
                     help="the Movies_RQ1 folder (Movies/ and base_line_data/)")
    rq1.add_argument("--out", required=True, help="output folder")
    rq1.add_argument("--size", type=int, default=RQ1Config.size,
                     help="the target set: 100 (default) or 1500 where its files exist")
    rq1.add_argument("--variants", nargs="+", choices=list(TRAINING_VARIANTS),
                     default=list(DEFAULT_VARIANTS), metavar="VARIANT",
                     help=f"training variants (default: {' '.join(DEFAULT_VARIANTS)}; one of "
                     f"{', '.join(TRAINING_VARIANTS)})")
    rq1.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds")
    rq1.add_argument("--data-seed", type=int, default=RQ1Config.data_seed,
                     help="seed of the titles drawn from m")
    rq1.add_argument("--epochs", type=int, default=RQ1Config.epochs, help="most epochs (7)")
    rq1.add_argument("--patience", type=int, default=RQ1Config.patience,
                     help="early-stopping patience in epochs (2)")
    rq1.add_argument("--batch-size", type=int, default=RQ1Config.batch_size)
    rq1.add_argument("--valid-limit", type=int, default=RQ1Config.valid_limit,
                     help="validation samples per evaluation")
    rq1.set_defaults(handler=_rq1)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (DatasetError, FileNotFoundError, OSError, ValueError) as error:
        print(f"flower-rec {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
