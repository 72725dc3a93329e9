"""Sentiment pipeline: recurrent text classifier on IMDB, SST or a user CSV, exported to TFLite."""
