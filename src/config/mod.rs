//! Parsing of `--blockdev` / `--export` / `--config` (dotted key=value and JSON).
