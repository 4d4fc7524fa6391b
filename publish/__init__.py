"""Publishing a trained Tiny Audio checkpoint to the Hugging Face Hub (`python -m publish.push`)."""
