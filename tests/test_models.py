"""Models by name from both zoos, local pretrained weights, heads for other classes, checkpoints."""

from __future__ import annotations

import hashlib

import pytest
import torch

from stages.common import UserError
from stages.models import build_model, create_model, load_checkpoint, load_pretrained


def test_models_by_name_have_a_head_per_class():
    x = torch.randn(2, 3, 32, 32)
    assert create_model("smallcnn", 7)(x).shape == (2, 7)
    assert create_model("resnet18", 5).eval()(x).shape == (2, 5)
    assert create_model("timm/test_efficientnet", 6).eval()(x).shape == (2, 6)


def test_both_zoos_build_their_own_model_for_a_name_they_share():
    import timm
    import torchvision

    assert type(create_model("resnet18", 3)) is torchvision.models.ResNet
    assert type(create_model("timm/resnet18", 3)) is timm.models.ResNet
    # A name only timm knows needs no prefix, and builds without weights: nothing is read.
    model, loaded = build_model("test_efficientnet", 3)
    assert type(model) is timm.models.EfficientNet and loaded is None


def test_models_come_in_channels_last_and_keep_it_on_a_device():
    model = create_model("smallcnn", 3).to(torch.device("cpu"))
    conv = model.features[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_unknown_model_is_a_one_line_error():
    with pytest.raises(UserError, match="unknown model 'resnet19'.*did you mean") as err:
        create_model("resnet19", 3)
    assert "\n" not in str(err.value)


def test_missing_pretrained_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="nope.pt not found.*train.pretrained"):
        create_model("smallcnn", 3, pretrained=tmp_path / "nope.pt")


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    source = create_model("smallcnn", 3)
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": source.state_dict()}, path)  # the models/model.pt layout
    loaded = create_model("smallcnn", 3, pretrained=path)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded.eval()(x), source.eval()(x))


def test_checkpoint_for_other_classes_loads_all_but_the_head(tmp_path, capsys):
    torch.manual_seed(0)
    imagenet = create_model("resnet18", 1000)
    path = tmp_path / "resnet18.pth"
    # Keys as DDP saves them: the prefix is stripped on load.
    torch.save({f"module.{k}": v for k, v in imagenet.state_dict().items()}, path)
    model = create_model("resnet18", 4, pretrained=path)
    out = capsys.readouterr().out
    assert "left as initialised" in out and "fc.weight" in out
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (4, 512)


def test_local_weights_load_into_a_timm_model_and_are_recorded(tmp_path):
    torch.manual_seed(0)
    source = create_model("timm/test_efficientnet", 1000)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    model, loaded = build_model("timm/test_efficientnet", 3, pretrained=str(path))
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)
    assert model.classifier.weight.shape[0] == 3
    assert loaded.file == str(path) and loaded.source == str(path)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoints_of_timm_models_load_by_their_recorded_name(tmp_path):
    torch.manual_seed(0)
    model = create_model("test_efficientnet", 2).eval()
    path = tmp_path / "model.pt"
    # The keys load_checkpoint reads, as train's save_model writes them.
    torch.save({"model": "timm/test_efficientnet", "classes": ["a", "b"],
                "state_dict": model.state_dict()}, path)
    loaded, checkpoint = load_checkpoint(path)
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    assert checkpoint["classes"] == ["a", "b"]


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "small.pt"
    torch.save(create_model("smallcnn", 3).state_dict(), path)
    model = create_model("resnet18", 3)
    with pytest.raises(UserError, match="do not fit this model"):
        load_pretrained(model, path)
