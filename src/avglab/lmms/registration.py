"""Entry point lmms-eval loads from the ``lmms_eval.models`` group (pyproject ``[project.entry-points]``).

lmms-eval (>= 0.6, ``lmms_eval/models/registry_v2.py``) calls every entry point of that group and
accepts a ``ModelManifest`` or a callable returning one; the class itself is imported only when
``--model avglab`` is asked for, so avglab imports nothing from lmms-eval at install time.
"""

from __future__ import annotations

MODEL_ID = "avglab"
CLASS_PATH = "avglab.lmms.model.AvgLabLMM"


def manifest():
    """The ``ModelManifest`` registering ``avglab`` as a simple (non-chat) lmms-eval model."""
    from lmms_eval.models.registry_v2 import ModelManifest  # only called by lmms-eval itself

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
