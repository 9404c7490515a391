"""Meta-Dataset without TensorFlow: records and specs, conversion to Hub datasets, the official sampler."""
