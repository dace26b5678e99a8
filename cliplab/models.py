"""Loading CLIP classifiers: by profile name, or any open_clip model with a tag, a checkpoint or no weights.

Weight files are resolved before open_clip is called, so that a missing file fails in seconds with a
message saying what to download and where to put it, instead of minutes of download retries.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import data
from ._arguments import check_choice
from ._io import save_tensors
from ._network import ensure_reachable
from ._torch import PRECISIONS
from .classifier import ZeroShotClassifier
from .shapes_clip import MODEL_NAME as SHAPES_MODEL, WEIGHTS as SHAPES_WEIGHTS, register_model_configs

# profile -> (open_clip model name, default weights, data set whose class names and prompts it uses)
PROFILE_MODELS = {
    "shapes": (SHAPES_MODEL, str(SHAPES_WEIGHTS), "shapes"),
    "cifar100": ("ViT-B-32", "openai", "cifar100"),
}
HUB_PREFIX = "hf-hub:"  # open_clip's prefix of a model on the Hugging Face hub (config and weights)
HUB_FILES = ("open_clip_config.json", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
_DEFAULT = object()  # "the profile's own weights"; for a bare model name, weights must be chosen explicitly


def own_weights_if_unset(pretrained: str | os.PathLike | None):
    """``pretrained=`` for ``load_classifier``, ``check_weights`` and ``weights_file`` from a setting where None
    means "not set": the model's own weights, not the random initialisation that ``pretrained=None`` asks for."""
    return _DEFAULT if pretrained is None else pretrained


def load_classifier(name: str = "shapes", *, pretrained=_DEFAULT, class_names: Sequence[str] | None = None,
                    templates: Sequence[str] | None = None, device: str | torch.device | None = None,
                    precision: str = "auto", text_head: torch.Tensor | None = None) -> ZeroShotClassifier:
    """Build a zero-shot classifier.

    Args:
        name: a profile (``"shapes"``, ``"cifar100"``), any open_clip model name (``"ViT-B-32"``), or a model on
            the Hugging Face hub as open_clip names it (``"hf-hub:chs20/fare2-clip"``: its config and weights,
            from the local hub cache when there is no network or ``HF_HUB_OFFLINE=1``).
        pretrained: an open_clip pretrained tag (``"openai"``), a local checkpoint path (.safetensors,
            .pt, .bin), or None for random initialisation (tests, benchmarks). Defaults to the profile's
            weights; must be given for a bare model name, and not for a hub model.
        class_names: readable class names; default: the profile's data set (CIFAR-100 for model names).
        templates: prompt templates with one ``{}``; default: the data set's templates.
        device: where to put the model; default CUDA when available, else CPU.
        precision: ``"auto"`` (bf16 autocast where the device computes bf16 natively: CUDA from Ampere on, CPUs
            with AVX512-BF16 or AMX; fp32 elsewhere), ``"bf16"`` or ``"fp32"``
            (see ``ZeroShotClassifier``).
        text_head: the class embeddings computed earlier for these class names and templates (skips the text
            encoder).

    Returns:
        A ``ZeroShotClassifier`` in eval mode, every parameter and buffer on ``device``.

    Raises:
        ValueError: unknown profile or model name, an unknown pretrained tag, or a checkpoint file that is
            truncated or holds another architecture.
        FileNotFoundError: weights neither on disk nor downloadable (fails within seconds).
    """
    import open_clip

    check_choice(precision, "precision", PRECISIONS)
    model_name, pretrained, dataset, options = _resolve(name, pretrained)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _create_model(model_name, pretrained, device, options)
    classifier = ZeroShotClassifier(
        model, open_clip.get_tokenizer(model_name),
        class_names if class_names is not None else data.class_names(dataset),
        templates if templates is not None else data.templates(dataset),
        precision=precision, text_head=text_head,
    )
    return classifier.eval()


def check_weights(name: str = "shapes", *, pretrained=_DEFAULT) -> torch.nn.Module:
    """Fail fast, before any heavy work, when ``load_classifier(name, pretrained=...)`` could not load.

    Resolves the weights exactly as ``load_classifier`` does (a tag from the cache, else a download if the
    host answers; a local file) and loads them into the architecture built on the ``meta`` device, so a
    missing, truncated or wrong-architecture file is reported in seconds, without building the text head.

    Returns:
        The open_clip model on the ``meta`` device: its shapes, no memory, for checks that need them.

    Raises:
        ValueError, FileNotFoundError: as ``load_classifier``.
    """
    model_name, pretrained, _, options = _resolve(name, pretrained)
    with warnings.catch_warnings():  # loading into meta tensors is a no-op copy, which torch warns about
        warnings.simplefilter("ignore", UserWarning)
        return _create_model(model_name, pretrained, torch.device("meta"), options)


def weights_file(name: str = "shapes", *, pretrained=_DEFAULT) -> Path | None:
    """The file ``load_classifier(name, pretrained=...)`` reads its weights from: a local checkpoint, a tag's or a hub
    model's file in the local cache (fetched if the host answers), the shipped shapes weights; None for random
    initialisation (``pretrained=None``). What a result computed from the weights is keyed by (``_io.file_digest``)."""
    model_name, pretrained, _, _ = _resolve(name, pretrained)
    if name.startswith(HUB_PREFIX):
        from huggingface_hub import try_to_load_from_cache

        cached = [try_to_load_from_cache(name[len(HUB_PREFIX):], file) for file in HUB_FILES[1]]
        return next((Path(file) for file in cached if isinstance(file, str)), None)
    if pretrained is None:
        return None
    import open_clip

    tag = open_clip.get_pretrained_cfg(model_name, str(pretrained))
    return Path(_cached_weights(model_name, str(pretrained), tag)) if tag else Path(pretrained)


def _resolve(name: str, pretrained) -> tuple[str, str | os.PathLike | None, str, dict]:
    """(open_clip model name, weights, data set of its class names, create_model options) for a profile or
    model name. A profile's architecture is that of its own weights, whatever is loaded into it: OpenAI's
    CLIP uses QuickGELU, so the cifar100 profile builds it for a local copy of those weights, or none, too."""
    import open_clip

    register_model_configs()
    if name.startswith(HUB_PREFIX):
        if pretrained not in (_DEFAULT, None):
            raise ValueError(f"pretrained must not be given for a hub model ({name} holds its own weights), "
                             f"got {pretrained!r}")
        _check_hub_model(name)
        return name, None, "cifar100", {}
    if name in PROFILE_MODELS:
        model_name, default_weights, dataset = PROFILE_MODELS[name]
        pretrained = default_weights if pretrained is _DEFAULT else pretrained
        options = _tag_options(model_name, default_weights)
    elif name in open_clip.list_models():
        model_name, dataset, options = name, "cifar100", {}
        if pretrained is _DEFAULT:
            raise ValueError(f"pretrained must be given for model {name!r}: a tag "
                             f"({', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none known'}), "
                             "a checkpoint path, or None for random initialisation")
    else:
        raise ValueError(f"name must be a profile ({', '.join(PROFILE_MODELS)}), an open_clip model name (see "
                         f"open_clip.list_models()) or {HUB_PREFIX}ORG/REPO, got {name!r}")
    return model_name, pretrained, dataset, options


def _tag_options(model_name: str, tag_name: str) -> dict:
    """The create_model options a pretrained tag implies (activation, normalisation); none for a file."""
    import open_clip

    tag = open_clip.get_pretrained_cfg(model_name, tag_name)
    preprocess = {k: tag[k] for k in ("mean", "std") if k in tag}
    return {"force_quick_gelu": tag.get("quick_gelu", False), "force_preprocess_cfg": preprocess or None}


def _create_model(model_name: str, pretrained: str | os.PathLike | None, device: torch.device,
                  options: dict) -> nn.Module:
    import open_clip

    if pretrained is None and model_name.startswith(HUB_PREFIX):
        try:
            return open_clip.create_model(model_name, device=device, **options)
        except Exception as error:  # a truncated or foreign file in the hub cache: name it, not a loader trace
            reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise ValueError(f"the hub model {model_name} cannot be loaded from its cached weights "
                             f"{weights_file(model_name)}: they are truncated, corrupted or hold another "
                             f"architecture ({type(error).__name__}: {reason}); delete them to fetch them again"
                             ) from None
    if pretrained is None:
        return open_clip.create_model(model_name, device=device, **options)
    pretrained = str(pretrained)
    tag = open_clip.get_pretrained_cfg(model_name, pretrained)
    if tag:  # open_clip would reconfigure from the tag; with the file we pass what the tag implies
        return open_clip.create_model(model_name, pretrained=_cached_weights(model_name, pretrained, tag),
                                      device=device, **_tag_options(model_name, pretrained))
    if not Path(pretrained).is_file():
        looks_like_path = os.sep in pretrained or Path(pretrained).suffix
        raise FileNotFoundError(f"pretrained checkpoint file not found: {pretrained}") if looks_like_path else \
            ValueError(f"pretrained must be a tag of {model_name!r} "
                       f"({', '.join(open_clip.list_pretrained_tags_by_model(model_name)) or 'none known'}), "
                       f"a checkpoint path or None, got {pretrained!r}")
    try:
        return open_clip.create_model(model_name, pretrained=pretrained, device=device, **options).float()
    except Exception as error:  # a truncated or foreign file: name it and say why, not a deep loader trace
        if "weights_only" in str(error):  # torch refused to unpickle objects: not damage, and not to be retried
            raise ValueError(f"pretrained checkpoint {pretrained} holds pickled Python objects besides tensors, which "
                             "cliplab does not unpickle (unpickling can run code): save the model's state dict as "
                             ".safetensors (or a plain tensor state dict) and load that") from None
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise ValueError(f"pretrained checkpoint {pretrained} cannot be loaded into {model_name}: it is truncated, "
                         f"corrupted or holds another architecture ({type(error).__name__}: {reason})") from error


def _check_hub_model(name: str) -> None:
    """A hub model's config and weights must be in the local hub cache, or the hub must answer (within seconds)."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo_id = name[len(HUB_PREFIX):]
    config, weights = HUB_FILES
    cached = isinstance(try_to_load_from_cache(repo_id, config), str) and any(
        isinstance(try_to_load_from_cache(repo_id, file), str) for file in weights)
    if not cached:
        ensure_reachable(constants.ENDPOINT, what=f"the model {name} (looked in the Hugging Face cache, "
                                                  f"{constants.HF_HUB_CACHE})",
                         how=f"load it once on a machine with internet (cliplab.load_classifier({name!r})) and copy "
                             "the cache (HF_HOME) here, or set HF_HOME to a copy of it")


def _cached_weights(model_name: str, tag_name: str, tag: dict) -> str:
    """Path of a pretrained tag's weights: from the local cache, else downloaded (if the host answers)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from open_clip.pretrained import download_pretrained

    repo = tag.get("hf_hub", "")
    if repo:
        repo_id, filename = os.path.split(repo)
        for candidate in ([filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
            cached = try_to_load_from_cache(repo_id, candidate)
            if isinstance(cached, str):
                return cached
        source, where = constants.ENDPOINT, f"the Hugging Face cache ({constants.HF_HUB_CACHE}), repo {repo_id}"
    else:
        cached = Path.home() / ".cache" / "clip" / os.path.basename(tag["url"])
        if cached.is_file():
            return str(cached)
        source, where = tag["url"], str(cached)
    ensure_reachable(
        source, what=f"the weights of {model_name} {tag_name!r} (looked in {where})",
        how=f"run `cliplab.load_classifier({model_name!r}, pretrained={tag_name!r})` once on a machine with "
            "internet and copy the cache (HF_HOME) here, or pass pretrained='/path/to/checkpoint' "
            "(.safetensors/.pt) to load a local file",
    )
    return download_pretrained(tag)


def save_weights(model: nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Save a model's weights as safetensors, atomically (a crash never leaves half a file).

    A ``ZeroShotClassifier`` saves its open_clip model, so the file loads back through
    ``load_classifier(model_name, pretrained=path)``. ``dtype`` (e.g. ``torch.float16``) converts
    floating-point tensors to halve the file; loading casts them back to the model's precision.
    """
    model = model.model if isinstance(model, ZeroShotClassifier) else model
    save_tensors(model.state_dict(), path, dtype)
