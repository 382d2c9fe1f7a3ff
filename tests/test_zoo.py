"""The zoos read offline: which zoo a name means, which weights a setting names, their input."""

from __future__ import annotations

import pytest
import timm
import torchvision
from timm.data import create_transform, resolve_data_config
from torchvision.transforms import v2

from stages.common import UserError
from stages.imaging import IMAGENET_MEAN, IMAGENET_STD
from stages.zoo import resolve_model, resolve_preprocessing, resolve_weights


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "convnext_tiny", "efficientnet_b0"])
def test_a_plain_name_both_zoos_know_is_torchvisions_and_the_prefix_picks_timm(name):
    assert name in torchvision.models.list_models(module=torchvision.models)
    assert timm.is_model(name)  # else the rule would not be tested
    plain, prefixed = resolve_model(name), resolve_model(f"timm/{name}")
    assert (plain.zoo, plain.arch, plain.name) == ("torchvision", name, name)
    assert (prefixed.zoo, prefixed.arch, prefixed.name) == ("timm", name, f"timm/{name}")


def test_a_name_only_timm_knows_needs_no_prefix_and_records_it():
    assert "tf_efficientnet_lite0" not in torchvision.models.list_models()
    arch = resolve_model("tf_efficientnet_lite0")
    assert (arch.zoo, arch.arch, arch.name) == ("timm", "tf_efficientnet_lite0",
                                                "timm/tf_efficientnet_lite0")
    assert resolve_model(arch.name) == arch  # a checkpoint's name resolves to the same model


@pytest.mark.parametrize("name, closest", [
    ("resnet19", "resnet18"),  # both zoos
    ("mobilenet_v3_smal", "mobilenet_v3_small"),  # torchvision's spelling
    ("tf_efficientnet_lite9", "tf_efficientnet_lite0"),  # timm only
    ("timm/resnet19", "timm/resnet18"),
])
def test_an_unknown_name_is_one_line_with_the_closest_names_of_both_zoos(name, closest):
    with pytest.raises(UserError) as err:
        resolve_model(name)
    line = str(err.value)
    assert f"unknown model {name!r} in params.yaml train.model" in line and "\n" not in line
    assert closest in line.split("did you mean", 1)[1]


def test_a_tag_or_hub_id_in_train_model_points_to_train_pretrained():
    with pytest.raises(UserError, match=r"train.model: timm/resnet50, train.pretrained: a1_in1k"):
        resolve_model("timm/resnet50.a1_in1k")
    with pytest.raises(UserError, match=r"train.pretrained: hf-hub:timm/resnet18.a1_in1k"):
        resolve_model("hf-hub:timm/resnet18.a1_in1k")


def test_weights_by_name_resolve_without_reading_anything():
    tv = resolve_weights(resolve_model("resnet50"), "IMAGENET1K_V2")
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    assert (tv.kind, tv.location, tv.label) == ("url", weights.url, str(weights))
    assert resolve_weights(resolve_model("resnet50"), True).config is weights.DEFAULT
    lite = resolve_weights(resolve_model("tf_efficientnet_lite0"), True)
    cfg = timm.models.get_pretrained_cfg("tf_efficientnet_lite0")
    assert (lite.kind, lite.location) == ("hf-hub", cfg.hf_hub_id)
    assert lite.label == f"tf_efficientnet_lite0.{cfg.tag}"
    assert lite.files[0] == "model.safetensors"  # timm prefers safetensors
    tagged = resolve_weights(resolve_model("timm/resnet50"), "a1_in1k")
    assert tagged.location == timm.models.get_pretrained_cfg("resnet50.a1_in1k").hf_hub_id
    assert resolve_weights(resolve_model("resnet18"), None) is None


def test_files_are_files_and_tags_are_tags(tmp_path):
    arch = resolve_model("resnet18")
    for setting in ["weights.pt", "models/best.pth", str(tmp_path / "w.safetensors")]:
        assert resolve_weights(arch, setting).kind == "file"
    assert resolve_weights(arch, tmp_path / "w.bin").location == str(tmp_path / "w.bin")
    assert resolve_weights(arch, "IMAGENET1K_V1").kind == "url"


def test_unknown_tags_list_the_models_tags_in_one_line():
    with pytest.raises(UserError) as err:
        resolve_weights(resolve_model("resnet50"), "IMAGENET9K")
    line = str(err.value)
    assert all(tag in line for tag in torchvision.models.ResNet50_Weights.__members__)
    with pytest.raises(UserError) as err:
        resolve_weights(resolve_model("timm/resnet50"), "in9k")
    line = str(err.value)
    assert "in9k" in line and "a1_in1k" in line and "fb_swsl_ig1b_ft_in1k" in line
    # timm's tag on torchvision's model of the same name: say how to get timm's
    with pytest.raises(UserError, match="use train.model: timm/resnet50"):
        resolve_weights(resolve_model("resnet50"), "a1_in1k")
    with pytest.raises(UserError, match="smallcnn has no published weights"):
        resolve_weights(resolve_model("smallcnn"), True)


def test_preprocessing_follows_timm_weights():
    pre = resolve_preprocessing("tf_efficientnet_lite0", True)
    assert pre.mean == pre.std == (0.5, 0.5, 0.5)  # the real case: not ImageNet's
    assert "tf_efficientnet_lite0.in1k" in pre.why and "pretrained_cfg" in pre.why
    # The same resize and crop as timm's own eval transform.
    cfg = timm.models.get_pretrained_cfg("tf_efficientnet_lite0").to_dict()
    steps = create_transform(**resolve_data_config(pretrained_cfg=cfg)).transforms
    assert steps[0].size == pre.resize_size and steps[1].size == (pre.crop_size, pre.crop_size)
    assert steps[0].interpolation.value == pre.interpolation
    tagged = resolve_preprocessing("timm/resnet50", "a1_in1k")
    a1 = timm.models.get_pretrained_cfg("resnet50.a1_in1k")
    assert tagged.mean == a1.mean and tagged.crop_size == a1.input_size[-1]
    assert tagged.crop_pct == pytest.approx(a1.crop_pct, abs=0.005)  # sizes are whole pixels


def test_preprocessing_follows_torchvision_weights():
    pre = resolve_preprocessing("resnet50", "IMAGENET1K_V2")
    t = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()
    assert (list(pre.mean), list(pre.std)) == (t.mean, t.std)
    assert (pre.crop_size, pre.resize_size) == (t.crop_size[0], t.resize_size[0])
    assert pre.interpolation == v2.InterpolationMode.BILINEAR.value
    assert pre.resize_size != resolve_preprocessing("resnet50", "IMAGENET1K_V1").resize_size


def test_a_local_file_gets_the_architectures_default_preprocessing():
    pre = resolve_preprocessing("tf_efficientnet_lite0", "lite0.pth")
    assert pre.mean == (0.5, 0.5, 0.5) and "local file lite0.pth" in pre.why
    assert resolve_preprocessing("resnet18", "r.pt").resize_size == 256


def test_no_weights_keep_imgpipes_defaults_and_say_why():
    for name, pretrained in [("smallcnn", None), ("resnet18", None),
                             ("smallcnn", "w.pt"), ("tf_efficientnet_lite0", None)]:
        pre = resolve_preprocessing(name, pretrained)
        assert (pre.mean, pre.std) == (IMAGENET_MEAN, IMAGENET_STD)
        assert pre.crop_size is None and "imgpipe's defaults" in pre.why
