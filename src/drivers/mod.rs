//! Block drivers: protocols (`file`, `null-co`), formats (`raw`).
