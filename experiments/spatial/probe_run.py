"""``python -m avglab`` with an initialisation the configs cannot express, for the study's probe runs only.

``AVGLAB_PROBE_POS=sincos:<amplitude>`` replaces the random vision position embeddings of a freshly built
tiny model by fixed-formula 2D sine-cosine ones (MAE's, times the amplitude; CLS gets zeros; amplitude 1
is ``model.vision_position_init=sincos``, which the configs can express);
``AVGLAB_PROBE_POS=normal:<std>`` draws them with that standard deviation instead of CLIP's 0.02.
Stage outputs load over it, so only a stage that starts from random weights (stage 1) is changed.
``AVGLAB_PROBE_FREEZE_POS=1`` keeps the tower's position table out of training (any init).

    AVGLAB_PROBE_POS=sincos:0.5 python experiments/spatial/probe_run.py stage=pretrain ...
"""

import os

import torch

import avglab.stages.base as stage_base
import avglab.training.build as build
from avglab.core.position_codes import init_vision_positions


def patched(*args, **kwargs):
    """The tiny builder, then the probe's position embeddings."""
    model = original(*args, **kwargs)
    kind, value = os.environ["AVGLAB_PROBE_POS"].split(":")
    tower = model.model.vision_tower
    emb = getattr(tower, "vision_model", tower).embeddings.position_embedding.weight
    with torch.no_grad():
        if kind == "sincos":
            init_vision_positions(tower, "sincos")
            emb.mul_(float(value))
        elif kind == "normal":
            emb.normal_(0.0, float(value))
        else:
            raise ValueError(f"AVGLAB_PROBE_POS={kind}:{value}: sincos:<amplitude> or normal:<std>")
    return model


def trained_without_positions(core, part):
    """The part's parameters, the vision tower's position table left out (and frozen)."""
    params = original_parts(core, part)
    if part != "vision":
        return params
    tower = core.llava.model.vision_tower
    table = getattr(tower, "vision_model", tower).embeddings.position_embedding.weight
    table.requires_grad_(False)
    return [p for p in params if p is not table]


original = build.tiny_llava
if os.environ.get("AVGLAB_PROBE_POS"):
    build.tiny_llava = patched
original_parts = stage_base.part_parameters
if os.environ.get("AVGLAB_PROBE_FREEZE_POS"):
    stage_base.part_parameters = trained_without_positions

if __name__ == "__main__":
    from avglab.cli import main

    main()
