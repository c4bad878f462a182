"""A real D-CPT table on this machine: tiny Llamas continually pre-trained on a general/domain mixture,
then the mixture law (rollmill.mixlaw, docs/mixlaw.md) fitted to it against a baseline law.

Corpora, both built here with no download from the Python standard library's top-level modules,
read with `ast`; every tenth file is held out of both:
  general  their docstrings: English prose;
  domain   their code, without docstrings or comments (`ast.unparse`): a code domain, the D-CPT
           paper's own first example. (Arithmetic questions from rollmill's task generators were
           tried first: tiny models reach that corpus' floor within the budget, and the fit failed.)

For each model size (rollmill's tiny Llama, character tokenizer) a base model is first trained on the
general corpus alone; from it, one continual pre-training run per domain share r trains on batches
with exactly r of the sequences from the domain corpus, and is evaluated on both held-out corpora
after D = 1/8, 1/4, 1/2 and all of its tokens (constant learning rate, so an early checkpoint is a
valid shorter run). N counts non-embedding parameters. The rows go to table.csv.

The law is then fitted to all rows, to all rows but the r = 1/2 ones (predicting that unseen share),
and to all rows but the largest D (predicting more tokens); the baseline law, the same form without
the r^eta interaction, goes through the same three fits in the same run.

    nice -n 19 .venv/bin/python benchmarks/mixlaw_table.py                 # about 5-10 CPU minutes
    .venv/bin/python benchmarks/mixlaw_table.py --sizes h32,h64 --base-steps 8 --cpt-steps 16 --out /tmp/m
    .venv/bin/python benchmarks/mixlaw_table.py --refit                    # fit the saved table again

Ends with one line `RESULT key=value ...`.
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from rollmill import mixlaw
from rollmill.models import build_char_tokenizer, build_tiny_model

SIZES = {
    "h32": dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
    "h64": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
    "h128": dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256),
}
BATCH, SEQ = 16, 64  # 1,024 tokens a step; shares are whole numbers of sequences out of 16
RATIOS = (2 / 16, 4 / 16, 8 / 16, 12 / 16, 14 / 16)
HELD_OUT_RATIO = 8 / 16
EVAL_WINDOWS = 64  # held-out windows per corpus
LR, WARMUP = 3e-3, 10  # at 1e-3 the runs were still in their early, not power-law, phase
TOLERANCE = 0.03  # the optimal-ratio example: general loss at most 3% above the lowest any share reaches
DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, DOCUMENTED) and ast.get_docstring(node) is not None:
            node.body = node.body[1:] or [ast.Pass()]
    return tree


def corpora() -> dict[str, str]:
    """general, general_eval, domain, domain_eval text from the stdlib's top-level modules: their
    docstrings and their code without docstrings or comments; every tenth file is held out of both."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    parts = {key: [] for key in ("general", "general_eval", "domain", "domain_eval")}
    for i, path in enumerate(files):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        suffix = "_eval" if i % 10 == 0 else ""
        parts["general" + suffix] += [doc for n in ast.walk(tree)
                                      if isinstance(n, DOCUMENTED) and (doc := ast.get_docstring(n))]
        parts["domain" + suffix].append(ast.unparse(_strip_docstrings(tree)))  # unparse drops comments
    return {key: "\n".join(texts) for key, texts in parts.items()}


def encode(text: str, vocab: dict[str, int]) -> torch.Tensor:
    return torch.tensor([vocab[c] for c in text if c in vocab], dtype=torch.long)


def windows(ids: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
    """`count` random windows of SEQ tokens."""
    starts = torch.randint(0, len(ids) - SEQ, (count,), generator=gen)
    return torch.stack([ids[s:s + SEQ] for s in starts.tolist()])


def held_out(ids: torch.Tensor) -> torch.Tensor:
    """EVAL_WINDOWS windows spread evenly over a held-out stream: the same ones for every run."""
    starts = np.linspace(0, len(ids) - SEQ - 1, EVAL_WINDOWS).astype(int)
    return torch.stack([ids[s:s + SEQ] for s in starts])


@torch.no_grad()
def mean_loss(model, batch: torch.Tensor) -> float:
    model.eval()
    losses = [float(model(input_ids=chunk, labels=chunk).loss) for chunk in batch.split(BATCH)]
    model.train()
    return float(np.mean(losses))


def train(model, steps: int, lr: float, batch_fn, on_step=None) -> None:
    """AdamW at a constant lr after a linear warmup; `on_step(step)` runs after each step."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / WARMUP)
        batch = batch_fn()
        model(input_ids=batch, labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if on_step is not None:
            on_step(step)


def run_size(name: str, data: dict, base_steps: int, cpt_steps: int, vocab_size: int) -> tuple[list[dict], float]:
    """The table rows of one model size, and its base model's general held-out loss."""
    model = build_tiny_model(vocab_size, seed=0, **SIZES[name])
    n_params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    gen = torch.Generator().manual_seed(0)
    train(model, base_steps, LR, lambda: windows(data["general"], BATCH, gen))
    base_general = mean_loss(model, data["general_eval"])
    checkpoints = {cpt_steps // 8, cpt_steps // 4, cpt_steps // 2, cpt_steps}
    rows = []
    for r in RATIOS:
        cpt, n_domain = copy.deepcopy(model), round(r * BATCH)
        gen = torch.Generator().manual_seed(1)

        def mixed_batch():
            return torch.cat([windows(data["domain"], n_domain, gen), windows(data["general"], BATCH - n_domain, gen)])

        def evaluate(step):
            if step in checkpoints:
                rows.append({"size": name, "N": n_params, "D": step * BATCH * SEQ, "r": r,
                             "domain_loss": mean_loss(cpt, data["domain_eval"]),
                             "general_loss": mean_loss(cpt, data["general_eval"])})

        train(cpt, cpt_steps, LR, mixed_batch, evaluate)
        last = rows[-1]
        print(f"  {name} N={n_params} r={r:.4f}: domain {last['domain_loss']:.4f} general {last['general_loss']:.4f}",
              flush=True)
    return rows, base_general


def fit_errors(table: mixlaw.Table, train_rows: np.ndarray, test_rows: np.ndarray, interaction: bool) -> dict:
    """Fit each loss column on `train_rows` and return its relative errors on `test_rows`, with the laws."""
    out = {}
    for column, loss in table.losses.items():
        share = mixlaw.share_for(column, table.r)
        law = mixlaw.fit(table.N[train_rows], table.D[train_rows], share[train_rows], loss[train_rows],
                         interaction=interaction)
        out[column] = (law, mixlaw.relative_errors(law, table.N[test_rows], table.D[test_rows], share[test_rows],
                                                   loss[test_rows]))
    return out


def rms(errors: dict) -> float:
    """RMS relative error over all loss columns together."""
    return float(np.sqrt(np.mean(np.concatenate([e for _, e in errors.values()]) ** 2)))


def make_table(args, out: Path) -> None:
    """Train every run and write OUT/table.csv (with each size's base general loss, for reference)."""
    vocab = build_char_tokenizer().get_vocab()
    data = {key: encode(text, vocab) for key, text in corpora().items()}
    data["general_eval"], data["domain_eval"] = held_out(data["general_eval"]), held_out(data["domain_eval"])
    print(f"general corpus {len(data['general'])} train chars; domain corpus {len(data['domain'])} train chars")
    rows = []
    for name in args.sizes.split(","):
        size_rows, base_general = run_size(name, data, args.base_steps, args.cpt_steps, len(vocab))
        rows += [{**row, "base_general_loss": base_general} for row in size_rows]
    with open(out / "table.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def analyse(out: Path) -> tuple[list[str], dict]:
    """Fit the law and the baseline to OUT/table.csv three ways; the report lines and RESULT values."""
    table = mixlaw.read_table(out / "table.csv")
    with open(out / "table.csv", newline="") as fh:
        base_general = {row["size"]: float(row["base_general_loss"]) for row in csv.DictReader(fh)}
    everything = np.ones(len(table.r), dtype=bool)
    unseen_r, unseen_d = np.isclose(table.r, HELD_OUT_RATIO), table.D == table.D.max()
    fits = {(law, split): fit_errors(table, train, test, interaction=law == "dcpt")
            for law in ("dcpt", "baseline")
            for split, (train, test) in {"all": (everything, everything), "r": (~unseen_r, unseen_r),
                                         "D": (~unseen_d, unseen_d)}.items()}
    laws = {column: law for column, (law, _) in fits["dcpt", "all"].items()}
    mixlaw.save_params(out / "params.json", laws, table)
    N, D = table.N.max(), table.D.max()
    choice = mixlaw.optimal_ratio(laws["domain_loss"], N, D, laws["general_loss"], TOLERANCE)
    summary = {"rows": len(table.r),
               "dcpt_rms_rel_err": rms(fits["dcpt", "all"]),
               "dcpt_max_rel_err": max(float(np.abs(e).max()) for _, e in fits["dcpt", "all"].values()),
               "baseline_rms_rel_err": rms(fits["baseline", "all"]),
               "dcpt_unseen_r_rms": rms(fits["dcpt", "r"]), "baseline_unseen_r_rms": rms(fits["baseline", "r"]),
               "dcpt_unseen_D_rms": rms(fits["dcpt", "D"]), "baseline_unseen_D_rms": rms(fits["baseline", "D"]),
               **{f"domain_{k}": getattr(laws["domain_loss"], k) for k in ("alpha", "beta", "eta", "gamma")},
               **{f"general_{k}": getattr(laws["general_loss"], k) for k in ("alpha", "beta", "eta", "gamma")},
               "opt_r_tol3": choice.r}
    report = [mixlaw.format_fit(laws, table), "",
              "base models' general held-out loss: " + " ".join(f"{k}={v:.4f}" for k, v in base_general.items()),
              f"optimal domain share at N={N:g}, D={D:g} with the general loss at most {TOLERANCE:.0%} above the "
              f"lowest any share reaches ({choice.general_limit:.4f}): r={choice.r:.4f} "
              f"(domain {choice.domain_loss:.4f}, general {choice.general_loss:.4f})"]
    return report, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="h32,h64,h128", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--base-steps", type=int, default=200, help="general-only steps of each base model")
    parser.add_argument("--cpt-steps", type=int, default=384, help="mixture steps of each run (a multiple of 8)")
    parser.add_argument("--out", default="benchmarks/results/mixlaw", help="folder for table.csv, fit.txt, params.json")
    parser.add_argument("--refit", action="store_true", help="train nothing: fit OUT/table.csv again")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models: one thread is as fast and leaves the other core alone
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.process_time()
    if not args.refit:
        make_table(args, out)
    train_s = time.process_time() - started
    report, summary = analyse(out)
    summary["mode"] = "refit" if args.refit else "trained"
    if not args.refit:
        summary["train_cpu_s"] = train_s
    summary["fit_cpu_s"] = time.process_time() - started - train_s
    report += ["", "RESULT " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in summary.items())]
    (out / "fit.txt").write_text("\n".join(report) + "\n")
    print("\n".join(report))


if __name__ == "__main__":
    main()
