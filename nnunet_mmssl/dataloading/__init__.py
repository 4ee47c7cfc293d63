"""dataloading."""
