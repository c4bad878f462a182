"""`rollmill train | eval | export | samples | algos | plot | view | simulate | mixlaw`: the command line over the pipelines."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from rollmill.checks import load_run_config
from rollmill.config import ConfigError, RunConfig
from rollmill.config.presets import ALGORITHMS
from rollmill.sandbox.cli import add_sandbox_parser
from rollmill.simulate.cli import add_simulate_parser
from rollmill.terminal import add_tasks_parser

log = logging.getLogger("rollmill")


def _latest_run(cfg: RunConfig) -> Path | None:
    runs = sorted(Path(cfg.log.run_root).glob(f"{cfg.name}-*"))
    return runs[-1] if runs else None


def _fmt(metrics: dict | None) -> str:
    if not metrics:
        return "n/a"
    # failures are shown whenever there are any: a score over broken episodes must not look clean
    return " ".join(f"{k.removeprefix('eval/')}={v:.0f}" if k == "eval/failed" else f"{k.removeprefix('eval/')}={v:.3f}"
                    for k, v in metrics.items() if k != "eval/failed" or v > 0)


def cmd_train(args) -> int:
    config_path = args.config
    if config_path is None and args.resume and args.run_dir and (Path(args.run_dir) / "config.yaml").is_file():
        config_path = Path(args.run_dir) / "config.yaml"
    cfg = load_run_config(config_path, args.set)
    from rollmill.pipelines.common import new_run_dir
    from rollmill.runtime import train

    run_dir = Path(args.run_dir) if args.run_dir else (_latest_run(cfg) if args.resume else None) or new_run_dir(cfg)
    log.info("run directory: %s", run_dir)
    result = train(cfg, run_dir, resume=args.resume, overwrite=args.overwrite)
    print(f"held-out before: {_fmt(result.eval_before)}")
    print(f"held-out after:  {_fmt(result.eval_after)}")
    if cfg.pipeline == "cascade":
        from rollmill.runtime.cascade import read_summary

        summary = read_summary(result.run_dir)
        by_stage = " ".join(f"{stage}={acc:.3f}" for stage, acc in summary["accuracy"].items())
        print(f"accuracy by stage: {by_stage or 'n/a'}")
        print(f"final checkpoint: {summary['final_checkpoint'] or 'none (no stage trained)'}")
    print(f"run directory:   {result.run_dir}")
    return 0


def _newest_checkpoint(run_dir: Path) -> tuple[Path, Path]:
    """(checkpoint, the run directory it belongs to) for `run_dir`: its newest checkpoint, or for a cascade's
    run directory the final checkpoint of its last trained stage (in that stage's directory)."""
    from rollmill.runtime.cascade import read_summary
    from rollmill.train import list_checkpoints

    summary = read_summary(run_dir)
    if summary is not None:
        if summary["final_checkpoint"] is None:
            raise ConfigError(f"{run_dir} holds a cascade in which no stage has trained yet: no checkpoint")
        checkpoint = Path(summary["final_checkpoint"])
        return checkpoint, checkpoint.parent.parent
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if not ckpts:
        raise ConfigError(f"{run_dir} is neither a checkpoint nor a run directory with checkpoints")
    return ckpts[-1], run_dir


def cmd_eval(args) -> int:
    from rollmill.runtime import evaluate

    target = Path(args.target) if args.target else None
    checkpoint, run_dir = _newest_checkpoint(target) if target is not None and target.is_dir() else (None, None)
    cfg = load_run_config(run_dir / "config.yaml" if run_dir else target, args.set)
    overrides = {k: v for k, v in (("n", args.n), ("temperature", args.temperature)) if v is not None}
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update=overrides)})
    metrics, count = evaluate(cfg, checkpoint)
    what = f"held-out {cfg.env.name} episodes" if cfg.pipeline == "agentic" else "held-out prompts"
    print(f"{checkpoint or 'initial weights'}: {count} {what}: {_fmt(metrics)}")
    return 0


def cmd_export(args) -> int:
    from rollmill.runtime import export

    target = Path(args.target)
    if (target / "state.json").is_file():  # a checkpoint folder: its run is two levels up
        checkpoint, run_dir = target, target.parent.parent
    else:
        checkpoint, run_dir = _newest_checkpoint(target)
    cfg = load_run_config(run_dir / "config.yaml")
    try:
        out = export(cfg, checkpoint, Path(args.out))
    except FileExistsError as err:
        raise ConfigError(str(err)) from None
    print(f"{checkpoint} -> {out} (transformers folder; open it with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_samples(args) -> int:
    from rollmill.track import format_samples, read_jsonl

    records = read_jsonl(Path(args.run_dir) / "samples.jsonl")
    if not records:
        raise ConfigError(f"{args.run_dir} has no samples.jsonl")
    step = args.step if args.step is not None else records[-1]["step"]
    print(format_samples([r for r in records if r["step"] == step]) or f"no samples at step {step}")
    return 0


def _plot_paths(args) -> tuple[Path, Path]:
    """(run directory, image to write), checked here because matplotlib's errors name neither the run
    nor the option, and an unknown extension would only fail after the figure is drawn."""
    from matplotlib.backend_bases import FigureCanvasBase

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "curves.png"
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist (or is not a directory): nothing to plot")
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl: nothing to plot (is it a run directory?)")
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write the plot to {out}: folder {out.parent} does not exist")
    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if out.suffix.removeprefix(".").lower() not in formats:
        raise ConfigError(f"cannot write the plot to {out}: the file name must end in an image extension, "
                          f"one of {formats}")
    return run_dir, out


def cmd_plot(args) -> int:
    from rollmill.track import plot_run

    run_dir, out = _plot_paths(args)
    try:
        print(plot_run(run_dir, out))
    except FileNotFoundError as err:  # metrics.jsonl holds no record
        raise ConfigError(str(err)) from None
    except OSError as err:
        raise ConfigError(f"cannot write the plot to {out}: {err.strerror or err}") from None
    return 0


def cmd_view(args) -> int:
    from rollmill.view import make_server, url_of

    missing = [d for d in args.run_dirs if not Path(d).is_dir()]
    if missing:
        raise ConfigError(f"not a directory: {', '.join(missing)}")
    try:
        server = make_server([Path(d) for d in args.run_dirs], args.port)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    except OSError as err:  # the port is taken
        raise ConfigError(f"cannot listen on 127.0.0.1:{args.port}: {err.strerror or err} (try --port 0)") from None
    print(f"rollmill view: {url_of(server)} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _first_line(obj) -> str:
    """The first sentence of a docstring, on one line."""
    paragraph = " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".")


def cmd_algos(args) -> int:
    import rollmill.algos as algos
    from rollmill.rewards import REWARDS

    sections = [
        ("presets (algorithm.name)", {k: p.description for k, p in ALGORITHMS.items()}),
        ("advantage estimators (algorithm.advantage)", {**{k: _first_line(f) for k, f in algos.ADVANTAGES.items()},
                                                        **{k: _first_line(f) for k, f in algos.TOKEN_ADVANTAGES.items()},
                                                        **_EXTRA_ADVANTAGES}),
        ("policy losses (algorithm.loss)", {k: _first_line(f) for k, f in algos.POLICY_LOSSES.items()}),
        ("KL estimators (algorithm.kl_estimator)", {k: _first_line(f) for k, f in algos.KL_ESTIMATORS.items()}),
        ("loss aggregations (algorithm.loss_agg)", {k: _AGG_HELP[k] for k in algos.LOSS_AGGREGATIONS}),
        ("reward functions (reward.functions[].name; or your own as module:attr or file.py:attr)",
         {**{k: _first_line(f) for k, f in REWARDS.items()}, **_plugins("reward function")}),
        ("task sources (task.source; or your own loader as module:attr or file.py:attr)",
         {"arithmetic": "built-in generators (task.name)", "reasoning_gym": "a reasoning-gym dataset (task.name)",
          "file": "a JSONL/JSON/Parquet file or datasets folder (task.path)",
          "hub": "a Hugging Face Hub dataset in the local cache, read offline (task.name)", **_plugins("task source")}),
    ]
    for title, entries in sections:
        print(title)
        for name, text in entries.items():
            print(f"  {name:<24} {text}")
        print()
    return 0


def cmd_envs(args) -> int:
    from rollmill.envs import ENVS

    for name, spec in sorted(ENVS.items()):
        print(f"  {name:<14} {spec.description}")
        print(f"  {'':<14} kwargs: {', '.join(spec.parameters()) or '-'}")
    for name, text in _plugins("env").items():
        print(f"  {name:<14} {text}")
    print("  (or your own env class as env.name: module:attr or file.py:attr)")
    return 0


def _plugins(what: str) -> dict[str, str]:
    """Entry points installed packages declare for `what`, described by where they point."""
    from rollmill.plugins import installed

    return {name: f"plugin: {target}" for name, target in sorted(installed(what).items())}


def cmd_mixlaw(args) -> int:
    from rollmill import mixlaw

    try:
        if args.action == "fit":
            table = mixlaw.read_table(args.table)
            laws = mixlaw.fit_table(table)
            print(mixlaw.format_fit(laws, table))
            if args.out:
                mixlaw.save_params(args.out, laws, table)
                print(f"params written to {args.out}")
        else:
            laws = mixlaw.load_params(args.params)
            print(mixlaw.format_prediction(laws, args.N, args.D, args.r, args.tolerance, args.general_ref))
    except mixlaw.MixlawError as err:
        raise ConfigError(str(err)) from None
    return 0


_EXTRA_ADVANTAGES = {
    "normalized": "composed from algorithm.norm_mean, norm_std, reward_clip, advantage_clip, whiten_advantages",
    "gae": "GAE over a learned value model (the ppo preset)",
}

_AGG_HELP = {
    "token-mean": "every valid token weighs the same (DAPO, Lite PPO)",
    "token-sum": "sum over every valid token, no denominator",
    "seq-mean-token-sum": "sum over a sequence's tokens, mean over sequences",
    "seq-mean-token-mean": "mean over a sequence's tokens, then over sequences (original GRPO)",
    "seq-mean-token-sum-norm": "sum over tokens divided by a constant length (Dr.GRPO)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollmill", description="RL post-training for LLMs and agents.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sets = dict(action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-5")

    p = sub.add_parser("train", help="train a policy (default config: the main job)")
    p.add_argument("config", nargs="?", help="YAML config (default: the packaged main job)")
    p.add_argument("--set", **sets)
    p.add_argument("--run-dir", help="run directory (default: runs/NAME-TIMESTAMP)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --run-dir (its files are removed)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="pass@1 / pass@k on the held-out split")
    p.add_argument("target", nargs="?", help="a run directory (latest checkpoint; a cascade's: its final one) "
                                             "or a YAML config (initial weights)")
    p.add_argument("--set", **sets)
    p.add_argument("--n", type=int, default=None, help="samples per prompt (pass@k for k <= n)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a checkpoint as a standalone transformers folder (LoRA merged)")
    p.add_argument("target", help="a run directory (latest checkpoint; a cascade's: its final one) or one of its "
                                  "checkpoints/step_N folders")
    p.add_argument("out", help="the new model folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("algos", help="list presets, advantage estimators, losses, KL estimators")
    p.set_defaults(func=cmd_algos)

    p = sub.add_parser("envs", help="list the registered environments (env.name) and their kwargs")
    p.set_defaults(func=cmd_envs)

    p = sub.add_parser("samples", help="print one step's sample episodes or completions readably")
    p.add_argument("run_dir")
    p.add_argument("--step", type=int, default=None, help="which step (default: the last)")
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser("plot", help="write RUN_DIR/curves.png")
    p.add_argument("run_dir")
    p.add_argument("--out", help="the image to write (default: RUN_DIR/curves.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("view", help="browse runs' curves and samples in a local web page (127.0.0.1 only)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories; their curves are overlaid")
    p.add_argument("--port", type=int, default=8787, help="port to listen on (0 = any free port)")
    p.set_defaults(func=cmd_view)

    add_simulate_parser(sub)

    p = sub.add_parser("mixlaw", help="fit the D-CPT mixture law to small runs, predict losses, pick a ratio")
    p.set_defaults(func=cmd_mixlaw)
    mix = p.add_subparsers(dest="action", required=True)
    q = mix.add_parser("fit", help="fit one law per loss column of a CSV (N, D, r, domain_loss and/or general_loss)")
    q.add_argument("table", help="CSV of runs")
    q.add_argument("--out", help="write the fitted parameters to this JSON file")
    q = mix.add_parser("predict", help="predicted losses over mixture ratios and the optimal domain ratio")
    q.add_argument("params", help="JSON written by `rollmill mixlaw fit --out`")
    q.add_argument("--N", type=float, required=True, help="model size, in the table's units")
    q.add_argument("--D", type=float, required=True, help="training tokens, in the table's units")
    q.add_argument("--r", type=float, default=None, help="also show this domain ratio")
    q.add_argument("--tolerance", type=float, default=None,
                   help="relative rise of the general loss allowed, e.g. 0.03 (needs a general_loss law)")
    q.add_argument("--general-ref", type=float, default=None,
                   help="general loss the tolerance is relative to (default: the lowest any fitted ratio reaches)")

    add_sandbox_parser(sub)
    add_tasks_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe raises here, where it is handled, not at exit ("Exception ignored")
        return code
    except ConfigError as err:
        print(f"rollmill: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _output_closed()


def _output_closed() -> int:
    """Stdout's reader went away (`rollmill samples RUN | head`): stop quietly, as `cat` or `seq` do.

    Stdout is pointed at /dev/null (the Python docs' recipe for SIGPIPE) because the interpreter flushes
    it once more at exit, which would fail again and print "Exception ignored ... BrokenPipeError". The
    exit status is 141 (128 +
    SIGPIPE), what a shell reports for a tool stopped by a closed pipe, so `set -o pipefail` scripts treat
    a cut-short listing like any other tool's."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


def package_version() -> str:
    """The installed distribution's version; the source tree's `rollmill.__version__` when run uninstalled."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rollmill")
    except PackageNotFoundError:
        import rollmill

        return getattr(rollmill, "__version__", "unknown")


if __name__ == "__main__":
    sys.exit(main())
