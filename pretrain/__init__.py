"""Stage 1: self-supervised pretraining (SimCLR, MAE) from WebDataset shards."""
