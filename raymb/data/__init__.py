"""Preparing datasets: images and text into parquet shards, their manifest, tokenizers, and
seeded synthetic sets in the same layout."""
