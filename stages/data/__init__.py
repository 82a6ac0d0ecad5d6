"""Data sources and views: image datasets with stable ids, the recorded view plan, and replaying it in batches."""
