"""The embedded glance/gaze VQA set (``data=synth``): config, scene, generator."""
