"""The fine-tuning recipe: the new head found and fitted first on frozen features, then the
whole net with a lower backbone lr and batch norm's statistics kept."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import torch
import torchvision
from conftest import dvc, mlflow_runs, one_line_error, run, set_params
from torch import nn

from stages import finetune
from stages import train as stage
from stages.models import SmallCNN, load_pretrained
from stages.params import Train


@pytest.mark.parametrize("name, head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3"),
                                        ("efficientnet_b0", "classifier.1")])
def test_the_new_head_is_the_layer_the_weights_file_lacked(tmp_path, name, head):
    file = tmp_path / "imagenet.pt"
    torch.save(torchvision.models.get_model(name, num_classes=1000).state_dict(), file)
    model = torchvision.models.get_model(name, num_classes=7)
    new = load_pretrained(model, file)
    assert finetune.new_head(model, new) is model.get_submodule(head)


def test_no_head_when_the_file_fits_everywhere_or_misses_more(tmp_path):
    model = SmallCNN(4)
    assert finetune.new_head(model, []) is None
    assert finetune.new_head(model, ["head.weight", "features.0.0.weight"]) is None
    assert finetune.new_head(model, ["head.weight", "head.bias"]) is model.head
    model.head = nn.Linear(128, 4, bias=False)  # fit_head fits a weight and a bias
    assert finetune.new_head(model, ["head.weight"]) is None


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well separated clusters in 16 dimensions."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)) * 4
    y = torch.randint(0, 3, (n,), generator=g)
    return centres[y] + torch.randn(n, 16, generator=g), y


def test_the_head_is_fitted_to_convergence_with_the_l2_val_prefers():
    head = nn.Linear(16, 3)
    fitted = finetune.fit_head(head, blobs(300, 1), blobs(100, 2))
    assert fitted["train_acc"] == 1.0 and fitted["head_l2"] in finetune.HEAD_L2
    xv, yv = blobs(200, 3)
    assert (head(xv).argmax(1) == yv).float().mean() > 0.99  # the layer itself holds the fit
    # Labels with no signal: the val loss picks the strongest penalty, which predicts least.
    x, _ = blobs(200, 4)
    noise = torch.randint(0, 3, (200,), generator=torch.Generator().manual_seed(5))
    xv, _ = blobs(100, 6)
    noisy = finetune.fit_head(nn.Linear(16, 3), (x, noise), (xv, torch.randint(0, 3, (100,))))
    assert noisy["head_l2"] == max(finetune.HEAD_L2)


def test_the_probes_val_scores_are_the_nets_own_in_eval_mode():
    """Epoch 0's val loss and accuracy come from the cached features, not a second pass over
    val: they must equal the whole net's, run as evaluate runs it."""
    torch.manual_seed(0)
    net = SmallCNN(3)
    meta = {"mean": [0.5] * 3, "std": [0.25] * 3, "image_size": 12}
    batches = [(torch.randint(0, 256, (16, 3, 12, 12), dtype=torch.uint8),
                torch.randint(0, 3, (16,))) for _ in range(4)]
    cpu = torch.device("cpu")

    def to_input(x):
        return stage.to_device(x, cpu, meta)

    train = finetune.head_inputs(net, net.head, batches[:2], cpu, to_input)
    val = finetune.head_inputs(net, net.head, batches[2:], cpu, to_input)
    fitted = finetune.fit_head(net.head, train, val)
    loss, acc = stage.evaluate(net, batches[2:], nn.CrossEntropyLoss(), cpu, meta)
    assert fitted["val_loss"] == pytest.approx(loss, rel=1e-4)
    assert fitted["val_acc"] == pytest.approx(acc)


def test_gradients_are_clipped_when_fine_tuning_unless_set_otherwise():
    assert stage.gradient_clip("auto", pretrained=True) == finetune.FINE_TUNE_CLIP
    assert stage.gradient_clip("auto", pretrained=False) is None  # from scratch: as before
    assert stage.gradient_clip(None, pretrained=True) is None
    assert stage.gradient_clip(5.0, pretrained=False) == 5.0


def test_frozen_batch_norm_keeps_its_statistics_while_the_rest_trains():
    model = torchvision.models.resnet18(num_classes=3)
    before = model.bn1.running_mean.clone()
    finetune.train_mode(model, freeze_bn=True)
    assert model.training and not model.bn1.training and model.layer1[0].conv1.training
    model(torch.randn(4, 3, 32, 32))
    assert torch.equal(model.bn1.running_mean, before)
    finetune.train_mode(model, freeze_bn=False)
    model(torch.randn(4, 3, 32, 32))
    assert not torch.equal(model.bn1.running_mean, before)


def test_pretrained_weights_train_at_backbone_lr_and_the_head_at_lr():
    model = SmallCNN(3)
    groups = stage.param_groups(model, model.head, 0.1, Train(backbone_lr=0.25), True)
    assert [g["lr"] for g in groups] == [0.025, 0.1]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.head.parameters()}
    frozen = stage.param_groups(model, model.head, 0.1, Train(backbone_lr=0), True)
    assert len(frozen) == 1 and not model.features[0][0].weight.requires_grad
    fitted = stage.param_groups(model, model.head, 0.1, Train(backbone_lr=0.25), True, True)
    assert [g["lr"] for g in fitted] == [0.025, 0.025]  # a fitted head takes small steps too
    scratch = stage.param_groups(SmallCNN(3), None, 0.1, Train(), False)
    assert [g["lr"] for g in scratch] == [0.1]


def test_fine_tuning_starts_from_a_fitted_head_kept_as_epoch_0(clone_built):
    repo = clone_built()
    # Weights of an earlier model of ten digits, for a tree of eight: a new head for 8 classes.
    shutil.copy(repo / "models/model.pt", repo / "weights/digits.pt")
    for gone in ("eight", "nine"):
        shutil.rmtree(repo / "data/raw" / gone)
    set_params(repo, train={"pretrained": "weights/digits.pt", "epochs": 2})
    out = dvc(repo, "repro").stdout
    assert "is outside weights/" not in out
    assert ("fine-tuning after fitting the head (backbone lr x0.02, batch norm frozen), "
            "gradient norm clipped at 1;") in out
    assert "epoch   0     the new head on frozen features (L2 " in out
    epochs = pd.read_csv(repo / "metrics/epochs.csv")
    assert epochs["epoch"].tolist() == [0, 1, 2]
    probe = epochs.iloc[0]
    assert probe["val_acc"] > 0.5  # features learnt on digits separate digits
    best = json.loads((repo / "metrics/train.json").read_text())
    assert best["epochs"] == 2 and best["val_loss"] == epochs["val_loss"].min()
    assert best["val_loss"] <= probe["val_loss"]  # fine-tuning kept only if it does better
    from mlflow import MlflowClient

    run = next(r for r in mlflow_runs(repo) if r.data.tags.get("imgpipe.stage") == "train")
    history = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").get_metric_history(
        run.info.run_id, "val_loss")
    assert sorted(m.step for m in history) == [0, 1, 2]

    # Another file behind the same name retrains: weights/ is a dependency of the stage.
    state = torch.load(repo / "weights/digits.pt", weights_only=True)
    state["state_dict"]["head.bias"] += 1
    torch.save(state, repo / "weights/digits.pt")
    status = dvc(repo, "status", "train").stdout
    assert "modified:           weights" in status


def test_epochs_0_keeps_the_fitted_head_alone(clone_built):
    repo = clone_built()
    shutil.copy(repo / "models/model.pt", repo / "weights/digits.pt")
    for gone in ("eight", "nine"):  # eight classes: the file's head of ten is left out
        shutil.rmtree(repo / "data/raw" / gone)
    set_params(repo, train={"pretrained": "weights/digits.pt", "epochs": 0})
    out = dvc(repo, "repro").stdout
    assert "0 epochs, " in out and "only the new head, fitted on frozen features" in out
    epochs = pd.read_csv(repo / "metrics/epochs.csv")
    assert epochs["epoch"].tolist() == [0]
    best = json.loads((repo / "metrics/train.json").read_text())
    assert best == {"best_epoch": 0, "epochs": 0,
                    "val_loss": pytest.approx(epochs["val_loss"][0]),
                    "val_acc": pytest.approx(epochs["val_acc"][0])}
    assert best["val_acc"] > 0.5  # the probe, written as the model and scored by evaluate
    assert json.loads((repo / "metrics/eval.json").read_text())["accuracy"] > 0.5

    # A file that fits every layer leaves no new head to fit: one line, before any work.
    shutil.copy(repo / "models/model.pt", repo / "weights/eight.pt")
    set_params(repo, train={"pretrained": "weights/eight.pt", "epochs": 0})
    line = one_line_error(run(["python", "-m", "stages.train"], repo, check=False))
    assert line == ("error: train.epochs is 0, which keeps only a new head fitted on pretrained "
                    "features, but weights/eight.pt leaves no new linear head on smallcnn to "
                    "fit: set train.epochs to 1 or more")


def test_a_local_file_outside_weights_is_named(clone_built):
    repo = clone_built()
    shutil.copy(repo / "models/model.pt", repo / "elsewhere.pt")
    set_params(repo, train={"pretrained": "elsewhere.pt", "epochs": 1})
    out = dvc(repo, "repro", "train").stdout
    assert ("note: train.pretrained elsewhere.pt is outside weights/, which the train stage "
            "depends on: DVC will not retrain when that file is replaced") in out


def test_ddp_fits_the_head_once_and_every_process_fine_tunes_from_it(clone_built):
    """train.gpus: 2 on the CPU (gloo): rank 0 fits the head before DDP wraps the net, the
    epoch-0 row reaches every process, and the run ends as one model with epochs 0, 1, 2."""
    repo = clone_built()
    shutil.copy(repo / "models/model.pt", repo / "weights/digits.pt")
    for gone in ("eight", "nine"):
        shutil.rmtree(repo / "data/raw" / gone)
    set_params(repo, train={"pretrained": "weights/digits.pt", "epochs": 2, "gpus": 2})
    out = dvc(repo, "repro").stdout
    assert "x 2 processes" in out
    assert out.count("epoch   0     the new head on frozen features") == 1  # rank 0 only
    assert out.count("note: loaded 30 of 32 tensors") == 1  # said once, not once a process
    epochs = pd.read_csv(repo / "metrics/epochs.csv")
    assert epochs["epoch"].tolist() == [0, 1, 2]
    assert epochs.iloc[0]["val_acc"] > 0.5
    best = json.loads((repo / "metrics/train.json").read_text())
    assert best["val_loss"] == epochs["val_loss"].min()
