"""setup() seeds, picks the profile and device, and prints an honest environment report."""

import re
from pathlib import Path

import pytest
import torch

from course_utils import profiles


def test_setup_offline_report(monkeypatch, capsys):
    monkeypatch.delenv("COURSE_PROFILE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    profile = profiles.setup(seed=3)
    out = capsys.readouterr().out
    assert profile.name == "offline" and profile.seed == 3
    assert profile.model_id("llama") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "[OK] profile: offline" in out and "[OK] Hugging Face Hub disabled" in out
    assert all(line.startswith(("[OK]", "[FAIL]")) for line in out.strip().splitlines())
    assert "[FAIL]" not in out  # this environment satisfies requirements.txt


def test_setup_seeds_torch():
    profiles.setup(seed=7, verbose=False)
    a = torch.rand(3)
    profiles.setup(seed=7, verbose=False)
    assert torch.equal(a, torch.rand(3))


def test_profile_resolution(monkeypatch):
    monkeypatch.setenv("COURSE_PROFILE", "full")
    assert profiles.resolve_profile_name() == "full"
    assert profiles.resolve_profile_name("offline") == "offline"  # the argument wins
    monkeypatch.delenv("COURSE_PROFILE")
    monkeypatch.setenv("COLAB_RELEASE_TAG", "x")
    assert profiles.in_colab()
    assert profiles.resolve_profile_name() == "offline"  # Colab runs the tested profile unless told otherwise
    report = profiles.environment_report(profiles.get_profile("offline"))
    assert any(line.startswith("[OK] Colab: the tested offline profile") for line in report)
    assert profiles.get_profile("full").model_id("llama") == "meta-llama/Llama-3.2-1B"
    with pytest.raises(ValueError, match="unknown profile 'colab'"):
        profiles.resolve_profile_name("colab")


def test_unknown_role():
    with pytest.raises(ValueError, match="unknown model role 'bert'.*gpt2.*llama"):
        profiles.get_profile("offline").model_id("bert")


def test_missing_and_old_packages_fail():
    rows = profiles.check_versions({"torch": "99.0", "no-such-package-xyz": "1.0", "numpy": "1.0"})
    assert [ok for ok, _ in rows] == [False, False, True]
    assert "not installed" in rows[1][1]


def test_min_versions_match_requirements_txt():
    text = (Path(__file__).resolve().parent.parent / "requirements.txt").read_text()
    bounds = dict(re.findall(r"^([A-Za-z0-9_.-]+)>=([0-9.]+)", text, flags=re.M))
    for package, minimum in profiles.MIN_VERSIONS.items():
        assert bounds.get(package) == minimum, f"{package}: requirements.txt says {bounds.get(package)}"


def test_device_override(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert profiles.pick_device() == torch.device("cpu")
