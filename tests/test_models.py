import pytest
import torch

from kdray.models import MODELS, ModelInfo, build_model, parameter_count

# Parameter counts with a 10-class head, as published for these CIFAR networks (He et al. 2016:
# resnet20 0.27M, resnet56 0.85M, resnet110 1.7M; Zagoruyko & Komodakis 2016: WRN-28-10 36.5M).
PUBLISHED_MILLIONS = {"resnet20": 0.27, "resnet56": 0.85, "resnet110": 1.7, "wrn_28_10": 36.5, "wrn_40_2": 2.2}


def calibrated(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """``model`` in eval mode with BatchNorm statistics of ``images`` (as after training): a freshly built deep
    network in eval mode (running variance 1) shrinks its signal to ~1e-9 logits, which compare equal."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one pass sets the statistics of that batch
    model.train()
    with torch.no_grad():
        model(images)
    return model.eval()


@pytest.mark.integration
@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_runs_on_cifar_and_digits_shapes(name: str) -> None:
    torch.manual_seed(0)
    cifar = calibrated(build_model(name, ModelInfo(100, 3, 32)), torch.randn(16, 3, 32, 32))
    images = torch.randn(2, 3, 32, 32)
    logits, stages = cifar(images, features=True)
    assert logits.shape == (2, 100)
    assert list(stages) == cifar.stage_names and len(stages) >= 2
    # the pass that keeps the features gives a plain call's logits, and every stage can be resumed from
    assert torch.allclose(cifar(images), logits, atol=1e-6)
    assert not torch.allclose(cifar(torch.randn(2, 3, 32, 32)), logits)  # and the logits depend on the input
    for stage, hidden in stages.items():
        assert torch.allclose(cifar.forward_from(stage, hidden), logits, atol=1e-5)
    digits = build_model(name, ModelInfo(num_classes=10, in_channels=1, image_size=8)).eval()
    assert digits(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_stage_shapes_of_resnet8() -> None:
    model = build_model("resnet8", ModelInfo(num_classes=10)).eval()
    _, stages = model(torch.zeros(1, 3, 32, 32), features=True)
    assert {k: tuple(v.shape[1:]) for k, v in stages.items()} == {
        "stem": (16, 32, 32),
        "layer1": (16, 32, 32),
        "layer2": (32, 16, 16),
        "layer3": (64, 8, 8),
    }
    assert model.classifier.weight.shape == (10, 64)


@pytest.mark.parametrize(("name", "millions"), PUBLISHED_MILLIONS.items())
def test_parameter_counts_match_the_papers(name: str, millions: float) -> None:
    assert parameter_count(build_model(name, ModelInfo(num_classes=10))) / 1e6 == pytest.approx(millions, rel=0.03)


def test_x4_variants_are_wider() -> None:
    narrow = build_model("resnet8", ModelInfo(num_classes=100))
    wide = build_model("resnet8x4", ModelInfo(num_classes=100))
    assert wide.classifier.in_features == 256 and narrow.classifier.in_features == 64


def test_too_small_input_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 8x8"):
        build_model("resnet8", ModelInfo(num_classes=10, image_size=4))


def test_same_seed_same_initial_weights() -> None:
    torch.manual_seed(5)
    a = build_model("wrn_16_1", ModelInfo(num_classes=10))
    torch.manual_seed(5)
    b = build_model("wrn_16_1", ModelInfo(num_classes=10))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
