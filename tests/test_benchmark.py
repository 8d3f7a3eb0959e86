"""The benchmark protocol: seeds that mean one thing each, the synthetic benchmark's phrasings
and held-out authors, the held-out stopping rule, NPO and GradDiff against their naive
formulas, the weak-benchmark check, and rkld sweep / rkld benchmark end to end on tiny sizes."""
import json
import math

import pytest
import torch

from rkld import metrics
from rkld.benchmark import (
    METHODS,
    Protocol,
    Runner,
    WeakBenchmark,
    measure,
    parse_grid,
    run_benchmark,
    run_sweep,
)
from rkld.config import FinetuneConfig, StrengthenConfig, UnlearnConfig
from rkld.data import collate, load_benchmark
from rkld.runs import data_mismatches
from rkld.synthetic import generate_synthetic
from rkld.train import TrainData, _encode, _UnlearnObjective, finetune, npo_loss_sum, strengthen

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64}
FAST = dict(max_length=48, progress=False, lr=5e-3, max_authors=10)


# --------------------------------------------------------------------------- data and seeds

def test_phrasings_train_several_wordings_and_keep_one_evaluation_row():
    plain = load_benchmark("synthetic", max_authors=10)
    bench = load_benchmark("synthetic:phrasings=3", max_authors=10)
    questions = bench.split("forget10_perturbed")
    assert len(questions) == len(plain.split("forget10_perturbed")) == 10
    train = bench.split("forget10")
    assert len(train) > 2 * len(questions)          # two or three wordings per fact
    for row in questions:
        wordings = [r["answer"] for r in train if r["question"] == row["question"]]
        assert row["answer"] in wordings and len(set(wordings)) == len(wordings) >= 2
        # The truth ratio's wording is never trained on.
        assert row["paraphrased_answer"] not in wordings
        assert "train_answers" not in row
    # One wording per fact is exactly the original benchmark.
    assert plain.split("full") == [{"question": r["question"], "answer": r["answer"]}
                                   for r in plain.split("full")]
    with pytest.raises(ValueError, match="synthetic:NAME=INT"):
        load_benchmark("synthetic:wordings=3")


def test_holdout_authors_are_outside_every_training_split():
    bench = load_benchmark("synthetic", max_authors=30)
    holdout = bench.split("holdout10")
    assert len(holdout) == len(bench.split("forget10_perturbed")) == 30
    trained = {r["question"] for r in bench.split("full")}
    assert not trained & {r["question"] for r in holdout}
    # Adding held-out authors changes no other split.
    with_holdout = generate_synthetic(seed=4, n_authors=5, n_holdout=2)
    without = generate_synthetic(seed=4, n_authors=5, n_holdout=0)
    assert with_holdout["authors"] == without["authors"]
    assert with_holdout["world_facts"] == without["world_facts"]


def test_model_seed_and_data_seed_are_independent(tmp_path):
    runs = {}
    for name, seed, data_seed in (("a", 0, 0), ("b", 1, 0), ("c", 0, 1)):
        out, _ = finetune(FinetuneConfig(model="tiny", out=str(tmp_path / name), seed=seed,
                                         data_seed=data_seed, epochs=1, batch_size=32,
                                         micro_batch_size=32, tiny=TINY, **FAST))
        runs[name] = json.loads((out / "run.json").read_text())
    data = {name: run["data"]["full"] for name, run in runs.items()}
    assert data["a"] == data["b"] != data["c"]      # --seed never changes the benchmark
    assert runs["b"]["config"]["seed"] == 1 and runs["b"]["config"]["data_seed"] == 0
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in "ab"}
    assert weights["a"] != weights["b"]             # ... but it changes the model
    # rkld eval warns when its data differ from the model's run record.
    assert data_mismatches(tmp_path / "b", "synthetic", 0, 10) == []
    lines = data_mismatches(tmp_path / "c", "synthetic", 0, 20)
    assert any("data seed" in line and "--data-seed 1" in line for line in lines)
    assert any("--max-authors 10" in line for line in lines)
    assert any("benchmark" in line for line in data_mismatches(tmp_path / "a", "tofu", 0, 10))


def test_eval_prints_the_data_warning(tmp_path, capsys):
    from rkld.cli import main
    finetune(FinetuneConfig(model="tiny", out=str(tmp_path / "m"), data_seed=2, epochs=1,
                            batch_size=32, micro_batch_size=32, tiny=TINY, **FAST))
    assert main(["eval", "--model", str(tmp_path / "m"), "--max-authors", "10",
                 "--out", str(tmp_path / "e"), "--no-generation", "--no-progress",
                 "--max-length", "48"]) == 0
    err = capsys.readouterr().err
    assert "warning: data seed" in err and "--data-seed 2" in err


# --------------------------------------------------------------------------- objectives

def test_npo_loss_matches_the_naive_formula():
    generator = torch.Generator().manual_seed(0)
    lengths = [3, 1, 5]
    answer_ids = torch.repeat_interleave(torch.arange(3), torch.tensor(lengths))
    student = torch.randn(9, generator=generator, dtype=torch.float64, requires_grad=True)
    reference = torch.randn(9, generator=generator, dtype=torch.float64)
    beta = 0.3
    got = npo_loss_sum(student, reference, answer_ids, 3, beta)
    naive, start = 0.0, 0
    for n in lengths:
        log_ratio = student[start:start + n].sum() - reference[start:start + n].sum()
        # NPO: -(2 / beta) log sigmoid(-beta log(pi / pi_ref)), one per answer
        naive = naive + n * (-(2 / beta) * torch.log(torch.sigmoid(-beta * log_ratio)))
        start += n
    assert got.item() == pytest.approx(naive.item(), rel=1e-12)
    (g1,) = torch.autograd.grad(got, student)
    (g2,) = torch.autograd.grad(naive, student)
    assert torch.allclose(g1, g2, rtol=1e-10)
    # At the start of unlearning (student = reference) every answer costs (2 / beta) log 2.
    same = npo_loss_sum(reference, reference, answer_ids, 3, beta)
    assert same.item() == pytest.approx(9 * 2 / beta * math.log(2))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("bench_models")
    target, _ = finetune(FinetuneConfig(model="tiny", out=str(root / "target"), epochs=2,
                                        batch_size=32, micro_batch_size=32, tiny=TINY, **FAST))
    strong, _ = strengthen(StrengthenConfig(model=str(target), out=str(root / "strong"),
                                            epochs=1, batch_size=10, micro_batch_size=10,
                                            **FAST))
    return root, target, strong


def _objective_inputs(target, method, tmp_path, **overrides):
    """The unlearn objective of ``method`` with the original model as a live teacher, one
    forget batch and its paired retain batch."""
    from rkld.models import load_model
    from rkld.teacher_cache import LiveTeachers
    from rkld.train import _paired_retain
    cfg = UnlearnConfig(model=str(target), out=str(tmp_path / "u"), method=method,
                        **{**FAST, **overrides})
    model, tokenizer = load_model(target)
    bench = load_benchmark("synthetic", max_authors=10)
    forget = _encode(tokenizer, bench.split("forget10")[:4], cfg, "forget10")
    retain = _paired_retain(_encode(tokenizer, bench.split("retain90"), cfg, "retain90"), 4, 0)
    teachers = LiveTeachers({"original": load_model(target)[0]})
    data = TrainData(forget, retain, tokenizer.pad_token_id)
    objective = _UnlearnObjective(cfg, teachers, None)
    indices = [0, 1, 2, 3]
    return model, objective, indices, data.batch(indices, "cpu"), data.batch(indices, "cpu", True)


def _answer_log_probs(model, batch):
    """Per answer: the sum of log p(token) over its supervised tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    return picked.sum(1), keep.sum(1)


def test_npo_objective_in_the_loop_matches_naive(trained, tmp_path):
    _, target, _ = trained
    model, objective, indices, batch, retain = _objective_inputs(target, "npo", tmp_path,
                                                                 npo_beta=0.5)
    with torch.no_grad():       # a student that has moved away from the reference
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    forget_sum, retain_sum = objective(model, indices, batch, indices, retain)
    assert retain_sum is None
    from rkld.models import load_model
    reference = load_model(target)[0].eval()
    model.eval()
    student_lp, counts = _answer_log_probs(model, batch)
    with torch.no_grad():
        reference_lp, _ = _answer_log_probs(reference, batch)
    naive = (counts * (2 / 0.5) * torch.nn.functional.softplus(
        0.5 * (student_lp - reference_lp))).sum()
    assert forget_sum.item() == pytest.approx(naive.item(), rel=1e-4)


def test_graddiff_is_gradient_ascent_plus_retain_nll(trained, tmp_path):
    _, target, _ = trained
    model, objective, indices, batch, retain = _objective_inputs(target, "graddiff", tmp_path)
    model.eval()
    forget_sum, retain_sum = objective(model, indices, batch, indices, retain)
    forget_lp, _ = _answer_log_probs(model, batch)
    retain_lp, _ = _answer_log_probs(model, retain)
    assert forget_sum.item() == pytest.approx(forget_lp.sum().item(), rel=1e-4)   # -NLL
    assert retain_sum.item() == pytest.approx(-retain_lp.sum().item(), rel=1e-4)  # +NLL
    with pytest.raises(ValueError, match="graddiff"):
        UnlearnConfig(model=str(target), out=str(tmp_path / "x"), method="graddiff",
                      retain_term="kl").validate()


# --------------------------------------------------------------------------- stopping rule

def test_holdout_rule_stops_training_and_is_recorded(trained, tmp_path, monkeypatch):
    from rkld import stopping
    from rkld.train import unlearn
    _, target, strong = trained
    seen = []
    original_check = stopping.HoldoutStop.check

    def check(self, model, step):
        original_check(self, model, step)
        seen.append(step)
        return step >= 4            # the rule is met at the second check (every 2 steps)
    monkeypatch.setattr(stopping.HoldoutStop, "check", check)
    out, stats = unlearn(UnlearnConfig(model=str(target), strengthened=str(strong),
                                       out=str(tmp_path / "u"), epochs=3, batch_size=2,
                                       micro_batch_size=2, stop_at_holdout=True,
                                       stop_check_every=2, **FAST))
    assert seen == [2, 4] and stats["stopped_at_step"] == 4
    assert len(stats["stop_checks"]) == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and (out / "model.safetensors").exists()
    # The threshold is the held-out authors' probability under the original model.
    from rkld.models import load_model
    model, tokenizer = load_model(target)
    bench = load_benchmark("synthetic", max_authors=10)
    rule = stopping.HoldoutStop(bench, "forget10", tokenizer, 48)
    assert stats["stop_threshold"] == pytest.approx(rule.start(model), rel=1e-6)


def test_holdout_rule_compares_forget_and_holdout_probabilities(trained):
    from rkld.models import load_model
    from rkld.stopping import HoldoutStop, mean_answer_probability
    _, target, _ = trained
    model, tokenizer = load_model(target)
    bench = load_benchmark("synthetic", max_authors=10)
    rule = HoldoutStop(bench, "forget10", tokenizer, 48)
    threshold = rule.start(model)
    forget = mean_answer_probability(model, tokenizer, rule.forget)
    # By hand: exp(-avgNLL) of each held-out answer, averaged.
    batch = collate(rule.holdout, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    by_hand = torch.exp(-metrics.answer_average_nll(logits, batch["labels"])).mean().item()
    assert threshold == pytest.approx(by_hand, rel=1e-5)
    assert rule.check(model, 0) == (forget <= threshold)
    rule.threshold = forget + 1e-9
    assert rule.check(model, 1) is True
    with pytest.raises(ValueError, match="holdout10"):
        HoldoutStop(_without_holdout(bench), "forget10", tokenizer, 48)


def _without_holdout(bench):
    from rkld.data import Benchmark
    return Benchmark("no holdout", {k: bench.split(k) for k in bench.splits
                                    if not k.startswith("holdout")})


# --------------------------------------------------------------------------- the commands

def _protocol(out, **overrides) -> Protocol:
    settings = dict(out=str(out), data="synthetic:phrasings=2", data_seed=3, max_authors=10,
                    retain_seeds=(11, 12, 13), max_length=64, max_new_tokens=4,
                    tiny={"hidden": 32, "layers": 1, "intermediate": 64, "vocab": 300},
                    finetune_args="--epochs 2 --lr 5e-3 --batch-size 32 --micro-batch-size 32",
                    strengthen_args="--epochs 1 --lr 3e-3 --batch-size 16 "
                                    "--micro-batch-size 16",
                    unlearn_args="--epochs 1 --lr 1e-3 --batch-size 8 --micro-batch-size 8 "
                                 "--stop-at-holdout --stop-check-every 1",
                    log=False)
    settings.update(overrides)
    return Protocol(**settings)


def test_weak_benchmark_is_refused_or_flagged(monkeypatch, tmp_path):
    logs = {"forget_truth_ratio": {"value_by_index": {str(i): {"score": 0.1 + i / 200}
                                                      for i in range(100)}}}
    summary = {"model_utility": 0.5, "retain_Q_A_Prob": 0.9}
    runner = Runner(_protocol(tmp_path))
    monkeypatch.setattr(Runner, "target", lambda self, seed: tmp_path)
    monkeypatch.setattr(Runner, "evaluate", lambda self, model: (logs, summary))
    references = {11: logs, 12: logs, 13: logs}
    with pytest.raises(WeakBenchmark, match="already has median forget quality 1"):
        runner.check_target(1, references)
    flagged = Runner(_protocol(tmp_path, allow_weak=True)).check_target(1, references)
    assert flagged["weak"] and flagged["fq_median"] == pytest.approx(1.0)
    far = {"forget_truth_ratio": {"value_by_index": {str(i): {"score": 0.9 + i / 2000}
                                                     for i in range(100)}}}
    row = Runner(_protocol(tmp_path)).check_target(1, {11: far, 12: far, 13: far})
    assert row["fq_median"] < 1e-20 and "weak" not in row


def test_measure_reports_every_reference_and_ratios():
    def log(scores):
        return {"forget_truth_ratio": {"value_by_index": {str(i): {"score": s}
                                                          for i, s in enumerate(scores)}}}
    refs = {1: log([0.1, 0.2, 0.3]), 2: log([0.5, 0.6, 0.7]), 3: log([0.1, 0.25, 0.3])}
    model = log([0.1, 0.2, 0.3])
    row = measure(model, {"model_utility": 0.4, "retain_Q_A_Prob": 0.45, "retain_Q_A_ROUGE": 0.5},
                  refs, {"mu": 0.5, "retain_prob": 0.9, "retain_rouge": 1.0})
    expected = sorted(metrics.forget_quality(model, r) for r in refs.values())
    assert sorted(row["fq"].values()) == pytest.approx(expected)
    assert row["fq_median"] == pytest.approx(expected[1])
    assert (row["fq_min"], row["fq_max"]) == pytest.approx((expected[0], expected[2]))
    assert row["mu_ratio"] == pytest.approx(0.8) and row["retain_prob_ratio"] == pytest.approx(0.5)


def test_parse_grid():
    assert parse_grid(["lr=1e-4,3e-4", "--alpha=8"]) == [
        [("--lr", "1e-4"), ("--alpha", "8")], [("--lr", "3e-4"), ("--alpha", "8")]]
    assert parse_grid([]) == [[]]
    with pytest.raises(ValueError, match="FLAG=V1,V2"):
        parse_grid(["lr"])


def test_benchmark_and_sweep_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    names = [name for name, _ in METHODS]
    result = run_benchmark(_protocol(out, allow_weak=True), [1], names)
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["target", *names]
    for row in rows:
        assert len(row["fq"]) == 3 and row["fq_min"] <= row["fq_median"] <= row["fq_max"]
        assert 0.0 <= row["mu"] <= 1.0
    assert len(result["retain_vs_retain_fq"]) == 3
    report = (out / "benchmark.md").read_text()
    for name in names:
        assert f"| {name} |" in report
    assert "Benchmark too weak" in report or "fails the criterion" in report
    # The report holds the commands that rebuild every model, in order.
    rkld_commands = result["commands"]["models/data-3/seed-1/rkld"]
    assert [c.split()[1] for c in rkld_commands] == ["finetune", "strengthen", "unlearn", "eval"]
    assert "--data-seed 3" in rkld_commands[0] and "--seed 1" in rkld_commands[0]
    assert "--stop-at-holdout" in rkld_commands[2]
    retain = result["commands"]["models/data-3/retain-11"]
    assert "--seed 11" in retain[0] and "retain90" in retain[0]
    for png in ("benchmark_fq_vs_mu.png", "benchmark_fq_per_seed.png"):
        assert (out / png).stat().st_size > 1000
    # A second run reuses every finished stage (same commands, same inputs).
    again = run_benchmark(_protocol(out, allow_weak=True), [1], ["rkld"])
    assert not [k for k in again["stage_seconds"] if not k.startswith("eval/")]
    assert again["rows"][1]["fq"] == rows[1]["fq"]
    # The sweep runs every grid point on the tuning seed, beside the benchmark's models.
    sweep = run_sweep(_protocol(out, allow_weak=True), [1], ["rkld", "npo"],
                      ["alpha=4,8"])
    assert [r["run"] for r in sweep["rows"]] == ["rkld_alpha4", "rkld_alpha8", "npo_alpha4",
                                                 "npo_alpha8"]
    assert (out / "sweep_frontier.png").stat().st_size > 1000
    assert "| rkld | alpha=4 |" in (out / "sweep.md").read_text()


def test_benchmark_cli_refuses_bad_arguments(tmp_path, capsys):
    from rkld.cli import main
    assert main(["benchmark", "--out", str(tmp_path), "--method-args", "nosuch=--lr 1"]) == 2
    assert "unknown methods" in capsys.readouterr().err
    assert main(["sweep", "--out", str(tmp_path), "--grid", "lr"]) == 2
    assert "FLAG=V1,V2" in capsys.readouterr().err


def test_sweep_and_benchmark_check_every_stage_before_training(tmp_path, capsys):
    from rkld.cli import main
    out = tmp_path / "bench"
    cases = [
        (lambda: run_sweep(_protocol(out), [0], ["rkld"], ["nonsense=1"]),
         r"the unlearn stage of models/data-3/seed-0/rkld_nonsense1: --grid '--nonsense 1': "
         r"unrecognized arguments: --nonsense 1"),
        (lambda: run_sweep(_protocol(out), [0], ["rkld"], ["lr=1e-3,abc"]),
         r"rkld_lrabc: --grid '--lr abc': argument --lr: invalid float value: 'abc'"),
        (lambda: run_sweep(_protocol(out), [0], ["ga", "rkld"], ["alpha=-1"]),
         r"--grid '--alpha -1': alpha must be >= 0; got -1.0"),
        (lambda: run_benchmark(_protocol(out, unlearn_args="--epochs 0"), [1], ["rkld"]),
         r"seed-1/rkld: --unlearn-args '--epochs 0': argument --epochs: expected a positive "
         r"integer; got 0"),
        (lambda: run_benchmark(_protocol(out, method_args={"npo": "--npo-beta 0"}), [1],
                               ["rkld", "npo"]),
         r"seed-1/npo: --method-args npo= '--npo-beta 0': npo_beta must be > 0"),
        (lambda: run_benchmark(_protocol(out, finetune_args="--lr x"), [1], ["rkld"]),
         r"the finetune stage of models/data-3/retain-11: --finetune-args '--lr x'"),
        (lambda: run_benchmark(_protocol(out, tiny={"hidden": 30, "layers": 1,
                                                    "intermediate": 64, "vocab": 300}),
                               [1], ["rkld"]),
         r"the finetune stage of models/data-3/retain-11: tiny model: --tiny-hidden "
         r"\(hidden_size\) must be a multiple of 8"),
    ]
    for run, message in cases:
        with pytest.raises(ValueError, match=message):
            run()
        assert not (out / "models").exists()        # refused before any stage trained
    # From the command line: one line naming the stage and the flag's origin.
    assert main(["sweep", "--out", str(out), "--grid", "nonsense=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--grid '--nonsense 1': unrecognized arguments" in err
    assert err.startswith("rkld sweep: error: the unlearn stage of ")
