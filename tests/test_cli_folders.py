"""The commands on your own folders: ``learn-prior --dataset DIR`` writes a prior that
records its input (size, channels, normalisation), the prior fine-tunes on another
folder (grey images, given the prior's RGB input), and ``train``/``evaluate`` work on a
folder. Small images and a small network: the ResNet-50 run at 224² is in docs/data.md.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from image_folders import fashion_test_images, write_folder  # noqa: E402

from bayes_transfer.cli import main  # noqa: E402


def _digits_folder(root: Path) -> Path:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for split, rows in (("train", slice(0, 300)), ("val", slice(300, 400))):
        for i in np.arange(len(bunch.target))[rows]:
            d = root / split / f"digit{bunch.target[i]}"
            d.mkdir(parents=True, exist_ok=True)
            image = np.round(bunch.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(image).resize((14, 14)).save(d / f"{i}.png")   # grey
    return root


@pytest.fixture(scope="module")
def fashion_images():
    return fashion_test_images()


def test_learn_prior_on_a_folder_then_finetune_on_another(tmp_path, fashion_images, capsys):
    source = write_folder(tmp_path / "clothes", fashion_images, fmt="JPEG")
    target = _digits_folder(tmp_path / "digits")
    prior = tmp_path / "prior"
    common = ["--image-size", "16", "--workers", "0", "--batch-size", "12"]
    assert main(["learn-prior", "--dataset", str(source), "--arch", "small_cnn", "--epochs", "1",
                 "--swag-epochs", "1", "--every", "1", "--rank", "2", "--dtype", "bfloat16",
                 "--out", str(prior), *common]) == 0
    meta = json.loads((prior / "metadata.json").read_text())
    assert meta["source"]["input"] == {"size": 16, "channels": 3, "mean": [0.485, 0.456, 0.406],
                                       "std": [0.229, 0.224, 0.225]}
    assert meta["architecture"]["in_channels"] == 3
    assert meta["arrays"]["mean"]["dtype"] == "bfloat16"
    out = tmp_path / "finetune.json"
    assert main(["finetune", "--prior", str(prior), "--dataset", str(target), "--shots", "2",
                 "--epochs", "2", "--scale", "1", "--method", "lowrank", "--workers", "0",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["method"] == "lowrank" and 0 <= result["error"] <= 1
    model = tmp_path / "model"
    assert main(["train", "--dataset", str(source), "--arch", "small_cnn", "--epochs", "1",
                 "--out", str(model), *common]) == 0
    assert json.loads((model / "model.json").read_text())["input"]["size"] == 16
    capsys.readouterr()
    assert main(["evaluate", "--model", str(model), "--dataset", str(source),
                 "--workers", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"] == "test" and 0 <= report["error"] <= 1
