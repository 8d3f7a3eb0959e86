"""TOFU evaluation: log schema, consistency of per-example values, batching, stopping, reuse."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from rkld import evaluate, metrics
from rkld.cli import build_parser, main
from rkld.data import collate, encode_qa, load_benchmark
from rkld.evaluate import EvalConfig, evaluate_model
from rkld.models import build_tiny_model

UTILITY = metrics.MODEL_UTILITY_KEYS
CONFIG = EvalConfig(forget_split="forget10", max_new_tokens=6, batch_size=48,
                    generation_batch_size=40, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench_data():
    return load_benchmark("synthetic", max_authors=10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bench_data):
    """A small untrained Llama saved to disk, and its evaluation log."""
    out = tmp_path_factory.mktemp("tiny")
    texts = [r["question"] + " " + r["answer"] for r in bench_data.split("full")]
    model, tokenizer = build_tiny_model(texts, out_dir=out, hidden_size=32, num_hidden_layers=1,
                                        intermediate_size=64, vocab_size=400)
    logs = evaluate_model(model, tokenizer, bench_data, CONFIG)
    return {"path": out, "model": model, "tokenizer": tokenizer, "logs": logs}


def test_log_has_open_unlearning_schema(tiny, bench_data):
    logs = tiny["logs"]
    sizes = {"forget": len(bench_data.split("forget10_perturbed")),
             "retain": len(bench_data.split("retain_perturbed")),
             "ra": len(bench_data.split("real_authors_perturbed")),
             "wf": len(bench_data.split("world_facts_perturbed"))}
    for key in UTILITY + ("forget_Q_A_Prob", "forget_Q_A_ROUGE", "forget_truth_ratio",
                          "forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob"):
        prefix = key.split("_")[0]
        entry = logs[key]
        assert math.isfinite(entry["agg_value"])
        assert list(entry["value_by_index"]) == [str(i) for i in range(sizes[prefix])], key
    assert logs["forget_quality"] == {"agg_value": None}      # no reference: unavailable, not 0
    assert logs["model_utility"]["agg_value"] == pytest.approx(metrics.model_utility(logs))
    first = logs["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]
    assert len(first["prob"]) == len(first["avg_loss"]) == 3
    rouge = logs["ra_Q_A_ROUGE"]["value_by_index"]["0"]
    assert set(rouge) == {"rouge1_recall", "rougeL_f1", "rougeL_recall", "input",
                          "ground_truth", "generation"}
    json.dumps(logs, allow_nan=False)   # strict JSON


def test_per_example_values_follow_the_formulas(tiny):
    logs = tiny["logs"]

    def column(metric, field):
        return np.array([v[field] for v in logs[metric]["value_by_index"].values()])

    para = column("forget_Q_A_PARA_Prob", "avg_loss")
    pert = column("forget_Q_A_PERT_Prob", "avg_loss")
    ratios = column("forget_truth_ratio", "score")
    np.testing.assert_allclose(ratios, np.exp(para - pert.mean(axis=1)), rtol=1e-6)
    assert logs["forget_truth_ratio"]["agg_value"] == pytest.approx(
        np.mean(np.minimum(ratios, 1 / ratios)))
    retain_r = column("retain_Truth_Ratio", "score")
    assert logs["retain_Truth_Ratio"]["agg_value"] == pytest.approx(
        np.mean(np.maximum(0, 1 - retain_r)))
    # Real authors: the truth ratio and the normalised probability use the true answer.
    true_p = column("ra_Q_A_Prob", "prob")
    wrong_p = column("ra_Q_A_PERT_Prob", "prob")
    np.testing.assert_allclose(column("ra_Q_A_Prob_normalised", "prob"),
                               true_p / (true_p + wrong_p.sum(axis=1)), rtol=1e-6)
    np.testing.assert_allclose(column("ra_Truth_Ratio", "score"),
                               np.exp(np.log(wrong_p).mean(axis=1)) / true_p, rtol=1e-5)
    np.testing.assert_allclose(column("forget_Q_A_Prob", "prob"),
                               np.exp(-column("forget_Q_A_Prob", "avg_loss")), rtol=1e-6)


def test_batched_likelihood_matches_one_sequence_at_a_time(tiny, bench_data):
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    rows = bench_data.split("forget10_perturbed")[:4]
    examples = [encode_qa(tokenizer, r["question"], r["paraphrased_answer"], 512) for r in rows]
    with torch.no_grad():
        alone = [metrics.answer_average_nll(
            model(input_ids=torch.tensor([e["input_ids"]])).logits,
            torch.tensor([e["labels"]])).item() for e in examples]
    logged = [tiny["logs"]["forget_Q_A_PARA_Prob"]["value_by_index"][str(i)]["avg_loss"]
              for i in range(4)]
    assert logged == pytest.approx(alone, rel=1e-5)
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    batched = metrics.answer_average_nll(logits, batch["labels"]).tolist()
    assert batched == pytest.approx(alone, rel=1e-5)


def test_forget_quality_against_a_reference(tiny, tmp_path):
    logs = tiny["logs"]
    same = evaluate.with_reference(logs, logs)
    assert same["forget_quality"]["agg_value"] == pytest.approx(1.0)
    ratios = metrics.forget_truth_ratios(logs)
    far = evaluate.with_reference(logs, ratios * 1e6)
    n = len(ratios)
    assert far["forget_quality"]["agg_value"] == pytest.approx(2 / math.comb(2 * n, n))


def test_outputs_are_written(tiny, tmp_path):
    summary = evaluate.write_outputs(tmp_path, tiny["logs"], reference_logs=tiny["logs"])
    for name in ("TOFU_EVAL.json", "TOFU_SUMMARY.json", "report.md", "truth_ratio_hist.png",
                 "utility_components.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    on_disk = json.loads((tmp_path / "TOFU_SUMMARY.json").read_text())
    assert on_disk == summary and on_disk["forget_quality"] is None
    assert "unavailable" in (tmp_path / "report.md").read_text()
    # The written log is a valid reference for forget quality.
    assert metrics.forget_quality(tmp_path / "TOFU_EVAL.json", tiny["logs"]) == pytest.approx(1.0)


def test_generation_stops_at_end_of_turn(tiny, bench_data, monkeypatch):
    model, tokenizer = tiny["model"], tiny["tokenizer"]
    tokenizer = type(tokenizer).from_pretrained(tiny["path"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end_of_turn|>"]})
    tokenizer.chat_template = ("{% for m in messages %}<bos>{{ m['role'] }}: {{ m['content'] }}"
                               "<|end_of_turn|>{% endfor %}"
                               "{% if add_generation_prompt %}<bos>assistant: {% endif %}")
    eot = tokenizer.convert_tokens_to_ids("<|end_of_turn|>")
    assert evaluate.stop_token_ids(model, tokenizer) == sorted({tokenizer.eos_token_id, eot})
    # A head that always prefers the end-of-turn token: every answer must stop after one token.
    model = type(model)(model.config)
    model.resize_token_embeddings(len(tokenizer))
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[eot] = 10.0
    model.lm_head = head
    lengths = []
    generate = model.generate

    def recording_generate(*args, **kwargs):
        out = generate(*args, **kwargs)
        lengths.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(model, "generate", recording_generate)
    config = EvalConfig(max_new_tokens=50, generation_batch_size=100, progress=False)
    prompts = [[tokenizer.bos_token_id, 5, 6, 7], [tokenizer.bos_token_id, 9]]
    texts = evaluate._generate(model, tokenizer, prompts, config, evaluate._Shards())
    assert texts == ["", ""] and lengths == [1]


# --------------------------------------------------------------------------- the command line

EVAL_ARGS = ["--data", "synthetic", "--max-authors", "10", "--forget", "forget10",
             "--max-new-tokens", "6", "--batch-size", "48", "--generation-batch-size", "40",
             "--no-progress"]


@pytest.fixture(scope="module")
def cli_eval(tiny, tmp_path_factory):
    """``rkld eval`` run once on the tiny model; its output folder."""
    out = tmp_path_factory.mktemp("cli_eval") / "eval"
    assert main(["eval", "--model", str(tiny["path"]), "--out", str(out), *EVAL_ARGS]) == 0
    return out


def test_eval_command_writes_and_reuses_or_refuses(tiny, cli_eval, capsys):
    summary = json.loads((cli_eval / "TOFU_SUMMARY.json").read_text())
    assert summary["forget_quality"] is None and math.isfinite(summary["model_utility"])
    meta = json.loads((cli_eval / "EVAL_META.json").read_text())
    assert meta["fingerprint"]["forget_split"] == "forget10"
    capsys.readouterr()
    # Same model, data and settings: reused, and forget quality now filled from --reference
    # (a copy with its metadata: a reference inside --out is refused).
    reference_dir = cli_eval.parent / "reference"
    reference_dir.mkdir(exist_ok=True)
    for name in ("TOFU_EVAL.json", "EVAL_META.json"):
        shutil.copy(cli_eval / name, reference_dir / name)
    reference = reference_dir / "TOFU_EVAL.json"
    assert main(["eval", "--model", str(tiny["path"]), "--out", str(cli_eval),
                 "--reference", str(reference), *EVAL_ARGS]) == 0
    captured = capsys.readouterr()
    assert "reusing" in captured.out
    assert json.loads((cli_eval / "TOFU_SUMMARY.json").read_text())["forget_quality"] == 1.0
    # The report prints the command that computes these results (the reference included).
    import shlex
    command = json.loads((cli_eval / "EVAL_META.json").read_text())["command"]
    assert command in (cli_eval / "report.md").read_text()
    used = build_parser().parse_args(
        ["eval", "--model", str(tiny["path"]), "--out", str(cli_eval), "--reference",
         str(reference), *EVAL_ARGS])
    printed = build_parser().parse_args(shlex.split(command)[1:])
    assert {k: v for k, v in vars(printed).items() if k not in ("no_progress", "handler")} == \
        {k: v for k, v in vars(used).items() if k not in ("no_progress", "handler")}
    # Another forget split (or generation length) in the same folder: refused, files untouched.
    before = (cli_eval / "TOFU_EVAL.json").read_bytes()
    args = [a if a != "forget10" else "forget05" for a in EVAL_ARGS]
    assert main(["eval", "--model", str(tiny["path"]), "--out", str(cli_eval), *args]) == 2
    err = capsys.readouterr().err
    assert "another model, split or configuration" in err and "forget_split" in err
    assert (cli_eval / "TOFU_EVAL.json").read_bytes() == before


def test_eval_command_errors(tiny, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny["path"]), "--out", str(tmp_path / "e"),
                 "--reference", str(tmp_path / "absent.json"), *EVAL_ARGS]) == 2
    assert "absent.json: no such file" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_eval_under_accelerate_launch_with_two_processes(tiny, cli_eval, tmp_path):
    out = tmp_path / "eval2"
    # accelerate's multi-process launcher; without GPUs both processes run on the CPU (gloo).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "rkld", "eval",
               "--model", str(tiny["path"]), "--out", str(out), *EVAL_ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count('"out"') == 1        # one report, from the main process
    two = json.loads((out / "TOFU_EVAL.json").read_text())
    one = json.loads((cli_eval / "TOFU_EVAL.json").read_text())
    one["forget_quality"] = two["forget_quality"]   # the reused log above got a reference
    assert two == one                               # every per-example value, bit for bit
    assert json.loads((out / "EVAL_META.json").read_text())["processes"] == 2


def test_unlearn_with_evaluation_every_epoch(tiny, cli_eval, tmp_path, capsys):
    common = ["unlearn", "--model", str(tiny["path"]), "--method", "ga", "--data", "synthetic",
              "--max-authors", "10", "--forget", "forget10", "--epochs", "2", "--lr", "1e-3",
              "--batch-size", "5", "--micro-batch-size", "5", "--max-length", "512",
              "--no-progress", "--eval-every-epoch"]
    assert main([*common, "--out", str(tmp_path / "no_ref")]) == 2
    assert "--reference" in capsys.readouterr().err and not (tmp_path / "no_ref").exists()

    out = tmp_path / "ga"
    assert main([*common, "--out", str(out), "--reference", str(cli_eval / "TOFU_EVAL.json")]) == 0
    record = json.loads((out / "epoch_curve.json").read_text())
    curve = record["curve"]
    assert [p["epoch"] for p in curve] == [1, 2]
    assert all(0 <= p["forget_quality"] <= 1 and p["model_utility"] is None for p in curve)
    fqs = [p["forget_quality"] for p in curve]
    assert record["peak_epoch"] == fqs.index(max(fqs)) + 1
    assert (out / "epoch_eval" / "epoch-2" / "TOFU_EVAL.json").exists()
    assert (out / "peak" / "model.safetensors").exists() and (out / "epoch_curve.png").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_model_fingerprint_follows_weights_not_run_records(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    first = evaluate.model_fingerprint(str(tmp_path))
    (tmp_path / "run.json").write_text('{"status": "finished"}')
    (tmp_path / "epoch_curve.json").write_text("{}")
    assert evaluate.model_fingerprint(str(tmp_path)) == first
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert evaluate.model_fingerprint(str(tmp_path)) != first


def test_reference_is_checked_against_its_own_metadata(cli_eval, bench_data, tmp_path, capsys):
    ref = tmp_path / "reference"
    ref.mkdir()
    for name in ("TOFU_EVAL.json", "EVAL_META.json"):
        shutil.copy(cli_eval / name, ref / name)
    log = ref / "TOFU_EVAL.json"
    assert evaluate.check_reference(log, bench_data, "forget10") == str(log)
    # Another benchmark seed: as many examples, other questions.
    other_seed = load_benchmark("synthetic", seed=1, max_authors=10)
    assert len(other_seed.split("forget10_perturbed")) == len(bench_data.split(
        "forget10_perturbed"))
    with pytest.raises(ValueError, match="other evaluation data .*forget10_perturbed"):
        evaluate.check_reference(log, other_seed, "forget10")
    # A log of another forget split.
    meta = json.loads((ref / "EVAL_META.json").read_text())
    meta["fingerprint"]["forget_split"] = "forget05"
    (ref / "EVAL_META.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="computed for forget split 'forget05', not 'forget10'"):
        evaluate.check_reference(log, bench_data, "forget10")
    # A log without metadata (e.g. a published one): refused unless accepted deliberately,
    # then its example count only, said in one line.
    (ref / "EVAL_META.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no EVAL_META.json .*--unverified-reference"):
        evaluate.check_reference(log, bench_data, "forget10")
    capsys.readouterr()
    evaluate.check_reference(log, bench_data, "forget10", unverified=True)
    assert "only its example count could be checked" in capsys.readouterr().out


def test_a_failed_evaluation_is_never_reused(tiny, cli_eval, bench_data, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to simulate a full disk")
    out = tmp_path / "eval"
    shutil.copytree(cli_eval, out)            # the results of the tiny model
    texts = [r["question"] + " " + r["answer"] for r in bench_data.split("full")]
    build_tiny_model(texts, out_dir=tmp_path / "other", seed=5, hidden_size=32,
                     num_hidden_layers=1, intermediate_size=64, vocab_size=400)
    # Evaluating another model there fails after its log is written (the disk fills up).
    (out / "TOFU_SUMMARY.json.tmp").symlink_to("/dev/full")
    with pytest.raises(OSError, match="TOFU_SUMMARY.json: the disk is full"):
        evaluate.run_eval(str(tmp_path / "other"), "synthetic", out, config=CONFIG,
                          max_authors=10, overwrite=True)
    assert not (out / "EVAL_META.json").exists()
    # The tiny model's results are gone: its evaluation must not "reuse" the other's log.
    with pytest.raises(FileExistsError, match="no EVAL_META.json"):
        evaluate.run_eval(str(tiny["path"]), "synthetic", out, config=CONFIG, max_authors=10)


def test_eval_out_apart_from_its_inputs(tiny, cli_eval):
    with pytest.raises(ValueError, match="is the model"):
        evaluate.run_eval(str(tiny["path"]), "synthetic", tiny["path"], config=CONFIG)
    with pytest.raises(ValueError, match="contains the reference log"):
        evaluate.run_eval(str(tiny["path"]), "synthetic", cli_eval, config=CONFIG,
                          reference=cli_eval / "TOFU_EVAL.json")


def test_reference_from_other_evaluation_settings_is_refused(tiny, cli_eval, bench_data,
                                                              tmp_path, capsys):
    ref = tmp_path / "reference"
    ref.mkdir()
    for name in ("TOFU_EVAL.json", "EVAL_META.json"):
        shutil.copy(cli_eval / name, ref / name)
    log = ref / "TOFU_EVAL.json"
    same = EvalConfig(forget_split="forget10", generation=False, batch_size=7)
    assert evaluate.check_reference(log, bench_data, "forget10", config=same) == str(log)
    with pytest.raises(ValueError, match=r"other evaluation settings \(--max-length 512 there, "
                                         r"48 here\), which change the truth ratios"):
        evaluate.check_reference(log, bench_data, "forget10",
                                 config=EvalConfig(forget_split="forget10", max_length=48))
    with pytest.raises(ValueError, match=r"--template 'auto' there, 'plain' here"):
        evaluate.check_reference(log, bench_data, "forget10",
                                 config=EvalConfig(forget_split="forget10", template="plain"))
    # From the command line: refused in one line before any evaluation.
    out = tmp_path / "e"
    assert main(["eval", "--model", str(tiny["path"]), "--out", str(out), "--reference",
                 str(log), *EVAL_ARGS, "--max-length", "48"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-length 512 there, 48 here" in err
    assert not out.exists()
    # Without its EVAL_META.json: refused unless --unverified-reference, which is recorded.
    (ref / "EVAL_META.json").unlink()
    assert main(["eval", "--model", str(tiny["path"]), "--out", str(out), "--reference",
                 str(log), *EVAL_ARGS]) == 2
    assert "--unverified-reference" in capsys.readouterr().err and not out.exists()
    assert main(["eval", "--model", str(tiny["path"]), "--out", str(out), "--reference",
                 str(log), "--unverified-reference", *EVAL_ARGS, "--no-generation"]) == 0
    meta = json.loads((out / "EVAL_META.json").read_text())
    assert meta["reference_verified"] is False and "--unverified-reference" in meta["command"]


def test_eval_output_folder_is_locked(tiny, cli_eval, tmp_path):
    from rkld.storage import LOCK_FILE
    assert not (cli_eval / LOCK_FILE).exists()        # released after an evaluation
    out = tmp_path / "e"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid,
                                                 "host": socket.gethostname()}))
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match=f"in use by process {sleeper.pid}"):
                evaluate.run_eval(str(tiny["path"]), "synthetic", out, overwrite=overwrite,
                                  max_authors=10, config=EvalConfig(generation=False))
        assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    finally:
        sleeper.kill()
        sleeper.wait()
