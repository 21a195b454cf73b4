"""synfer.testing, the plugin-author harness: it passes good stages and names what a bad one breaks."""
import types

import numpy as np
import pytest

from synfer import hookimpl
from synfer.stages import Expert, GuidanceClassifier, StageConfig
from synfer.testing import check_stage, plugin_registry, sample_images

torch = pytest.importorskip("torch")


class GoodExpert(Expert):
    name = "t-good"
    label_space = "fer2013"

    def predict(self, images):
        x = np.array([np.asarray(im, dtype=np.float64).mean(axis=(0, 1)) for im in images])  # (N, 3) colour means
        logits = np.concatenate([x, x[:, :2], x[:, :2]], 1) / 50
        e = np.exp(logits - logits.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)


class LogitsExpert(GoodExpert):
    name = "t-logits"

    def predict(self, images):
        return np.log(super().predict(images))


class WrongWidthExpert(GoodExpert):
    name = "t-width"
    label_space = "affectnet8"  # says 8 classes, returns 7


class GoodGuidance(GuidanceClassifier):
    name = "t-guide"
    label_space = "affectnet8"

    class Config(StageConfig):
        detach: bool = False

    def forward(self, images):
        w = torch.linspace(-1, 1, 8)
        out = images.mean(dim=(1, 2, 3))[:, None] * w[None] * 4
        return out.detach() if self.config.detach else out


def module_with(*classes):
    m = types.ModuleType("synfer_harness_test")

    @hookimpl
    def register_stages(register):
        for c in classes:
            register(c)

    m.register_stages = register_stages
    return m


def test_good_stages_pass_and_the_registry_holds_only_them():
    reg = plugin_registry(module_with(GoodExpert, GoodGuidance))
    assert reg.names("expert") == ["t-good"] and reg.names("guidance_classifier") == ["t-guide"]
    check_stage(reg.build("expert", {"plugin": "t-good"}))
    check_stage(reg.build("guidance_classifier", {"plugin": "t-guide"}))


def test_logits_from_an_expert_are_caught():
    with pytest.raises(AssertionError, match="probabilities .* not logits"):
        check_stage(LogitsExpert())


def test_a_wrong_number_of_classes_is_caught():
    with pytest.raises(AssertionError, match=r"shape \(5, 7\); expected \(5, 8\) for label space affectnet8"):
        check_stage(WrongWidthExpert())


def test_a_guidance_classifier_without_gradient_is_caught():
    with pytest.raises(AssertionError, match="no gradient"):
        check_stage(GoodGuidance(GoodGuidance.Config(detach=True)))


class EditingExpert(GoodExpert):
    name = "t-edit"

    def predict(self, images):
        for im in images:
            im.paste((0, 0, 0), (0, 0, 4, 4))  # blacks out a corner in place
        return super().predict(images)


def test_an_expert_that_edits_its_images_is_caught():
    with pytest.raises(AssertionError, match=r"^t-edit: predict changed the images it was given; copy one"):
        check_stage(EditingExpert())


def test_sample_images_are_seeded():
    a, b = sample_images(2, size=16, seed=3), sample_images(2, size=16, seed=3)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert a[0].size == (16, 16) and not np.array_equal(np.asarray(a[0]), np.asarray(sample_images(1, 16, seed=4)[0]))
