"""Offline kit: real pretrained weights and speech data for Tiny Audio without the Hugging Face Hub."""

# Weight dtypes the converters can store (names of torch dtypes); kept here so both converters share one list.
DTYPE_NAMES = ("float32", "float16", "bfloat16")
