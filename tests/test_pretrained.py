"""The embedded default model on real photos: right classes, heat inside the labelled box."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from camcli.engine import Explainer, TargetSpec
from camcli.io import decode_image
from camcli.methods import parse_methods
from camcli.models import load_model, resolve_layer
from camcli.render import resize
from camcli.run.stages import preprocess


@pytest.fixture(scope="module")
def default_run(samples_dir, sample_labels) -> dict[str, Any]:
    loaded = load_model()
    layer = resolve_layer(loaded.model, "auto", loaded.input, torch.device("cpu"))
    names = sorted(sample_labels)
    images = [decode_image(samples_dir / name) for name in names]
    batch = torch.stack([preprocess(image, loaded.input) for image in images])
    result = Explainer(loaded.model, layer, parse_methods("gradcam")).explain(batch, TargetSpec())
    return {"names": names, "images": images, "result": result, "loaded": loaded}


def test_default_model_is_offline_pretrained_lite0() -> None:
    loaded = load_model()
    assert loaded.name == "efficientnet_lite0"
    assert loaded.input.size == 224 and loaded.input.mean == (0.5, 0.5, 0.5)
    assert loaded.input.interpolation == "bicubic"
    assert loaded.categories is not None and len(loaded.categories) == 1000


def test_top1_is_the_labelled_class(default_run, sample_labels) -> None:
    top1 = default_run["result"].logits.argmax(1).tolist()
    for name, predicted in zip(default_run["names"], top1, strict=True):
        assert predicted in sample_labels[name]["acceptable_classes"], (name, predicted)
    by_name = dict(zip(default_run["names"], top1, strict=True))
    assert default_run["loaded"].label(by_name["skimage_chelsea.png"]) in {"tabby", "tiger cat", "Egyptian cat"}
    assert by_name["skimage_coffee.png"] in {967, 968}  # espresso or cup


def test_gradcam_maximum_lies_in_the_labelled_box(default_run, sample_labels) -> None:
    explanation = default_run["result"].explanations[0]
    for i, name in enumerate(default_run["names"]):
        image = default_run["images"][i]
        heat = resize(explanation.maps[i].numpy(), image.shape[1], image.shape[0])
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        x0, y0, x1, y1 = sample_labels[name]["bbox"]
        assert x0 <= x <= x1 and y0 <= y <= y1, (name, (x, y), (x0, y0, x1, y1))
