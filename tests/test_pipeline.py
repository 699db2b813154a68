"""The prune pipeline and its command: refusals before loading, atomic output, saved = measured model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig, BertModel

from course_utils import checkpointing, cli, distill, evaluation, models, pipeline
from course_utils.data import load_texts

FAST = dict(calib_samples=8, calib_seq_len=64, eval_tokens=256, train_seq_len=32, train_batch_size=2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 4-layer random Llama with SmolLM2's tokenizer (so the profile's text tokenises), saved."""
    tokenizer = AutoTokenizer.from_pretrained(models.smollm2_dir())
    model = tiny_llama(num_hidden_layers=4, intermediate_size=128, vocab_size=len(tokenizer),
                       max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny") / "llama"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if anything tries to load weights."""
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the request was checked")
    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def test_default_recipe_is_valid_and_bad_fields_are_named():
    assert pipeline.Recipe().problems() == []
    bad = pipeline.Recipe(width=1.5, depth=-1, recover="magic", quantize="int4", width_method="l7", lr=0.0)
    text = "\n".join(bad.problems())
    for field in ("width", "depth", "recover", "quantize", "width_method", "lr"):
        assert field in text, field
    assert "steps >= 1" in "\n".join(pipeline.Recipe(recover="kd").problems())
    assert "--recover kd" in "\n".join(pipeline.Recipe(steps=5).problems())
    assert pipeline.Recipe(depth=True).problems()  # a bool is not a layer count
    with pytest.raises(ValueError, match="not valid"):
        pipeline.Recipe(width=-0.1).check()


def test_recipe_files(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"width": 0.3, "depth": 2}))
    (tmp_path / "r.toml").write_text("width = 0.3\ndepth = 2\n")
    assert pipeline.Recipe.from_file(tmp_path / "r.json") == pipeline.Recipe(width=0.3, depth=2)
    if sys.version_info >= (3, 11):
        assert pipeline.Recipe.from_file(tmp_path / "r.toml") == pipeline.Recipe(width=0.3, depth=2)
    (tmp_path / "bad.json").write_text(json.dumps({"widht": 0.3}))
    with pytest.raises(ValueError, match="unknown fields"):
        pipeline.Recipe.from_file(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{width: ")
    with pytest.raises(ValueError, match="not valid"):
        pipeline.Recipe.from_file(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="does not exist"):
        pipeline.Recipe.from_file(tmp_path / "missing.toml")


def test_bad_requests_are_refused_before_any_weights_load(tiny_dir, tmp_path, no_loading):
    width = pipeline.Recipe(width=0.2)
    cases = {
        "does not exist": ("./no/such/model", width, tmp_path / "a"),
        "without config.json": (str(tmp_path), width, tmp_path / "b"),
        "does nothing": (str(tiny_dir), pipeline.Recipe(), tmp_path / "c"),
        "remove at most 2": (str(tiny_dir), pipeline.Recipe(depth=3), tmp_path / "d"),
    }
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases["not empty"] = (str(tiny_dir), width, tmp_path / "full")
    for message, (model, recipe, out) in cases.items():
        with pytest.raises(ValueError, match=message):
            pipeline.check_request(model, recipe, out)
    assert (tmp_path / "full" / "x").read_text() == "x"  # untouched


def test_unsupported_architecture_mismatched_tokenizer_and_gpt2_int8_are_refused(tiny_dir, tmp_path, no_loading):
    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=len(AutoTokenizer.from_pretrained(tiny_dir)))).save_pretrained(bert)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(bert)
    with pytest.raises(ValueError, match="bert"):
        pipeline.check_request(str(bert), pipeline.Recipe(width=0.2), tmp_path / "o1")
    small_vocab = tmp_path / "small_vocab"
    tiny_llama().save_pretrained(small_vocab)  # 100 embedding rows
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(small_vocab)  # 49,152 tokens
    with pytest.raises(ValueError, match="do not belong together"):
        pipeline.check_request(str(small_vocab), pipeline.Recipe(width=0.2), tmp_path / "o2")
    gpt2 = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(gpt2)
    with pytest.raises(ValueError, match="Conv1D"):
        pipeline.check_request(str(gpt2), pipeline.Recipe(quantize="int8"), tmp_path / "o3")


def test_run_saves_the_model_it_measured(tiny_dir, tmp_path):
    recipe = pipeline.Recipe(width=0.25, depth=1, multiple_of=32, recover="kd", steps=2, **FAST)
    request = pipeline.check_request(str(tiny_dir), recipe, tmp_path / "out")
    result = pipeline.run(request, progress=False, log=lambda *_: None)
    assert [s.step for s in result.stages] == ["base", "depth", "width", "kd", "save"]
    out = tmp_path / "out"
    report = json.loads((out / pipeline.REPORT_FILE).read_text())
    assert report["recipe"]["width"] == 0.25 and len(report["layers_removed"]) == 1
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # stock loader, no course code
    assert reloaded.config.num_hidden_layers == 3 and reloaded.config.intermediate_size == 96
    tokenizer = AutoTokenizer.from_pretrained(out)
    measured = evaluation.perplexity(reloaded, tokenizer, load_texts("evaluation"), max_tokens=recipe.eval_tokens)
    assert measured == pytest.approx(result.stages[-2].ppl, rel=1e-5)  # the saved model is the one measured
    assert result.stages[-2].parameters < result.stages[0].parameters
    assert "PPL after kd" in (out / "README.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary directory left behind


def test_int8_reloads_with_the_stock_loader(tiny_dir, tmp_path):
    pytest.importorskip("torchao")
    request = pipeline.check_request(str(tiny_dir), pipeline.Recipe(quantize="int8", **FAST), tmp_path / "q")
    result = pipeline.run(request, progress=False, log=lambda *_: None)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    assert "Int8" in type(reloaded.model.layers[0].mlp.up_proj.weight).__name__
    base, quantized = result.stages[0], result.stages[1]
    assert quantized.step == "int8" and quantized.ppl != base.ppl  # the weights did change
    assert abs(quantized.ppl / base.ppl - 1) < 0.05  # int8 weights barely move a random model's perplexity


def test_an_interrupted_run_leaves_no_output(tiny_dir, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(distill, "distill", interrupted)
    request = pipeline.check_request(str(tiny_dir), pipeline.Recipe(width=0.25, recover="kd", steps=2, **FAST),
                                     tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(request, progress=False, log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def test_cli_flags_override_the_recipe_file(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"width": 0.3, "depth": 2}))
    args = cli.parser().parse_args(["prune", "--model", "m", "--out", "o", "--recipe", str(tmp_path / "r.json"),
                                    "--depth", "1", "--no-refit"])
    assert cli.recipe_from(args) == pipeline.Recipe(width=0.3, depth=1, refit=False)


def test_the_command_runs_and_refuses(tiny_dir, tmp_path):
    env = {**os.environ, "COURSE_PROFILE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "course_utils", "prune", "--model", str(tiny_dir), "--quiet",
            "--eval-tokens", "256", "--calib-samples", "8"]
    bad = subprocess.run(base + ["--width", "2", "--out", str(tmp_path / "x")], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "width must be in" in bad.stderr and not (tmp_path / "x").exists()
    ok = subprocess.run(base + ["--width", "0.25", "--multiple-of", "32", "--out", str(tmp_path / "y")],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "width" in ok.stdout and (tmp_path / "y" / "config.json").is_file()


def test_the_console_script_is_installed():
    """`pip install -e .` (make venv) puts `course-utils` next to the interpreter; it answers --help."""
    script = Path(sys.executable).parent / "course-utils"
    assert script.is_file(), "reinstall the package: pip install -e . (the console script is missing)"
    done = subprocess.run([str(script), "prune", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--width" in done.stdout and "--recipe" in done.stdout


def test_an_interrupted_recovery_resumes_from_its_checkpoint(tiny_dir, tmp_path, monkeypatch):
    recipe = pipeline.Recipe(width=0.25, multiple_of=32, recover="kd", steps=4, **FAST)
    straight = pipeline.run(pipeline.check_request(str(tiny_dir), recipe, tmp_path / "straight"),
                            progress=False, log=lambda *_: None)
    original, calls = distill.kd_loss, []

    def stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # inside step 3, after the checkpoint of step 2
        return original(*args, **kwargs)
    monkeypatch.setattr(distill, "kd_loss", stopped)
    out = tmp_path / "out"
    request = pipeline.check_request(str(tiny_dir), recipe, out, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(request, progress=False, log=lambda *_: None)
    monkeypatch.undo()
    assert not out.exists() and [p.name for p in checkpointing.list_checkpoints(request.checkpoints)] == ["step-000002"]
    with pytest.raises(ValueError, match="pass --resume"):
        pipeline.check_request(str(tiny_dir), recipe, out, checkpoint_every=2)
    with pytest.raises(ValueError, match="another model or recipe"):
        pipeline.check_request(str(tiny_dir), pipeline.Recipe(width=0.5, recover="kd", steps=4, **FAST), out,
                               resume=True)
    resumed = pipeline.run(pipeline.check_request(str(tiny_dir), recipe, out, checkpoint_every=2, resume=True),
                           progress=False, log=lambda *_: None)
    assert resumed.stages[-2].step == "kd" and resumed.stages[-2].ppl == straight.stages[-2].ppl
    assert not request.checkpoints.exists()  # removed once the output is complete
    with pytest.raises(ValueError, match="apply to the recovery"):
        pipeline.check_request(str(tiny_dir), pipeline.Recipe(width=0.25), tmp_path / "o", resume=True)


def test_the_command_runs_under_accelerate_launch_on_two_processes(tiny_dir, tmp_path):
    """Two CPU processes (gloo): both prune and train (DDP), the main one saves; the output reloads."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "COURSE_PROFILE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(port), "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "-m", "course_utils"]
    done = subprocess.run(launch + ["prune", "--model", str(tiny_dir), "--quiet", "--eval-tokens", "256",
                                    "--calib-samples", "8", "--width", "0.25", "--multiple-of", "32", "--recover",
                                    "kd", "--steps", "2", "--out", str(tmp_path / "ddp")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved to") == 1  # one process reports and saves
    report = json.loads((tmp_path / "ddp" / pipeline.REPORT_FILE).read_text())
    assert [s["step"] for s in report["stages"]] == ["base", "width", "kd", "save"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ddp").config.intermediate_size == 96


def test_int4_copy_refuses_a_cpu_model_and_a_bad_group_before_touching_torchao():
    import torch

    from course_utils import quantize

    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="CUDA kernels"):
        quantize.int4_copy(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    if torch.cuda.is_available():  # pragma: no cover - CI has no GPU
        with pytest.raises(ValueError, match="group_size"):
            quantize.int4_copy(model.cuda(), group_size=48)
