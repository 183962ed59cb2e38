"""The ``flower-rec`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .cli_options import add_config_options, config_from_args
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
    from .evaluate import EVALUATE_RULES, check_options, evaluate, write_evaluation
    from .files import reading
    from .rewards import PopularityRewards

    check_options(  # a bad value fails before anything loads
        guidance=args.guidance, guidance_form=args.guidance_form,
        **{name: getattr(args, name) for name in EVALUATE_RULES},
    )

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

    return main_demo(config_from_args(DemoConfig, args))


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

    report = run_rq1(config_from_args(RQ1Config, args))
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
    _add_demo(commands)
    _add_prepare(commands)
    _add_stats(commands)
    _add_train(commands)
    _add_evaluate(commands)
    _add_train_aux(commands)
    _add_screen(commands)
    _add_rq1(commands)
    return parser


def _add_demo(commands) -> None:
    from .demo import DEMO_RULES, DemoConfig

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
    add_config_options(demo, DemoConfig, DEMO_RULES, extra={"guidance": {"metavar": "BETA|auto"}})
    demo.set_defaults(handler=_demo)


def _add_prepare(commands) -> None:
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


def _add_stats(commands) -> None:
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


def _add_train(commands) -> None:
    from .training import FIELD_RULES, TrainConfig

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
    training.add_argument("--aux", help="a train-aux output folder (SASRec giving p_u)")
    add_config_options(
        training, TrainConfig, FIELD_RULES, unset=True,
        skip=("aux_probabilities", "valid_aux_probabilities", "lora_target_modules"),
        extra={"learning_rate": {"flags": ["--lr"]}},
    )
    training.set_defaults(handler=_train)


def _add_evaluate(commands) -> None:
    from .decoding import GUIDANCE_FORMS
    from .evaluate import DECODING_MODES
    from .prompts import DOMAINS

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


def _add_train_aux(commands) -> None:
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


def _add_screen(commands) -> None:
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


def _add_rq1(commands) -> None:
    from .rq1 import RQ1_RULES, RQ1Config
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
    add_config_options(
        rq1, RQ1Config, RQ1_RULES,
        extra={"variants": {"choices": list(TRAINING_VARIANTS), "metavar": "VARIANT"}},
    )
    rq1.set_defaults(handler=_rq1)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (DatasetError, FileNotFoundError, OSError, ValueError) as error:
        print(f"flower-rec {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
