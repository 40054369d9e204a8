"""``python -m avglab stage=bench``: side-by-side speed of HF LLaVA-NeXT and avglab on the same weights."""
