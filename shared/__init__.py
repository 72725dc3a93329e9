"""Common layer of the rnn-pipelines suite: config, data, models, training, tuning and export."""

import os

# TensorFlow's C++ start-up chatter (CUDA probes, oneDNN notes) hides the pipeline's own logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
