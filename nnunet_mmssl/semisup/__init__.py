"""semisup."""
