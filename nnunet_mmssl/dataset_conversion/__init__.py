"""dataset_conversion."""
