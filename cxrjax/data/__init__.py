"""Data: sources, the imbalance protocol, rebalancing and Grain pipelines."""
