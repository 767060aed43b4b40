"""Real servers and helpers the tests start on loopback (S3, Hugging Face Hub, counting proxy)."""
