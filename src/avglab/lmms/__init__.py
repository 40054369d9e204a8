"""lmms-eval plugin: ``--model avglab`` through the ``lmms_eval.models`` entry point (see registration)."""
