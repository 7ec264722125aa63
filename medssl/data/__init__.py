"""Data I/O: readers, de-identification, shards, and the synthetic demo corpus."""
