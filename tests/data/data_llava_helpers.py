"""Builders of tiny LLaVA-format sources for the real-data tests (JSON records and an image folder).

They live in tests/userdata.py, beside the fuller user data set; this module keeps the old import path.
"""

from userdata import LLAVA_IMAGE_SIZES, llava_records, write_llava_source

__all__ = ["LLAVA_IMAGE_SIZES", "llava_records", "write_llava_source"]
