"""The study layer: what the notebooks and the command line do with the kernels, for a profile.

- ``profiles``: the two profiles (``shapes``, ``cifar100``), their settings and how they reach a notebook's kernel;
- ``finetuning``: 05 and 06's shared setup (``FinetuneStudy``), the cache of fine-tuned encoders, and
  ``finetune_and_evaluate`` (``cliplab finetune``);
- ``shared``: the worst-case evaluations the notebooks of one run share (05 and 06 evaluate two models alike);
- ``measures``: the seeded targets of the targeted attacks, 03's certified accuracy, 06's neuron geometry and
  trainable parameters;
- ``conclusions``: what each notebook's results say, written from them (judgements by disjoint 95% intervals);
- ``pretraining``: the recipe that trained the shapes profile's tiny CLIP (``cliplab train-shapes-clip``);
- ``report``: ``cliplab evaluate``'s worst-case report card;
- ``plots``: the notebooks' figures.

Every number a notebook prints comes from a function here or below, each tested.
"""
from .finetuning import (FinetuneStudy, export_weights, finetune_and_evaluate, load_encoder, load_or_finetune,
                         save_encoder)
from .measures import ADAPTED_WEIGHTS, certified_accuracy, geometry_change, neuron_geometry, random_targets
from .profiles import Profile, get_profile

__all__ = ["ADAPTED_WEIGHTS", "FinetuneStudy", "Profile", "certified_accuracy", "export_weights",
           "finetune_and_evaluate", "geometry_change", "get_profile", "load_encoder", "load_or_finetune",
           "neuron_geometry", "random_targets", "save_encoder"]
