"""Settings that keep the POPE / CHAIR protocol commands quick on a tiny model."""

QUICK = ["--limit", "4", "--max-new-tokens", "3", "--system-prompt", "", "--device", "cpu"]
