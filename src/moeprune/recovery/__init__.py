"""Recovery after pruning (router-only KD, expert merging)."""
