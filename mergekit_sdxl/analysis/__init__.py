"""Reports on checkpoints: the `inspect` report (from the header, optionally hashes and values) and the per-block
difference of two checkpoints (`diff`). Reads through `io`, knows the architecture through `arch`; no printing."""
