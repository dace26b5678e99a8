"""The recipe behind the shipped `shapes` checkpoint still learns (a short run, far above chance)."""
import pytest
import torch

import cliplab
from cliplab.classifier import ZeroShotClassifier
from cliplab.shapes100 import SHAPES100_CLASSES, SHAPES100_TEMPLATES
from cliplab.study.pretraining import ShapesCLIPConfig, caption_loss, train_shapes_clip


def test_caption_loss_treats_same_class_captions_as_positives():
    emb = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    labels = torch.tensor([0, 0, 1, 2])
    perfect = caption_loss(emb, emb, labels, torch.tensor(1.0))
    shuffled = caption_loss(emb, emb.roll(1, 0), labels, torch.tensor(1.0))
    assert perfect < shuffled
    # two images of class 0: each caption of class 0 is an equally right answer for both
    duplicated = torch.cat([emb[:1], emb[:1], emb[2:]])
    assert caption_loss(duplicated, duplicated, labels, torch.tensor(100.0)) < 0.75  # ~ log 2 at most


@pytest.mark.slow
def test_short_training_run_learns_colours_and_beats_chance():
    model = train_shapes_clip(ShapesCLIPConfig(steps=80, batch_size=64, warmup=10, lr=2e-3, train_images=4000,
                                               progress=False))
    import open_clip

    classifier = ZeroShotClassifier(model, open_clip.get_tokenizer("cliplab-shapes-tiny"), SHAPES100_CLASSES,
                                    SHAPES100_TEMPLATES).eval()
    x, y, _ = cliplab.load_dataset("shapes", n=500)
    prediction = cliplab.predict(classifier, x)
    colour_accuracy = (prediction // 10 == y // 10).float().mean().item()
    accuracy = (prediction == y).float().mean().item()
    assert colour_accuracy > 0.5, colour_accuracy  # chance: 0.1
    assert accuracy > 0.05, accuracy  # chance: 0.01
