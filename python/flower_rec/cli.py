"""The ``flower-rec`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .cli_options import add_config_options, config_from_args, options_from_args
from .config_checks import one_of
from .data import DatasetError

Handler = Callable[[argparse.Namespace], int]


def _prepare(function: Callable) -> Handler:
    """The handler of ``prepare SOURCE``: ``function`` (a ``prepare_*`` of :mod:`flower_rec.data`)
    with the parsed options, its progress lines printed."""

    def handler(args: argparse.Namespace) -> int:
        function(**options_from_args(function, args), log=print)
        return 0

    return handler


def _stats(args: argparse.Namespace) -> int:
    from .stats import dataset_stats, format_stats

    stats = dataset_stats(args.data, **options_from_args(dataset_stats, args))
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


SUMMARY_METRICS = (
    "NDCG@10", "HR@10", "DGU", "MGU", "word_entropy", "type_token_ratio", "distinct_titles",
    "invalid_outputs",
)


#: The arguments of :func:`flower_rec.evaluate.evaluate` that are objects there and paths on the
#: command line (the guidance prior and the target distribution are JSON files of counts).
EVALUATE_OBJECTS = ("model", "tokenizer", "dataset", "target_distribution", "guidance_prior")


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
    options = options_from_args(evaluate, args, skip=EVALUATE_OBJECTS)
    evaluation = evaluate(model, tokenizer, dataset, target_distribution=target,
                          guidance_prior=prior, **options)
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
    model, report = train_sasrec(dataset, **options_from_args(train_sasrec, args))
    exclude = args.exclude_history
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
    ranked = "all items but the user's history" if exclude else "all items"
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


def _training_parser():
    """``flower-rec train``'s options: :func:`transformers.HfArgumentParser` of the three
    configuration classes (every field a flag, its help from the field), and ``--config``."""
    from transformers import HfArgumentParser

    from .training import CONFIG_CLASSES, METHOD_OPTIONS

    parser = HfArgumentParser(
        CONFIG_CLASSES,
        prog="flower-rec train",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file of training options (the flags' names, "
                        "e.g. eval_steps); flags given as well override it")
    # --help lists the data, the model and the method before the Trainer's ~130 options:
    # argparse's groups are shown in their list's order.
    method = parser.add_argument_group("the method (FlowerConfig's own options)")
    for action in list(parser._optionals._group_actions):
        if action.dest in METHOD_OPTIONS:
            parser._optionals._group_actions.remove(action)
            method._group_actions.append(action)
    parser._optionals.title = "the Trainer (transformers.TrainingArguments, our defaults shown)"
    parser._action_groups.append(parser._action_groups.pop(1))  # the optionals, last
    return parser


TRAIN_DESCRIPTION = (
    "Fine-tunes a Hugging Face causal LM (default: a tiny Llama-style model with a BPE tokenizer "
    "trained on the dataset) on transformers.Trainer. sft is the BIGRec baseline; flower adds "
    "(1 - theta) x modified sub-trajectory balance on one on-policy trie rollout per sample (or "
    "teacher-forced flow matching). Every transformers.TrainingArguments option is a flag too "
    "(--optim, --lr-scheduler-type, --report-to, --gradient-checkpointing, ...). Checkpoints "
    "every --save-steps; --resume continues an interrupted run. --eval-steps adds the "
    "validation loss (eval_loss in metrics.jsonl), --early-stopping-patience stops on it and "
    "keeps the best checkpoint. Options may also come from a YAML file (--config)."
)


def _train(args: argparse.Namespace) -> int:
    from .files import read_yaml
    from .training import configs_from_options, train

    parser = _training_parser()
    for action in parser._actions:  # data and output_dir may come from the file
        action.required = False
    # argparse sets a default only where the namespace lacks the attribute: a namespace that has
    # them all, unset, keeps exactly the flags given, to merge over the file.
    unset = object()
    namespace = argparse.Namespace(**{action.dest: unset for action in parser._actions})
    parsed = vars(parser.parse_args(args.arguments, namespace=namespace))
    given = {name: value for name, value in parsed.items() if value is not unset}
    options = {}
    config_file = given.pop("config", None)
    if config_file:
        options = read_yaml(config_file)
        if options is None:  # an empty file
            options = {}
        if not isinstance(options, dict):
            raise ValueError(f"{config_file}: expected a mapping of training options")
    options.update(given)
    model, data, training = configs_from_options(options)
    run = train(training, data, model)
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
    rows = screen(dataset, probabilities, **options_from_args(screen, args))
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
    parser.add_argument("--version", action="version", version=f"flower-rec {__version__}")
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


#: The ``--out`` of ``prepare SOURCE``, which the ``prepare_*`` functions make optional.
_DATASET_OUT = {"required": True, "help": "the dataset folder to write (created)"}


def _add_prepare(commands) -> None:
    from .data import prepare_amazon, prepare_movielens, prepare_synthetic

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
    movielens = sources.add_parser(
        "movielens",
        help="MovieLens ml-100k or ml-1m raw files",
        description="Reads ml-100k (u.data, u.item) or ml-1m (ratings.dat, movies.dat) and builds "
        "the same 5-core, history and split pipeline; titles keep their year.",
    )
    synthetic = sources.add_parser(
        "synthetic",
        help="the embedded synthetic catalog (the demo's default)",
        description="A deterministic synthetic video-game store: long-tailed popularity, users "
        "with taste clusters, readable titles that share prefixes (series, editions, platforms).",
    )
    for source, function in ((amazon, prepare_amazon), (movielens, prepare_movielens),
                             (synthetic, prepare_synthetic)):
        add_config_options(source, function, {}, skip=("log",), extra={"out": _DATASET_OUT})
        source.set_defaults(handler=_prepare(function))


def _add_stats(commands) -> None:
    from .stats import dataset_stats

    stats = commands.add_parser(
        "stats",
        help="dataset statistics and popularity groups",
        description="Items, unique titles, samples per split, history lengths, popularity "
        "counts, the 8 equal-size popularity groups and their training shares GH.",
    )
    stats.add_argument("--data", required=True, help="dataset folder")
    add_config_options(stats, dataset_stats, {}, skip=("dataset",))
    stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    stats.set_defaults(handler=_stats)


def _add_train(commands) -> None:
    # The options are parsed by _train (transformers' HfArgumentParser of the configuration
    # classes), which also answers --help.
    training = commands.add_parser(
        "train", help="fine-tune a causal LM recommender with SFT or Flower", add_help=False,
    )
    training.set_defaults(handler=_train)


def _add_evaluate(commands) -> None:
    from .decoding import GUIDANCE_FORMS
    from .evaluate import EVALUATE_RULES, evaluate

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
    evaluation.add_argument("--out", required=True, help="output folder (created)")
    add_config_options(
        evaluation, evaluate, {**EVALUATE_RULES, "guidance_form": one_of(GUIDANCE_FORMS)},
        skip=EVALUATE_OBJECTS,
        extra={"guidance": {"metavar": "BETA|auto"}},
    )
    evaluation.add_argument(
        "--guidance-prior", metavar="JSON",
        help="JSON {title: count} of the guidance prior (default: training popularity)",
    )
    evaluation.add_argument(
        "--target-distribution", metavar="JSON",
        help="JSON {title: count} to compare the recommended titles with (KL(m||b), KL(b||m), JS)",
    )
    evaluation.set_defaults(handler=_evaluate)


def _add_train_aux(commands) -> None:
    from .auxiliary import train_sasrec

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
    add_config_options(train_aux, train_sasrec, {}, skip=("dataset", "ks"))
    train_aux.add_argument(  # the flag of earlier versions
        "--include-history", dest="exclude_history", action="store_false",
        default=argparse.SUPPRESS, help="the same as --no-exclude-history",
    )
    train_aux.set_defaults(handler=_train_aux)


def _add_screen(commands) -> None:
    from .data import SPLITS
    from .screen import screen

    screening = commands.add_parser(
        "screen",
        help="what each reward's exact top-K would give, before any training",
        description="Scores every user's items by each reward variant (logp; with --aux also "
        "the personalised logp_div_s, logp_add_logs and p_div_pop) and takes the exact top-K: "
        "what beam search on a model that fits the reward perfectly converges to. Prints "
        "NDCG/HR@K, DGU, "
        "MGU, word entropy, distinct titles and the targets' entropy, beside SASRec's own top-K "
        "and SASRec's scores under flow guidance at several betas (with --aux). --thetas adds "
        "each reward mixed with p_u, theta p_u + (1 - theta) R_u / Z_u: what SFT at weight "
        "theta plus a flow term at 1 - theta converge to, both being cross-entropies.",
    )
    screening.add_argument("--data", required=True, help="dataset folder")
    screening.add_argument("--aux", help="a train-aux output folder (SASRec giving p_u)")
    screening.add_argument("--out", help="also write screen.json into this folder")
    add_config_options(screening, screen, {"split": one_of(SPLITS)},
                       skip=("dataset", "probabilities"))
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
    parser = build_parser()
    args, arguments = parser.parse_known_args(argv)
    if arguments and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(arguments)}")
    args.arguments = arguments
    try:
        return args.handler(args)
    except (DatasetError, FileNotFoundError, OSError, ValueError) as error:
        print(f"flower-rec {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
