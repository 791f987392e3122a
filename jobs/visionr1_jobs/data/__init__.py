"""The pipeline's data layer: one sample record, its parquet storage, and readers of public formats."""
